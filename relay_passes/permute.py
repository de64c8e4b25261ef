"""PermuteChannels: make every WAPS layer's input groups contiguous channel runs.

Tensors whose channel order must agree form a class (union-find): an op and the
inputs of channel-wise ops (relay_passes/opset.py: Channels.CHANNELWISE, and depthwise
convs) share one; the inputs and output of a PINNED op (concat, gather, quantize,
dequantize) keep the identity order.
A class may take any channel order π (position j holds original channel π[j]) when
its producers are conv/linear layers that can emit their output channels in that
order (weights, bias, M, shift rows permuted), and it is fixed at the identity when
it touches a pinned op or a grouped (RegNet-style) conv, whose conv-group membership
pins its channels. Every conv/linear reading a class reorders
its weights' input axis (and group labels) by π, which costs nothing at run time.

For each class the pass tries each WAPS consumer's own grouping order (channels
sorted stably by group label) and the identity, and keeps the one that leaves the
fewest consumers with split groups; each of those gets an explicit ``gather`` (a
channel take) before it, into its own order. ``gathers`` on the returned report
counts them. Flattened tensors carry the class order in blocks of H·W features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from relay_passes.attrs import GatherAttrs
from relay_passes.kernels import group_ranges
from relay_passes.opset import KINDS, Channels, is_layer
from relay_passes.program import waps_pass, INPUT, Op, Program, emit, parse


@dataclass
class PermuteReport:
    classes: int = 0
    permuted: int = 0
    gathers: int = 0
    gathered_layers: list[str] = field(default_factory=list)


def _wants(op: Op) -> bool:
    """A consumer whose WAPS groups need contiguous input channels."""
    return is_layer(op) and "groups" in op.params and not _grouped_conv(op)


def _grouped_conv(op: Op) -> bool:
    return is_layer(op) and op.attrs.grouped and not _depthwise(op)


def _depthwise(op: Op) -> bool:
    return is_layer(op) and op.attrs.grouped and op.params["w"].shape[1] == 1


def _broadcast(prog: Program, name: str, op: Op) -> bool:
    """Input ``name`` of ``op`` is one channel broadcast to all (an add operand): any order reads it."""
    shape = prog.shape_of(name)
    return len(shape) > 1 and shape[1] == 1 != prog.shape_of(op.name)[1] and len(shape) == len(prog.shape_of(op.name))


class _UF:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def permute_channels(program: Program) -> tuple[Program, PermuteReport]:
    prog = program.copy()
    if any(not o.shape for o in prog.ops):
        emit(prog)                          # shapes are needed below
    uf = _UF()
    unit: dict[str, int] = {}                 # features per base channel for each tensor
    for op in prog.ops:
        uf.find(op.name)
        unit[op.name] = 1
        if KINDS[op.kind].channels is Channels.CHANNELWISE or _depthwise(op):
            joined = [i for i in op.inputs if not _broadcast(prog, i, op)]
            for i in joined:
                uf.union(op.name, i)
            src = joined[0] if joined else op.inputs[0]
            # features along dim 1 per input channel: 1, H·W for a flatten of [N, C, H, W], the
            # multiplier of a depthwise conv
            unit[op.name] = unit[src] * (prog.shape_of(op.name)[1] // prog.shape_of(src)[1])
    fixed: set[str] = set()
    for op in prog.ops:
        if KINDS[op.kind].channels is Channels.PINNED or _grouped_conv(op):
            fixed.update(uf.find(v) for v in [op.name, *op.inputs])

    classes: dict[str, list[str]] = {}
    for op in prog.ops:
        classes.setdefault(uf.find(op.name), []).append(op.name)
    readers: dict[str, list[Op]] = {}
    for op in prog.ops:
        if is_layer(op) and not _depthwise(op) and op.inputs[0] != INPUT:
            readers.setdefault(uf.find(op.inputs[0]), []).append(op)

    report = PermuteReport(classes=len(classes))
    orders: dict[str, np.ndarray] = {}
    gathers: dict[str, np.ndarray] = {}      # consumer name → its desired order (original channels)
    for root, members in classes.items():
        base = _base_channels(prog, members, unit)
        cons = [c for c in readers.get(root, []) if _wants(c)]
        labels = {c.name: _base_labels(c, unit[c.inputs[0]]) for c in cons}
        candidates = [np.arange(base)]
        if root not in fixed:
            candidates += [np.argsort(labels[c.name], kind="stable") for c in cons]
        best, best_bad = None, None
        for cand in candidates:
            bad = [c for c in cons if group_ranges(labels[c.name][cand], c.n_groups) is None]
            if best is None or len(bad) < len(best_bad):
                best, best_bad = cand, bad
        orders[root] = best
        if not np.array_equal(best, np.arange(base)):
            report.permuted += 1
        for c in best_bad:
            gathers[c.name] = np.argsort(labels[c.name], kind="stable")
    _apply(prog, uf, unit, orders, gathers, report)
    return prog, report


def _base_channels(prog: Program, members: list[str], unit: dict[str, int]) -> int:
    name = members[0]
    return prog.shape_of(name)[1] // unit[name]


def _base_labels(op: Op, u: int) -> np.ndarray:
    """Group label of each base channel of the consumer's input (first feature of its block)."""
    return op.params["groups"][::u].astype(np.int64)


def _expand(order: np.ndarray, u: int) -> np.ndarray:
    return (order[:, None] * u + np.arange(u)[None, :]).reshape(-1) if u > 1 else order


def _apply(prog: Program, uf: _UF, unit, orders, gathers, report: PermuteReport) -> None:
    new_ops: list[Op] = []
    for op in prog.ops:
        if is_layer(op):
            root_out = uf.find(op.name)
            pi_out = orders[root_out]
            if op.inputs[0] != INPUT and not _depthwise(op):
                root_in = uf.find(op.inputs[0])
                u = unit[op.inputs[0]]
                order_in = orders[root_in]
                if op.name in gathers:
                    want = gathers[op.name]
                    inv = np.argsort(order_in)
                    index = _expand(inv[want], u).astype(np.int32)
                    g = Op("gather", prog.unique_name(f"gather_{op.name}"), [op.inputs[0]], GatherAttrs(),
                           {"index": index}, prog.shape_of(op.inputs[0]), prog.dtype_of(op.inputs[0]))
                    new_ops.append(g)
                    op.inputs = [g.name]
                    order_in = want
                    report.gathers += 1
                    report.gathered_layers.append(op.label)
                _permute_inputs(op, _expand(order_in, u))
            _permute_outputs(op, pi_out)
        new_ops.append(op)
    prog.ops = new_ops


def _permute_inputs(op: Op, order: np.ndarray) -> None:
    if is_layer(op) and op.attrs.grouped:
        return                                    # fixed classes only: order is the identity
    op.params["w"] = np.ascontiguousarray(op.params["w"][:, order])
    if "groups" in op.params:
        op.params["groups"] = np.ascontiguousarray(op.params["groups"][order])


def _permute_outputs(op: Op, order: np.ndarray) -> None:
    if np.array_equal(order, np.arange(order.size)):
        return
    for k in ("w", "bias", "mult", "shift"):
        op.params[k] = np.ascontiguousarray(op.params[k][order])
    if _depthwise(op) and "groups" in op.params:
        op.params["groups"] = np.ascontiguousarray(op.params["groups"][order])


def PermuteChannels(sink=None):  # noqa: N802 (TVM pass naming)
    """The pass; ``sink(PermuteReport)`` receives its report when given."""
    @waps_pass("waps.PermuteChannels")
    def _pass(mod, ctx):
        prog, report = permute_channels(parse(mod))
        if sink is not None:
            sink(report)
        return emit(prog)
    return _pass
