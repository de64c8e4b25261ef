/* npu16_sim.h: functional, bit-exact simulator of the npu16 instruction stream (C99).
 *
 * Executes the stream of targets/npu16/isa.py against the buffers of one op and counts
 * what the hardware would do. The MAC array is 16 input channels × 16 output channels:
 * one array step multiplies one 16-row input slice (read through the tile's channel
 * table, zero point subtracted, padding = real zero) by a 16×16 weight tile into the D1
 * accumulators. On a group switch D1 is scaled into D2 (acc·2^frac + σ·shift), one cycle
 * per group, plus one to merge; the epilogue adds the bias, requantizes (int64,
 * round half up) and clamps, 8 values per cycle. Every rounding, shift and requantization
 * is a primitive of targets/waps_numeric.h, the C definition the C kernels share.
 */
#ifndef NPU16_SIM_H
#define NPU16_SIM_H

#include <stdint.h>
#include <string.h>

#include "waps_numeric.h"

enum { NPU16_END = 0, NPU16_SET = 1, NPU16_CONV = 2, NPU16_DWCONV = 3, NPU16_ADD = 4, NPU16_MAXPOOL = 5,
       NPU16_SUMPOOL = 6, NPU16_GATHER = 7 };
enum { R_N = 0, R_C, R_H, R_W, R_M, R_KH, R_KW, R_G, R_SH, R_SW, R_PH, R_PW, R_DH, R_DW, R_ZIN, R_ZOUT, R_LO,
       R_HI, R_FRAC, R_NGROUPS, R_IN_WIDE, R_ZA, R_ZB, R_KA, R_KB, R_T, R_COUNT, R_OUTC, R_INNER,
       R_SIGMA0 = 32, R_NSHIFT0 = 40, R_TILES0 = 48, R_NREGS = 64 };

typedef struct {
  int64_t macs, array_steps, waps_cycles, shifts, adds, epilogue_values, dma_in_bytes, dma_out_bytes;
} npu16_counters;

typedef struct {
  const void *x, *x2;         /* input codes (uint8, or int32 when IN_WIDE), second add input */
  void *out;                  /* output codes */
  const int8_t *tiles;        /* CONV: [G, OT, P, IT, KH, KW, 16, 16]; DWCONV: raw [M, KH, KW] */
  const int32_t *table;       /* CONV: [G, P, IT, 16] input channel per tile row, -1 = pad */
  const int32_t *bias, *mult, *shift, *index;
} npu16_bufs;


static inline int32_t npu16_in(const npu16_bufs *b, int wide, size_t i) {
  return wide ? ((const int32_t *)b->x)[i] : (int32_t)((const uint8_t *)b->x)[i];
}

static inline uint8_t npu16_requant(int64_t acc, int32_t mult, int32_t shift, const int64_t *r) {
  return (uint8_t)waps_output_code(acc, mult, shift, (int32_t)r[R_ZOUT], (int32_t)r[R_LO], (int32_t)r[R_HI]);
}

static void npu16_conv(const int64_t *r, const npu16_bufs *b, npu16_counters *c) {
  int N = (int)r[R_N], C = (int)r[R_C], H = (int)r[R_H], W = (int)r[R_W], M = (int)r[R_M];
  int KH = (int)r[R_KH], KW = (int)r[R_KW], G = (int)r[R_G], P = (int)r[R_NGROUPS], wide = (int)r[R_IN_WIDE];
  int sh = (int)r[R_SH], sw = (int)r[R_SW], ph = (int)r[R_PH], pw = (int)r[R_PW], dh = (int)r[R_DH], dw = (int)r[R_DW];
  int OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  int MG = M / G, OT = (MG + 15) / 16, IT = 1, frac = (int)r[R_FRAC];
  int32_t z = (int32_t)r[R_ZIN];
  for (int p = 0; p < P; ++p) if (r[R_TILES0 + p] > IT) IT = (int)r[R_TILES0 + p];
  c->dma_in_bytes += (int64_t)N * C * H * W * (wide ? 4 : 1) + (int64_t)G * OT * P * IT * KH * KW * 256;
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g)
      for (int ot = 0; ot < OT; ++ot)
        for (int oy = 0; oy < OH; ++oy)
          for (int ox = 0; ox < OW; ++ox) {
            int32_t d2[16] = {0};
            int valid = MG - ot * 16 < 16 ? MG - ot * 16 : 16;
            for (int p = 0; p < P; ++p) {
              int32_t d1[16] = {0};
              for (int it = 0; it < r[R_TILES0 + p]; ++it)
                for (int ky = 0; ky < KH; ++ky)
                  for (int kx = 0; kx < KW; ++kx) {
                    const int8_t *t = b->tiles + ((((((size_t)g * OT + ot) * P + p) * IT + it) * KH + ky) * KW + kx) * 256;
                    const int32_t *rows = b->table + (((size_t)g * P + p) * IT + it) * 16;
                    int iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw;
                    c->array_steps += 1;
                    for (int i = 0; i < 16; ++i) {
                      if (rows[i] < 0) continue;
                      int32_t xv = (iy < 0 || iy >= H || ix < 0 || ix >= W)
                                       ? 0 : npu16_in(b, wide, (((size_t)n * C + rows[i]) * H + iy) * W + ix) - z;
                      for (int j = 0; j < 16; ++j) d1[j] += (int32_t)t[i * 16 + j] * xv;
                      c->macs += valid;
                    }
                  }
              for (int j = 0; j < 16; ++j)              /* group switch: D1 scaled into D2 */
                d2[j] += waps_group_term(d1[j], (int)r[R_SIGMA0 + p], (int)r[R_NSHIFT0 + p], frac);
              if (P > 1) {
                c->waps_cycles += 1;
                if (r[R_SIGMA0 + p]) { c->shifts += valid; c->adds += valid; }
              }
            }
            if (P > 1) c->waps_cycles += 1;                /* merge */
            for (int j = 0; j < valid; ++j) {
              int k = g * MG + ot * 16 + j;
              ((uint8_t *)b->out)[(((size_t)n * M + k) * OH + oy) * OW + ox] =
                  npu16_requant((int64_t)d2[j] + b->bias[k], b->mult[k], b->shift[k], r);
            }
            c->epilogue_values += valid;
          }
  c->dma_out_bytes += (int64_t)N * M * OH * OW;
}

static void npu16_dwconv(const int64_t *r, const npu16_bufs *b, npu16_counters *c) {
  int N = (int)r[R_N], C = (int)r[R_C], H = (int)r[R_H], W = (int)r[R_W], KH = (int)r[R_KH], KW = (int)r[R_KW];
  int sh = (int)r[R_SH], sw = (int)r[R_SW], ph = (int)r[R_PH], pw = (int)r[R_PW], dh = (int)r[R_DH], dw = (int)r[R_DW];
  int OH = (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1;
  int wide = (int)r[R_IN_WIDE], frac = (int)r[R_FRAC];
  int32_t z = (int32_t)r[R_ZIN];
  c->dma_in_bytes += (int64_t)N * C * H * W * (wide ? 4 : 1) + (int64_t)C * KH * KW;
  for (int n = 0; n < N; ++n)
    for (int k0 = 0; k0 < C; k0 += 16)
      for (int oy = 0; oy < OH; ++oy)
        for (int ox = 0; ox < OW; ++ox) {
          int valid = C - k0 < 16 ? C - k0 : 16;
          int32_t d1[16] = {0};
          for (int ky = 0; ky < KH; ++ky)
            for (int kx = 0; kx < KW; ++kx) {
              int iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw;
              c->array_steps += 1;                      /* one step: 16 channels, one tap each */
              for (int j = 0; j < valid; ++j) {
                int k = k0 + j;
                int32_t xv = (iy < 0 || iy >= H || ix < 0 || ix >= W)
                                 ? 0 : npu16_in(b, wide, (((size_t)n * C + k) * H + iy) * W + ix) - z;
                d1[j] += (int32_t)b->tiles[((size_t)k * KH + ky) * KW + kx] * xv;
                c->macs += 1;
              }
            }
          for (int j = 0; j < valid; ++j) {
            int k = k0 + j;
            ((uint8_t *)b->out)[(((size_t)n * C + k) * OH + oy) * OW + ox] =
                npu16_requant((int64_t)waps_group_term(d1[j], 0, 0, frac) + b->bias[k], b->mult[k], b->shift[k], r);
          }
          c->epilogue_values += valid;
        }
  c->dma_out_bytes += (int64_t)N * C * OH * OW;
}

static void npu16_add(const int64_t *r, const npu16_bufs *b, npu16_counters *c) {
  const uint8_t *x = (const uint8_t *)b->x, *y = (const uint8_t *)b->x2;
  int t = (int)r[R_T];
  for (int64_t i = 0; i < r[R_COUNT]; ++i) {
    int64_t v = waps_add_rescale(x[i], r[R_ZA], r[R_KA], y[i], r[R_ZB], r[R_KB], t) + r[R_ZOUT];
    ((uint8_t *)b->out)[i] = (uint8_t)waps_clamp64(v, r[R_LO], r[R_HI]);
  }
  c->epilogue_values += r[R_COUNT];
  c->dma_in_bytes += 2 * r[R_COUNT];
  c->dma_out_bytes += r[R_COUNT];
}

static void npu16_pool(const int64_t *r, const npu16_bufs *b, npu16_counters *c, int is_max) {
  int N = (int)r[R_N], C = (int)r[R_C], H = (int)r[R_H], W = (int)r[R_W], KH = (int)r[R_KH], KW = (int)r[R_KW];
  int sh = (int)r[R_SH], sw = (int)r[R_SW], ph = (int)r[R_PH], pw = (int)r[R_PW];
  int OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
  const uint8_t *x = (const uint8_t *)b->x;
  for (int nc = 0; nc < N * C; ++nc)
    for (int oy = 0; oy < OH; ++oy)
      for (int ox = 0; ox < OW; ++ox) {
        int32_t acc = 0;
        for (int ky = 0; ky < KH; ++ky)
          for (int kx = 0; kx < KW; ++kx) {
            int iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
            int in = iy >= 0 && iy < H && ix >= 0 && ix < W;
            int32_t v = in ? x[((size_t)nc * H + iy) * W + ix] : (is_max ? 0 : (int32_t)r[R_ZIN]);
            acc = is_max ? (v > acc ? v : acc) : acc + v;
          }
        size_t o = ((size_t)nc * OH + oy) * OW + ox;
        if (is_max) ((uint8_t *)b->out)[o] = (uint8_t)acc;
        else ((int32_t *)b->out)[o] = acc;
      }
  c->epilogue_values += (int64_t)N * C * OH * OW * KH * KW;
  c->dma_in_bytes += (int64_t)N * C * H * W;
  c->dma_out_bytes += (int64_t)N * C * OH * OW * (is_max ? 1 : 4);
}

static void npu16_gather(const int64_t *r, const npu16_bufs *b, npu16_counters *c) {
  int N = (int)r[R_N], C = (int)r[R_C], J = (int)r[R_OUTC];
  size_t inner = (size_t)r[R_INNER], elem = r[R_IN_WIDE] ? 4 : 1;
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < J; ++j)
      memcpy((char *)b->out + (((size_t)n * J + j) * inner) * elem,
             (const char *)b->x + (((size_t)n * C + b->index[j]) * inner) * elem, inner * elem);
  c->dma_in_bytes += (int64_t)N * J * inner * elem;
  c->dma_out_bytes += (int64_t)N * J * inner * elem;
}

/* Run ``prog`` (uint32 [n, 4]) until END. Returns 0, or -1 on an unknown opcode. */
static int npu16_execute(const uint32_t *prog, const npu16_bufs *b, npu16_counters *c) {
  int64_t r[R_NREGS];
  memset(r, 0, sizeof(r));
  for (;; prog += 4) {
    int op = (int)(prog[0] & 0xFF);
    switch (op) {
      case NPU16_END: return 0;
      case NPU16_SET: r[(prog[0] >> 8) & 0xFF & (R_NREGS - 1)] = (int64_t)((uint64_t)prog[1] | ((uint64_t)prog[2] << 32)); break;
      case NPU16_CONV: npu16_conv(r, b, c); break;
      case NPU16_DWCONV: npu16_dwconv(r, b, c); break;
      case NPU16_ADD: npu16_add(r, b, c); break;
      case NPU16_MAXPOOL: npu16_pool(r, b, c, 1); break;
      case NPU16_SUMPOOL: npu16_pool(r, b, c, 0); break;
      case NPU16_GATHER: npu16_gather(r, b, c); break;
      default: return -1;
    }
  }
}

#endif /* NPU16_SIM_H */
