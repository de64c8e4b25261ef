"""Rebuild the fake-quant PyTorch model from a .waps artifact, for evaluation.

Weights are the artifact's integer codes times their scales, groups are the hard
assignment, activation quantizers use the stored scales and zero points: the
model computes what calibration finished with, no calibration state needed.
"""
from __future__ import annotations

import torch

from calib.artifact import TensorQuant, WapsArtifact
from calib.config import CalibConfig
from calib.graph import PARAM_OPS, QUANT_OPS, Graph, Node
from calib.product_groups import ProductGroups
from calib.qmodel import QuantModel
from calib.quantizers import ActQuantizer


def _set(q: ActQuantizer, tq: TensorQuant) -> None:
    q.bits = tq.bits
    q.enabled = not tq.is_float
    q.scale.data.fill_(tq.scale)
    q.zero_point.fill_(tq.zero_point)


def build_fake_quant(art: WapsArtifact) -> QuantModel:
    nodes = []
    for n in art.graph:
        params = dict(n.params)             # NODE_PARAMS ops keep theirs (a layer norm's γ, β)
        if n.op in PARAM_OPS:
            rec = art.layers[n.name]
            codes = torch.from_numpy(rec.w_codes.astype("float32"))
            scale = torch.from_numpy(rec.w_scale)
            params = {"weight": codes * scale.reshape((-1,) + (1,) * (codes.dim() - 1)),
                      "bias": torch.from_numpy(rec.bias.copy()), "w_scale": scale}
        nodes.append(Node(n.name, n.op, list(n.inputs), dict(n.attrs), params, n.source, tuple(n.shape)))
    graph = art.graph.replace(nodes)
    cfg = CalibConfig(method="rtn", progress=False)
    model = QuantModel(graph, cfg)
    _set(model.input_quant, art.quant[graph.input.name])
    with torch.no_grad():
        for n in graph:
            if n.op in PARAM_OPS:
                rec, layer = art.layers[n.name], model.layer(n.name)
                layer.wbits = rec.wbits
                layer.w_codes.copy_(torch.from_numpy(rec.w_codes.astype("float32")))
                layer.w_scale.copy_(torch.from_numpy(rec.w_scale))
                layer.gamma_z.copy_(torch.from_numpy(rec.gamma_z))
                layer.phi_z.copy_(torch.from_numpy(rec.phi_z))
                layer.unit_size = rec.unit_size
                if rec.groups is not None:
                    pg = ProductGroups(len(rec.groups), [s.gamma for s in rec.group_scales])
                    pg.set_assignment(torch.from_numpy(rec.groups.astype("int64")))
                    layer.groups = pg
                _set(layer.out_quant, art.quant[n.name])
            elif n.op in QUANT_OPS:
                _set(model.layer(n.name).out_quant, art.quant[n.name])
    model.set_quant(True)
    return model.eval()
