"""Fuse ReLU/ReLU6 into the conv, linear or add that produces their input.

After fusion every conv/linear/add output is one quantization point (its own
activation quantizer), matching what the integer program computes: the clamp
happens in the producer's epilogue. A ReLU that reads a tensor with several
readers, or a pooling output, stays a separate node.
"""
from __future__ import annotations

from calib.graph import Graph, Node

FUSABLE = ("conv2d", "linear", "add")


def fuse_activations(graph: Graph) -> Graph:
    users = graph.consumers()
    by_name = {n.name: n for n in graph.nodes}
    fused: dict[str, str] = {}   # producer → activation
    alias: dict[str, str] = {}   # activation node → producer
    for n in graph.nodes:
        if n.op in ("relu", "relu6"):
            prod = by_name[n.inputs[0]]
            if prod.op in FUSABLE and len(users[prod.name]) == 1 and prod.attrs.get("act") is None:
                fused[prod.name] = n.op
                alias[n.name] = prod.name
    nodes = []
    for n in graph.nodes:
        if n.name in alias:
            continue
        attrs = dict(n.attrs)
        if n.name in fused:
            attrs["act"] = fused[n.name]
        nodes.append(Node(n.name, n.op, [alias.get(i, i) for i in n.inputs], attrs, n.params, n.source, n.shape))
    return graph.replace(nodes, tuple(alias.get(o, o) for o in graph.outputs))
