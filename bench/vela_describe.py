"""The project's captured graph as a framework-neutral description for the Vela side.

``describe(graph)`` checks that every node has a TFLite counterpart and returns a
:class:`Description`; ``write(desc, folder)`` stores it as ``graph.json`` (structure)
plus ``weights.npz`` (float32, torch layout: conv ``[m, c/groups, kh, kw]``, linear
``[m, c]``, bias ``[m]``; keys ``<node>.weight`` / ``<node>.bias``). The Keras builder
(bench/vela_tflite.py, run in the Vela venv) reads exactly this and does the NCHW →
NHWC layout change itself, so this side needs neither TensorFlow nor Vela.

Node names are the graph's (torch.export fx names: ``conv2d_3``, ``add_1``, …); the
builder uses them as Keras layer names so Vela's per-layer rows can be matched back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calib.errors import UnsupportedOpError
from calib.graph import Graph, Node

FORMAT = "waps-vela-graph/1"
# ops the Keras builder translates (bench/vela_tflite.py keeps the same list)
OPS = ("input", "conv2d", "linear", "add", "relu", "relu6", "max_pool2d", "avg_pool2d", "global_avg_pool",
       "flatten", "cat", "pad")
_NONNEG_ACTS = ("relu", "relu6")


@dataclass
class DescNode:
    """One node: ``shape`` is the torch output shape without the batch, (C, H, W) or (F,)."""
    name: str
    op: str
    inputs: list[str]
    shape: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class Description:
    model: str
    input: str
    output: str
    nodes: list[DescNode]
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    format: str = FORMAT


def describe(graph: Graph, model: str = "") -> Description:
    """The description of ``graph`` (after fold_batch_norm and fuse_activations).

    Raises UnsupportedOpError naming every node that has no exact translation: ops outside
    OPS, broadcasting adds, non-zero pad values, max-pool padding over an input that may be
    negative (the builder pads with zeros, exact only for a non-negative input), avg-pool
    padding without count_include_pad or with divisor_override, ceil-mode or dilated pools.
    """
    bad: list[str] = []
    nodes: list[DescNode] = []
    weights: dict[str, np.ndarray] = {}
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        why = _refusal(n, by_name)
        if why:
            bad.append(f"{n.label()}: {why}")
            continue
        attrs = {k: v for k, v in n.attrs.items()}
        if n.op in ("conv2d", "linear"):
            weights[f"{n.name}.weight"] = n.params["weight"].detach().float().numpy()
            weights[f"{n.name}.bias"] = n.params["bias"].detach().float().numpy()
        nodes.append(DescNode(n.name, n.op, list(n.inputs), [int(d) for d in n.shape], attrs, n.source))
    if bad:
        raise UnsupportedOpError("no TFLite translation for: " + "; ".join(bad))
    return Description(model, graph.input.name, graph.output, nodes, weights)


def _nonnegative(n: Node, by_name: dict[str, Node]) -> bool:
    """The value is ≥ 0 by construction: a ReLU/ReLU6 output, or a pool / zero pad / flatten of one."""
    while n.op in ("max_pool2d", "avg_pool2d", "global_avg_pool", "flatten") or (n.op == "pad"
                                                                                and n.attrs["value"] == 0.0):
        n = by_name[n.inputs[0]]
    return n.op in _NONNEG_ACTS or n.attrs.get("act") in _NONNEG_ACTS


def _refusal(n: Node, by_name: dict[str, Node]) -> str:
    """Why ``n`` cannot be translated exactly ('' when it can)."""
    if n.op not in OPS:
        return f"op {n.op}"
    a = n.attrs
    if n.op == "add" and by_name[n.inputs[0]].shape != by_name[n.inputs[1]].shape:
        return "broadcasting add"
    if n.op == "pad" and a["value"] != 0.0:
        return f"pad value {a['value']}"
    if n.op in ("max_pool2d", "avg_pool2d") and a.get("ceil_mode"):
        return "ceil_mode pooling"
    if n.op == "max_pool2d":
        if list(a["dilation"]) != [1, 1]:
            return "dilated max-pool"
        if any(a["padding"]) and not _nonnegative(by_name[n.inputs[0]], by_name):
            return "padded max-pool of a possibly negative input"
    if n.op == "avg_pool2d":
        if any(a["padding"]) and not a["count_include_pad"]:
            return "padded avg-pool without count_include_pad"
        if a.get("divisor_override"):
            return "avg-pool divisor_override"
    return ""


def write(desc: Description, folder: Path) -> Path:
    """Write ``graph.json`` and ``weights.npz`` into ``folder``; returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", **desc.weights)
    body = {"format": desc.format, "model": desc.model, "input": desc.input, "output": desc.output,
            "weights": "weights.npz", "nodes": [asdict(n) for n in desc.nodes]}
    path = folder / "graph.json"
    path.write_text(json.dumps(body, indent=1))
    return path


def main(argv=None) -> int:
    """``python -m bench.vela_describe MODEL --size S --out DIR`` (the project venv)."""
    import argparse

    import torch

    from calib.capture import capture, export_module
    from calib.fold_bn import fold_batch_norm
    from calib.fuse import fuse_activations
    from waps_tvm.architectures import get_architecture

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    net = get_architecture(args.model).eval()
    graph = fuse_activations(fold_batch_norm(capture(export_module(net, (3, args.size, args.size)))))
    print(write(describe(graph, args.model), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
