/* waps_numeric.h: the integer primitives of the numeric contract, the one C definition.
 *
 * Included by the portable C kernels (codegen/c/waps_kernels.h) and by the npu16
 * simulator (targets/npu16/npu16_sim.h). The NumPy definition is calib/numerics.py, the
 * TIR one relay_passes/numeric_tir.py; tests/calib/test_numeric_core.py holds all three
 * equal on edge values. docs/numeric-contract.md states the rules:
 *   shift_round(a, n) = (a + 2^(n−1)) >> n            arithmetic, round half up; n = 0: a
 *   group_term(acc, σ, n, L) = v + σ·shift_round(v, n),  v = acc·2^L        int32
 *   requant(acc, M, s)  = (acc·M + 2^(S−1)) >> S,  S = 31 + s ∈ [1, 62]      int64
 *   add_rescale         = ((a − za)·ka + (b − zb)·kb + 2^(t−1)) >> t         int64
 *   rescale(x, z, k, t) = ((x − z)·k + 2^(t−1)) >> t                          int64 (concat)
 *   resize_acc          = Σ row weight · column weight · (code − z)            int32 (resize)
 *   isqrt(v)            = ⌊√v⌋, 0 ≤ v < 2^62, bit by bit                      int64 (layer norm)
 *   round_div(num, den) = ⌊(2·num + den) / (2·den)⌋, den > 0: round half up   int64
 *   layer_norm_code     = clamp(round_div(y·g·2^p + b·D, D·2^k) + z_out, lo, hi)  int64 (layer norm)
 *   softmax_code        = clamp(round_div(e·r, S·2^k) + z_out, lo, hi)           int64 (softmax)
 * Right shifts of negative values use waps_asr32/64 (floor), never C's implementation-
 * defined >>; left shifts are multiplications.
 */
#ifndef WAPS_NUMERIC_H
#define WAPS_NUMERIC_H

#include <stdint.h>

static inline int32_t waps_asr32(int32_t a, int n) { return a >= 0 ? (a >> n) : (int32_t)~(~a >> n); }
static inline int64_t waps_asr64(int64_t a, int n) { return a >= 0 ? (a >> n) : (int64_t)~(~a >> n); }

static inline int64_t waps_clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline int32_t waps_shift_round32(int32_t a, int n) {
  return n == 0 ? a : waps_asr32(a + (int32_t)(1 << (n - 1)), n);
}

/* One WAPS group's share of the merge (int32; the overflow proof bounds it). */
static inline int32_t waps_group_term(int32_t acc, int sigma, int n, int frac) {
  int32_t v = acc * (int32_t)(1 << frac);
  if (sigma == 0) return v;
  int32_t s = waps_shift_round32(v, n);
  return sigma > 0 ? v + s : v - s;
}

static inline int64_t waps_requant(int64_t acc, int32_t mult, int32_t shift) {
  int S = 31 + shift;
  return waps_asr64(acc * (int64_t)mult + ((int64_t)1 << (S - 1)), S);
}

/* clamp(requant(acc) + z_out, lo, hi): a layer's output code. */
static inline int64_t waps_output_code(int64_t acc, int32_t mult, int32_t shift, int32_t z_out, int32_t lo,
                                       int32_t hi) {
  return waps_clamp64(waps_requant(acc, mult, shift) + z_out, lo, hi);
}

static inline int64_t waps_add_rescale(int64_t a, int64_t za, int64_t ka, int64_t b, int64_t zb, int64_t kb, int t) {
  return waps_asr64((a - za) * ka + (b - zb) * kb + ((int64_t)1 << (t - 1)), t);
}

/* One tensor moved to another scale (each concat input): ((x − z)·k + 2^(t−1)) >> t, t ≥ 1.
 * k may exceed int32 (a large scale ratio), so everything is int64; |(x − z)·k| < 2^62. */
static inline int64_t waps_rescale(int64_t x, int64_t z, int64_t k, int t) {
  return waps_asr64((x - z) * k + ((int64_t)1 << (t - 1)), t);
}

/* An elementwise function of codes: table[code] (tables from calib/numerics.code_table). */
static inline uint8_t waps_table(const uint8_t *table, int32_t code) { return table[code]; }

/* A resize's accumulator (int32; |acc| ≤ 2^(2·frac)·255): source rows r0 (weight wy) and r1
 * (2^frac − wy), columns c0 (weight wx) and c1 (2^frac − wx), codes less z. */
static inline int32_t waps_resize_acc(const uint8_t *r0, const uint8_t *r1, int32_t c0, int32_t c1, int32_t wx,
                                      int32_t wy, int frac, int32_t z) {
  int32_t one = (int32_t)1 << frac;
  int32_t a0 = wx * (r0[c0] - z) + (one - wx) * (r0[c1] - z);
  int32_t a1 = wx * (r1[c0] - z) + (one - wx) * (r1[c1] - z);
  return wy * a0 + (one - wy) * a1;
}

/* ⌊√v⌋ exactly for 0 ≤ v < 2^62, integers only (digit by digit, two bits per step). */
static inline int64_t waps_isqrt64(int64_t v) {
  uint64_t x = (uint64_t)v, r = 0, bit = (uint64_t)1 << 62;
  while (bit > x) bit >>= 2;
  while (bit) {
    if (x >= r + bit) {
      x -= r + bit;
      r = (r >> 1) + bit;
    } else {
      r >>= 1;
    }
    bit >>= 2;
  }
  return (int64_t)r;
}

/* ⌊a / b⌋ for b > 0 (C's / truncates toward zero). */
static inline int64_t waps_floordiv64(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* num / den rounded half up, den > 0. */
static inline int64_t waps_round_div64(int64_t num, int64_t den) { return waps_floordiv64(2 * num + den, 2 * den); }

/* One layer norm output code from y = C·x_c − Σx and the root D (calib/numerics.layer_norm_codes). */
static inline int64_t waps_layer_norm_code(int64_t y, int64_t d, int32_t g, int32_t b, int p, int k, int32_t z_out,
                                           int32_t lo, int32_t hi) {
  int64_t num = y * (int64_t)g * ((int64_t)1 << p) + (int64_t)b * d;
  return waps_clamp64(waps_round_div64(num, d * ((int64_t)1 << k)) + z_out, lo, hi);
}

/* One softmax output code from its exp table value e and the group's sum S (calib/numerics.softmax_codes). */
static inline int64_t waps_softmax_code(int64_t e, int64_t total, int64_t mult, int k, int32_t z_out, int32_t lo,
                                        int32_t hi) {
  return waps_clamp64(waps_round_div64(e * mult, total * ((int64_t)1 << k)) + z_out, lo, hi);
}

#endif /* WAPS_NUMERIC_H */
