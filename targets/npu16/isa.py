"""The npu16 instruction set: register writes and unit commands, 128 bits each.

Like NVDLA's per-layer register programming or VTA's queues, a layer is configured by
SET instructions (one register each) and started by a command; the simulator
(targets/npu16/npu16_sim.h) executes the stream and the cost model counts it.

Word layout (four little-endian uint32):
    w0  bits 0–7 opcode, bits 8–15 register (SET), bits 16–31 reserved (0)
    w1  low 32 bits of the value     w2  high 32 bits of the value (sign-extended)
    w3  reserved (0)
Commands: CONV (conv2d/linear on the MAC array, D1/D2 group accumulation, epilogue),
DWCONV (depthwise: 16 channels per array step), ADD, MAXPOOL, SUMPOOL, GATHER (DMA
channel gather), END.
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
    SIGMA0 = 32           # σ_p for p = 0..7
    NSHIFT0 = 40          # n_p for p = 0..7
    TILES0 = 48           # in-tiles of WAPS group p (per conv group), p = 0..7


MAX_GROUPS = 8


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
