/* One-pass CPU kernels for the reconstruction loop's full-size elementwise work
 * (calib/native.py loads them; calib/quantizers.py, calib/frontier.py and
 * calib/reconstruct.py call them).
 *
 * Arrays hold n elements in the same memory order; float arrays are float32, or bfloat16
 * where a kernel takes a ``*_bf16`` flag (read as the float32 of the same bits shifted up,
 * written rounded to nearest even, as PyTorch's casts do for finite values).
 * Built with -ffp-contract=off so every float operation rounds as in PyTorch's
 * eager kernels: fq_forward's output is bit-identical to
 *   v = x / s; v = round_half_even(v) + z; v = clamp(v, 0, L); out = (v - z) * s
 * (then cast to bfloat16 where asked), and fq_backward recomputes it from x rather than
 * reading a stored copy.
 * Sums are accumulated in float over blocks of BLOCK elements (vectorized), and the
 * block sums in double in block order, so a result does not depend on the thread count
 * or scheduling (PyTorch's order differs: equal up to float summation order).
 * The kernels allocate nothing: a reduction takes ``part``, scratch_len(n) doubles (two
 * such runs for lsq_sse) that the caller owns. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096
#define BLOCKS(n) (((n) + BLOCK - 1) / BLOCK)

/* The doubles of scratch one reduction over n elements needs (one per block). */
int64_t scratch_len(int64_t n) { return BLOCKS(n) + 1; }

/* Σ of the per-block sums, in block order (deterministic). */
static double ordered_sum(const double *part, int64_t blocks) {
    double acc = 0.0;
    for (int64_t b = 0; b < blocks; b++) acc += part[b];
    return acc;
}

/* round half to even in the default rounding mode, inlined as one instruction */
static inline float round_even(float v) { return rintf(v); }

/* bfloat16 <-> float32: a bfloat16 is the upper half of a float32's bits. The store rounds
 * to nearest even (PyTorch's round_to_nearest_even; a NaN becomes the quiet NaN 0x7FC0). */
static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array */
static inline float load(const void *a, int bf16, int64_t i) {
    return bf16 ? bf16_load(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

static inline void store(void *a, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)a)[i] = bf16_store(v);
    else ((float *)a)[i] = v;
}

/* The fake-quantization rule, once: the code clamp(round_even(x/s) + z, 0, L) in *code,
 * whether 0 < unclamped code < L (the STE mask) in *inside, and (code − z)·s returned. */
static inline float fake_quant_point(float x, float s, float z, float levels, int *inside, float *code) {
    float v = round_even(x / s) + z;
    *inside = (v > 0.0f) & (v < levels);
    *code = v < 0.0f ? 0.0f : (v > levels ? levels : v);
    return (*code - z) * s;
}

/* Fake quantization forward: out = the fake-quantized x (x and out each float32 or bfloat16). */
void fq_forward(const void *x, int x_bf16, void *out, int out_bf16, int64_t n, float s, float z, float levels,
                int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < BLOCKS(n); b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        if (!x_bf16 && !out_bf16) {
            const float *xf = x;
            float *of = out;
#pragma omp simd
            for (int64_t i = b * BLOCK; i < end; i++) {
                int in;
                float code;
                of[i] = fake_quant_point(xf[i], s, z, levels, &in, &code);
            }
        } else {
            for (int64_t i = b * BLOCK; i < end; i++) {
                int in;
                float code;
                store(out, out_bf16, i, fake_quant_point(load(x, x_bf16, i), s, z, levels, &in, &code));
            }
        }
    }
}

/* Fake quantization backward, recomputing the forward from x: gx = g·inside (when gx is
 * not NULL; same type as x) with inside = 0 < unclamped code < L (the STE mask), and
 * returns Σ g·(out − x·inside), the LSQ step gradient times s. */
double fq_backward(const void *g, int g_bf16, const void *x, int x_bf16, void *gx, int64_t n, float s, float z,
                   float levels, double *sums, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < BLOCKS(n); b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        float part = 0.0f;
        if (!g_bf16 && !x_bf16) {
            const float *gf = g, *xf = x;
            float *gxf = gx;
#pragma omp simd reduction(+ : part)
            for (int64_t i = b * BLOCK; i < end; i++) {
                int in;
                float code;
                float q = fake_quant_point(xf[i], s, z, levels, &in, &code);
                float fin = (float)in;
                part += gf[i] * (q - xf[i] * fin);
                if (gxf) gxf[i] = gf[i] * fin;
            }
        } else {
#pragma omp simd reduction(+ : part)
            for (int64_t i = b * BLOCK; i < end; i++) {
                int in;
                float code, xi = load(x, x_bf16, i), gi = load(g, g_bf16, i);
                float q = fake_quant_point(xi, s, z, levels, &in, &code);
                float fin = (float)in;
                part += gi * (q - xi * fin);
                if (gx) store(gx, x_bf16, i, gi * fin);
            }
        }
        sums[b] = part;
    }
    return ordered_sum(sums, BLOCKS(n));
}

/* Cached activation codes to values, gathering a batch: out[j] = (codes[idx[j]] − z)·s for
 * ``batch`` samples of ``channels``×``pixels`` codes each (a sample's codes channel-major,
 * as stored), written channel-major (nhwc = 0) or pixel-major (nhwc = 1: the channels-last
 * memory order of a 4-D batch). ``codes`` is uint8, or float32 values gathered as they are
 * (decode = 0; s and z unused). */
void gather(const void *src, int decode, const int64_t *idx, int64_t batch, int64_t channels, int64_t pixels,
            float s, float z, int nhwc, float *out, int threads) {
    const int64_t tile = 64, tiles = (pixels + tile - 1) / tile, per = channels * pixels;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
    for (int64_t j = 0; j < batch; j++) {
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t p0 = t * tile, p1 = p0 + tile < pixels ? p0 + tile : pixels;
            const uint8_t *cb = (const uint8_t *)src + idx[j] * per;
            const float *fb = (const float *)src + idx[j] * per;
            float *ob = out + j * per;
            for (int64_t c = 0; c < channels; c++) {
                for (int64_t p = p0; p < p1; p++) {
                    float v = decode ? ((float)cb[c * pixels + p] - z) * s : fb[c * pixels + p];
                    ob[nhwc ? p * channels + c : c * pixels + p] = v;
                }
            }
        }
    }
}

/* Clipped squared error forward: d = clamp(x, lo, hi) − t (stored), returns Σ d². */
double sse_forward(const float *x, const float *t, float *d, int64_t n, float lo, float hi, int clip,
                   double *sums, int threads) {
    if (!clip) lo = -INFINITY, hi = INFINITY;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < BLOCKS(n); b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t i = b * BLOCK; i < end; i++) {
            float v = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
            float e = v - t[i];
            d[i] = e;
            part += e * e;
        }
        sums[b] = part;
    }
    return ordered_sum(sums, BLOCKS(n));
}

/* Clipped squared error backward: gx = c·d·[lo ≤ x ≤ hi] (the bounds pass, as torch's clamp). */
void sse_backward(const float *x, const float *d, float *gx, int64_t n, float lo, float hi, int clip, float c,
                  int threads) {
    if (!clip) lo = -INFINITY, hi = INFINITY;
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float m = (x[i] >= lo && x[i] <= hi) ? 1.0f : 0.0f;
        gx[i] = d[i] * c * m;
    }
}

/* Squared error of the fake-quantized x against t, and its derivative in the step s,
 * in one read pass (x is not differentiated): returns Σ (q − t)² and writes
 * Σ 2(q − t)·∂q/∂s to *ds (sums: 2·scratch_len(n) doubles), with ∂q/∂s = (q − x)/s inside and (code − z) outside. */
double lsq_sse(const float *x, const float *t, int64_t n, float s, float z, float levels, double *ds,
               double *sums, int threads) {
    double *gsums = sums + BLOCKS(n) + 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < BLOCKS(n); b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        float part = 0.0f, gpart = 0.0f;
#pragma omp simd reduction(+ : part, gpart)
        for (int64_t i = b * BLOCK; i < end; i++) {
            int in;
            float code;
            float q = fake_quant_point(x[i], s, z, levels, &in, &code);
            float e = q - t[i];
            part += e * e;
            gpart += 2.0f * e * (in ? (q - x[i]) / s : (code - z));
        }
        sums[b] = part;
        gsums[b] = gpart;
    }
    *ds = ordered_sum(gsums, BLOCKS(n));
    return ordered_sum(sums, BLOCKS(n));
}
