"""QuantizeGraph: the integer rules that turn calibrated layers into Program ops.

The frontend (waps_tvm/frontend.py) walks the artifact's layer graph and calls one
``ProgramBuilder`` method per node, so every layer is identified by its graph node (never
by position in another IR) and the integer program is emitted as Relax once:

    conv2d / linear [+ relu | relu6]          → conv2d / linear (requant α′, bias b, clamps)
    add(tensor, tensor) [+ relu]              → add (one rounding, common shift t)
    max_pool2d                                → max_pool2d on codes
    upsample_nearest2d / upsample_bilinear2d  → resize (nearest: a gather of codes; bilinear:
                                                2^-10 weights, requantized to its own codes)
    avg_pool2d / global_avg_pool              → sum_pool2d (int32 sums, 1/count folded
                                                into the consumer's requantization)
    flatten                                   → flatten
    layer_norm                                → layer_norm (integer sums, exact root; numerics)
    matmul (attention, per head)              → matmul (int32 Σ of code products, requant of α·s_a·s_b)
    softmax (per head)                        → softmax (exp table, int64 sum, rounded quotient)
    constant (class token, position embedding) → constant (its codes, broadcast over the batch)
    reshape / crop (token layouts)            → reshape / crop (codes moved unchanged)
with quantize at the input and dequantize at the output. Integer parameters:
    α′_k = γ^z_k·s_w[k]·s_in / (s_out·2^L)  →  (M_k, shift_k) by quantize_multiplier
    b_k  = round((γ^z_k·β_k + φ^z_k)·2^L / (γ^z_k·s_w[k]·s_in))
    L    = fractional accumulator bits (``frac``, up to 16, as many as int32 allows)
    ReLU: lo = z_out;  ReLU6: hi = z_out + round(6/s_out)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from calib.errors import ConfigError, UnsupportedOpError, WapsError
from calib.numerics import (INT32_MAX, GroupScale, code_table, layer_norm_constants, quantize_multiplier,
                            softmax_constants)
from relay_passes.attrs import (AddAttrs, AvgPoolAttrs, ConcatAttrs, ConstantAttrs, CropAttrs, DequantizeAttrs,
                                FlattenAttrs, GatherAttrs, LayerNormAttrs, MatmulAttrs, MaxPoolAttrs, MulAttrs,
                                PadAttrs, QuantizeAttrs, ReshapeAttrs, SoftmaxAttrs, SumPoolAttrs, TableAttrs)
from relay_passes.opset import kind as op_kind
from relay_passes.program import INPUT, Op, Program, emit
from relay_passes.resize import resize_op


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
    scales: list[GroupScale] = field(default_factory=list)     # one per group (when ``groups``)
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
        self.input = self._new("quantize", "quantize", [INPUT], QuantizeAttrs(
            scale=codes.scale, zero_point=codes.zero_point, qmax=codes.qmax), {}, codes)

    def finish(self, outs: Value | list[Value]) -> Program:
        """The program returning (dequantized, codes) of each of ``outs`` in order (Program.results);
        shapes and dtypes filled in."""
        names = []
        for out in [outs] if isinstance(outs, Value) else outs:
            deq = self._new("dequantize", "dequantize", [out.name], DequantizeAttrs(
                scale=out.codes.scale, zero_point=out.codes.zero_point), {}, None, dtype="float32")
            names += [deq.name, out.name]
        prog = Program(self.input_shape, self.ops, names)
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
        params = {"w": ls.w_codes.astype(np.int8), "bias": bias.astype(np.int32),
                  "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        scales = ()
        if ls.groups is not None:
            params["groups"] = ls.groups.astype(np.int8)
            scales = tuple(ls.scales)
        attrs = op_kind(ls.kind).attrs(
            **conv, z_in=int(xin.zero_point), z_out=int(ls.out.zero_point), lo=lo, hi=hi, in_qmax=int(xin.qmax),
            layer=ls.label, frac=frac, group_scales=scales)
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

    def residual_add(self, ad: AddQuant, a: Value, b: Value, b_broadcast: bool = False) -> Value:
        """a + b with one rounding. ``b_broadcast``: b is a broadcast operand (one value per
        channel, per position or per sample, relay_passes/reference.py); it may then hold int32
        sums of a global pool (wide codes, its 1/count folded into kb). The caller puts the
        broadcast operand second (the add is commutative: operands swap with their scales)."""
        if a.codes.qmax > 255 or (b.codes.qmax > 255 and not b_broadcast):
            raise UnsupportedOpError(f"{ad.label}: adding pooled (wide) tensors is not supported")
        ra, rb = a.codes.scale / ad.out.scale, b.codes.scale / ad.out.scale
        t = int(np.clip(30 - math.ceil(math.log2(max(ra, rb))), 1, 48))
        ka, kb = int(round(ra * 2.0**t)), int(round(rb * 2.0**t))
        if a.codes.qmax * ka + b.codes.qmax * kb >= 1 << 62:     # the add runs in int64 on every backend
            raise CompileError(f"{ad.label}: residual add of pooled sums could overflow int64")
        lo, hi = self._clamps(ad.out, ad.act, ad.label)
        attrs = AddAttrs(za=a.codes.zero_point, zb=b.codes.zero_point, ka=ka, kb=kb, t=t, z_out=ad.out.zero_point,
                         lo=lo, hi=hi, layer=ad.label)
        return self._new("add", _op_name(ad.label), [a.name, b.name], attrs, {}, ad.out)

    # ------------------------------------------------------------ pooling, layout
    def max_pool(self, t: Value, attrs: dict, label: str, size: tuple[int, int] | None = None) -> Value:
        """``attrs``: kernel, stride, padding (symmetric [ph, pw]), dilation, ceil_mode. With
        ceil_mode on an input of ``size`` (H, W), the windows past the bottom/right edge read an
        explicit pad of code 0, which never wins: each window holds a real code ≥ 0."""
        c = self._narrow(t, "max_pool2d", label)
        kernel, stride, padding = list(attrs["kernel"]), list(attrs["stride"]), list(attrs["padding"])
        dilation = list(attrs.get("dilation", [1, 1]))
        if attrs.get("ceil_mode"):
            extra = [max(0, (pool_output_size(n, k, s, p, d, True) - 1) * s - (n + 2 * p - d * (k - 1) - 1))
                     for n, k, s, p, d in zip(size, kernel, stride, padding, dilation)]
            if any(extra):
                ph, pw = padding
                t = self._new("pad", "pad", [t.name], PadAttrs(pads=(ph, pw, ph + extra[0], pw + extra[1]), value=0),
                              {}, c)
                padding = [0, 0]
        return self._new("max_pool2d", "max_pool", [t.name], MaxPoolAttrs(kernel=kernel, stride=stride, padding=padding,
                         dilation=dilation), {}, c)

    def sum_pool(self, t: Value, attrs: dict, label: str) -> Value:
        """Window sums (average pooling with the padding counted, 1/count folded downstream)."""
        c = t.codes
        count = attrs["kernel"][0] * attrs["kernel"][1]
        wide = TensorCodes(c.scale / count, c.zero_point * count, c.qmax * count)
        if wide.qmax > INT32_MAX:
            raise CompileError(f"pooling window of {count} at {label} overflows int32")
        return self._new("sum_pool2d", "sum_pool", [t.name], SumPoolAttrs(**attrs, z_in=int(c.zero_point)), {}, wide,
                         dtype="int32")

    def flatten(self, t: Value) -> Value:
        return self._new("flatten", "flatten", [t.name], FlattenAttrs(), {}, t.codes)

    def pad(self, t: Value, pads: list[int], value: float, label: str) -> Value:
        """Constant padding [top, left, bottom, right] with the real ``value`` (its code)."""
        c = self._narrow(t, "pad", label)
        code = int(np.floor(value / c.scale + 0.5)) + c.zero_point
        if not 0 <= code <= c.qmax or abs((code - c.zero_point) * c.scale - value) > c.scale / 2:
            raise CompileError(f"{label}: pad value {value} is outside the input's quantized range")
        if any(int(p) < 0 for p in pads):
            raise UnsupportedOpError(f"negative padding (cropping) at {label}")
        return self._new("pad", "pad", [t.name], PadAttrs(pads=[int(p) for p in pads], value=code), {}, c)

    def gather(self, t: Value, index: list[int], label: str) -> Value:
        """Channels x[:, index] (a split, a selection or a channel shuffle)."""
        return self._new("gather", "gather", [t.name], GatherAttrs(), {"index": np.asarray(index, np.int32)}, t.codes)

    def avg_pool(self, t: Value, windows: "Windows", out: TensorCodes, label: str) -> Value:
        """Box averages with their own rounding: every output position's window and divisor."""
        c = self._narrow(t, "average pooling", label)
        distinct, rq = np.unique(windows.divisor, return_inverse=True)
        mult, shift = quantize_multiplier(c.scale / (out.scale * distinct.astype(np.float64)))
        self._check_multiplier(shift, label)
        params = {"h0": windows.h0, "h1": windows.h1, "w0": windows.w0, "w1": windows.w1,
                  "rq": rq.reshape(windows.divisor.shape).astype(np.int32),
                  "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        attrs = AvgPoolAttrs(z_in=c.zero_point, z_out=out.zero_point, lo=0, hi=out.qmax, layer=label)
        return self._new("avg_pool2d", _op_name(label), [t.name], attrs, params, out)

    def resize(self, t: Value, in_hw: tuple[int, int], size: tuple[int, int], mode: str, align_corners: bool, scales,
               out: TensorCodes | None, label: str) -> Value:
        """F.interpolate of an ``in_hw`` map to ``size`` (relay_passes/resize.py): nearest keeps the
        input's codes (``out`` None); bilinear requantizes its weighted sums to ``out``."""
        c = self._narrow(t, f"{mode} resize", label)
        op = resize_op(_op_name(label), t.name, tuple(in_hw), tuple(size), mode, align_corners, scales, c.scale,
                       c.zero_point, out.scale if out else c.scale, out.zero_point if out else c.zero_point,
                       (out or c).qmax)
        self._check_multiplier(np.array([op.attrs.shift]), label)
        return self._new("resize", op.name, [t.name], replace(op.attrs, layer=label), op.params, out or c)

    def concat(self, ts: list[Value], out: TensorCodes, label: str, axis: int = 1) -> Value:
        """Inputs moved to the output scale (one rounding each, common shift t), then joined along
        ``axis`` (1: channels; 2, 3: rows, columns)."""
        for t in ts:
            self._narrow(t, "concat", label)
        ratios = [t.codes.scale / out.scale for t in ts]
        t_ = int(np.clip(30 - math.ceil(math.log2(max(ratios))), 1, 48))
        attrs = ConcatAttrs(zs=[t.codes.zero_point for t in ts], ks=[int(round(r * 2.0**t_)) for r in ratios], t=t_,
                            z_out=out.zero_point, lo=0, hi=out.qmax, axis=int(axis), layer=label)
        return self._new("concat", _op_name(label), [t.name for t in ts], attrs, {}, out)

    def table(self, t: Value, fn, out: TensorCodes, label: str) -> Value:
        """An elementwise function of one tensor as the exact table over its input codes.
        ``fn`` maps float32 arrays to float32 arrays exactly as the fake-quant model computes it."""
        c = self._narrow(t, "an elementwise function", label)
        table = code_table(fn, c.scale, c.zero_point, c.qmax, out.scale, out.zero_point, out.qmax)
        return self._new("table", _op_name(label), [t.name], TableAttrs(layer=label), {"table": table}, out)

    def layer_norm(self, t: Value, gamma: np.ndarray, beta: np.ndarray, eps: float, out: TensorCodes,
                   label: str) -> Value:
        """Layer norm over the channels (γ, β [C] float, ``eps``) in integers: numerics.layer_norm_codes."""
        c = t.codes                         # int32 sums of a global pool too (the norm ignores their scale)
        try:
            nc = layer_norm_constants(gamma, beta, eps, c.scale, c.qmax, out.scale)
        except ConfigError as e:
            raise CompileError(f"{label}: {e}") from None
        attrs = LayerNormAttrs(prec=nc.p, eps=nc.e, frac=nc.k, z_out=out.zero_point, lo=0, hi=out.qmax, layer=label)
        return self._new("layer_norm", _op_name(label), [t.name], attrs, {"g": nc.g, "b": nc.b}, out)

    def mul(self, a: Value, b: Value, out: TensorCodes, label: str) -> Value:
        """a·b (b of a's shape, or one value per channel broadcast over H, W)."""
        ca, cb = self._narrow(a, "mul", label), self._narrow(b, "mul", label)
        mult, shift = quantize_multiplier(np.array([ca.scale * cb.scale / out.scale]))
        self._check_multiplier(shift, label)
        attrs = MulAttrs(za=ca.zero_point, zb=cb.zero_point, mult=int(mult[0]), shift=int(shift[0]),
                         z_out=out.zero_point, lo=0, hi=out.qmax, layer=label)
        return self._new("mul", _op_name(label), [a.name, b.name], attrs, {}, out)

    # ------------------------------------------------------------ attention
    def matmul(self, a: Value, b: Value, heads: int, contract: str, alpha: float, out: TensorCodes,
               label: str) -> Value:
        """α·(a ⊗ b) per head (MatmulAttrs): the int32 sum of code products, requantized once by
        M·2^-s = α·s_a·s_b/s_out (relay_passes/overflow.py refuses a sum that could leave int32)."""
        ca, cb = self._narrow(a, "matmul", label), self._narrow(b, "matmul", label)
        mult, shift = quantize_multiplier(np.array([alpha * ca.scale * cb.scale / out.scale]))
        self._check_multiplier(shift, label)
        attrs = MatmulAttrs(heads=int(heads), contract=contract, za=ca.zero_point, zb=cb.zero_point,
                            mult=int(mult[0]), shift=int(shift[0]), z_out=out.zero_point, lo=0, hi=out.qmax,
                            layer=label)
        return self._new("matmul", _op_name(label), [a.name, b.name], attrs, {}, out)

    def softmax(self, t: Value, groups: int, out: TensorCodes, label: str) -> Value:
        """Softmax over the channels in ``groups`` heads (numerics.softmax_codes)."""
        c = self._narrow(t, "softmax", label)
        k = softmax_constants(c.scale, c.qmax, out.scale)
        attrs = SoftmaxAttrs(groups=int(groups), mult=k.r, frac=k.k, z_out=out.zero_point, lo=0, hi=out.qmax,
                             layer=label)
        return self._new("softmax", _op_name(label), [t.name], attrs, {"exp": k.table}, out)

    def constant(self, batch_of: Value, codes: np.ndarray, out: TensorCodes, label: str) -> Value:
        """A constant map of ``codes`` (uint8 [C, H, W]) for every sample of ``batch_of``."""
        return self._new("constant", _op_name(label), [batch_of.name], ConstantAttrs(layer=label),
                         {"codes": np.asarray(codes, np.uint8)}, out)

    def reshape(self, t: Value, shape: tuple[int, int, int], label: str) -> Value:
        """Each channel's positions re-laid row-major as ``shape`` (C, H', W')."""
        return self._new("reshape", "reshape", [t.name], ReshapeAttrs(shape=tuple(int(d) for d in shape)), {},
                         t.codes)

    def crop(self, t: Value, box: tuple[int, int, int, int], label: str) -> Value:
        """The positions [top, top + height) × [left, left + width) of every channel."""
        top, left, height, width = (int(v) for v in box)
        return self._new("crop", "crop", [t.name], CropAttrs(top=top, left=left, height=height, width=width), {},
                         t.codes)

    @staticmethod
    def _narrow(t: Value, what: str, label: str) -> TensorCodes:
        if t.codes.qmax > 255:
            raise UnsupportedOpError(f"{what} of a pooled (wide int32) tensor at {label}")
        return t.codes

    @staticmethod
    def _check_multiplier(shift: np.ndarray, label: str) -> None:
        if np.any(shift < -30):
            raise CompileError(f"{label}: requantization multiplier too large")


@dataclass
class Windows:
    """Pooling windows of every output position: rows [h0_i, h1_i), columns [w0_j, w1_j)
    (clipped to the input, int32) and the divisor of each position (int64 [OH, OW])."""

    h0: np.ndarray
    h1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    divisor: np.ndarray

    @staticmethod
    def pooling(size: tuple[int, int], kernel, stride, padding, ceil_mode: bool, count_include_pad: bool,
                divisor_override: int | None) -> "Windows":
        """torch's avg_pool2d windows (aten AvgPool2d: output size with ceil_mode, the padded
        window clipped to H + pad for count_include_pad, then to the input)."""
        axes = [_pool_axis(n, k, s, p, ceil_mode) for n, k, s, p in zip(size, kernel, stride, padding)]
        (h0, h1, hs), (w0, w1, ws) = axes
        div = None
        if divisor_override:
            div = np.full((h0.size, w0.size), int(divisor_override), np.int64)
        elif count_include_pad:
            div = hs[:, None] * ws[None, :]
        return Windows._of(h0, h1, w0, w1, div)

    @staticmethod
    def adaptive(size: tuple[int, int], out: tuple[int, int]) -> "Windows":
        """torch's adaptive_avg_pool2d: window i spans [⌊i·H/OH⌋, ⌈(i+1)·H/OH⌉)."""
        (h, w), (oh, ow) = size, out
        h0, h1 = (np.arange(oh) * h) // oh, -((-(np.arange(oh) + 1) * h) // oh)
        w0, w1 = (np.arange(ow) * w) // ow, -((-(np.arange(ow) + 1) * w) // ow)
        return Windows._of(h0, h1, w0, w1)

    @staticmethod
    def _of(h0, h1, w0, w1, div=None) -> "Windows":
        """Windows of these bounds; ``div`` defaults to each window's clipped size."""
        if div is None:
            div = (h1 - h0)[:, None] * (w1 - w0)[None, :]
        return Windows(*(v.astype(np.int32) for v in (h0, h1, w0, w1)), div.astype(np.int64))


def pool_output_size(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling output length (the last window must start inside the input or the
    left padding when ceil_mode rounds up)."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _pool_axis(n: int, k: int, s: int, p: int, ceil_mode: bool):
    """(start, end, padded size) of every window along one axis (aten avg_pool2d)."""
    out = pool_output_size(n, k, s, p, 1, ceil_mode)
    start = np.arange(out) * s - p
    end = np.minimum(start + k, n + p)
    size = end - start
    return np.maximum(start, 0), np.minimum(end, n), size


def _op_name(label: str) -> str:
    base = label.split(" (")[0]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "layer"
