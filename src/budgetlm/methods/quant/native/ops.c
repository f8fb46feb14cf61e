/* The glue of a Llama decoder layer for budgetlm's lean runtime (decode/lean.py), float32, for M new tokens:
   RMSNorm (with the residual add before it), rotary embedding of queries and keys with the keys and values stored
   into the layer's cache, causal attention over the cache with grouped key/value heads, and SiLU(gate) * up.
   Each replaces 5-15 torch operations whose dispatch costs more than their arithmetic at one token. The formulas
   are those of the Llama architecture (RMSNorm: x / sqrt(mean(x^2) + eps) * w; rotary: x * cos + rotate_half(x) *
   sin; attention: softmax(q k^T * scale) v over positions 0..start + m for token m). Written for budgetlm. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float dot(const float *a, const float *b, int n) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

ALWAYS_INLINE void axpy(float *y, float a, const float *x, int n) {
#pragma omp simd
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

ALWAYS_INLINE void rms_rows(const float *x, const float *w, int M, int D, float eps, float *out) {
    for (int m = 0; m < M; m++) {
        const float *r = x + (size_t)m * D;
        float ss = dot(r, r, D) / (float)D;
        float inv = 1.f / sqrtf(ss + eps);
        float *o = out + (size_t)m * D;
#pragma omp simd
        for (int i = 0; i < D; i++) o[i] = w[i] * (r[i] * inv);
    }
}

ALWAYS_INLINE void attention_rows(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D,
                                  int cap, int start, float scale, int window, float *out, float *p) {
    const int group = H / KV;
    for (int m = 0; m < M; m++) {
        const int len = start + m + 1;
        const int first = window > 0 && len > window ? len - window : 0; /* a sliding window: the last `window` */
        for (int h = 0; h < H; h++) {
            const float *qh = q + ((size_t)m * H + h) * D;
            const float *K = kc + (size_t)(h / group) * cap * D, *V = vc + (size_t)(h / group) * cap * D;
            float mx = -INFINITY;
            for (int j = first; j < len; j++) {
                p[j] = dot(qh, K + (size_t)j * D, D) * scale;
                if (p[j] > mx) mx = p[j];
            }
            float sum = 0.f;
            for (int j = first; j < len; j++) {
                p[j] = expf(p[j] - mx);
                sum += p[j];
            }
            float *o = out + ((size_t)m * H + h) * D;
            memset(o, 0, sizeof(float) * D);
            const float inv = 1.f / sum;
            for (int j = first; j < len; j++) axpy(o, p[j] * inv, V + (size_t)j * D, D);
        }
    }
}

/* generic and AVX2 builds of each entry point; `simd` (checked by q4_has_simd) picks */
ALWAYS_INLINE void rms_body(const float *x, const float *w, int M, int D, float eps, float *out) {
    rms_rows(x, w, M, D, eps, out);
}
ALWAYS_INLINE void add_rms_body(float *h, const float *delta, const float *w, int M, int D, float eps, float *out) {
    for (size_t i = 0; i < (size_t)M * D; i++) h[i] += delta[i];
    rms_rows(h, w, M, D, eps, out);
}
ALWAYS_INLINE void attn_body(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap,
                             int start, float scale, int window, float *out, float *p) {
    attention_rows(q, kc, vc, M, H, KV, D, cap, start, scale, window, out, p);
}

#if defined(__x86_64__) || defined(__i386__)
static void rms_generic(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
__attribute__((target("avx2,fma"))) static void rms_avx2(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
static void add_rms_generic(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
__attribute__((target("avx2,fma"))) static void add_rms_avx2(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
static void attn_generic(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, float *out, float *p) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, out, p); }
__attribute__((target("avx2,fma"))) static void attn_avx2(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, float *out, float *p) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, out, p); }
#define CHOOSE(name, simd) ((simd) ? name##_avx2 : name##_generic)
#else
static void rms_generic(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
static void add_rms_generic(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
static void attn_generic(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, float *out, float *p) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, out, p); }
#define CHOOSE(name, simd) name##_generic
#endif

/* out [M, D] = RMSNorm(x) * w */
void lean_rms_norm(const float *x, const float *w, int M, int D, float eps, float *out, int simd) {
    CHOOSE(rms, simd)(x, w, M, D, eps, out);
}

/* h += delta (in place), then out = RMSNorm(h) * w */
void lean_add_rms_norm(float *h, const float *delta, const float *w, int M, int D, float eps, float *out, int simd) {
    CHOOSE(add_rms, simd)(h, delta, w, M, D, eps, out);
}

/* q [M, H, D] rotated in place; k [M, KV, D] rotated and v [M, KV, D] copied into the caches [KV, cap, D] at
   positions start..start+M. cos, sin [M, D] (halves duplicated, as transformers' rotary embedding returns them). */
void lean_rope_store(float *q, const float *k, const float *v, const float *cos_, const float *sin_, int M, int H,
                     int KV, int D, float *kc, float *vc, int cap, int start) {
    const int half = D / 2;
    float tmp[1024];
    if (D > 1024) return;
    for (int m = 0; m < M; m++) {
        const float *c = cos_ + (size_t)m * D, *s = sin_ + (size_t)m * D;
        for (int h = 0; h < H; h++) {
            float *x = q + ((size_t)m * H + h) * D;
            for (int i = 0; i < half; i++) {
                tmp[i] = x[i] * c[i] + (-x[i + half]) * s[i];
                tmp[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
            memcpy(x, tmp, sizeof(float) * D);
        }
        for (int h = 0; h < KV; h++) {
            const float *x = k + ((size_t)m * KV + h) * D;
            float *dst = kc + ((size_t)h * cap + start + m) * D;
            for (int i = 0; i < half; i++) {
                dst[i] = x[i] * c[i] + (-x[i + half]) * s[i];
                dst[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
            memcpy(vc + ((size_t)h * cap + start + m) * D, v + ((size_t)m * KV + h) * D, sizeof(float) * D);
        }
    }
}

/* out [M, H, D]: token m attends to cache positions 0..start+m (causal), only the last `window` of them when
   window > 0 (a sliding-window layer); head h reads key/value head h / (H/KV). Returns 1 when the scratch cannot be
   allocated. */
int lean_attention(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap, int start,
                   float scale, int window, float *out, int simd) {
    float *p = malloc(sizeof(float) * (size_t)(start + M));
    if (!p) return 1;
    CHOOSE(attn, simd)(q, kc, vc, M, H, KV, D, cap, start, scale, window, out, p);
    free(p);
    return 0;
}

/* out [n] = silu(gate) * up */
void lean_silu_mul(const float *gate, const float *up, int n, float *out) {
    for (int i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.f + expf(-g)) * up[i];
    }
}
