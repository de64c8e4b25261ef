"""Turn a finished calibration (a frozen QuantModel) into a WapsArtifact."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from calib.artifact import TensorQuant, WapsArtifact, LayerRecord, group_scales_of
from calib.calibrate import CalibResult
from calib.graph import NODE_PARAMS, PARAM_OPS, QUANT_OPS, Node
from calib.quantizers import ActQuantizer


def _tq(q: ActQuantizer) -> TensorQuant:
    if not q.enabled and q.bits >= 32:
        return TensorQuant(32)
    return TensorQuant(q.bits, float(q.scale.detach()), int(q.zero_point))


def to_artifact(result: CalibResult, producer: str = "waps-tvm") -> WapsArtifact:
    model, graph = result.model, result.model.graph
    layers, quant = {}, {graph.input.name: _tq(model.input_quant)}
    for n in graph:
        if n.op in PARAM_OPS:
            layer = model.layer(n.name)
            if layer.rounding is not None:
                layer.freeze()
            groups = None
            scales = []
            if layer.groups is not None and layer.groups.hard:
                groups = _np(layer.groups.assignment).astype(np.int8)
                scales = group_scales_of(layer.groups.gammas.tolist())
            layers[n.name] = LayerRecord(
                layer.wbits, layer.unit_size, _np(layer.w_codes).astype(np.int8),
                _np(layer.w_scale).astype(np.float32), _np(layer.bias).astype(np.float32),
                _np(layer.gamma_z).astype(np.float32), _np(layer.phi_z).astype(np.float32),
                groups, scales)
            quant[n.name] = _tq(layer.out_quant)
        elif n.op in QUANT_OPS:
            quant[n.name] = _tq(model.layer(n.name).out_quant)
    # timings stay out: they would make two runs of the same calibration differ in bytes
    report = [{k: v for k, v in asdict(r).items() if k != "seconds"} for r in result.report]
    return WapsArtifact(graph.replace([_strip(n) for n in graph]), layers, quant,
                        result.config.to_json(), report, producer)


def _np(t) -> np.ndarray:
    """A CPU NumPy copy of a tensor on any device."""
    return t.detach().cpu().numpy()


def _strip(n: Node) -> Node:
    """The node without the layers' float parameters (the artifact stores codes instead); the
    float parameters of NODE_PARAMS ops (a layer norm's γ, β) stay, on the CPU."""
    params = {k: n.params[k].detach().float().cpu() for k in NODE_PARAMS.get(n.op, ())}
    return Node(n.name, n.op, list(n.inputs), dict(n.attrs), params, n.source, tuple(n.shape))
