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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.artifact import TensorQuant, WapsArtifact
from calib.errors import ArtifactError, UnsupportedOpError
from calib.graph import PARAM_OPS, Graph, Node, add_broadcast_ok
from calib.qmodel import apply_act, compute, key
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
        if n.op == "input":
            continue
        xs = [env[i] for i in n.inputs]
        env[n.name] = _lower_node(art, b, n, xs)
    return b.finish(env[g.output]), env


def _lower_node(art: WapsArtifact, b: ProgramBuilder, n: Node, xs: list[Value]) -> Value:
    a = n.attrs
    label = n.label()
    if n.op in PARAM_OPS:
        conv = {}
        if n.op == "conv2d":
            conv = {"stride": list(a["stride"]), "padding": list(a["padding"]), "dilation": list(a["dilation"]),
                    "conv_groups": int(a["groups"])}
        return b.layer(layer_quant(art, n), xs[0], conv)
    size = tuple(art.graph[n.inputs[0]].shape[1:3]) if n.inputs else ()
    if n.op == "add":
        x, y = xs
        bcast = _broadcast_operand(art, n)
        if bcast == 0:                       # the broadcast operand goes second (a + b = b + a)
            x, y = y, x
        return b.residual_add(AddQuant(label, a.get("act"), _codes(art.quant[n.name], label)), x, y,
                              b_broadcast=bcast is not None)
    if n.op == "max_pool2d":
        return b.max_pool(xs[0], a, label, size)
    if n.op == "avg_pool2d" and n.name in art.quant:
        win = Windows.pooling(size, a["kernel"], a["stride"], a["padding"], bool(a.get("ceil_mode")),
                              bool(a.get("count_include_pad", True)), a.get("divisor_override"))
        return b.avg_pool(xs[0], win, _codes(art.quant[n.name], label), label)
    if n.op == "avg_pool2d":                # an artifact without the pool's quantizer: sums folded downstream
        return b.sum_pool(xs[0], _window(a), label)
    if n.op == "adaptive_avg_pool2d":
        win = Windows.adaptive(size, tuple(a["output_size"]))
        return b.avg_pool(xs[0], win, _codes(art.quant[n.name], label), label)
    if n.op in ("upsample_nearest2d", "upsample_bilinear2d"):
        bilinear = n.op == "upsample_bilinear2d"
        out = _codes(art.quant[n.name], label) if bilinear else None
        return b.resize(xs[0], size, tuple(a["size"]), "bilinear" if bilinear else "nearest",
                        bool(a.get("align_corners", False)), a.get("scales"), out, label)
    if n.op == "global_avg_pool":
        h, w = size
        return b.sum_pool(xs[0], {"kernel": [h, w], "stride": [1, 1], "padding": [0, 0]}, label)
    if n.op == "flatten":
        return b.flatten(xs[0])
    if n.op == "pad":
        return b.pad(xs[0], list(a["pads"]), float(a.get("value", 0.0)), label)
    if n.op == "gather":
        return b.gather(xs[0], list(a["index"]), label)
    if n.op == "cat":
        if int(a.get("axis", 1)) != 1:
            raise UnsupportedOpError(f"cat along axis {a['axis']} at {label} (only channels)")
        return b.concat(xs, _codes(art.quant[n.name], label), label)
    if n.op == "mul":
        _broadcast_operand(art, n)
        return b.mul(*xs, _codes(art.quant[n.name], label), label)
    if n.op in ("elementwise", "relu", "relu6"):
        out = _codes(art.quant[n.name], label) if n.name in art.quant else xs[0].codes
        return b.table(xs[0], _float_fn(n), out, label)
    raise UnsupportedOpError(f"operation {n.op} at {label} has no integer lowering")


def _float_fn(n: Node):
    """float32 array → float32 array: the node's function exactly as the fake-quant model computes it."""
    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return apply_act(compute(n, [torch.from_numpy(np.asarray(x, np.float32))]), n.attrs.get("act")).numpy()
    return fn


def _broadcast_operand(art: WapsArtifact, n: Node) -> int | None:
    """None for equal shapes; else the index of the broadcast operand. add broadcasts either
    operand as [C, 1, 1], [1, H, W] or [1, 1, 1] (shapes without the batch); mul its second
    operand per channel ([C, 1, 1])."""
    a, b_ = (tuple(art.graph[i].shape) for i in n.inputs)
    if a == b_:
        return None
    if n.op == "add":
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
            if n.op == "input":
                continue
            a, ins = n.attrs, [env[i] for i in n.inputs]
            if n.op == "conv2d":
                y = F.conv2d(ins[0], getattr(self, key(n.name) + "_w"), getattr(self, key(n.name) + "_b"),
                             a["stride"], a["padding"], a["dilation"], a["groups"])
                y = apply_act(y, a.get("act"))
            elif n.op == "linear":
                y = apply_act(F.linear(ins[0], getattr(self, key(n.name) + "_w"), getattr(self, key(n.name) + "_b")),
                         a.get("act"))
            else:
                y = apply_act(compute(n, ins), a.get("act"))
            env[n.name] = y
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
