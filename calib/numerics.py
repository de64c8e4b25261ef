"""The integer arithmetic of the numeric contract, defined once (NumPy, int64 inside).

Every backend generator and the reference interpreter call these; calibration
export uses them to turn float parameters into the integers the program holds.

Rounding choices (fixed here, documented in docs/numeric-contract.md):
- ``shift_round(a, n)``: arithmetic right shift by n ≥ 1 with round-half-up,
  ``(a + 2^(n-1)) >> n`` (floor for n = 0 is the identity).
- ``requantize(acc, M, s)``: TFLite/gemmlowp-style fixed-point multiply with an
  int32 multiplier M ∈ [2^30, 2^31) and a right shift s, round-half-up:
  ``(acc·M + 2^(30+s)) >> (31+s)``, i.e. ``round_half_up(acc·M/2^(31+s))``. This is
  what TVM's ``q_multiply_shift`` computes (ties upward).
- ``add_rescale``: ``((a − za)·ka + (b − zb)·kb + 2^(t−1)) >> t`` in int64, one rounding.
- ``rescale``: ``((x − z)·k + 2^(t−1)) >> t``, the add rescale of one operand (concat).
- ``apply_table``: an elementwise function of A-bit codes is a table of 2^A output codes.

This is the NumPy rendering of the contract. The same primitives exist once as TIR
expression builders (``relay_passes/numeric_tir.py``, every TVM form) and once in C
(``targets/waps_numeric.h``, the C kernels and the npu16 simulator);
``tests/calib/test_numeric_core.py`` holds the three equal on edge values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from calib.errors import ConfigError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class GroupScale:
    """γ = 1 + σ·2^(-n), σ ∈ {-1, 0, +1}, n ≥ 1 (n = 0 when σ = 0)."""

    sigma: int
    n: int

    @property
    def gamma(self) -> float:
        return 1.0 + self.sigma * 2.0 ** (-self.n)


def group_scale(gamma: float) -> GroupScale:
    """Decompose γ into shift form; rejects values that are not 1 ± 2^(-n), n ∈ 1..15."""
    if gamma == 1.0:
        return GroupScale(0, 0)
    d = abs(gamma - 1.0)
    n = round(-math.log2(d)) if d > 0 else 0
    if not 1 <= n <= 15 or abs(d - 2.0 ** (-n)) > 1e-12:
        raise ConfigError(f"group scale {gamma} is not of the form 1 ± 2^-n with n in 1..15")
    return GroupScale(1 if gamma > 1 else -1, n)


def shift_round(a: np.ndarray, n: int) -> np.ndarray:
    """Arithmetic right shift with round-half-up; ``a`` integer array, n ≥ 0."""
    a = np.asarray(a, dtype=np.int64)
    if n == 0:
        return a
    return (a + (1 << (n - 1))) >> n


def group_term(acc: np.ndarray, scale: GroupScale, frac: int = 0) -> np.ndarray:
    """One group's share of the merge: v + σ·shift_round(v, n) with v = acc·2^frac (int64)."""
    v = np.asarray(acc, dtype=np.int64) << frac
    return v + scale.sigma * shift_round(v, scale.n) if scale.sigma else v


def merge_groups(acc_groups: list[np.ndarray], scales: Sequence[GroupScale], frac: int = 0) -> np.ndarray:
    """acc = Σ_p group_term(acc_p, γ_p, L), int64 (callers check the int32 range)."""
    total = np.zeros_like(np.asarray(acc_groups[0], dtype=np.int64))
    for acc, gs in zip(acc_groups, scales):
        total = total + group_term(acc, gs, frac)
    return total


def group_factor(scale: GroupScale, frac: int) -> int | None:
    """K with group_term(acc, γ, L) == acc·K for every integer acc, or None.

    When n ≤ L, acc·2^L is a multiple of 2^n, so the rounding half never carries and the
    shift is exact: K = 2^L + σ·2^(L−n). The fast kernels use this to fold groups."""
    if not scale.sigma:
        return 1 << frac
    if scale.n > frac:
        return None
    return (1 << frac) + scale.sigma * (1 << (frac - scale.n))


def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers (0 < r < 2^31) → int32 M ∈ [2^30, 2^31) and shift s with
    r ≈ M·2^(-31-s). s may be negative (left shift) for r ≥ 1. r = 0 gives M = 0, s = 0."""
    real = np.asarray(real, dtype=np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ConfigError("requantization multipliers must be finite and non-negative")
    mant, exp = np.frexp(real)             # real = mant·2^exp, mant ∈ [0.5, 1)
    m = np.round(mant * 2.0**31).astype(np.int64)
    carry = m == 2**31                       # mantissa rounded up to 1.0
    m = np.where(carry, 2**30, m)
    exp = np.where(carry, exp + 1, exp)
    shift = (-exp).astype(np.int64)
    zero = real == 0
    return np.where(zero, 0, m).astype(np.int64), np.where(zero, 0, shift)


def requant_tables(multiplier: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel constants of ``requantize`` as the TVM forms hold them: M, the rounding
    term 2^(S−1) and the total shift S = 31 + s (int64 arrays of the inputs' shape)."""
    s = 31 + np.asarray(shift, dtype=np.int64)
    return np.asarray(multiplier, dtype=np.int64), np.left_shift(np.int64(1), s - 1), s


def requantize(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """round_half_up(acc·M·2^(-31-s)) in exact integer arithmetic (Python ints via object
    arrays would be slow; int64 suffices because |acc| < 2^31 and M < 2^31 → < 2^62)."""
    acc = np.asarray(acc, dtype=np.int64)
    m = np.asarray(multiplier, dtype=np.int64)
    total = 31 + np.asarray(shift, dtype=np.int64)
    prod = acc * m                          # < 2^62 in magnitude
    left = total <= 0                       # only for multipliers ≥ 2^31: not expected
    r = np.where(left, 0, total)
    rounding = np.where(r > 0, np.left_shift(np.int64(1), np.maximum(r - 1, 0)), 0)
    return np.where(left, prod << np.maximum(-total, 0), (prod + rounding) >> r)


def clamp(v: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """min(max(v, lo), hi) in int64."""
    return np.clip(np.asarray(v, dtype=np.int64), lo, hi)


def output_codes(acc: np.ndarray, multiplier: np.ndarray, shift: np.ndarray, z_out: int, lo: int, hi: int
                 ) -> np.ndarray:
    """A layer's output codes: clamp(requantize(acc, M, s) + z_out, lo, hi), int64."""
    return clamp(requantize(acc, multiplier, shift) + z_out, lo, hi)


def add_rescale(a: np.ndarray, za: int, ka: int, b: np.ndarray, zb: int, kb: int, t: int) -> np.ndarray:
    """The residual add's sum before z_out: ((a − za)·ka + (b − zb)·kb + 2^(t−1)) >> t, int64
    (|(x − z)·k| < 2^40, so no intermediate leaves int64); t ≥ 1."""
    v = (np.asarray(a, np.int64) - za) * ka + (np.asarray(b, np.int64) - zb) * kb
    return (v + (1 << (t - 1))) >> t


def rescale(x: np.ndarray, z: int, k: int, t: int) -> np.ndarray:
    """One tensor moved to another scale: ((x − z)·k + 2^(t−1)) >> t, int64; t ≥ 1 (add_rescale
    with one operand; a concat's inputs go through it to the shared output scale)."""
    return ((np.asarray(x, np.int64) - z) * k + (1 << (t - 1))) >> t


def code_table(fn, in_scale: float, in_zero: int, in_qmax: int, out_scale: float, out_zero: int,
               out_qmax: int) -> np.ndarray:
    """An elementwise function of A-bit codes as a table: entry c (0 ≤ c ≤ in_qmax) is
    clamp(round_half_even(fn((c − z_in)·s_in)/s_out) + z_out, 0, out_qmax), float32 like the
    fake-quant model (torch.round is half to even). uint8 [in_qmax + 1]."""
    x = (np.arange(in_qmax + 1, dtype=np.float32) - np.float32(in_zero)) * np.float32(in_scale)
    y = np.asarray(fn(x), dtype=np.float32)
    q = np.rint(y / np.float32(out_scale)) + np.float32(out_zero)
    return np.clip(q, 0, out_qmax).astype(np.uint8)


def apply_table(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """table[codes]: the output codes of an elementwise function (see ``code_table``)."""
    return np.asarray(table)[np.asarray(codes, dtype=np.int64)]


def isqrt(v: np.ndarray) -> np.ndarray:
    """⌊√v⌋ exactly, int64, for 0 ≤ v < 2^62: the float64 root (within one of the answer) then
    one correction each way. The C definition is a bitwise integer root; both are exact."""
    v = np.asarray(v, dtype=np.int64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(np.int64)
    r = r - (r * r > v)
    return r + ((r + 1) * (r + 1) <= v)


NORM_PREC_MAX = 8        # at most this many extra bits of the layer norm's root (2^p)
NORM_BOUND = 1 << 62     # C³·qmax²·4^p stays below this (Σy²·4^p in int64)
NORM_NUM_BOUND = 1 << 29  # (√C·max|g| + max|b|): the output numerator stays below 2^62


def norm_precision(channels: int, qmax: int) -> int:
    """p of the layer norm: the most bits (≤ NORM_PREC_MAX) with C³·qmax²·4^p < 2^62; −1 when
    even p = 0 overflows (too many channels)."""
    p = -1
    while p < NORM_PREC_MAX and channels**3 * qmax**2 * 4 ** (p + 1) < NORM_BOUND:
        p += 1
    return p


def norm_shift(gain: np.ndarray, offset: np.ndarray, channels: int, max_shift: int = 24) -> int:
    """k of the layer norm: the most fractional bits (≤ ``max_shift``) of the per-channel gain
    g = γ/s_out and offset b = β/s_out with (√C·max|g| + max|b|)·2^k < 2^29; −1 when none fit."""
    need = math.sqrt(channels) * float(np.max(np.abs(gain), initial=0)) + float(np.max(np.abs(offset), initial=0))
    k = -1
    while k < max_shift and need * 2.0 ** (k + 1) < NORM_NUM_BOUND:
        k += 1
    return k


def layer_norm_codes(x: np.ndarray, g: np.ndarray, b: np.ndarray, p: int, e: int, k: int, z_out: int, lo: int,
                     hi: int) -> np.ndarray:
    """Layer norm over axis 1 (the channels, C of them) of codes ``x`` [N, C, ...], int64:

        s = Σ_c x_c,  y_c = C·x_c − s                       (the input's zero point cancels)
        D = ⌊√(⌊Σ_c y_c²·4^p / C⌋ + e)⌋                     (2^p·the standard deviation; e ≥ 1)
        out_c = clamp(⌊(2·num + den) / (2·den)⌋ + z_out, lo, hi),
                num = y_c·g_c·2^p + b_c·D,  den = D·2^k      (round half up)

    with g_c = round(γ_c/s_out·2^k), b_c = round(β_c/s_out·2^k) (int32 [C]) and e = the float
    eps in these units, round(eps·C²·4^p/s_in²). Bounds (norm_precision, norm_shift) keep every
    intermediate in int64."""
    x = np.asarray(x, dtype=np.int64)
    c = x.shape[1]
    bshape = (1, c) + (1,) * (x.ndim - 2)
    y = c * x - x.sum(axis=1, keepdims=True)
    d = isqrt((y * y).sum(axis=1, keepdims=True) * (1 << 2 * p) // c + e)
    num = y * np.asarray(g, np.int64).reshape(bshape) * (1 << p) + np.asarray(b, np.int64).reshape(bshape) * d
    return clamp(round_div(num, d << k) + z_out, lo, hi)


def round_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den rounded half up, den > 0: ⌊(2·num + den) / (2·den)⌋ (int64; |2·num + den| < 2^63)."""
    num, den = np.asarray(num, np.int64), np.asarray(den, np.int64)
    return (2 * num + den) // (2 * den)


EXP_BITS = 20            # the softmax's exp table holds round(e^(−d·s)·2^EXP_BITS)


@dataclass(frozen=True)
class SoftmaxConstants:
    """The integers of ``softmax_codes``: the exp table (int32 [qmax + 1]), r and k."""
    table: np.ndarray
    r: int
    k: int


def softmax_constants(in_scale: float, in_qmax: int, out_scale: float, max_shift: int = 24) -> SoftmaxConstants:
    """The integer form of a softmax between codes of ``in_scale`` (0..in_qmax) and codes of
    ``out_scale``: table[d] = round(e^(−d·s_in)·2^EXP_BITS) for the d = max − x̄ an input can
    show, r = round(2^k/s_out) with k the most bits (≤ ``max_shift``) keeping r·2^EXP_BITS < 2^60."""
    d = np.arange(in_qmax + 1, dtype=np.float64)
    table = np.round(np.exp(-d * in_scale) * 2.0**EXP_BITS).astype(np.int32)
    k = max_shift
    while k > 0 and 2.0**k / out_scale * 2.0**EXP_BITS >= 2.0**60:
        k -= 1
    return SoftmaxConstants(table, int(round(2.0**k / out_scale)), k)


def softmax_codes(x: np.ndarray, table: np.ndarray, groups: int, r: int, k: int, z_out: int, lo: int,
                  hi: int) -> np.ndarray:
    """Softmax over axis 1 of codes ``x`` [N, C, ...] in ``groups`` contiguous groups of C/groups
    channels (one per attention head), int64:

        m = max over the group,  e_c = table[m − x̄_c]  (e^(−(m − x_c)·s_in)·2^20, exact per code)
        S = Σ_group e,  out_c = clamp(round_div(e_c·r, S·2^k) + z_out, lo, hi)

    (r = round(2^k/s_out): e_c/S in output steps). S ≤ C·2^20 and e·r < 2^60 stay in int64."""
    x = np.asarray(x, dtype=np.int64)
    n, c = x.shape[:2]
    xg = x.reshape(n, groups, c // groups, *x.shape[2:])
    e = np.asarray(table, np.int64)[xg.max(axis=2, keepdims=True) - xg]
    total = e.sum(axis=2, keepdims=True)
    return clamp(round_div(e * r, total << k) + z_out, lo, hi).reshape(x.shape)


@dataclass(frozen=True)
class NormConstants:
    """The integers of ``layer_norm_codes`` for one layer norm: g, b (int32 [C]), p, e, k."""
    g: np.ndarray
    b: np.ndarray
    p: int
    e: int
    k: int


def layer_norm_constants(gamma: np.ndarray, beta: np.ndarray, eps: float, in_scale: float, in_qmax: int,
                         out_scale: float) -> NormConstants:
    """The integer form of a float layer norm (γ, β [C], ``eps``) between codes of ``in_scale``
    (0..in_qmax) and codes of ``out_scale``; ConfigError when the bounds leave no bits."""
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    c = gamma.size
    p = norm_precision(c, in_qmax)
    k = norm_shift(gamma / out_scale, beta / out_scale, c)
    if p < 0 or k < 0:
        raise ConfigError(f"layer norm over {c} channels does not fit the int64 contract "
                          f"(precision bits {p}, gain bits {k})")
    e = int(min(max(round(eps * c * c * 4.0**p / in_scale**2), 1), 1 << 60))
    g = np.round(gamma / out_scale * 2.0**k).astype(np.int32)
    b = np.round(beta / out_scale * 2.0**k).astype(np.int32)
    return NormConstants(g, b, p, e, k)
