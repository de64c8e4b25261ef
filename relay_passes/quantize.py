"""QuantizeGraph: float Relax (from torch.export) + calibration results → integer Program.

Layers are matched by graph structure: the k-th conv2d/matmul binding of ``main`` is
the k-th layer of the spec (calibration's graph order, the order torch.export emitted),
and its weight constant must equal the spec's dequantized weights; the k-th add of two
tensors is the k-th residual add. Float ops become integer ops:

    conv2d + bias add [+ relu | clip(0, 6)]   → conv2d (requant α′, bias b, clamps)
    matmul + bias add [+ relu]                → linear
    add(tensor, tensor) [+ relu]              → add (one rounding, common shift t)
    max_pool2d                                → max_pool2d on codes
    avg_pool2d / adaptive_avg_pool2d(1) / mean → sum_pool2d (int32 sums, 1/count folded
                                                into the consumer's requantization)
    reshape to [N, -1]                        → flatten
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
import tvm
from tvm import relax

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
class QuantSpec:
    input: TensorCodes
    layers: list[LayerQuant]
    adds: list[AddQuant]


@dataclass
class _Pending:
    """A conv/linear/add whose bias add and activation may still follow."""

    kind: str
    spec: LayerQuant | AddQuant
    inputs: list
    bias_seen: bool = False
    act_seen: str | None = None


@dataclass
class _T:
    name: str
    codes: TensorCodes


def quantize_graph(mod: tvm.IRModule, spec: QuantSpec) -> Program:
    prog = _Quantizer(spec).run(mod["main"])
    emit(prog)                              # fills in every op's shape and dtype
    return prog


def QuantizeGraph(spec: QuantSpec):  # noqa: N802 (TVM pass naming)
    @tvm.ir.transform.module_pass(opt_level=0, name="waps.QuantizeGraph")
    def _pass(mod, ctx):
        return emit(quantize_graph(mod, spec))
    return _pass


class _Quantizer:
    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.layers = list(spec.layers)
        self.adds = list(spec.adds)
        self.ops: list[Op] = []
        self.env: dict = {}
        self.last_label = "the model input"

    # ------------------------------------------------------------ driver
    def run(self, main: relax.Function) -> Program:
        x = main.params[0]
        shape = tuple(int(d) for d in x.ty.shape)
        q = self.spec.input
        self.env[x] = self._new("quantize", "quantize", [INPUT], {"scale": q.scale, "zero_point": q.zero_point,
                                                                  "qmax": q.qmax}, {}, q)
        out = None
        for block in main.body.blocks:
            for b in block.bindings:
                self.env[b.var] = self._visit(b.value)
        out = self.env[main.body.body] if main.body.body in self.env else self._value(main.body.body)
        if isinstance(out, list):
            out = [o for o in out if o is not None]
            if len(out) != 1:
                raise CompileError("the model must have exactly one output tensor")
            out = out[0]
        t = self._tensor(out, "the graph output")
        if self.layers or self.adds:
            left = (self.layers or self.adds)[0].label
            raise CompileError(f"layer {left} of the artifact was not found in the exported graph")
        deq = self._new("dequantize", "dequantize", [t.name], {"scale": t.codes.scale,
                        "zero_point": t.codes.zero_point}, {}, None, dtype="float32")
        return Program(shape, self.ops, [deq.name, t.name])

    def _new(self, kind, base, inputs, attrs, params, codes, dtype=None) -> _T:
        name = base
        i = 1
        while any(o.name == name for o in self.ops):
            name = f"{base}_{i}"
            i += 1
        self.ops.append(Op(kind, name, list(inputs), attrs, params, (), dtype or codes.dtype))
        return _T(name, codes)

    def _value(self, e):
        if isinstance(e, tvm.ir.Constant):
            return e.value.numpy() if hasattr(e.value, "numpy") else e   # tensor, or a scalar argument
        if isinstance(e, relax.Var):
            return self.env[e]
        if isinstance(e, relax.Tuple):
            return [self._value(f) for f in e.fields]
        if isinstance(e, relax.ShapeExpr):
            return tuple(int(v) for v in e.values)
        if hasattr(e, "value"):                 # PrimValue / IntImm / FloatImm arguments
            return e
        raise CompileError(f"unsupported expression {type(e).__name__} after {self.last_label}")

    def _tensor(self, v, where: str) -> _T:
        if isinstance(v, _Done):
            return v.result
        if isinstance(v, _Pending):
            return self._materialize(v)
        if isinstance(v, _T):
            return v
        raise CompileError(f"expected an activation tensor at {where} (after {self.last_label})")

    # ------------------------------------------------------------ bindings
    def _visit(self, e):
        if isinstance(e, (tvm.ir.Constant, relax.Var, relax.Tuple)):
            return self._value(e)
        if isinstance(e, relax.TupleGetItem):
            return self._value(e.tuple_value)[e.index]
        if not isinstance(e, relax.Call) or not isinstance(e.op, tvm.ir.Op):
            raise CompileError(f"unsupported expression {type(e).__name__} after {self.last_label}")
        op = e.op.name
        args = [self._value(a) for a in e.args]
        a = e.attrs
        if op == "relax.reshape" and isinstance(args[0], np.ndarray):
            return args[0].reshape([int(d) for d in e.ty.shape])
        if op == "relax.permute_dims" and isinstance(args[0], np.ndarray):
            return np.transpose(args[0], [int(v) for v in a.axes] if a.axes is not None else None)
        if op == "relax.nn.conv2d":
            return self._conv(args, a, e)
        if op == "relax.matmul":
            return self._matmul(args, e)
        if op == "relax.add":
            return self._add(args)
        if op in ("relax.nn.relu", "relax.clip"):
            return self._act(op, args, e)
        if op == "relax.zeros_like":
            return None
        if op == "relax.nn.max_pool2d":
            return self._pool("max_pool2d", args[0], a, e)
        if op == "relax.nn.avg_pool2d":
            if not bool(a.count_include_pad) and any(int(p) for p in a.padding):
                raise UnsupportedOpError(f"avg_pool2d with count_include_pad=False after {self.last_label}")
            return self._pool("sum_pool2d", args[0], a, e)
        if op == "relax.nn.adaptive_avg_pool2d":
            if [int(v) for v in a.output_size] != [1, 1]:
                raise UnsupportedOpError(f"adaptive_avg_pool2d to a size other than 1x1 after {self.last_label}")
            return self._global_pool(args[0], e, keepdims=True)
        if op == "relax.mean":
            axes = sorted(int(v) % 4 for v in a.axis)
            if axes != [2, 3]:
                raise UnsupportedOpError(f"mean over axes {axes} after {self.last_label}")
            return self._global_pool(args[0], e, keepdims=bool(a.keepdims))
        if op in ("relax.reshape", "relax.flatten"):
            t = self._tensor(args[0], op)
            shape = [int(d) for d in e.ty.shape]
            src = [int(d) for d in e.args[0].ty.shape]
            if len(shape) != 2 or shape[0] != src[0]:
                raise UnsupportedOpError(f"reshape to {shape} after {self.last_label} (only flatten is supported)")
            return self._new("flatten", "flatten", [t.name], {}, {}, t.codes)
        raise UnsupportedOpError(f"operation {op.replace('relax.', '')} after {self._where(args)} has no integer lowering")

    def _where(self, args) -> str:
        """Label of the layer producing the first tensor argument (for error messages)."""
        for v in args:
            if isinstance(v, _Done):
                v = v.result
            if isinstance(v, _Pending):
                return v.spec.label
            if isinstance(v, _T):
                op = next(o for o in self.ops if o.name == v.name)
                return op.attrs.get("layer", f"the {op.kind} {op.name}")
        return self.last_label

    # ------------------------------------------------------------ layers
    def _next_layer(self, kind: str) -> LayerQuant:
        if not self.layers:
            raise CompileError(f"the exported graph has more conv/linear layers than the artifact (after {self.last_label})")
        ls = self.layers.pop(0)
        if ls.kind != kind:
            raise CompileError(f"graph structure mismatch: expected {ls.kind} {ls.label}, found {kind}")
        return ls

    def _conv(self, args, a, e):
        x, w = args
        ls = self._next_layer("conv2d")
        deq = ls.w_codes.astype(np.float32) * ls.w_scale.reshape(-1, 1, 1, 1)
        if not isinstance(w, np.ndarray) or w.shape != deq.shape or not np.allclose(w, deq, rtol=1e-5, atol=1e-6):
            raise CompileError(f"graph structure mismatch at {ls.label}: its weights differ from the artifact's")
        pad = [int(v) for v in a.padding]
        if pad[0] != pad[2] or pad[1] != pad[3]:
            raise UnsupportedOpError(f"asymmetric padding in {ls.label}")
        attrs = {"stride": [int(v) for v in a.strides], "padding": [pad[0], pad[1]],
                 "dilation": [int(v) for v in a.dilation], "conv_groups": int(a.groups)}
        return _Pending("conv2d", ls, [x, attrs])

    def _matmul(self, args, e):
        x, wt = args
        ls = self._next_layer("linear")
        deq = ls.w_codes.astype(np.float32) * ls.w_scale.reshape(-1, 1)
        if not isinstance(wt, np.ndarray) or wt.T.shape != deq.shape or not np.allclose(wt.T, deq, rtol=1e-5, atol=1e-6):
            raise CompileError(f"graph structure mismatch at {ls.label}: its weights differ from the artifact's")
        return _Pending("linear", ls, [x, {}])

    def _add(self, args):
        a, b = args
        for p, c in ((a, b), (b, a)):
            if isinstance(p, _Pending) and p.kind != "add" and isinstance(c, np.ndarray):
                if p.bias_seen or p.act_seen:
                    break
                bias = c.reshape(-1)
                if bias.shape != p.spec.bias.shape or not np.allclose(bias, p.spec.bias, rtol=1e-5, atol=1e-6):
                    raise CompileError(f"graph structure mismatch at {p.spec.label}: its bias differs from the artifact's")
                p.bias_seen = True
                return p
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            raise UnsupportedOpError(f"adding a constant tensor after {self.last_label}")
        if not self.adds:
            raise CompileError(f"the exported graph has more residual adds than the artifact (after {self.last_label})")
        return _Pending("add", self.adds.pop(0), [a, b], bias_seen=True)

    def _act(self, op, args, e):
        p = args[0]
        if op == "relax.clip":
            lo, hi = float(e.args[1].value), float(e.args[2].value)
            if (lo, hi) != (0.0, 6.0):
                raise UnsupportedOpError(f"clip({lo}, {hi}) after {self.last_label}")
            act = "relu6"
        else:
            act = "relu"
        if not isinstance(p, _Pending) or p.act_seen:
            raise UnsupportedOpError(f"a standalone {act} after {self.last_label} (not fused into a layer)")
        if p.spec.act != act:
            raise CompileError(f"graph structure mismatch at {p.spec.label}: activation {act}, artifact has {p.spec.act}")
        p.act_seen = act
        return p

    def _materialize(self, p: _Pending) -> _T:
        ls = p.spec
        if p.act_seen != ls.act or not p.bias_seen:
            raise CompileError(f"graph structure mismatch at {ls.label}: bias or activation missing")
        if p.kind == "add":
            t = self._residual_add(p)
        else:
            t = self._layer(p)
        self.last_label = ls.label
        p.__class__ = _Done                      # later reads of the same var reuse the result
        p.result = t
        return t

    def _clamps(self, out: TensorCodes, act: str | None, label: str) -> tuple[int, int]:
        lo, hi = 0, out.qmax
        if act in ("relu", "relu6"):
            lo = out.zero_point
        if act == "relu6":
            hi = min(hi, out.zero_point + int(round(6.0 / out.scale)))
        return lo, hi

    def _layer(self, p: _Pending) -> _T:
        ls: LayerQuant = p.spec
        x = self._tensor(p.inputs[0], ls.label)
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
        attrs = dict(p.inputs[1])
        attrs.update({"z_in": int(xin.zero_point), "z_out": int(ls.out.zero_point), "lo": lo, "hi": hi,
                      "in_qmax": int(xin.qmax), "layer": ls.label, "form": "reference", "frac": frac})
        params = {"w": ls.w_codes.astype(np.int8), "bias": bias.astype(np.int32),
                  "mult": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        if ls.groups is not None:
            params["groups"] = ls.groups.astype(np.int8)
            attrs["sigma"], attrs["n"] = list(ls.sigma), list(ls.n)
        return self._new(p.kind, _op_name(ls.label), [x.name], attrs, params, ls.out)

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

    def _residual_add(self, p: _Pending) -> _T:
        ad: AddQuant = p.spec
        a, b = (self._tensor(v, ad.label) for v in p.inputs)
        if a.codes.qmax > 255 or b.codes.qmax > 255:
            raise UnsupportedOpError(f"{ad.label}: adding pooled (wide) tensors is not supported")
        ra, rb = a.codes.scale / ad.out.scale, b.codes.scale / ad.out.scale
        t = int(np.clip(30 - math.ceil(math.log2(max(ra, rb))), 1, 48))
        ka, kb = int(round(ra * 2.0**t)), int(round(rb * 2.0**t))
        lo, hi = self._clamps(ad.out, ad.act, ad.label)
        attrs = {"za": a.codes.zero_point, "zb": b.codes.zero_point, "ka": ka, "kb": kb, "t": t,
                 "z_out": ad.out.zero_point, "lo": lo, "hi": hi, "layer": ad.label}
        return self._new("add", _op_name(ad.label), [a.name, b.name], attrs, {}, ad.out)

    # ------------------------------------------------------------ pooling
    def _pool(self, kind, v, a, e) -> _T:
        t = self._tensor(v, kind)
        pad = [int(x) for x in a.padding]
        if pad[0] != pad[2] or pad[1] != pad[3] or bool(a.ceil_mode) or any(int(d) != 1 for d in a.dilation):
            raise UnsupportedOpError(f"{kind} with asymmetric padding, ceil_mode or dilation after {self.last_label}")
        attrs = {"kernel": [int(x) for x in a.pool_size], "stride": [int(x) for x in a.strides],
                 "padding": [pad[0], pad[1]]}
        if kind == "max_pool2d":
            if t.codes.qmax > 255:
                raise UnsupportedOpError(f"max_pool2d of a pooled (wide) tensor after {self.last_label}")
            return self._new(kind, "max_pool", [t.name], attrs, {}, t.codes)
        count = attrs["kernel"][0] * attrs["kernel"][1]
        return self._sum(t, attrs, count)

    def _global_pool(self, v, e, keepdims: bool) -> _T:
        t = self._tensor(v, "global average pool")
        h, w = [int(d) for d in e.args[0].ty.shape][2:]
        out = self._sum(t, {"kernel": [h, w], "stride": [1, 1], "padding": [0, 0]}, h * w)
        if not keepdims:
            out = self._new("flatten", "flatten", [out.name], {}, {}, out.codes)
        return out

    def _sum(self, t: _T, attrs: dict, count: int) -> _T:
        c = t.codes
        attrs["z_in"] = int(c.zero_point)
        wide = TensorCodes(c.scale / count, c.zero_point * count, c.qmax * count)
        if wide.qmax > INT32_MAX:
            raise CompileError(f"pooling window of {count} after {self.last_label} overflows int32")
        return self._new("sum_pool2d", "sum_pool", [t.name], attrs, {}, wide, dtype="int32")


class _Done(_Pending):
    result: _T


def _op_name(label: str) -> str:
    base = label.split(" (")[0]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "layer"
