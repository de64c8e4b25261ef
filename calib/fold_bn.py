"""Fold inference batch norm into the preceding conv/linear (a uniform scale into a matmul).

y = γ·(W*x + b − μ)/√(σ² + ε) + β  ⇒  W' = W·γ/√(σ² + ε) (per output channel),
b' = (b − μ)·γ/√(σ² + ε) + β. Exact in real arithmetic; done in float64 so the
folded float32 model matches the original to rounding.
"""
from __future__ import annotations

import torch

from calib.errors import UnsupportedOpError
from calib.graph import Graph, Node


def fold_batch_norm(graph: Graph) -> Graph:
    """Return a graph with every batch_norm folded into its producer.

    Batch norms in a row (a frozen batch norm captured as a scale and a shift) fold one after
    the other. A batch_norm whose input is not a conv/linear read by nothing else (DenseNet's
    pre-activation BN after a cat or pool) becomes a 1×1 depthwise conv2d with the
    BN's per-channel scale and shift: the integer program has no BN op, and one weight
    per output channel is exact under per-channel symmetric weight quantization.
    """
    users = graph.consumers()
    by_name = {n.name: n for n in graph.nodes}
    folded: dict[str, Node] = {}
    alias: dict[str, str] = {}
    standalone: dict[str, Node] = {}
    bad = []
    for bn in graph.nodes:
        if bn.op != "batch_norm":
            continue
        src = bn.inputs[0]
        r = alias.get(src, src)               # a batch_norm folded already: its conv, as folded
        prod = folded.get(r) or standalone.get(r) or by_name[r]
        p = bn.params
        scale = p["weight"].double() / torch.sqrt(p["var"].double() + bn.attrs["eps"])
        shift = p["bias"].double() - p["mean"].double() * scale
        if prod.op == "matmul" and len(users[src]) == 1 and not shift.any() and bool((scale == scale[0]).all()):
            # attention scores times a number (q·kᵀ·d^-½ written out): the matmul's alpha
            folded[prod.name] = Node(prod.name, prod.op, prod.inputs,
                                     {**prod.attrs, "alpha": float(prod.attrs["alpha"] * scale[0])}, {},
                                     prod.source, bn.shape)
            alias[bn.name] = prod.name
            continue
        if prod.op not in ("conv2d", "linear") or len(users[src]) != 1:
            if len(bn.shape) != 3:
                bad.append(f"{bn.label()}: batch_norm of a {len(bn.shape) + 1}-D tensor not after a conv/linear")
                continue
            c = scale.shape[0]
            standalone[bn.name] = Node(bn.name, "conv2d", list(bn.inputs),
                                       {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": c,
                                        "act": None},
                                       {"weight": scale.float().reshape(c, 1, 1, 1), "bias": shift.float()},
                                       bn.source, bn.shape)
            continue
        w = prod.params["weight"].double()
        w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b = (prod.params["bias"].double() - p["mean"].double()) * scale + p["bias"].double()
        folded[prod.name] = Node(prod.name, prod.op, prod.inputs, dict(prod.attrs),
                                 {"weight": w.float(), "bias": b.float()}, prod.source, bn.shape)
        alias[bn.name] = prod.name
    if bad:
        raise UnsupportedOpError("unsupported layers: " + "; ".join(bad))
    nodes = []
    for n in graph.nodes:
        if n.op == "batch_norm" and n.name not in standalone:
            continue
        n = standalone.get(n.name, n)
        n = folded.get(n.name, n)
        nodes.append(Node(n.name, n.op, [alias.get(i, i) for i in n.inputs], n.attrs, n.params, n.source, n.shape))
    return graph.replace(nodes, tuple(alias.get(o, o) for o in graph.outputs))
