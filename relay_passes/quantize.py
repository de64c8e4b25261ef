"""QuantizeGraph: the integer rules that turn calibrated layers into Program ops.

The frontend (waps_tvm/frontend.py) walks the artifact's layer graph and calls one
``ProgramBuilder`` method per node, so every layer is identified by its graph node (never
by position in another IR) and the integer program is emitted as Relax once:

    conv2d / linear [+ relu | relu6]          → conv2d / linear (requant α′, bias b, clamps)
    add(tensor, tensor) [+ relu]              → add (one rounding, common shift t)
    max_pool2d                                → max_pool2d on codes
    avg_pool2d / global_avg_pool              → sum_pool2d (int32 sums, 1/count folded
                                                into the consumer's requantization)
    flatten                                   → flatten
with quantize at the input and dequantize at the output. Integer parameters:
    α′_k = γ^z_k·s_w[k]·s_in / (s_out·2^L)  →  (M_k, shift_k) by quantize_multiplier
    b_k  = round((γ^z_k·β_k + φ^z_k)·2^L / (γ^z_k·s_w[k]·s_in))
    L    = fractional accumulator bits (``frac``, up to 16, as many as int32 allows)
    ReLU: lo = z_out;  ReLU6: hi = z_out + round(6/s_out)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from calib.errors import UnsupportedOpError, WapsError
from calib.numerics import INT32_MAX, quantize_multiplier
from relay_passes.program import INPUT, Op, Program, emit


FRAC_BITS = 16         # at most this many fractional accumulator bits (see _frac_bits)


class CompileError(WapsError):
    """The model cannot be lowered to the integer program (named layer, reason)."""


@dataclass
class TensorCodes:
    """real = scale·(code − zero_point), code ∈ [0, qmax]."""

    scale: float
    zero_point: int
    qmax: int

    @property
    def dtype(self) -> str:
        return "uint8" if self.qmax <= 255 else "int32"


@dataclass
class LayerQuant:
    kind: str                       # conv2d | linear
    label: str                      # where it sits in the user's model
    w_codes: np.ndarray             # int8 [m, c/groups, kh, kw] | [m, f]
    w_scale: np.ndarray             # float [m]
    bias: np.ndarray                # float [m] (BN folded)
    gamma_z: np.ndarray
    phi_z: np.ndarray
    groups: np.ndarray | None       # int8 group per input channel/feature, or None
    sigma: list[int] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    act: str | None = None
    out: TensorCodes | None = None


@dataclass
class AddQuant:
    label: str
    act: str | None
    out: TensorCodes


@dataclass
class Value:
    """A value of the program being built: the op that produces it and its codes."""

    name: str
    codes: TensorCodes


class ProgramBuilder:
    """Appends integer ops to a Program, one call per graph node, in graph order."""

    def __init__(self, input_shape: tuple[int, ...], codes: TensorCodes):
        self.input_shape = tuple(input_shape)
        self.ops: list[Op] = []
        self.input = self._new("quantize", "quantize", [INPUT], {"scale": codes.scale, "zero_point": codes.zero_point,
                                                                 "qmax": codes.qmax}, {}, codes)

    def finish(self, out: Value) -> Program:
        """The program returning (dequantized ``out``, its codes); shapes and dtypes filled in."""
        deq = self._new("dequantize", "dequantize", [out.name], {"scale": out.codes.scale,
                        "zero_point": out.codes.zero_point}, {}, None, dtype="float32")
        prog = Program(self.input_shape, self.ops, [deq.name, out.name])
        emit(prog)
        return prog

    def _new(self, kind, base, inputs, attrs, params, codes, dtype=None) -> Value:
        names = {o.name for o in self.ops}
        name, i = base, 1
        while name in names:
            name, i = f"{base}_{i}", i + 1
        self.ops.append(Op(kind, name, list(inputs), attrs, params, (), dtype or codes.dtype))
        return Value(name, codes)

    def _clamps(self, out: TensorCodes, act: str | None, label: str) -> tuple[int, int]:
        lo, hi = 0, out.qmax
        if act in ("relu", "relu6"):
            lo = out.zero_point
        if act == "relu6":
            hi = min(hi, out.zero_point + int(round(6.0 / out.scale)))
        return lo, hi

    def layer(self, ls: LayerQuant, x: Value, conv: dict) -> Value:
        """A conv2d (``conv``: stride, padding, dilation, conv_groups) or linear (``conv`` empty)."""
        xin = x.codes
        if ls.out is None or ls.out.qmax > 255:
            raise CompileError(f"{ls.label}: weight-only (float activation) artifacts cannot be compiled to an "
                               f"integer program; calibrate with --abits 8 or less")
        s_acc = ls.gamma_z.astype(np.float64) * ls.w_scale.astype(np.float64) * xin.scale
        if np.any(s_acc <= 0) or not np.all(np.isfinite(s_acc)):
            raise CompileError(f"{ls.label}: non-positive output scale γ^z·s_w (cannot requantize)")
        frac = self._frac_bits(ls, xin, (ls.gamma_z.astype(np.float64) * ls.bias + ls.phi_z) / s_acc)
        alpha = s_acc / ls.out.scale / 2.0**frac
        bias = np.round((ls.gamma_z.astype(np.float64) * ls.bias + ls.phi_z) / s_acc * 2.0**frac)
        if np.any(np.abs(bias) > INT32_MAX // 2):
            raise CompileError(f"{ls.label}: integer bias does not fit int32")
        mult, shift = quantize_multiplier(alpha)
        if np.any(shift < -30):
            raise CompileError(f"{ls.label}: requantization multiplier {alpha.max():.3g} too large")
        lo, hi = self._clamps(ls.out, ls.act, ls.label)
        attrs = dict(conv)
        attrs.update({"z_in": int(xin.zero_point), "z_out": int(ls.out.zero_point), "lo": lo, "hi": hi,
                      "in_qmax": int(xin.qmax), "layer": ls.label, "form": "reference", "frac": frac})
        params = {"w": ls.w_codes.astype(np.int8), "bias": bias.astype(np.int32),
                  "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        if ls.groups is not None:
            params["groups"] = ls.groups.astype(np.int8)
            attrs["sigma"], attrs["n"] = list(ls.sigma), list(ls.n)
        return self._new(ls.kind, _op_name(ls.label), [x.name], attrs, params, ls.out)

    @staticmethod
    def _frac_bits(ls: LayerQuant, xin: TensorCodes, bias_units: np.ndarray) -> int:
        """Fractional accumulator bits L: the largest L ≤ FRAC_BITS for which the layer's
        accumulator bound (all groups, γ ≤ 1.5, plus the bias in accumulator units) stays
        below 2^30 after scaling by 2^L. With L ≥ n_p the group shift is exact (γ_p applied
        without rounding) and the bias keeps L fractional bits. CheckOverflow re-proves it."""
        w = np.abs(ls.w_codes.astype(np.int64)).reshape(ls.w_codes.shape[0], -1).sum(1)
        span = max(xin.zero_point, xin.qmax - xin.zero_point, 1)
        need = float(np.max(w * span * 1.5 + np.abs(bias_units) + 1))
        frac = 0
        while frac < FRAC_BITS and need * 2.0 ** (frac + 1) < 2.0**30:
            frac += 1
        return frac

    def residual_add(self, ad: AddQuant, a: Value, b: Value) -> Value:
        if a.codes.qmax > 255 or b.codes.qmax > 255:
            raise UnsupportedOpError(f"{ad.label}: adding pooled (wide) tensors is not supported")
        ra, rb = a.codes.scale / ad.out.scale, b.codes.scale / ad.out.scale
        t = int(np.clip(30 - math.ceil(math.log2(max(ra, rb))), 1, 48))
        ka, kb = int(round(ra * 2.0**t)), int(round(rb * 2.0**t))
        lo, hi = self._clamps(ad.out, ad.act, ad.label)
        attrs = {"za": a.codes.zero_point, "zb": b.codes.zero_point, "ka": ka, "kb": kb, "t": t,
                 "z_out": ad.out.zero_point, "lo": lo, "hi": hi, "layer": ad.label}
        return self._new("add", _op_name(ad.label), [a.name, b.name], attrs, {}, ad.out)

    # ------------------------------------------------------------ pooling, layout
    def max_pool(self, t: Value, attrs: dict, label: str) -> Value:
        """``attrs``: kernel, stride, padding (symmetric [ph, pw])."""
        if t.codes.qmax > 255:
            raise UnsupportedOpError(f"max_pool2d of a pooled (wide) tensor at {label}")
        return self._new("max_pool2d", "max_pool", [t.name], dict(attrs), {}, t.codes)

    def sum_pool(self, t: Value, attrs: dict, label: str) -> Value:
        """Window sums (average pooling with the padding counted, 1/count folded downstream)."""
        c = t.codes
        count = attrs["kernel"][0] * attrs["kernel"][1]
        wide = TensorCodes(c.scale / count, c.zero_point * count, c.qmax * count)
        if wide.qmax > INT32_MAX:
            raise CompileError(f"pooling window of {count} at {label} overflows int32")
        return self._new("sum_pool2d", "sum_pool", [t.name], {**attrs, "z_in": int(c.zero_point)}, {}, wide,
                         dtype="int32")

    def flatten(self, t: Value) -> Value:
        return self._new("flatten", "flatten", [t.name], {}, {}, t.codes)


def _op_name(label: str) -> str:
    base = label.split(" (")[0]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "layer"
