"""The numeric contract as TVM expression builders: the one definition every TVM form uses.

Each primitive of ``calib/numerics.py`` (the NumPy definition) is written here once, over a
small arithmetic interface with two renderings:

    TIR            TIR/TE ``PrimExpr`` operators: the fused and fast kernels' epilogues
    RelaxArith(bb) Relax operator calls emitted into a BlockBuilder: the split and
                   reference forms, whose convs stay Relax ``conv2d`` calls

so the split form and a scheduled kernel cannot round differently. The C definition is
``targets/waps_numeric.h``; ``tests/calib/test_numeric_core.py`` holds the three equal.

Dtypes: group sums and merges int32 (the overflow proof bounds them), requantization and
the add rescale int64, results cast to the op's output dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tvm import relax, tirx

from calib.numerics import GroupScale, group_factor
from relay_passes.attrs import AddAttrs

I32, I64 = "int32", "int64"
Expr = Any                      # a tirx.PrimExpr (TIR) or a relax.Expr (RelaxArith)


class TirArith:
    """Arithmetic on TIR expressions (operators build the tree; nothing is emitted)."""

    def const(self, value: int, dtype: str) -> Expr:
        return tirx.const(value, dtype)

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def shl(self, a, b):
        return a << b

    def shr(self, a, b):
        return a >> b

    def cast(self, a, dtype: str):
        return a.astype(dtype)

    def clamp(self, a, lo: int, hi: int, dtype: str):
        return tirx.max(tirx.min(a, tirx.const(hi, dtype)), tirx.const(lo, dtype))


class RelaxArith:
    """Arithmetic as Relax operator calls, each emitted into ``bb`` (broadcasting operands)."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb = bb

    def const(self, value: int, dtype: str) -> Expr:
        return relax.const(value, dtype)

    def add(self, a, b):
        return self.bb.emit(relax.op.add(a, b))

    def sub(self, a, b):
        return self.bb.emit(relax.op.subtract(a, b))

    def mul(self, a, b):
        return self.bb.emit(relax.op.multiply(a, b))

    def shl(self, a, b):
        return self.bb.emit(relax.op.left_shift(a, b))

    def shr(self, a, b):
        return self.bb.emit(relax.op.right_shift(a, b))

    def cast(self, a, dtype: str):
        return self.bb.emit(relax.op.astype(a, dtype))

    def clamp(self, a, lo: int, hi: int, dtype: str):
        return self.bb.emit(relax.op.clip(a, lo, hi))


TIR = TirArith()


def shift_round(ar, v: Expr, n: int, dtype: str = I32) -> Expr:
    """(v + 2^(n−1)) >> n, arithmetic, round half up; the identity for n = 0."""
    if n == 0:
        return v
    return ar.shr(ar.add(v, ar.const(1 << (n - 1), dtype)), ar.const(n, dtype))


def group_term(ar, acc: Expr, scale: GroupScale, frac: int) -> Expr:
    """v + σ·shift_round(v, n) with v = acc·2^L (int32). Where the shift is exact (n ≤ L,
    numerics.group_factor) this is one multiply, acc·K."""
    factor = group_factor(scale, frac)
    if scale.sigma and factor is not None:
        return ar.mul(acc, ar.const(factor, I32))
    v = ar.shl(acc, ar.const(frac, I32)) if frac else acc
    if not scale.sigma:
        return v
    s = shift_round(ar, v, scale.n)
    return ar.add(v, s) if scale.sigma > 0 else ar.sub(v, s)


def group_term_by(ar, acc: Expr, sigma: Expr, n: Expr, frac: int) -> Expr:
    """group_term with σ and n read per output channel from int32 tables (depthwise layers,
    one WAPS group per channel; n ≥ 1 in the table, σ = 0 where the channel is unscaled)."""
    v = ar.shl(acc, ar.const(frac, I32)) if frac else acc
    s = ar.shr(ar.add(v, ar.shl(ar.const(1, I32), ar.sub(n, ar.const(1, I32)))), n)
    return ar.add(v, ar.mul(sigma, s))


def merge_groups(ar, bias: Expr, corrected: dict[int, Expr], scales: Sequence[GroupScale], frac: int) -> Expr:
    """bias + Σ_p group_term(acc_p, γ_p, L) over the non-empty groups ``corrected``
    {p: acc_p − z_in·Σw_p} (int32)."""
    total = bias
    for p, acc in corrected.items():
        total = ar.add(total, group_term(ar, acc, scales[p], frac))
    return total


def requantize(ar, total: Expr, mult: Expr, rounding: Expr, shift: Expr) -> Expr:
    """(total·M + 2^(S−1)) >> S in int64 from an int32 ``total``; ``rounding`` and ``shift`` are
    the 2^(S−1) and S tables of numerics.requant_tables (int64), ``mult`` int32 or int64."""
    return ar.shr(ar.add(ar.mul(ar.cast(total, I64), ar.cast(mult, I64)), rounding), shift)


def output_code(ar, total: Expr, mult: Expr, rounding: Expr, shift: Expr, z_out: int, lo: int, hi: int,
                dtype: str, narrow: bool = False) -> Expr:
    """clamp(requantize(total) + z_out, lo, hi) cast to ``dtype``. ``narrow`` (every s ≥ 0): the
    requantized value fits int32 (|total·M| < 2^62 shifted by ≥ 31), so it is clamped to
    [lo − z_out, hi − z_out] in int32 before adding z_out: the same value in narrower lanes."""
    t = requantize(ar, total, mult, rounding, shift)
    if narrow:
        t = ar.clamp(ar.cast(t, I32), lo - z_out, hi - z_out, I32)
        return ar.cast(ar.add(t, ar.const(z_out, I32)), dtype)
    return clamp_code(ar, t, z_out, lo, hi, dtype)


def clamp_code(ar, v: Expr, z_out: int, lo: int, hi: int, dtype: str) -> Expr:
    """clamp(v + z_out, lo, hi) in int64, cast to ``dtype``: an int64 value as an output code."""
    return ar.cast(ar.clamp(ar.add(v, ar.const(z_out, I64)), lo, hi, I64), dtype)


def add_rescale(ar, a: Expr, za: int, ka: int, b: Expr, zb: int, kb: int, t: int) -> Expr:
    """((a − za)·ka + (b − zb)·kb + 2^(t−1)) >> t in int64 from codes ``a`` and ``b``."""
    return shift_round(ar, ar.add(_scaled(ar, a, za, ka), _scaled(ar, b, zb, kb)), t, I64)


def rescale(ar, x: Expr, z: int, k: int, t: int) -> Expr:
    """((x − z)·k + 2^(t−1)) >> t in int64 from codes ``x`` (a concat input moved to the output scale)."""
    return shift_round(ar, _scaled(ar, x, z, k), t, I64)


def _scaled(ar, x: Expr, z: int, k: int) -> Expr:
    """(x − z)·k in int64 from codes ``x``."""
    return ar.mul(ar.sub(ar.cast(x, I64), ar.const(z, I64)), ar.const(k, I64))


def residual_add(ar, a: Expr, b: Expr, attrs: AddAttrs, dtype: str) -> Expr:
    """The add op: clamp(add_rescale(a, b) + z_out, lo, hi) cast to ``dtype``."""
    v = add_rescale(ar, a, attrs.za, attrs.ka, b, attrs.zb, attrs.kb, attrs.t)
    return clamp_code(ar, v, attrs.z_out, attrs.lo, attrs.hi, dtype)


def table_lookup(table, code: Expr) -> Expr:
    """table[code] for a TE table placeholder (an elementwise function of codes)."""
    return table[code.astype(I32)]


def group_factors(scales: Sequence[GroupScale], frac: int) -> np.ndarray | None:
    """K_p of every group (int64 [g]) when every group's shift is exact, else None."""
    ks = [group_factor(s, frac) for s in scales]
    return None if any(k is None for k in ks) else np.array(ks, np.int64)


def isqrt(v: Expr) -> Expr:
    """⌊√v⌋ of an int64 TIR expression, 0 ≤ v < 2^62 (numerics.isqrt): the float64 root, then one
    integer correction each way (the root is within one of the answer)."""
    r0 = tirx.Var("r0", I64)
    r1 = tirx.Var("r1", I64)
    fixed_down = tirx.Select(r0 * r0 > v, r0 - tirx.const(1, I64), r0)
    fixed_up = tirx.Select((r1 + tirx.const(1, I64)) * (r1 + tirx.const(1, I64)) <= v, r1 + tirx.const(1, I64), r1)
    root = tirx.Cast(I64, tirx.floor(tirx.sqrt(tirx.Cast("float64", v))))
    return tirx.Let(r0, root, tirx.Let(r1, fixed_down, fixed_up))


def layer_norm_code(y: Expr, d: Expr, g: Expr, b: Expr, p: int, k: int, z_out: int, lo: int, hi: int,
                    dtype: str) -> Expr:
    """One output code of numerics.layer_norm_codes from y_c = C·x_c − Σx and the root D (int64
    TIR): clamp(⌊(2·num + den) / (2·den)⌋ + z_out, lo, hi), num = y·g·2^p + b·D, den = D·2^k."""
    num = y * g.astype(I64) * tirx.const(1 << p, I64) + b.astype(I64) * d
    return clamp_code(TIR, round_div(num, d * tirx.const(1 << k, I64)), z_out, lo, hi, dtype)


def round_div(num: Expr, den: Expr) -> Expr:
    """num / den rounded half up (int64 TIR, den > 0): ⌊(2·num + den) / (2·den)⌋ (numerics.round_div)."""
    two = tirx.const(2, I64)
    return tirx.floordiv(num * two + den, den * two)


def softmax_code(e: Expr, total: Expr, mult: int, k: int, z_out: int, lo: int, hi: int, dtype: str) -> Expr:
    """One output code of numerics.softmax_codes from the table value e and the group's sum S
    (int64 TIR): clamp(round_div(e·r, S·2^k) + z_out, lo, hi)."""
    q = round_div(e * tirx.const(mult, I64), total * tirx.const(1 << k, I64))
    return clamp_code(TIR, q, z_out, lo, hi, dtype)
