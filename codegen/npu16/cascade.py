"""Multi-op partitions: chains of npu16 ops run back to back as one partition (issue 15).

``chains(program, where, npu)`` finds the maximal chains of offloaded ops in which each op's
output has exactly one consumer, the next op of the chain (not a model output), read as one
of that op's inputs: conv → conv, 1×1 → depthwise → 1×1 → residual add (the add's other
input comes from outside the chain, e.g. the chain's input, by DMA as before), conv → pool,
attention's scores matmul → softmax → probs·V matmul, conv → layer norm → conv.
Only ops run as one command that moves its activations through the DMA of the simulator's
``npu16_dma_in``/``npu16_dma_out`` (``CHAIN_COMMANDS``) are chained, and only in NCHW uint8.
An add fed by two chainable producers continues the later one's chain (program order).

Each intermediate (``Link``) is kept in the activation SRAM when ``memory.keeps`` says it fits
next to the two ops' working sets (the one definition of SRAM use, targets/npu16/memory.py);
else it spills to host memory through the DMA (still one partition, bit-exact either way).
A kept link's producer gets ``KEEP_OUT`` 1 and its consumer bit ``input_index`` of
``KEEP_IN``: the simulator skips those DMA bytes and counts them in ``dma_saved_bytes``, and
the cost model does the same (cost.cascaded). With ``npu.cascade`` false there are no
chains: every op is its own partition, as before.

TVM's own route, ``FuseOpsByPattern`` + ``MergeCompositeFunctions``, is not used: the
passes already produce one Relax function per integer op (nothing for an operator pattern
to match), and ``MergeCompositeFunctions`` on those functions marked ``Composite`` fails in
TVM 0.27 with "Check failed: (it_group != obj2group_.end()) is false: Variable lv could not
be found in any group" (it expects composites nested in FuseOpsByPattern's functions). The
chain is formed here, over the integer program (``form`` over ``Node``s, so a captured graph
gets the same rule: bench/graph_cost.graph_chains), and codegen/npu16/merge.py merges its
calls in Relax.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from codegen.npu16.lower import NpuOp
from targets.npu16 import memory
from targets.npu16.isa import Op, Reg, set_
from targets.npu16.params import NPU16

# conv2d/linear, add, max_pool2d, matmul, softmax, layer_norm
CHAIN_COMMANDS = (Op.CONV, Op.DWCONV, Op.ADD, Op.MAXPOOL, Op.MATMUL, Op.SOFTMAX, Op.LAYERNORM)


@dataclass(frozen=True)
class Link:
    """The intermediate between two consecutive ops of a chain: ``producer``'s output, read as
    input ``input_index`` of ``consumer``; ``nbytes`` uint8 codes (whole batch); ``kept`` in SRAM."""
    producer: str
    consumer: str
    input_index: int
    nbytes: int
    kept: bool


@dataclass(frozen=True)
class Chain:
    ops: tuple[str, ...]
    links: tuple[Link, ...]

    def keep_in(self, op: str) -> tuple[int, ...]:
        """Inputs of ``op`` read from the SRAM (kept links into it)."""
        return tuple(lk.input_index for lk in self.links if lk.consumer == op and lk.kept)

    def keep_out(self, op: str) -> bool:
        return any(lk.producer == op and lk.kept for lk in self.links)


@dataclass(frozen=True)
class Node:
    """What chain forming needs of one op: its inputs (names), its output's size in bytes
    (uint8 codes, whole batch), the activation SRAM its stripes use for input rows and for
    output rows (memory.StripePlan; 0: it streams) and whether it may be chained at all
    (offloaded, lowered to one ``CHAIN_COMMANDS`` command, NCHW, uint8 out)."""
    name: str
    inputs: tuple[str, ...]
    nbytes: int
    sram_in: int
    sram_out: int
    chainable: bool


def form(nodes: list[Node], outputs: set[str], npu: NPU16) -> list[Chain]:
    """The chains (2 ops or more) of ``nodes`` (in program order; ``outputs``: names the model
    returns), each link kept or spilled, in program order; none when ``npu.cascade`` is off."""
    if not npu.cascade:
        return []
    by_name = {n.name: n for n in nodes}
    users: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    nxt: dict[str, str] = {}
    prev: dict[str, str] = {}
    for n in nodes:                              # program order: a later producer replaces an earlier one
        us = users.get(n.name, [])
        if not (n.chainable and n.name not in outputs and len(us) == 1):
            continue
        user = us[0]
        if user.chainable and user.inputs.count(n.name) == 1:
            if user.name in prev:
                del nxt[prev[user.name]]
            nxt[n.name], prev[user.name] = user.name, n.name
    out = []
    for n in nodes:
        if n.name in nxt and n.name not in prev:
            names = [n.name]
            while names[-1] in nxt:
                names.append(nxt[names[-1]])
            out.append(_decide([by_name[k] for k in names], npu))
    return out


def chains(program, where: list[dict], npu: NPU16) -> list[Chain]:
    """The chains of ``program``'s offloaded ops (``where``: byoc.placement rows, with their
    ``lowered`` NpuOp) on ``npu``."""
    low = {r["op"]: r["lowered"] for r in where if r["target"] == "npu16"}
    nodes = [Node(op.name, tuple(op.inputs), int(np.prod(op.shape)),
                  low[op.name].sram_in if op.name in low else 0, low[op.name].sram_out if op.name in low else 0,
                  op.name in low and op.schedule.layout == "NCHW" and op.dtype == "uint8"
                  and _command(low[op.name]))
             for op in program.ops]
    return form(nodes, set(program.outputs), npu)


def _decide(nodes: list[Node], npu: NPU16) -> Chain:
    """The chain's links, each kept in SRAM or spilled (memory.keeps), first to last."""
    links, held = [], 0
    for a, b in zip(nodes, nodes[1:]):
        kept = memory.keeps(a.nbytes, a.sram_in, b.sram_out, npu, held)
        links.append(Link(a.name, b.name, b.inputs.index(a.name), a.nbytes, kept))
        held = a.nbytes if kept else 0
    return Chain(tuple(n.name for n in nodes), tuple(links))


def cascaded_cost(cost, input_bytes: list[int], keep_in: tuple[int, ...], keep_out: bool, npu: NPU16):
    """An op's cost.LayerCost with its kept inputs (``input_bytes``: the activation DMA bytes
    of each input as the op moves them) and output saved (cost.cascaded)."""
    from targets.npu16.cost import cascaded
    if not keep_in and not keep_out:
        return cost
    return cascaded(cost, sum(input_bytes[i] for i in keep_in), keep_out, npu)


def with_keep(low: NpuOp, keep_in: tuple[int, ...], keep_out: bool) -> NpuOp:
    """``low`` with the KEEP_IN / KEEP_OUT registers set before its command (the stream is
    unchanged when nothing is kept)."""
    if not keep_in and not keep_out:
        return low
    mask = sum(1 << i for i in keep_in)
    s = low.stream
    return replace(low, stream=[*s[:-2], set_(Reg.KEEP_IN, mask), set_(Reg.KEEP_OUT, int(keep_out)), *s[-2:]])


def _command(low: NpuOp) -> bool:
    """One command of the chainable units, then END."""
    cmds = [i.op for i in low.stream if i.op != Op.SET]
    return len(cmds) == 2 and cmds[0] in CHAIN_COMMANDS and cmds[1] == Op.END


_LAST: list = []          # (program, npu, keeps) of the last ``keeps_of`` call: estimates ask per op


def keeps_of(program, npu: NPU16) -> dict[str, dict]:
    """{op name: {"inputs": kept input indices, "output": kept}} of every chained op of
    ``program`` on ``npu``, as the npu16 offload decides it (each op lowered for ``npu``)."""
    if _LAST and _LAST[0] is program and _LAST[1] == npu:
        return _LAST[2]
    from codegen.npu16.lower import NotOnNpu, lower_op
    where = []
    for op in program.ops:
        try:
            low = lower_op(op.kind, op.attrs, [program.shape_of(i) for i in op.inputs],
                           [program.dtype_of(i) for i in op.inputs], op.params, npu)
            where.append({"op": op.name, "target": "npu16", "lowered": low})
        except NotOnNpu:
            where.append({"op": op.name, "target": "llvm", "lowered": None})
    out = {op: {"inputs": list(ch.keep_in(op)), "output": ch.keep_out(op)}
           for ch in chains(program, where, npu) for op in ch.ops}
    _LAST[:] = [program, npu, out]
    return out
