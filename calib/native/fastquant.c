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

/* c ? a : b without a branch (bitwise), so that loops selecting between two computed
 * values vectorize on AVX2: GCC leaves a float ?: on an int condition as control flow,
 * and the scalar loop mispredicts on every other element (about 20× slower). */
static inline float select_float(int c, float a, float b) {
    uint32_t ua, ub, m = -(uint32_t)(c != 0);
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    ua = (ua & m) | (ub & ~m);
    memcpy(&a, &ua, sizeof a);
    return a;
}

/* clamp(x, lo, hi) through selects (vectorizes where a nested float ?: may not) */
static inline float clamp_float(float x, float lo, float hi) {
    return select_float(x < lo, lo, select_float(x > hi, hi, x));
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
            if (gxf) {
#pragma omp simd reduction(+ : part)
                for (int64_t i = b * BLOCK; i < end; i++) {
                    int in;
                    float code;
                    float q = fake_quant_point(xf[i], s, z, levels, &in, &code);
                    float fin = (float)in;
                    part += gf[i] * (q - xf[i] * fin);
                    gxf[i] = gf[i] * fin;
                }
            } else {  /* a separate loop: a store under a condition keeps it scalar */
#pragma omp simd reduction(+ : part)
                for (int64_t i = b * BLOCK; i < end; i++) {
                    int in;
                    float code;
                    float q = fake_quant_point(xf[i], s, z, levels, &in, &code);
                    part += gf[i] * (q - xf[i] * (float)in);
                }
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
            gpart += 2.0f * e * select_float(in, (q - x[i]) / s, code - z);
        }
        sums[b] = part;
        gsums[b] = gpart;
    }
    *ds = ordered_sum(gsums, BLOCKS(n));
    return ordered_sum(sums, BLOCKS(n));
}

/* ---- AdaRound's soft weights (calib/rounding.py), forward and backward in one pass each ----
 * exp and log below are Cephes' single-precision polynomials (relative error about 1e-7),
 * written with selects only so that the loops vectorize; libm's are scalar calls. So h(V)
 * differs from torch.sigmoid's by an ulp or two, and |u|^β = exp(β·log|u|) from torch.pow
 * by about β·1e-7 relative: a regulariser and a soft rounding learned by Adam, not values
 * any backend reproduces (those are the frozen integer codes). */
static inline float exp_poly(float x) {
    x = clamp_float(x, -87.0f, 88.0f);
    float n = rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

/* natural log of a positive normal float */
static inline float log_poly(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    float e = (float)((int32_t)((u >> 23) & 0xff) - 126);
    u = (u & 0x807fffffu) | 0x3f000000u;             /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &u, sizeof m);
    int low = m < 0.707106781186547524f;
    e = select_float(low, e - 1.0f, e);
    m = select_float(low, m + m - 1.0f, m - 1.0f);
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y = y + e * -2.12194440e-4f;
    y = y - 0.5f * z;
    return m + y + e * 0.693359375f;
}

/* |u|^p for |u| ≤ 1 and p > 0 (0 at u = 0) */
static inline float abs_pow(float u, float p) {
    float a = fabsf(u);
    return select_float(a > 0.0f, exp_poly(p * log_poly(select_float(a > 0.0f, a, 1.0f))), 0.0f);
}

/* The pieces the soft rounding and the WAPS groups share. ``span`` = ζ − τ and ``low`` = τ
 * of the rectified sigmoid come from calib/rounding.py (ZETA, TAU), their one definition. */
static inline float sigmoid_poly(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

/* a probability stretched to (τ, ζ) before its clamp to [0, 1] */
static inline float stretch(float x, float span, float low) { return x * span + low; }

/* ∂/∂h of c_reg·(1 − |u|^b), u = 2h − 1: −c_reg·2b·|u|^(b−1)·sgn(u) (0 at u = 0) */
static inline float regulariser_grad(float u, float b, float c_reg) {
    float d = c_reg * 2.0f * b * abs_pow(u, b - 1.0f);
    return select_float(u > 0.0f, -d, select_float(u < 0.0f, d, 0.0f));
}

/* Soft weights of one tensor of ``rows`` output channels × ``per_row`` elements:
 * σ = σ(v), h = clamp(σ·(ζ−τ)+τ, 0, 1), w = clamp(floor + h, qmin, qmax)·scale[row];
 * returns Σ (1 − |2h − 1|^β) when ``with_reg`` (the binary regulariser), else 0 (not
 * computed). ``sums``: ``rows`` doubles. */
double soft_round_forward(const float *v, const float *floor_, const float *scale, int64_t rows, int64_t per_row,
                          float qmin, float qmax, float span, float low, int with_reg, float beta, float *w,
                          double *sums, int threads) {
    const float b = with_reg ? beta : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float sc = scale[r];
        const float *vr = v + r * per_row, *fr = floor_ + r * per_row;
        float *wr = w + r * per_row;
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t i = 0; i < per_row; i++) {
            float h = clamp_float(stretch(sigmoid_poly(vr[i]), span, low), 0.0f, 1.0f);
            float c = clamp_float(fr[i] + h, qmin, qmax);
            wr[i] = c * sc;
            part += 1.0f - abs_pow(2.0f * h - 1.0f, b);
        }
        sums[r] = part;
    }
    return with_reg ? ordered_sum(sums, rows) : 0.0;
}

/* The gradient in v of L = Σ gw·w + c_reg·reg with w and reg as soft_round_forward
 * (c_reg = 0: the regulariser is not in the loss; beta is then unused):
 * gv = (gw·scale[row]·[qmin ≤ floor + h ≤ qmax] − c_reg·2β·|u|^(β−1)·sgn(u))
 * ·(ζ−τ)·σ(1 − σ)·[0 ≤ σ(ζ−τ)+τ ≤ 1], u = 2h − 1; the masks pass their bounds, as
 * torch's clamp does. */
void soft_round_backward(const float *v, const float *floor_, const float *scale, const float *gw, int64_t rows,
                         int64_t per_row, float qmin, float qmax, float span, float low, float beta, float c_reg,
                         float *gv, int threads) {
    const float b = c_reg != 0.0f ? beta : 2.0f;    /* any exponent ≥ 1 keeps |u|^(b−1) finite */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float sc = scale[r];
        const float *vr = v + r * per_row, *fr = floor_ + r * per_row, *gr = gw + r * per_row;
        float *out = gv + r * per_row;
#pragma omp simd
        for (int64_t i = 0; i < per_row; i++) {
            float sig = sigmoid_poly(vr[i]);
            float pre = stretch(sig, span, low);
            float h = clamp_float(pre, 0.0f, 1.0f);
            float c = fr[i] + h;
            float g = select_float((c >= qmin) & (c <= qmax), gr[i] * sc, 0.0f);
            g = g + regulariser_grad(2.0f * h - 1.0f, b, c_reg);
            out[i] = select_float((pre >= 0.0f) & (pre <= 1.0f), g * span * (sig * (1.0f - sig)), 0.0f);
        }
    }
}

/* ---- WAPS group probabilities (calib/product_groups.py), one call each way per layer ----
 * For each of ``units`` rows of logits R [units, g] (g ≤ MAX_GROUPS):
 *   π = softmax(R_i) (sigmoid_form = 0) or σ(R_i)/Σ_j σ(R_ij) (sigmoid_form = 1, eq. 15 as printed),
 *   s = clamp(π·(ζ−τ)+τ, 0, 1), γ^y_i = Σ_p γ_p·s_p / Σ_p s_p,
 * and the binary regulariser Σ (1 − |2s − 1|^β) when ``with_reg``. Tiny tensors: plain loops,
 * the same exp as the soft rounding. */
#define MAX_GROUPS 64

/* π of one unit into pi (and σ into sig for the sigmoid form); returns the normaliser */
static float group_pi(const float *r, int64_t g, int sigmoid_form, float *pi, float *sig) {
    float total = 0.0f;
    if (sigmoid_form) {
        for (int64_t p = 0; p < g; p++) {
            sig[p] = sigmoid_poly(r[p]);
            total += sig[p];
        }
        for (int64_t p = 0; p < g; p++) pi[p] = sig[p] / total;
    } else {
        float top = r[0];
        for (int64_t p = 1; p < g; p++) top = r[p] > top ? r[p] : top;
        for (int64_t p = 0; p < g; p++) {
            pi[p] = exp_poly(r[p] - top);
            total += pi[p];
        }
        for (int64_t p = 0; p < g; p++) pi[p] = pi[p] / total;
    }
    return total;
}

double soft_groups_forward(const float *r, int64_t units, int64_t g, const float *gammas, int sigmoid_form,
                           float span, float low, int with_reg, float beta, float *s, float *gy) {
    double reg = 0.0;
    for (int64_t i = 0; i < units; i++) {
        float pi[MAX_GROUPS], sig[MAX_GROUPS], num = 0.0f, den = 0.0f, part = 0.0f;
        group_pi(r + i * g, g, sigmoid_form, pi, sig);
        for (int64_t p = 0; p < g; p++) {
            float sp = clamp_float(stretch(pi[p], span, low), 0.0f, 1.0f);
            s[i * g + p] = sp;
            num += sp * gammas[p];
            den += sp;
            if (with_reg) part += 1.0f - abs_pow(2.0f * sp - 1.0f, beta);
        }
        gy[i] = num / den;
        reg += part;
    }
    return with_reg ? reg : 0.0;
}

/* ∂/∂R of Σ_i ggy_i·γ^y_i + c_reg·reg (c_reg = 0: no regulariser in the loss), through the
 * clamp (passing its bounds, as torch's clamp) and softmax / sigmoid ratio; ``s`` and ``gy``
 * from soft_groups_forward. */
void soft_groups_backward(const float *r, int64_t units, int64_t g, const float *gammas, int sigmoid_form,
                          float span, float low, const float *s, const float *gy, const float *ggy, float beta,
                          float c_reg, float *gr) {
    const float b = c_reg != 0.0f ? beta : 2.0f;
    for (int64_t i = 0; i < units; i++) {
        float pi[MAX_GROUPS], sig[MAX_GROUPS], dpre[MAX_GROUPS], den = 0.0f, dot = 0.0f;
        const float total = group_pi(r + i * g, g, sigmoid_form, pi, sig);
        for (int64_t p = 0; p < g; p++) den += s[i * g + p];
        for (int64_t p = 0; p < g; p++) {
            float pre = stretch(pi[p], span, low);
            float ds = ggy[i] * (gammas[p] - gy[i]) / den + regulariser_grad(2.0f * s[i * g + p] - 1.0f, b, c_reg);
            dpre[p] = (pre >= 0.0f && pre <= 1.0f) ? ds * span : 0.0f;
            dot += dpre[p] * pi[p];
        }
        for (int64_t p = 0; p < g; p++) {
            if (sigmoid_form) {
                gr[i * g + p] = (dpre[p] - dot) / total * (sig[p] * (1.0f - sig[p]));
            } else {
                gr[i * g + p] = pi[p] * (dpre[p] - dot);
            }
        }
    }
}

/* ProductGroups.track in one call: s as soft_groups_forward (into ``s``), and per unit
 * settled_at = step where max_p s_p ≥ 1 (one-hot) and it was unsettled (< 0), −1 where not one-hot. */
void soft_groups_track(const float *r, int64_t units, int64_t g, int sigmoid_form, float span, float low,
                       int64_t step, float *s, int64_t *settled_at) {
    for (int64_t i = 0; i < units; i++) {
        float pi[MAX_GROUPS], sig[MAX_GROUPS], top = 0.0f;
        group_pi(r + i * g, g, sigmoid_form, pi, sig);
        for (int64_t p = 0; p < g; p++) {
            float sp = clamp_float(stretch(pi[p], span, low), 0.0f, 1.0f);
            s[i * g + p] = sp;
            top = sp > top ? sp : top;
        }
        if (top >= 1.0f) {
            if (settled_at[i] < 0) settled_at[i] = step;
        } else {
            settled_at[i] = -1;
        }
    }
}
