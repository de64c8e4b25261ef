/* waps_kernels.h: the integer operations of a waps-tvm program in portable C99.
 *
 * Nothing TVM-specific. Tensors are NCHW (or N×F), contiguous. Activations are codes:
 * uint8_t, or int32_t "wide" codes after sum pooling (the *_i32 variants). Semantics are
 * those of relay_passes/reference.py (docs/numeric-contract.md), bit for bit:
 *   acc_p  = (Σ_{i∈G_p} Σ_taps w·(x − z_in)) · 2^frac           int32 (proven not to overflow)
 *   acc    = Σ_p (acc_p + σ_p·((acc_p + 2^(n_p−1)) >> n_p)) + bias   arithmetic shifts
 *   out    = clamp(((int64)acc·M + 2^(S−1)) >> S + z_out, lo, hi),  S = 31 + shift
 * Right shifts of negative values use asr32/asr64 (floor), never C's implementation-
 * defined >>; left shifts are multiplications. Float code (quantize/dequantize) must be
 * compiled without FMA contraction (-ffp-contract=off) to match IEEE single rounding.
 */
#ifndef WAPS_KERNELS_H
#define WAPS_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "waps_numeric.h"

#define WAPS_MAX_GROUPS 8

/* Σ_p group_term(acc_p, σ_p, n_p, frac) + bias, then the output code. */
static inline int64_t waps_epilogue(const int32_t *acc, int ngroups, const int8_t *sigma, const int8_t *nshift,
                                    int frac, int32_t bias, int32_t mult, int32_t shift,
                                    int32_t z_out, int32_t lo, int32_t hi) {
  int32_t total = bias;
  for (int p = 0; p < ngroups; ++p) total += waps_group_term(acc[p], sigma[p], nshift[p], frac);
  return waps_output_code(total, mult, shift, z_out, lo, hi);
}

/* conv2d: x [N,C,H,W] (uint8 or int32 codes via xs/xw), w [M, C/G, KH, KW] int8.
 * group[c] = WAPS group of input channel c (NULL: one group). */
#define WAPS_CONV2D(NAME, XT)                                                                       \
  static void NAME(const XT *x, int N, int C, int H, int W, const int8_t *w, int M, int KH, int KW,   \
                   int G, int sh, int sw, int ph, int pw, int dh, int dw, const int8_t *group,          \
                   int ngroups, const int8_t *sigma, const int8_t *nshift, int frac,                    \
                   const int32_t *bias, const int32_t *mult, const int32_t *shift, int32_t z_in,       \
                   int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {                               \
    int OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1; \
    int CG = C / G, MG = M / G;                                                                         \
    for (int n = 0; n < N; ++n)                                                                         \
      for (int k = 0; k < M; ++k) {                                                                     \
        int g0 = (k / MG) * CG;                                                                         \
        const int8_t *wk = w + (size_t)k * CG * KH * KW;                                                \
        for (int oy = 0; oy < OH; ++oy)                                                                 \
          for (int ox = 0; ox < OW; ++ox) {                                                             \
            int32_t acc[WAPS_MAX_GROUPS] = {0};                                                         \
            for (int r = 0; r < CG; ++r) {                                                              \
              int ci = g0 + r;                                                                          \
              int p = group ? group[ci] : 0;                                                            \
              const XT *xc = x + ((size_t)n * C + ci) * H * W;                                          \
              int32_t s = 0;                                                                            \
              for (int ky = 0; ky < KH; ++ky) {                                                         \
                int iy = oy * sh - ph + ky * dh;                                                        \
                if (iy < 0 || iy >= H) continue;                                                        \
                for (int kx = 0; kx < KW; ++kx) {                                                       \
                  int ix = ox * sw - pw + kx * dw;                                                      \
                  if (ix < 0 || ix >= W) continue;                                                      \
                  s += (int32_t)wk[(r * KH + ky) * KW + kx] * ((int32_t)xc[iy * W + ix] - z_in);        \
                }                                                                                       \
              }                                                                                         \
              acc[p] += s;                                                                              \
            }                                                                                           \
            out[(((size_t)n * M + k) * OH + oy) * OW + ox] = (uint8_t)waps_epilogue(                   \
                acc, ngroups, sigma, nshift, frac, bias[k], mult[k], shift[k], z_out, lo, hi);         \
          }                                                                                             \
      }                                                                                                 \
  }
WAPS_CONV2D(waps_conv2d_u8, uint8_t)
WAPS_CONV2D(waps_conv2d_i32, int32_t)

#define WAPS_LINEAR(NAME, XT)                                                                       \
  static void NAME(const XT *x, int N, int F, const int8_t *w, int M, const int8_t *group, int ngroups, \
                   const int8_t *sigma, const int8_t *nshift, int frac, const int32_t *bias,          \
                   const int32_t *mult, const int32_t *shift, int32_t z_in, int32_t z_out, int32_t lo, \
                   int32_t hi, uint8_t *out) {                                                          \
    for (int n = 0; n < N; ++n)                                                                         \
      for (int k = 0; k < M; ++k) {                                                                     \
        int32_t acc[WAPS_MAX_GROUPS] = {0};                                                             \
        for (int f = 0; f < F; ++f)                                                                     \
          acc[group ? group[f] : 0] += (int32_t)w[(size_t)k * F + f] * ((int32_t)x[(size_t)n * F + f] - z_in); \
        out[(size_t)n * M + k] = (uint8_t)waps_epilogue(acc, ngroups, sigma, nshift, frac, bias[k], mult[k], \
                                                        shift[k], z_out, lo, hi);                        \
      }                                                                                                 \
  }
WAPS_LINEAR(waps_linear_u8, uint8_t)
WAPS_LINEAR(waps_linear_i32, int32_t)

static void waps_add(const uint8_t *a, const uint8_t *b, size_t count, int32_t za, int32_t zb, int64_t ka,
                     int64_t kb, int t, int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {
  for (size_t i = 0; i < count; ++i) {
    out[i] = (uint8_t)waps_clamp64(waps_add_rescale(a[i], za, ka, b[i], zb, kb, t) + z_out, lo, hi);
  }
}

/* The add with a broadcast b: a [N, C, INNER] codes, b [N, C or 1, INNER or 1] (b_c: b has C
 * channels, b_inner: b has INNER positions), uint8 or int32 (pooled sums) codes; same rounding
 * as waps_add. */
#define WAPS_ADD_BCAST(NAME, BT)                                                                     \
  static void NAME(const uint8_t *a, const BT *b, int N, int C, size_t inner, int b_c, int b_inner,  \
                   int32_t za, int32_t zb, int64_t ka, int64_t kb, int t, int32_t z_out, int32_t lo,  \
                   int32_t hi, uint8_t *out) {                                                       \
    size_t bC = b_c ? (size_t)C : 1, bI = b_inner ? inner : 1;                                       \
    for (int n = 0; n < N; ++n)                                                                      \
      for (int c = 0; c < C; ++c)                                                                    \
        for (size_t i = 0; i < inner; ++i) {                                                         \
          size_t o = ((size_t)n * C + c) * inner + i;                                                \
          int64_t bv = b[((size_t)n * bC + (b_c ? (size_t)c : 0)) * bI + (b_inner ? i : 0)];        \
          out[o] = (uint8_t)waps_clamp64(waps_add_rescale(a[o], za, ka, bv, zb, kb, t) + z_out, lo, hi); \
        }                                                                                            \
  }
WAPS_ADD_BCAST(waps_add_bcast_u8, uint8_t)
WAPS_ADD_BCAST(waps_add_bcast_i32, int32_t)

/* Window max of codes; padding never wins (a window of padding only gives 0). Dilation dh, dw. */
static void waps_max_pool2d(const uint8_t *x, int N, int C, int H, int W, int KH, int KW, int sh, int sw,
                            int ph, int pw, int dh, int dw, uint8_t *out) {
  int OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy)
      for (int ox = 0; ox < OW; ++ox) {
        int best = 0;
        for (int ky = 0; ky < KH; ++ky)
          for (int kx = 0; kx < KW; ++kx) {
            int iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw;
            if (iy >= 0 && iy < H && ix >= 0 && ix < W && x[((size_t)nc * H + iy) * W + ix] > best)
              best = x[((size_t)nc * H + iy) * W + ix];
          }
        out[((size_t)nc * OH + oy) * OW + ox] = (uint8_t)best;
      }
}

static void waps_sum_pool2d(const uint8_t *x, int N, int C, int H, int W, int KH, int KW, int sh, int sw,
                            int ph, int pw, int32_t z_in, int32_t *out) {
  int OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy)
      for (int ox = 0; ox < OW; ++ox) {
        int32_t s = 0;
        for (int ky = 0; ky < KH; ++ky)
          for (int kx = 0; kx < KW; ++kx) {
            int iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
            s += (iy >= 0 && iy < H && ix >= 0 && ix < W) ? (int32_t)x[((size_t)nc * H + iy) * W + ix] : z_in;
          }
        out[((size_t)nc * OH + oy) * OW + ox] = s;
      }
}

/* Box average: output (i, j) sums x − z_in over rows [h0[i], h1[i]) and columns [w0[j], w1[j])
 * (windows already clipped to the input; an empty window sums 0) in int64, then
 * clamp(requant(sum, mult[rq[i,j]], shift[rq[i,j]]) + z_out, lo, hi). */
static void waps_avg_pool2d(const uint8_t *x, int N, int C, int H, int W, int OH, int OW, const int32_t *h0,
                            const int32_t *h1, const int32_t *w0, const int32_t *w1, const int32_t *rq,
                            const int32_t *mult, const int32_t *shift, int32_t z_in, int32_t z_out, int32_t lo,
                            int32_t hi, uint8_t *out) {
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy)
      for (int ox = 0; ox < OW; ++ox) {
        int64_t s = 0;
        for (int iy = h0[oy]; iy < h1[oy]; ++iy)
          for (int ix = w0[ox]; ix < w1[ox]; ++ix) s += (int64_t)x[((size_t)nc * H + iy) * W + ix] - z_in;
        int q = rq[oy * OW + ox];
        out[((size_t)nc * OH + oy) * OW + ox] = (uint8_t)waps_output_code(s, mult[q], shift[q], z_out, lo, hi);
      }
}

/* Resize: output (i, j) weighs the taps (y0[i], x0[j]), (y0[i], x1[j]), (y1[i], x0[j]), (y1[i], x1[j])
 * by wy[i]·wx[j], wy[i]·(2^frac − wx[j]), … in int32 (|acc| ≤ 2^(2·frac)·255), then
 * clamp(requant(acc, mult, shift) + z_out, lo, hi). Nearest: frac = 0, a gather of codes. */
static void waps_resize(const uint8_t *x, int N, int C, int H, int W, int OH, int OW, const int32_t *y0,
                        const int32_t *y1, const int32_t *wy, const int32_t *x0, const int32_t *x1,
                        const int32_t *wx, int frac, int32_t z_in, int32_t mult, int32_t shift, int32_t z_out,
                        int32_t lo, int32_t hi, uint8_t *out) {
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy) {
      const uint8_t *r0 = x + ((size_t)nc * H + y0[oy]) * W, *r1 = x + ((size_t)nc * H + y1[oy]) * W;
      for (int ox = 0; ox < OW; ++ox) {
        int32_t acc = waps_resize_acc(r0, r1, x0[ox], x1[ox], wx[ox], wy[oy], frac, z_in);
        out[((size_t)nc * OH + oy) * OW + ox] = (uint8_t)waps_output_code(acc, mult, shift, z_out, lo, hi);
      }
    }
}

/* [N, C, H, W] → [N, C, H + top + bottom, W + left + right], the border filled with ``value``. */
static void waps_pad(const uint8_t *x, int N, int C, int H, int W, int top, int left, int bottom, int right,
                     uint8_t value, uint8_t *out) {
  int OH = H + top + bottom, OW = W + left + right;
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy)
      for (int ox = 0; ox < OW; ++ox) {
        int iy = oy - top, ix = ox - left;
        out[((size_t)nc * OH + oy) * OW + ox] =
            (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((size_t)nc * H + iy) * W + ix] : value;
      }
}

/* One concat input x [N, C, inner] into channels [c_off, c_off + C) of out [N, c_out, inner]:
 * clamp(rescale(x, z, k, t) + z_out, lo, hi). A concat along rows or columns is the same copy with
 * N the extent before its axis, C the input's extent along it and inner the extent after. */
static void waps_concat_part(const uint8_t *x, int N, int C, size_t inner, int c_off, int c_out, int32_t z,
                             int64_t k, int t, int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (size_t i = 0; i < inner; ++i)
        out[((size_t)n * c_out + c_off + c) * inner + i] =
            (uint8_t)waps_clamp64(waps_rescale(x[((size_t)n * C + c) * inner + i], z, k, t) + z_out, lo, hi);
}

/* Layer norm over the C channels of x [N, C, inner] (uint8 codes, or int32 sums when ``wide``) at
 * each (n, position): the int64 sum and sum of squares of y = C·x − Σx, the root
 * D = ⌊√(⌊Σy²·4^p / C⌋ + e)⌋, then waps_layer_norm_code. */
static void waps_layer_norm(const void *x, int wide, int N, int C, size_t inner, const int32_t *g, const int32_t *b,
                            int p, int64_t e, int k, int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {
#define WAPS_LN_AT(j) (wide ? (int64_t)((const int32_t *)x)[j] : (int64_t)((const uint8_t *)x)[j])
  for (int n = 0; n < N; ++n)
    for (size_t i = 0; i < inner; ++i) {
      size_t at = (size_t)n * C * inner + i;
      int64_t total = 0, squares = 0;
      for (int c = 0; c < C; ++c) total += WAPS_LN_AT(at + (size_t)c * inner);
      for (int c = 0; c < C; ++c) {
        int64_t y = (int64_t)C * WAPS_LN_AT(at + (size_t)c * inner) - total;
        squares += y * y;
      }
      int64_t d = waps_isqrt64(squares * ((int64_t)1 << (2 * p)) / C + e);
      for (int c = 0; c < C; ++c) {
        int64_t y = (int64_t)C * WAPS_LN_AT(at + (size_t)c * inner) - total;
        out[((size_t)n * C + c) * inner + i] = (uint8_t)waps_layer_norm_code(y, d, g[c], b[c], p, k, z_out, lo, hi);
      }
    }
#undef WAPS_LN_AT
}

/* Softmax over x [N, C, inner] (uint8 codes) in G groups of C/G channels at each (n, position):
 * the group's max m, e = table[m − x] (int32 table), the int64 sum S, then waps_softmax_code. */
static void waps_softmax(const uint8_t *x, int N, int C, int G, size_t inner, const int32_t *table, int64_t mult,
                         int k, int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {
  int size = C / G;
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g)
      for (size_t i = 0; i < inner; ++i) {
        size_t at = ((size_t)n * C + (size_t)g * size) * inner + i;
        int32_t m = 0;
        int64_t total = 0;
        for (int c = 0; c < size; ++c)
          if (x[at + (size_t)c * inner] > m) m = x[at + (size_t)c * inner];
        for (int c = 0; c < size; ++c) total += table[m - x[at + (size_t)c * inner]];
        for (int c = 0; c < size; ++c)
          out[at + (size_t)c * inner] =
              (uint8_t)waps_softmax_code(table[m - x[at + (size_t)c * inner]], total, mult, k, z_out, lo, hi);
      }
}

/* Product of a [N, Ca, P] and b [N, Cb, L] (uint8 codes) in G heads, int32 sums, then
 * waps_output_code (relay_passes/attrs.MatmulAttrs). over_positions 0, "channels" (Ca = Cb = G·D):
 * out[n, g·L + j, p] = Σ_d (a[n, g·D + d, p] − za)·(b[n, g·D + d, j] − zb); 1, "positions"
 * (Ca = G·L, Cb = G·D): out[n, g·D + d, p] = Σ_j (a[n, g·L + j, p] − za)·(b[n, g·D + d, j] − zb). */
static void waps_matmul(const uint8_t *a, const uint8_t *b, int N, int G, int over_positions, int Ca, int Cb,
                        size_t P, size_t L, int32_t za, int32_t zb, int32_t mult, int32_t shift, int32_t z_out,
                        int32_t lo, int32_t hi, uint8_t *out) {
  int D = Cb / G;
  size_t rows = over_positions ? (size_t)D : L;         /* output channels per head */
  size_t sum_len = over_positions ? L : (size_t)D;
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g)
      for (size_t r = 0; r < rows; ++r)
        for (size_t p = 0; p < P; ++p) {
          int32_t acc = 0;
          for (size_t k = 0; k < sum_len; ++k) {
            /* channels: a row g·D + k against b's (g·D + k, r); positions: a row g·L + k against b's (g·D + r, k) */
            size_t ach = over_positions ? (size_t)g * L + k : (size_t)g * D + k;
            size_t bat = over_positions ? ((size_t)n * Cb + (size_t)g * D + r) * L + k
                                        : ((size_t)n * Cb + (size_t)g * D + k) * L + r;
            acc += ((int32_t)a[((size_t)n * Ca + ach) * P + p] - za) * ((int32_t)b[bat] - zb);
          }
          out[(((size_t)n * G + g) * rows + r) * P + p] = (uint8_t)waps_output_code(acc, mult, shift, z_out, lo, hi);
        }
}

/* out[i] = table[x[i]]: an elementwise function of codes. */
static void waps_lookup(const uint8_t *x, size_t count, const uint8_t *table, uint8_t *out) {
  for (size_t i = 0; i < count; ++i) out[i] = waps_table(table, x[i]);
}

/* a [NC, inner] times b ([NC, inner], or [NC] broadcast over inner when b_bcast):
 * clamp(requant((a − za)·(b − zb), mult, shift) + z_out, lo, hi). */
static void waps_mul(const uint8_t *a, const uint8_t *b, size_t NC, size_t inner, int b_bcast, int32_t za,
                     int32_t zb, int32_t mult, int32_t shift, int32_t z_out, int32_t lo, int32_t hi, uint8_t *out) {
  for (size_t nc = 0; nc < NC; ++nc)
    for (size_t i = 0; i < inner; ++i) {
      int64_t bv = b[b_bcast ? nc : nc * inner + i];
      int64_t prod = ((int64_t)a[nc * inner + i] - za) * (bv - zb);
      out[nc * inner + i] = (uint8_t)waps_output_code(prod, mult, shift, z_out, lo, hi);
    }
}

/* out[n, j, ...] = x[n, index[j], ...]; elem = bytes per element, inner = elements per channel */
static void waps_gather(const void *x, int N, int C, size_t inner, size_t elem, const int32_t *index, int J,
                        void *out) {
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < J; ++j)
      memcpy((char *)out + (((size_t)n * J + j) * inner) * elem,
             (const char *)x + (((size_t)n * C + index[j]) * inner) * elem, inner * elem);
}

/* out [N, C, OH, OW] = x [N, C, H, W] rows [top, top + OH), columns [left, left + OW); elem bytes each */
static void waps_crop(const void *x, int N, int C, int H, int W, size_t elem, int top, int left, int OH, int OW,
                      void *out) {
  for (size_t nc = 0; nc < (size_t)N * C; ++nc)
    for (int i = 0; i < OH; ++i)
      memcpy((char *)out + ((nc * OH + i) * OW) * elem,
             (const char *)x + ((nc * H + top + i) * W + left) * elem, OW * elem);
}

/* out = N copies of the bytes x (a constant map repeated over the batch) */
static void waps_repeat(const void *x, size_t bytes, int N, void *out) {
  for (int n = 0; n < N; ++n) memcpy((char *)out + (size_t)n * bytes, x, bytes);
}

static void waps_quantize(const float *x, size_t count, float scale, float zero_point, float qmax, uint8_t *out) {
  for (size_t i = 0; i < count; ++i) {
    float q = floorf(x[i] / scale + 0.5f) + zero_point;
    q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
    out[i] = (uint8_t)q;
  }
}

static void waps_dequantize_u8(const uint8_t *x, size_t count, float scale, float zero_point, float *out) {
  for (size_t i = 0; i < count; ++i) out[i] = ((float)x[i] - zero_point) * scale;
}

static void waps_dequantize_i32(const int32_t *x, size_t count, float scale, float zero_point, float *out) {
  for (size_t i = 0; i < count; ++i) out[i] = ((float)x[i] - zero_point) * scale;
}

#endif /* WAPS_KERNELS_H */
