/* One-pass CPU kernels for the reconstruction loop's full-size elementwise work
 * (calib/native.py loads them; calib/quantizers.py and calib/reconstruct.py call them).
 *
 * All arrays are float32 (masks uint8) with n elements in the same memory order.
 * Built with -ffp-contract=off so every float operation rounds as in PyTorch's
 * eager kernels: fq_forward's output is bit-identical to
 *   v = x / s; v = round_half_even(v) + z; v = clamp(v, 0, L); out = (v - z) * s.
 * Sums are accumulated in float over blocks of BLOCK elements (vectorized), and the
 * block sums in double in block order, so a result does not depend on the thread count
 * or scheduling (PyTorch's order differs: equal up to float summation order).
 * The kernels allocate nothing: a reduction takes ``part``, scratch_len(n) doubles (two
 * such runs for lsq_sse) that the caller owns. */
#include <math.h>
#include <stdint.h>

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

/* The fake-quantization rule, once: the code clamp(round_even(x/s) + z, 0, L) in *code,
 * whether 0 < unclamped code < L (the STE mask) in *inside, and (code − z)·s returned. */
static inline float fake_quant_point(float x, float s, float z, float levels, int *inside, float *code) {
    float v = round_even(x / s) + z;
    *inside = (v > 0.0f) & (v < levels);
    *code = v < 0.0f ? 0.0f : (v > levels ? levels : v);
    return (*code - z) * s;
}

/* Fake quantization forward: out, and inside[i] = 0 < code < L (the STE mask). */
void fq_forward(const float *x, float *out, uint8_t *inside, int64_t n, float s, float z, float levels,
                int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int in;
        float code;
        out[i] = fake_quant_point(x[i], s, z, levels, &in, &code);
        inside[i] = (uint8_t)in;
    }
}

/* Fake quantization backward: gx = g·inside (when gx is not NULL) and returns
 * Σ g·(out − x·inside), the LSQ step gradient times s. */
double fq_backward(const float *g, const float *x, const float *out, const uint8_t *inside, float *gx,
                   int64_t n, double *sums, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < BLOCKS(n); b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        float part = 0.0f;
        if (gx) {
#pragma omp simd reduction(+ : part)
            for (int64_t i = b * BLOCK; i < end; i++) {
                float in = (float)inside[i];
                part += g[i] * (out[i] - x[i] * in);
                gx[i] = g[i] * in;
            }
        } else {
#pragma omp simd reduction(+ : part)
            for (int64_t i = b * BLOCK; i < end; i++) part += g[i] * (out[i] - x[i] * (float)inside[i]);
        }
        sums[b] = part;
    }
    return ordered_sum(sums, BLOCKS(n));
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
