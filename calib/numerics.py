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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


def merge_groups(acc_groups: list[np.ndarray], scales: list[GroupScale]) -> np.ndarray:
    """acc = Σ_p (acc_p + σ_p·shift_round(acc_p, n_p)), int64 (callers check int32 range)."""
    total = np.zeros_like(np.asarray(acc_groups[0], dtype=np.int64))
    for acc, gs in zip(acc_groups, scales):
        acc = np.asarray(acc, dtype=np.int64)
        total = total + acc + (gs.sigma * shift_round(acc, gs.n) if gs.sigma else 0)
    return total


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
