"""Reconstruction blocks, discovered from the graph's structure, not from class names.

A unit is the region between a tensor that forks and a join (any node with two or
more distinct inputs: add, mul, cat) where the branches meet again: for each join,
the fork is its immediate dominator (every path from the input to the join passes
through it), and the unit is every node on a path from the fork to the join. This
finds torchvision's BasicBlock, Bottleneck, InvertedResidual (with skip), RegNet's
ResBottleneckBlock, MnasNet's residual units, squeeze-excitation gates (mul),
Inception/GoogLeNet modules and SqueezeNet fire modules (cat), ShuffleNet units,
and the same shapes in any user CNN. Units that overlap are merged.

Sizes stay bounded: a unit, or a merge of units, holding more than MAX_UNIT_LAYERS
conv/linear layers is not formed (DenseNet's cats reach back over the whole dense
block; those layers fall back to single-layer blocks instead of one huge block).
Every conv/linear outside a unit is a block of its own; parameter-free nodes
(pooling, flatten, gather, standalone ReLU) join the block of their first reader.
"""
from __future__ import annotations

from dataclasses import dataclass

from calib.errors import ModelError
from calib.graph import PARAM_OPS, Graph

MAX_UNIT_LAYERS = 16  # InceptionE has 9 convs, an MBConv with SE 5; a dense block up to 96


@dataclass(frozen=True)
class Block:
    kind: str                  # "residual" or "layer"
    nodes: tuple[str, ...]     # in graph (topological) order
    inputs: tuple[str, ...]    # values read from outside the block
    outputs: tuple[str, ...]   # values read after the block, or the graph output

    @property
    def name(self) -> str:
        return self.nodes[-1]


def _dominators(graph: Graph) -> dict[str, str | None]:
    """Immediate dominator of each node in the DAG (input node → None)."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    idom: dict[str, str | None] = {}

    def intersect(a: str, b: str) -> str:
        while a != b:
            while order[a] > order[b]:
                a = idom[a]
            while order[b] > order[a]:
                b = idom[b]
        return a

    for n in graph.nodes:
        if not n.inputs:                     # a constant hangs off the input: a join reading it
            idom[n.name] = None if n.op == "input" else graph.input.name     # forks there
            continue
        d = n.inputs[0]
        for p in n.inputs[1:]:
            d = intersect(d, p)
        idom[n.name] = d
    return idom


def find_blocks(graph: Graph, residual: bool = True) -> list[Block]:
    """Partition the graph's non-input nodes into reconstruction blocks, in execution order.

    ``residual=False`` gives layer-wise blocks (AdaRound): every conv/linear alone."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    idom = _dominators(graph)
    users = graph.consumers()

    def layers_in(region: set[str]) -> int:
        return sum(1 for v in region if graph[v].op in PARAM_OPS)

    # nodes reachable backwards from each join, stopping at the fork
    units: list[set[str]] = []
    for n in graph.nodes:
        if len(set(n.inputs)) < 2 or not residual:
            continue
        fork, region, stack = idom[n.name], {n.name}, list(n.inputs)
        while stack:
            v = stack.pop()
            if v == fork or v in region:
                continue
            region.add(v)
            stack.extend(graph[v].inputs)
        if layers_in(region) <= MAX_UNIT_LAYERS:
            units.append(region)

    merged: list[set[str]] = []
    for u in units:
        overlap = [m for m in merged if m & u]
        whole = set(u).union(*overlap)
        if layers_in(whole) > MAX_UNIT_LAYERS:
            continue  # keep the units already formed; this join's layers go elsewhere
        for m in overlap:
            merged.remove(m)
        merged.append(whole)

    owner: dict[str, int] = {}
    groups: list[tuple[str, set[str]]] = [("residual", u) for u in merged]
    for i, (_, u) in enumerate(groups):
        for v in u:
            owner[v] = i
    for n in graph.nodes:
        if n.op in PARAM_OPS and n.name not in owner:
            owner[n.name] = len(groups)
            groups.append(("layer", {n.name}))
    # parameter-free glue joins its earliest reader's block (reverse order settles chains)
    for n in reversed(graph.nodes):
        if n.name in owner or n.op == "input":
            continue
        readers = [owner[u] for u in users[n.name] if u in owner]
        if not readers:  # glue producing the graph output: join its nearest owned producer
            v = n.inputs[0] if n.inputs else None
            while v is not None and v not in owner and graph[v].inputs:
                v = graph[v].inputs[0]
            readers = [owner[v]] if v in owner else []
        if not readers:
            raise ModelError(f"cannot place {n.label()} in a reconstruction block")
        target = min(readers, key=lambda i: min(order[v] for v in groups[i][1]))
        owner[n.name] = target
        groups[target][1].add(n.name)

    blocks = []
    for kind, members in groups:
        names = tuple(sorted(members, key=order.__getitem__))
        inputs = tuple(dict.fromkeys(i for v in names for i in graph[v].inputs if i not in members))
        outputs = tuple(v for v in names if v in graph.outputs or any(u not in members for u in users[v]))
        blocks.append(Block(kind, names, inputs, outputs))
    return _schedule(blocks, order, graph.input.name)


def _schedule(blocks: list[Block], order: dict[str, int], source: str) -> list[Block]:
    """The blocks in execution order: of those whose inputs are all computed, the one whose
    last node comes first in the graph. That is graph order of the last nodes wherever it
    respects the data (a chain, a residual network); a unit that a later output branch reads
    from inside (a feature pyramid's output conv on a top-down sum) runs before that branch."""
    produced, pending, out = {source}, sorted(blocks, key=lambda b: order[b.nodes[-1]]), []
    while pending:
        ready = next((b for b in pending if all(i in produced for i in b.inputs)), None)
        if ready is None:
            b = pending[0]
            missing = [i for i in b.inputs if i not in produced]
            raise ModelError(f"block ending at {b.name} reads {missing} before they are computed")
        pending.remove(ready)
        produced.update(ready.nodes)
        out.append(ready)
    return out
