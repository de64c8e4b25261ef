"""Host fallback time: what the ops the NPU cannot run cost on the host CPU beside it.

An npu16 build places every op the NPU cannot run on the host with a reason
(codegen/npu16/lower.py, ``HOST_KINDS``); the host (params.Host) runs it on tensors in the
DRAM it shares with the NPU's DMA, reading the NPU's outputs and writing its own back. As
Vela reports CPU-fallback ops apart from the NPU's, the report gives these ops host cycles
and time in their own columns, never mixed into the NPU's cycles.

Counts follow each kind's integer rule (calib/numerics.py; the host runs the TE kernels of
relay_passes/kernels.py, which compute the same expressions). ``ops`` are simple integer or
float operations (add, compare, shift, multiply, table lookup, convert, clamp side); a 64-bit
integer division, and the float64 root of the layer norm, are counted apart (``divisions``)
and weigh ``Host.div_ops`` ops each. Per element of the op's input, for n samples:

    softmax     (m − x̄ over a group of C/G codes)  compare for the max 1; m − x̄ 1; table
                lookup 1; add into S 1; e·r 1; 2·num + den 2; + z_out 1; clamp 2 → 10 ops
                and 1 division; per group and position S·2^k and 2·den → 2 ops
    layer_norm  Σx 1; y = C·x − s 2; y² and its sum 2; y·g·2^p 2; b·D 1; + 1; 2·num + den 2;
                + z_out 1; clamp 2 → 14 ops and 1 division; per position ·4^p, + e,
                D·2^k, 2·den → 4 ops, ÷C 1 division, the root (numerics.isqrt: a float64
                root → 1 division, then two converts, floor and one correction each way
                (multiply, compare, select) → 9 ops): 13 ops and 2 divisions
    quantize    float x / s, + 0.5, floor, + z, min, max, convert → 7 ops (float; the
                float divide is pipelined and counted as one op)
    dequantize  convert, − z, · s → 3 ops
    flatten,    a reshape of a contiguous NCHW buffer is a view (Relax reshape): 0 ops,
    reshape     0 bytes, 0 cycles; an input in another physical layout (NHWC) is copied:
                0 ops, its bytes read and written
    constant    the codes [C, H, W] written once per sample (broadcast): read and write
                n·C·H·W code bytes, 0 ops

An op of a kind the NPU runs can fall back too (a layer whose stripe does not fit the SRAM
or with more WAPS groups than the datapath holds, int32 codes into a uint8 unit, a machine
without the row unit). Its host work is counted from its npu16 cost query's arguments
(targets/npu16/report.HOST_FROM_NPU: the same shapes), with the TE kernel's expression:

    layer       conv2d/linear: 1 op per MAC (a multiply-add; the input zero point is one
                per-output correction), per output 8 ops (z correction, bias, requant's
                multiply, rounding add and shift, + z_out, clamp 2) and 4 more per WAPS group
                beyond the first (its shift, rounding, σ term and merge add)
    matmul      1 op per MAC, 8 per output (the zero-point terms, requant, clamp)
    add         per output 10: (x − z)·k twice (4), the rounding add, the shift, + z_out, clamp 2
    mul         per output 9: two subtractions, the product, requant 3, + z_out, clamp 2
    lut         per value 1 (the lookup)
    pool        per window tap 1 (compare or add), per output 1 (store)
    avg_pool    per window tap 1, per output 7 (− z·taps, requant 3, + z_out, clamp 2)
    concat      per value 7 (the rescale: −z, ·k, rounding add, shift; + z_out, clamp 2)
    resize      bilinear: per output 19 (four taps' subtractions and products and their
                sums 13, requant 3, + z_out, clamp 2); nearest: a copy, 0 ops
    gather, pad a copy: 0 ops, the bytes read and written
    row         softmax or layer norm: as above

Bytes: the input read once (a softmax group or layer norm position is at most a few
thousand codes and stays in L1 between its passes), the op's tables or per-channel constants
read once (softmax exp table int32, layer norm g and b int32), the output written once.

Time (cycles) = ⌈max((ops + divisions·div_ops) / ops_per_cycle, (read + written) /
bytes_per_cycle)⌉, a roofline: arithmetic and the load/store stream overlap (hardware
prefetch), so the slower of the two bounds the op ("compute" or "memory"); time_us =
cycles / host clock_mhz.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from targets.npu16.params import Host

SOFTMAX_ELEM_OPS, SOFTMAX_ROW_OPS = 10, 2
NORM_ELEM_OPS, NORM_POS_OPS, NORM_POS_DIVS = 14, 13, 2
QUANTIZE_OPS, DEQUANTIZE_OPS = 7, 3


@dataclass(frozen=True)
class HostCost:
    """One host op's work: simple ``ops``, 64-bit ``divisions``, DRAM bytes read and written."""
    kind: str
    ops: int
    divisions: int
    read_bytes: int
    write_bytes: int
    note: str = ""

    def work(self, host: Host) -> float:
        """Operations with each division weighed as ``div_ops``."""
        return self.ops + self.divisions * host.div_ops

    def compute_cycles(self, host: Host) -> int:
        return math.ceil(self.work(host) / host.ops_per_cycle)

    def memory_cycles(self, host: Host) -> int:
        return math.ceil((self.read_bytes + self.write_bytes) / host.bytes_per_cycle)

    def cycles(self, host: Host) -> int:
        return max(self.compute_cycles(host), self.memory_cycles(host))

    def bound(self, host: Host) -> str:
        if not self.cycles(host):
            return "none"
        return "compute" if self.compute_cycles(host) >= self.memory_cycles(host) else "memory"

    def time_us(self, host: Host) -> float:
        return self.cycles(host) / host.clock_mhz


def softmax_cost(elems: int, rows: int, in_bytes: int = 1, out_bytes: int = 1, table_entries: int = 256) -> HostCost:
    """A softmax over ``elems`` codes in ``rows`` (groups × positions × samples) of C/G codes."""
    return HostCost("softmax", SOFTMAX_ELEM_OPS * elems + SOFTMAX_ROW_OPS * rows, elems,
                    elems * in_bytes + 4 * table_entries, elems * out_bytes)


def layer_norm_cost(elems: int, positions: int, channels: int, in_bytes: int = 1, out_bytes: int = 1) -> HostCost:
    """A layer norm over ``elems`` codes: ``positions`` (samples × spatial) of ``channels`` each."""
    return HostCost("layer_norm", NORM_ELEM_OPS * elems + NORM_POS_OPS * positions,
                    elems + NORM_POS_DIVS * positions, elems * in_bytes + 8 * channels, elems * out_bytes)


MAC_OPS, LAYER_OUT_OPS, LAYER_GROUP_OPS, MATMUL_OUT_OPS = 1, 8, 4, 8
ELEMENT_OPS = {"add": 10, "mul": 9, "lut": 1, "concat": 7, "bilinear": 19, "copy": 0}
POOL_OUT_OPS, AVG_POOL_OUT_OPS = 1, 7


def kernel_cost(kind: str, ops: int, read_bytes: int, write_bytes: int, note: str = "") -> HostCost:
    """A host kernel of ``ops`` simple operations (no divisions) over its bytes: the form of
    every offloadable kind that falls back (counts from report.HOST_FROM_NPU)."""
    return HostCost(kind, ops, 0, read_bytes, write_bytes, note)


def quantize_cost(elems: int, in_bytes: int = 4, out_bytes: int = 1) -> HostCost:
    return HostCost("quantize", QUANTIZE_OPS * elems, 0, elems * in_bytes, elems * out_bytes)


def dequantize_cost(elems: int, in_bytes: int = 1, out_bytes: int = 4) -> HostCost:
    return HostCost("dequantize", DEQUANTIZE_OPS * elems, 0, elems * in_bytes, elems * out_bytes)


def view_cost(elems: int, elem_bytes: int = 1, contiguous: bool = True) -> HostCost:
    """A flatten or reshape: a view when the buffer is contiguous in the logical order, else a copy."""
    if contiguous:
        return HostCost("view", 0, 0, 0, 0, "a view of the contiguous buffer: no work")
    return HostCost("view", 0, 0, elems * elem_bytes, elems * elem_bytes, "a copy into the logical order")


def constant_cost(elems: int, elem_bytes: int = 1) -> HostCost:
    """The codes written once per sample (``elems``: the whole batch's output)."""
    return HostCost("constant", 0, 0, elems * elem_bytes, elems * elem_bytes, "the codes copied per sample")


# a host query's ``fn`` → its count function (keyword arguments: the query's args)
HOST_COSTS: dict[str, Callable[..., HostCost]] = {
    "softmax": softmax_cost, "layer_norm": layer_norm_cost, "quantize": quantize_cost,
    "dequantize": dequantize_cost, "view": view_cost, "constant": constant_cost, "kernel": kernel_cost}


def host_row(fn: str, args: dict, host: Host) -> dict:
    """The report's host columns of one op: its counts, cycles, bound and time on ``host``, and
    the query ({"fn", "args"}) that re-costs it for another host."""
    if fn not in HOST_COSTS:
        raise ValueError(f"no host cost for {fn!r}")
    c = HOST_COSTS[fn](**args)
    return {"ops": c.ops, "divisions": c.divisions, "work": c.work(host), "read_bytes": c.read_bytes,
            "write_bytes": c.write_bytes, "cycles": c.cycles(host), "bound": c.bound(host),
            "time_us": c.time_us(host), "note": c.note, "query": {"fn": fn, "args": args}}
