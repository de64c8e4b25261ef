"""The frontend: a .waps artifact becomes the integer Program, straight from its layer graph.

``to_program`` walks the artifact's graph (calibration's own record of the model, node by
node) and calls relay_passes.quantize.ProgramBuilder once per node, so each layer is
identified by its graph node and its calibration record, never by its position in
another IR; the Program is emitted as Relax once, by the pipeline. (The earlier route —
rebuild a torch module, torch.export it, import float Relax, match layers by position —
crossed three IRs and could pair a layer with another's parameters; see docs/compiler.md.)

``to_relax`` still gives the float model as Relax, for the fp32 TVM baseline of bench/cpu.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.artifact import TensorQuant, WapsArtifact
from calib.errors import ArtifactError, UnsupportedOpError
from calib.graph import PARAM_OPS, Graph, Node, add_broadcast_ok
from calib.qmodel import apply_act, compute, key
from relay_passes.opset import kind as op_kind
from relay_passes.program import Program
from relay_passes.quantize import AddQuant, CompileError, LayerQuant, ProgramBuilder, TensorCodes, Value, Windows


def to_program(art: WapsArtifact, batch: int = 1) -> Program:
    """The integer Program of ``art`` for inputs [batch, C, H, W] (shapes and dtypes filled in)."""
    return build_program(art, batch)[0]


def build_program(art: WapsArtifact, batch: int = 1) -> tuple[Program, dict[str, Value]]:
    """The Program and, per graph node, the program value that computes it (op name and codes)."""
    g = art.graph
    b = ProgramBuilder((batch, *g.input.attrs["shape"]), _codes(art.quant[g.input.name], "the model input"))
    env: dict[str, Value] = {g.input.name: b.input}
    for n in g:
        if n is g.input:
            continue
        xs = [env[i] for i in n.inputs]
        env[n.name] = _lower_node(art, b, n, xs)
    return b.finish([env[o] for o in g.outputs]), env


def _lower_node(art: WapsArtifact, b: ProgramBuilder, n: Node, xs: list[Value]) -> Value:
    rule = NODE_RULES.get(n.op)
    if rule is None:
        raise UnsupportedOpError(f"operation {n.op} at {n.label()} has no integer lowering")
    return rule(Lowering(art, b, n, n.attrs, n.label()), xs)


@dataclass(frozen=True)
class Lowering:
    """What a node's rule reads: the artifact, the builder, the node, its attributes and label."""
    art: WapsArtifact
    b: ProgramBuilder
    n: Node
    a: dict
    label: str

    @property
    def size(self) -> tuple[int, ...]:
        """The first input's spatial size (H, W)."""
        return tuple(self.art.graph[self.n.inputs[0]].shape[1:3])

    def out_codes(self) -> TensorCodes:
        return _codes(self.art.quant[self.n.name], self.label)


def _layer(L: Lowering, xs: list[Value]) -> Value:
    a = L.a
    conv = {}
    if op_kind(L.n.op).attrs.spatial:            # a conv's window; a linear's is fixed (LinearAttrs)
        conv = {"stride": list(a["stride"]), "padding": list(a["padding"]), "dilation": list(a["dilation"]),
                "conv_groups": int(a["groups"])}
    return L.b.layer(layer_quant(L.art, L.n), xs[0], conv)


def _add(L: Lowering, xs: list[Value]) -> Value:
    x, y = xs
    bcast = _broadcast_operand(L.art, L.n, either=True)
    if bcast == 0:                       # the broadcast operand goes second (a + b = b + a)
        x, y = y, x
    return L.b.residual_add(AddQuant(L.label, L.a.get("act"), L.out_codes()), x, y, b_broadcast=bcast is not None)


def _max_pool(L: Lowering, xs: list[Value]) -> Value:
    return L.b.max_pool(xs[0], L.a, L.label, L.size)


def _avg_pool(L: Lowering, xs: list[Value]) -> Value:
    a = L.a
    if L.n.name not in L.art.quant:      # an artifact without the pool's quantizer: sums folded downstream
        return L.b.sum_pool(xs[0], _window(a), L.label)
    win = Windows.pooling(L.size, a["kernel"], a["stride"], a["padding"], bool(a.get("ceil_mode")),
                          bool(a.get("count_include_pad", True)), a.get("divisor_override"))
    return L.b.avg_pool(xs[0], win, L.out_codes(), L.label)


def _adaptive_avg_pool(L: Lowering, xs: list[Value]) -> Value:
    return L.b.avg_pool(xs[0], Windows.adaptive(L.size, tuple(L.a["output_size"])), L.out_codes(), L.label)


def _upsample(mode: str):
    def rule(L: Lowering, xs: list[Value]) -> Value:
        out = L.out_codes() if mode == "bilinear" else None       # nearest moves codes unchanged
        return L.b.resize(xs[0], L.size, tuple(L.a["size"]), mode, bool(L.a.get("align_corners", False)),
                          L.a.get("scales"), out, L.label)
    return rule


def _global_avg_pool(L: Lowering, xs: list[Value]) -> Value:
    h, w = L.size
    return L.b.sum_pool(xs[0], {"kernel": [h, w], "stride": [1, 1], "padding": [0, 0]}, L.label)


def _flatten(L: Lowering, xs: list[Value]) -> Value:
    return L.b.flatten(xs[0])


def _pad(L: Lowering, xs: list[Value]) -> Value:
    return L.b.pad(xs[0], list(L.a["pads"]), float(L.a.get("value", 0.0)), L.label)


def _gather(L: Lowering, xs: list[Value]) -> Value:
    return L.b.gather(xs[0], list(L.a["index"]), L.label)


def _cat(L: Lowering, xs: list[Value]) -> Value:
    return L.b.concat(xs, L.out_codes(), L.label, int(L.a.get("axis", 1)))


def _matmul(L: Lowering, xs: list[Value]) -> Value:
    return L.b.matmul(xs[0], xs[1], int(L.a["heads"]), L.a["contract"], float(L.a["alpha"]), L.out_codes(),
                      L.label)


def _softmax(L: Lowering, xs: list[Value]) -> Value:
    return L.b.softmax(xs[0], int(L.a["groups"]), L.out_codes(), L.label)


def _constant(L: Lowering, xs: list[Value]) -> Value:
    """The value's codes exactly as its quantizer rounds them (calib/quantizers: float32
    round(v/s) + z, half to even, clamped), for every sample of the program's input."""
    out = L.out_codes()
    v = L.n.params["value"].detach().float()
    codes = torch.clamp(torch.round(v / torch.tensor(out.scale, dtype=torch.float32)) + out.zero_point, 0, out.qmax)
    return L.b.constant(L.b.input, codes.numpy().astype(np.uint8), out, L.label)


def _reshape(L: Lowering, xs: list[Value]) -> Value:
    return L.b.reshape(xs[0], tuple(L.n.shape), L.label)


def _crop(L: Lowering, xs: list[Value]) -> Value:
    return L.b.crop(xs[0], tuple(L.a["box"]), L.label)


def _mul(L: Lowering, xs: list[Value]) -> Value:
    _broadcast_operand(L.art, L.n, either=False)
    return L.b.mul(*xs, L.out_codes(), L.label)


def _layer_norm(L: Lowering, xs: list[Value]) -> Value:
    p = L.n.params
    return L.b.layer_norm(xs[0], p["weight"].numpy(), p["bias"].numpy(), float(L.a["eps"]), L.out_codes(), L.label)


def _elementwise(L: Lowering, xs: list[Value]) -> Value:
    out = L.out_codes() if L.n.name in L.art.quant else xs[0].codes
    return L.b.table(xs[0], _float_fn(L.n), out, L.label)


# graph op (calib/graph.py) → its integer rule: the frontend's one table
NODE_RULES = {**{op: _layer for op in PARAM_OPS}, "add": _add, "max_pool2d": _max_pool, "avg_pool2d": _avg_pool,
              "adaptive_avg_pool2d": _adaptive_avg_pool, "upsample_nearest2d": _upsample("nearest"),
              "upsample_bilinear2d": _upsample("bilinear"), "global_avg_pool": _global_avg_pool,
              "flatten": _flatten, "pad": _pad, "gather": _gather, "cat": _cat, "mul": _mul,
              "elementwise": _elementwise, "relu": _elementwise, "relu6": _elementwise, "layer_norm": _layer_norm,
              "matmul": _matmul, "softmax": _softmax, "constant": _constant, "reshape": _reshape, "crop": _crop}


def _float_fn(n: Node):
    """float32 array → float32 array: the node's function exactly as the fake-quant model computes it."""
    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return apply_act(compute(n, [torch.from_numpy(np.asarray(x, np.float32))]), n.attrs.get("act")).numpy()
    return fn


def _broadcast_operand(art: WapsArtifact, n: Node, either: bool) -> int | None:
    """None for equal shapes; else the index of the broadcast operand. ``either`` (add): either
    operand as [C, 1, 1], [1, H, W] or [1, 1, 1] (shapes without the batch); else (mul) the
    second operand per channel ([C, 1, 1])."""
    a, b_ = (tuple(art.graph[i].shape) for i in n.inputs)
    if a == b_:
        return None
    if either:
        for full, part, i in ((a, b_, 1), (b_, a, 0)):
            if add_broadcast_ok(full, part):
                return i
    elif len(a) == 3 and b_ == (a[0], 1, 1):
        return 1
    raise UnsupportedOpError(f"{n.op} of shapes {a} and {b_} at {n.label()} (add broadcasts either operand as "
                             f"[C, 1, 1], [1, H, W] or [1, 1, 1]; mul its second per channel)")


def _window(a: dict) -> dict:
    if a.get("ceil_mode") or not a.get("count_include_pad", True) or a.get("divisor_override"):
        raise ArtifactError("avg_pool2d with ceil_mode/count_include_pad=False/divisor needs the pool's own "
                            "quantizer in the artifact (recalibrate)")
    return {"kernel": list(a["kernel"]), "stride": list(a["stride"]), "padding": list(a["padding"])}


def layer_quant(art: WapsArtifact, n: Node) -> LayerQuant:
    """The calibration results of conv/linear node ``n`` that the integer rules need."""
    rec = art.layers.get(n.name)
    if rec is None:
        raise ArtifactError(f"artifact has no parameters for layer {n.label()}")
    groups = None if rec.groups is None else np.repeat(rec.groups.astype(np.int8), rec.unit_size)
    return LayerQuant(n.op, n.label(), rec.w_codes, rec.w_scale, rec.bias, rec.gamma_z, rec.phi_z, groups,
                      list(rec.group_scales), n.attrs.get("act"),
                      _codes(art.quant[n.name], n.label()))


class ArtifactModule(nn.Module):
    """The float (BN-folded) model an artifact describes, weights = codes·s_w (benchmarks)."""

    def __init__(self, art: WapsArtifact):
        super().__init__()
        self.graph: Graph = art.graph
        for n in self.graph:
            if n.op in PARAM_OPS:
                rec = art.layers[n.name]
                w = rec.w_codes.astype(np.float32)
                w = w * rec.w_scale.reshape((-1,) + (1,) * (w.ndim - 1))
                self.register_buffer(key(n.name) + "_w", torch.from_numpy(w))
                self.register_buffer(key(n.name) + "_b", torch.from_numpy(rec.bias.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.graph.input.name: x}
        for n in self.graph:
            if n is self.graph.input:
                continue
            a, ins = n.attrs, [env[i] for i in n.inputs]
            if n.op in PARAM_OPS:                  # the folded weights of the buffers above
                w, bias = getattr(self, key(n.name) + "_w"), getattr(self, key(n.name) + "_b")
                if op_kind(n.op).attrs.spatial:
                    y = F.conv2d(ins[0], w, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
                else:
                    y = F.linear(ins[0], w, bias)
            else:
                y = compute(n, ins)
            env[n.name] = apply_act(y, a.get("act"))
        return env[self.graph.output]


def to_relax(art: WapsArtifact, batch: int = 1):
    """Float Relax IRModule of the artifact's model for inputs [batch, C, H, W]."""
    from tvm.relax.frontend.torch import from_exported_program
    shape = (batch, *art.graph.input.attrs["shape"])
    module = ArtifactModule(art).eval()
    with torch.no_grad():
        ep = torch.export.export(module, (torch.zeros(shape),))
    return from_exported_program(ep)


def _codes(tq: TensorQuant, where: str) -> TensorCodes:
    if tq.is_float:
        raise CompileError(f"{where} is a float activation (weight-only artifact): integer compilation needs "
                           f"--abits 8 or less")
    return TensorCodes(float(tq.scale), int(tq.zero_point), (1 << tq.bits) - 1)
