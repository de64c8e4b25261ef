"""The npu16 instruction set: register writes and unit commands, 128 bits each.

Like NVDLA's per-layer register programming or VTA's queues, a layer is configured by
SET instructions (one register each) and started by a command; the simulator
(targets/npu16/npu16_sim.h) executes the stream and the cost model counts it.

Word layout (four little-endian uint32):
    w0  bits 0–7 opcode, bits 8–15 register (SET), bits 16–31 reserved (0)
    w1  low 32 bits of the value     w2  high 32 bits of the value (sign-extended)
    w3  reserved (0)
Commands: CONV (conv2d/linear on the MAC array, D1/D2 group accumulation, epilogue; with
IM2COL the tile rows are (channel, ky, kx) products of a few-channel conv),
DWCONV (depthwise: one tile of channels per array step), ADD (b optionally broadcast per
channel, position or sample, uint8 or int32 pooled sums), MAXPOOL (dilated windows),
SUMPOOL, GATHER (DMA channel gather), PAD (DMA writes the bordered layout), AVGPOOL (window
sums over a DMA'd window table, requantized in the epilogue), CONCAT (one input rescaled
through the epilogue into its channel range; one command per input), LUT (the epilogue's
lookup unit, table loaded by DMA), MUL (epilogue elementwise product, b optionally
broadcast over H·W), RESIZE (nearest: the DMA gathers each output code by the row/column
table, no epilogue; bilinear: the DMA fetches the two source rows of each output row and the
epilogue weighs four taps and requantizes, FRAC = weight bits), MATMUL (a product of two
activations, attention's Q·Kᵀ and probs·V: per head a GEMM whose stationary T×T tiles the
array loads from the second operand, held in the activation SRAM, as int8 b − 128; the first
operand streams through the rows as a − za like CONV's input, a row-sum adder beside the
array gives Σ(a − za) per position, and the epilogue adds (128 − zb)·Σ(a − za) before the
scalar requant), SOFTMAX and LAYERNORM (the row unit: per position, over the channels —
a softmax per group of C/G of them — a few passes through the epilogue's lanes with the
codes held in the activation SRAM, and per row an iterative stage for the root and the
divisor's reciprocal; integer rule of calib/numerics.py, tables by DMA), END.

Every stream starts by writing the machine registers (TILE, ARRAYS, DMA_BPC, EPI_LANES,
WAPS_*) from the target parameters (params.NPU16), so one simulator runs any config.
This module is the only definition of the opcodes, the register map and the counters:
``c_header()`` renders them as C for the simulator (targets/npu16/npu16_sim.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Op(IntEnum):
    END = 0
    SET = 1
    CONV = 2
    DWCONV = 3
    ADD = 4
    MAXPOOL = 5
    SUMPOOL = 6
    GATHER = 7
    PAD = 8
    AVGPOOL = 9
    CONCAT = 10
    LUT = 11
    MUL = 12
    RESIZE = 13
    MATMUL = 14
    SOFTMAX = 15
    LAYERNORM = 16


MAX_GROUPS = 8           # WAPS groups the D1/D2 datapath holds (σ/n/tile registers per group)


class Reg(IntEnum):
    N = 0
    C = 1
    H = 2
    W = 3
    M = 4
    KH = 5
    KW = 6
    CONV_GROUPS = 7
    SH = 8
    SW = 9
    PH = 10
    PW = 11
    DH = 12
    DW = 13
    Z_IN = 14
    Z_OUT = 15
    LO = 16
    HI = 17
    FRAC = 18
    NGROUPS = 19
    IN_WIDE = 20          # input codes are int32 (pooled sums)
    ZA = 21
    ZB = 22
    KA = 23
    KB = 24
    T = 25
    COUNT = 26
    OUT_CHANNELS = 27     # gather: output channel count
    INNER = 28            # gather: elements per channel
    SIGMA0 = 32                          # σ_p for p = 0..MAX_GROUPS-1
    NSHIFT0 = 32 + MAX_GROUPS            # n_p
    TILES0 = 32 + 2 * MAX_GROUPS         # in-tiles of WAPS group p (per conv group)
    TILE = 32 + 3 * MAX_GROUPS           # machine registers (params.NPU16), set by every stream
    ARRAYS = 33 + 3 * MAX_GROUPS
    DMA_BPC = 34 + 3 * MAX_GROUPS        # DMA bytes per cycle
    EPI_LANES = 35 + 3 * MAX_GROUPS      # epilogue values per cycle
    WAPS_SWITCH = 36 + 3 * MAX_GROUPS    # cycles per non-empty group switch (D1 → D2)
    WAPS_MERGE = 37 + 3 * MAX_GROUPS     # cycles to merge the groups
    WAPS_PIPELINED = 38 + 3 * MAX_GROUPS
    DOUBLE_BUFFER = 39 + 3 * MAX_GROUPS  # DMA overlaps compute (1) or takes turns with it (0)
    WEIGHT_BPC = 83       # weights' own port, bytes per cycle (0: they share DMA_BPC)
    OH = 64               # avgpool, resize: output size (the window / source table's length)
    OW = 65
    PAD_TOP = 66
    PAD_LEFT = 67
    PAD_BOTTOM = 68
    PAD_RIGHT = 69
    PAD_VALUE = 70        # pad: the border code
    MULT = 71             # mul, resize: requant multiplier and shift (scalars)
    SHIFT = 72
    B_BCAST = 73          # mul: b is [N, C] broadcast over INNER; add: b is broadcast (B_C, B_INNER, B_WIDE)
    C_OFFSET = 74         # concat: first output channel of this input
    INPUT_SEL = 75        # concat: which input buffer the command reads
    LUT_SIZE = 76         # lut: table entries (2^A)
    B_C = 77              # add with B_BCAST: b has C channels (0: one per sample position)
    B_INNER = 78          # add with B_BCAST: b has INNER positions (0: one per channel)
    B_WIDE = 79           # add with B_BCAST: b holds int32 codes (global-pool sums)
    STRIPE_ROWS = 80      # conv/dwconv: output rows per row stripe (targets/npu16/memory.py)
    STRIPE_TILES = 81     # conv/dwconv: output tiles per weight stripe
    W_RESIDENT = 82       # conv/dwconv: all weights fit SRAM, fetched once (else per row stripe or sample)
    STRIPE_ORDER = 84     # conv/dwconv: 0 row stripes outside weight stripes, 1 weight stripes outside
    CPV_ADD = 85          # machine: cycles per value of the add, mul, pool and lookup units in
    CPV_MUL = 86          # 1/256 cycle (params.NPU16.unit_q8); 0: the epilogue's EPI_LANES
    CPV_POOL = 87
    CPV_LUT = 88
    IM2COL = 89           # conv: 1 = tile rows are (channel, ky, kx) products, one step per in-tile
                          # (targets/npu16/first_layer.py); 0 = T channels of one tap
    KEEP_IN = 90          # cascading (codegen/npu16/cascade.py): bit i = input i is already in the
                          # activation SRAM (a chain's kept intermediate): no DMA, its bytes count as saved
    KEEP_OUT = 91         # 1 = the output stays in the activation SRAM for the next op of the chain
    MM_POSITIONS = 92     # matmul: 0 = contract channels (b's [K = D, L] as stored), 1 = contract
                          # positions (b's [D, L] read transposed: rows j < L = K, columns d)
    CPV_ROW = 93          # machine: the row unit's cycles per value and pass (1/256 cycle; 0: EPI_LANES)
    ROW_CYCLES = 94       # machine: the row unit's iterative stage per row (root, reciprocal)
    NORM_P = 95           # layer norm: p (the root's extra bits), e (eps in the root's units), k (gain bits)
    NORM_E = 96
    NORM_K = 97


NREGS = 128
# What the simulator counts per op (int64 each, in this order): the hardware's event
# counters, which targets/npu16/cost.py estimates analytically and tests hold equal.
COUNTERS = ("macs", "array_steps", "waps_cycles", "shifts", "adds", "epilogue_values", "dma_in_bytes",
            "dma_out_bytes", "compute_cycles", "dma_cycles", "epilogue_cycles", "cycles", "stripes",
            "dma_weight_bytes",          # of dma_in_bytes: constants (weights, tables), over the weight port
            "dma_saved_bytes")           # bytes a chain kept in SRAM (KEEP_IN/KEEP_OUT) instead of moving
# C spellings of registers whose C name predates this module (the simulator's arithmetic uses them)
_C_NAME = {"CONV_GROUPS": "G", "Z_IN": "ZIN", "Z_OUT": "ZOUT", "OUT_CHANNELS": "OUTC"}


def c_header() -> str:
    """The opcodes, register map, limits and counters struct as a C header (``npu16_isa.h``)."""
    from targets.npu16.params import CPV_STEPS, MAX_TILE
    ops = ", ".join(f"NPU16_{o.name} = {o.value}" for o in Op)
    regs = ", ".join(f"R_{_C_NAME.get(r.name, r.name)} = {r.value}" for r in Reg)
    return (f"/* npu16_isa.h: generated by targets/npu16/isa.py c_header(); do not edit. */\n"
            f"#ifndef NPU16_ISA_H\n#define NPU16_ISA_H\n#include <stdint.h>\n"
            f"#define NPU16_MAX_GROUPS {MAX_GROUPS}\n#define NPU16_MAX_TILE {MAX_TILE}\n"
            f"#define NPU16_CPV_STEPS {CPV_STEPS}\n"
            f"#define NPU16_NCOUNTERS {len(COUNTERS)}\n"
            f"enum {{ {ops} }};\nenum {{ {regs}, R_NREGS = {NREGS} }};\n"
            f"typedef struct {{ int64_t {', '.join(COUNTERS)}; }} npu16_counters;\n#endif\n")


@dataclass(frozen=True)
class Instr:
    op: Op
    reg: int = 0
    value: int = 0


def set_(reg: Reg, value: int) -> Instr:
    return Instr(Op.SET, int(reg), int(value))


def encode(stream: list[Instr]) -> np.ndarray:
    """Instructions → uint32 [len, 4]."""
    out = np.zeros((len(stream), 4), np.uint32)
    for i, ins in enumerate(stream):
        if not -(2**63) <= ins.value < 2**63:
            raise ValueError(f"value {ins.value} does not fit 64 bits")
        if not 0 <= ins.reg < 256:
            raise ValueError(f"register {ins.reg} out of range")
        v = ins.value & (2**64 - 1)
        out[i] = (int(ins.op) | (ins.reg << 8), v & 0xFFFFFFFF, v >> 32, 0)
    return out


def decode(words: np.ndarray) -> list[Instr]:
    """uint32 [len, 4] → instructions (inverse of encode)."""
    words = np.asarray(words, np.uint64).reshape(-1, 4)
    out = []
    for w0, lo, hi, _ in words:
        v = int(lo) | (int(hi) << 32)
        if v >= 2**63:
            v -= 2**64
        out.append(Instr(Op(int(w0) & 0xFF), (int(w0) >> 8) & 0xFF, v))
    return out


def machine_registers(npu) -> list[Instr]:
    from targets.npu16.params import UNITS
    """The SETs that describe the machine (a params.NPU16) to the simulator: every stream's prologue."""
    return [set_(Reg.TILE, npu.tile), set_(Reg.ARRAYS, npu.arrays), set_(Reg.DMA_BPC, npu.dma_bytes_per_cycle),
            set_(Reg.EPI_LANES, npu.epilogue_width), set_(Reg.WAPS_SWITCH, npu.waps_switch_cycles),
            set_(Reg.WAPS_MERGE, npu.waps_merge_cycles), set_(Reg.WAPS_PIPELINED, int(npu.waps_pipelined)),
            set_(Reg.DOUBLE_BUFFER, int(npu.double_buffer)), set_(Reg.WEIGHT_BPC, npu.weight_bytes_per_cycle),
            set_(Reg.ROW_CYCLES, npu.row_cycles),
            *(set_(Reg[f"CPV_{u.upper()}"], npu.unit_q8(u)) for u in UNITS)]
