"""The torch → Relax frontend: a .waps artifact becomes a float Relax module (through
torch.export and ``from_exported_program``) plus the calibration results the
QuantizeGraph pass attaches to it.

The float model is rebuilt from the artifact's graph with dequantized weights
(codes·s_w), so each conv/linear's weight constant in Relax identifies its layer;
QuantizeGraph matches layers by graph order and checks those constants.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calib.artifact import TensorQuant, WapsArtifact
from calib.errors import ArtifactError
from calib.graph import PARAM_OPS, Graph
from calib.qmodel import apply_act, key
from relay_passes.quantize import AddQuant, CompileError, LayerQuant, QuantSpec, TensorCodes


class ArtifactModule(nn.Module):
    """The float (BN-folded) model an artifact describes, weights = codes·s_w."""

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
            elif n.op == "add":
                y = apply_act(ins[0] + ins[1], a.get("act"))
            elif n.op == "max_pool2d":
                y = F.max_pool2d(ins[0], a["kernel"], a["stride"], a["padding"])
            elif n.op == "avg_pool2d":
                y = F.avg_pool2d(ins[0], a["kernel"], a["stride"], a["padding"], count_include_pad=True)
            elif n.op == "global_avg_pool":
                y = ins[0].mean((2, 3), keepdim=True)
            elif n.op == "flatten":
                y = ins[0].flatten(1)
            elif n.op in ("relu", "relu6"):
                y = apply_act(ins[0], n.op)
            else:
                raise CompileError(f"operation {n.op} at {n.label()} has no integer lowering")
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


def quant_spec(art: WapsArtifact) -> QuantSpec:
    """The calibration results QuantizeGraph needs, in graph order."""
    g = art.graph
    layers, adds = [], []
    for n in g:
        if n.op in PARAM_OPS:
            rec = art.layers.get(n.name)
            if rec is None:
                raise ArtifactError(f"artifact has no parameters for layer {n.label()}")
            groups = None
            if rec.groups is not None:
                groups = np.repeat(rec.groups.astype(np.int8), rec.unit_size)
            layers.append(LayerQuant(
                n.op, n.label(), rec.w_codes, rec.w_scale, rec.bias, rec.gamma_z, rec.phi_z, groups,
                [s.sigma for s in rec.group_scales], [s.n for s in rec.group_scales], n.attrs.get("act"),
                _codes(art.quant[n.name], n.label())))
        elif n.op == "add":
            adds.append(AddQuant(n.label(), n.attrs.get("act"), _codes(art.quant[n.name], n.label())))
    return QuantSpec(_codes(art.quant[g.input.name], "the model input"), layers, adds)
