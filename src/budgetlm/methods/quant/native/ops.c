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

/* bfloat16 (the upper 16 bits of a float32) <-> float32; to bfloat16 rounds to nearest even, as torch does */
ALWAYS_INLINE float bf16_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
ALWAYS_INLINE uint16_t f32_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* row `row` of a cache of D-wide rows as float32: the row itself (bf = 0), or widened into tmp from bfloat16 */
ALWAYS_INLINE const float *kv_row(const void *base, size_t row, int D, int bf, float *tmp) {
    if (!bf) return (const float *)base + row * D;
    const uint16_t *r = (const uint16_t *)base + row * D;
    for (int i = 0; i < D; i++) tmp[i] = bf16_f32(r[i]);
    return tmp;
}

/* x [D] stored at row `row` of a cache: float32 as it is, or rounded to bfloat16 */
ALWAYS_INLINE void kv_store(void *base, size_t row, int D, int bf, const float *x) {
    if (!bf) {
        memcpy((float *)base + row * D, x, sizeof(float) * D);
        return;
    }
    uint16_t *r = (uint16_t *)base + row * D;
    for (int i = 0; i < D; i++) r[i] = f32_bf16(x[i]);
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

ALWAYS_INLINE void attention_rows(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D,
                                  int cap, int start, float scale, int window, int sinks, float *out, float *p,
                                  int bf) {
    const int group = H / KV;
    float tmp[1024]; /* a bfloat16 row widened (D <= 1024: lean_attention_kv checks) */
    for (int m = 0; m < M; m++) {
        const int len = start + m + 1;
        const int first = window > 0 && len > window ? len - window : 0; /* a sliding window: the last `window` */
        const int sunk = sinks < first ? sinks : first; /* and the first `sinks` positions before it */
        for (int h = 0; h < H; h++) {
            const float *qh = q + ((size_t)m * H + h) * D;
            const size_t base = (size_t)(h / group) * cap;
            float mx = -INFINITY;
            for (int j = sunk ? 0 : first; j < len; j = j + 1 == sunk ? first : j + 1) {
                p[j] = dot(qh, kv_row(kc, base + j, D, bf, tmp), D) * scale;
                if (p[j] > mx) mx = p[j];
            }
            float sum = 0.f;
            for (int j = sunk ? 0 : first; j < len; j = j + 1 == sunk ? first : j + 1) {
                p[j] = expf(p[j] - mx);
                sum += p[j];
            }
            float *o = out + ((size_t)m * H + h) * D;
            memset(o, 0, sizeof(float) * D);
            const float inv = 1.f / sum;
            for (int j = sunk ? 0 : first; j < len; j = j + 1 == sunk ? first : j + 1)
                axpy(o, p[j] * inv, kv_row(vc, base + j, D, bf, tmp), D);
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
ALWAYS_INLINE void attn_body(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap,
                             int start, float scale, int window, int sinks, float *out, float *p, int bf) {
    attention_rows(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, bf);
}

#if defined(__x86_64__) || defined(__i386__)
static void rms_generic(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
__attribute__((target("avx2,fma"))) static void rms_avx2(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
static void add_rms_generic(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
__attribute__((target("avx2,fma"))) static void add_rms_avx2(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
static void attn_generic(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, int sinks, float *out, float *p, int bf) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, bf); }
__attribute__((target("avx2,fma"))) static void attn_avx2(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, int sinks, float *out, float *p, int bf) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, bf); }
#define CHOOSE(name, simd) ((simd) ? name##_avx2 : name##_generic)
#else
static void rms_generic(const float *x, const float *w, int M, int D, float eps, float *out) { rms_body(x, w, M, D, eps, out); }
static void add_rms_generic(float *h, const float *d, const float *w, int M, int D, float eps, float *out) { add_rms_body(h, d, w, M, D, eps, out); }
static void attn_generic(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap, int start, float scale, int window, int sinks, float *out, float *p, int bf) { attn_body(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, bf); }
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
   positions start..start+M, float32 (bf = 0) or rounded to bfloat16 (bf = 1). cos, sin [M, D] (halves duplicated, as
   transformers' rotary embedding returns them). */
void lean_rope_store_kv(float *q, const float *k, const float *v, const float *cos_, const float *sin_, int M, int H,
                        int KV, int D, void *kc, void *vc, int cap, int start, int bf) {
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
            for (int i = 0; i < half; i++) {
                tmp[i] = x[i] * c[i] + (-x[i + half]) * s[i];
                tmp[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
            }
            kv_store(kc, (size_t)h * cap + start + m, D, bf, tmp);
            kv_store(vc, (size_t)h * cap + start + m, D, bf, v + ((size_t)m * KV + h) * D);
        }
    }
}

/* lean_rope_store_kv into float32 caches */
void lean_rope_store(float *q, const float *k, const float *v, const float *cos_, const float *sin_, int M, int H,
                     int KV, int D, float *kc, float *vc, int cap, int start) {
    lean_rope_store_kv(q, k, v, cos_, sin_, M, H, KV, D, kc, vc, cap, start, 0);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define ATT_TILE 64 /* keys per tile: 64 rows of a 64-wide head are 16 KB, in L1 while a group's queries read them */

/* ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)): one fixed order, whatever the number of keys at once */
__attribute__((target("avx2,fma"))) static inline float hsum8(__m256 a) {
    const __m128 lo = _mm256_castps256_ps128(a), hi = _mm256_extractf128_ps(a, 1);
    const __m128 p = _mm_hadd_ps(lo, hi); /* x0+x1, x2+x3, x4+x5, x6+x7 */
    const __m128 s = _mm_hadd_ps(p, p);   /* (x0+x1)+(x2+x3), (x4+x5)+(x6+x7), ... */
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* eight float32 elements i..i+8 of a cache: float32 (bf = 0) or widened from bfloat16 (bf = 1; exact) */
#define LOAD8(base, i, bf)                                                                                             \
    ((bf) ? _mm256_castsi256_ps(_mm256_slli_epi32(                                                                     \
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(base) + (i)))), 16))        \
          : _mm256_loadu_ps((const float *)(base) + (i)))

/* p[j] = (q . K_j) * scale for j in [j0, j1), D a multiple of 8: eight keys at once in independent sums (the
   latency of one sum's chain no longer bounds the loop); each score is the same sum in the same order whether its
   key falls in a block of eight or in the tail, so a query's scores never depend on how many tokens came with it */
#define ATT_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
ATT_INLINE void scores_avx2(const float *q, const void *K, int D, int j0, int j1, float scale, float *p, int bf) {
    int j = j0;
    for (; j + 8 <= j1; j += 8) {
        const size_t k0 = (size_t)j * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int c = 0; c < D; c += 8) {
            const __m256 x = _mm256_loadu_ps(q + c);
            a0 = _mm256_fmadd_ps(x, LOAD8(K, k0 + c, bf), a0);
            a1 = _mm256_fmadd_ps(x, LOAD8(K, k0 + D + c, bf), a1);
            a2 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 2 * (size_t)D + c, bf), a2);
            a3 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 3 * (size_t)D + c, bf), a3);
            a4 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 4 * (size_t)D + c, bf), a4);
            a5 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 5 * (size_t)D + c, bf), a5);
            a6 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 6 * (size_t)D + c, bf), a6);
            a7 = _mm256_fmadd_ps(x, LOAD8(K, k0 + 7 * (size_t)D + c, bf), a7);
        }
        p[j] = hsum8(a0) * scale, p[j + 1] = hsum8(a1) * scale, p[j + 2] = hsum8(a2) * scale;
        p[j + 3] = hsum8(a3) * scale, p[j + 4] = hsum8(a4) * scale, p[j + 5] = hsum8(a5) * scale;
        p[j + 6] = hsum8(a6) * scale, p[j + 7] = hsum8(a7) * scale;
    }
    for (; j < j1; j++) {
        const size_t kj = (size_t)j * D;
        __m256 a = _mm256_setzero_ps();
        for (int c = 0; c < D; c += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), LOAD8(K, kj + c, bf), a);
        p[j] = hsum8(a) * scale;
    }
}

/* o += sum over j in [j0, j1) of w[j] V_j, in ascending j for every element, D a multiple of 8; 64 elements at a
   time held in registers across the keys (the tail of a head size not a multiple of 64 one vector at a time) */
ATT_INLINE void mix_avx2(const float *w, const void *V, int D, int j0, int j1, float *o, int bf) {
    int c0 = 0;
    for (; c0 + 64 <= D; c0 += 64) {
        __m256 a0 = _mm256_loadu_ps(o + c0), a1 = _mm256_loadu_ps(o + c0 + 8), a2 = _mm256_loadu_ps(o + c0 + 16);
        __m256 a3 = _mm256_loadu_ps(o + c0 + 24), a4 = _mm256_loadu_ps(o + c0 + 32);
        __m256 a5 = _mm256_loadu_ps(o + c0 + 40), a6 = _mm256_loadu_ps(o + c0 + 48);
        __m256 a7 = _mm256_loadu_ps(o + c0 + 56);
        for (int j = j0; j < j1; j++) {
            const __m256 a = _mm256_set1_ps(w[j]);
            const size_t v = (size_t)j * D + c0;
            a0 = _mm256_fmadd_ps(a, LOAD8(V, v, bf), a0), a1 = _mm256_fmadd_ps(a, LOAD8(V, v + 8, bf), a1);
            a2 = _mm256_fmadd_ps(a, LOAD8(V, v + 16, bf), a2), a3 = _mm256_fmadd_ps(a, LOAD8(V, v + 24, bf), a3);
            a4 = _mm256_fmadd_ps(a, LOAD8(V, v + 32, bf), a4), a5 = _mm256_fmadd_ps(a, LOAD8(V, v + 40, bf), a5);
            a6 = _mm256_fmadd_ps(a, LOAD8(V, v + 48, bf), a6), a7 = _mm256_fmadd_ps(a, LOAD8(V, v + 56, bf), a7);
        }
        _mm256_storeu_ps(o + c0, a0), _mm256_storeu_ps(o + c0 + 8, a1), _mm256_storeu_ps(o + c0 + 16, a2);
        _mm256_storeu_ps(o + c0 + 24, a3), _mm256_storeu_ps(o + c0 + 32, a4), _mm256_storeu_ps(o + c0 + 40, a5);
        _mm256_storeu_ps(o + c0 + 48, a6), _mm256_storeu_ps(o + c0 + 56, a7);
    }
    for (; c0 < D; c0 += 8) {
        __m256 acc = _mm256_loadu_ps(o + c0);
        for (int j = j0; j < j1; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), LOAD8(V, (size_t)j * D + c0, bf), acc);
        _mm256_storeu_ps(o + c0, acc);
    }
}

/* e^x for x <= 0, eight at once: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r from
   Cephes' degree-7 polynomial for expf (1 + r + r^2 P(r)), times 2^n through the exponent bits; 0 below -87.3
   (where e^x is no longer a normal float). A softmax weight is exp(score - max): never above 0. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_neg(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* e^(s[j] - mx) in place for j in [a, b), eight at once (the tail padded), added into sum8 */
__attribute__((target("avx2,fma"))) static __m256 exp_range(float *s, int a, int b, float mx, __m256 sum8) {
    const __m256 m8 = _mm256_set1_ps(mx);
    int j = a;
    for (; j + 8 <= b; j += 8) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), m8));
        _mm256_storeu_ps(s + j, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    if (j < b) {
        float tail[8];
        int t = b - j;
        for (int i = 0; i < 8; i++) tail[i] = i < t ? s[j + i] - mx : -INFINITY;
        const __m256 e = exp_neg(_mm256_loadu_ps(tail)); /* e^-inf: 0 (below -87.3) */
        _mm256_storeu_ps(tail, e);
        for (int i = 0; i < t; i++) s[j + i] = tail[i];
        sum8 = _mm256_add_ps(sum8, e);
    }
    return sum8;
}

__attribute__((target("avx2,fma"))) static float max_range(const float *s, int a, int b, float mx) {
    __m256 mx8 = _mm256_set1_ps(mx);
    int j = a;
    for (; j + 8 <= b; j += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, mx8);
    for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
    for (; j < b; j++) mx = s[j] > mx ? s[j] : mx;
    return mx;
}

__attribute__((target("avx2,fma"))) static void scale_range(float *s, int a, int b, __m256 inv) {
    int j = a;
    for (; j + 8 <= b; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));
    for (; j < b; j++) s[j] *= _mm256_cvtss_f32(inv);
}

/* the softmax of the scores s[0..sunk) and s[first..len), in place: the maximum, e^(s - max) eight at once, their
   sum in eight lanes then hsum8, times 1 / sum. One order for every query. */
__attribute__((target("avx2,fma"))) static void softmax_avx2(float *s, int sunk, int first, int len) {
    const float mx = max_range(s, first, len, max_range(s, 0, sunk, -INFINITY));
    const __m256 sum8 = exp_range(s, first, len, mx, exp_range(s, 0, sunk, mx, _mm256_setzero_ps()));
    const __m256 inv = _mm256_set1_ps(1.f / hsum8(sum8));
    scale_range(s, 0, sunk, inv);
    scale_range(s, first, len, inv);
}

/* the tiles of a query's keys: [0, sunk) then [first, len), ATT_TILE keys at most each; next_tile gives the tile
   after the one starting at j0, tile_end where the one starting at j0 ends */
static inline int next_tile(int j0, int sunk, int first) {
    return j0 < sunk && j0 + ATT_TILE >= sunk ? first : j0 + ATT_TILE;
}
static inline int tile_end(int j0, int sunk, int len) {
    const int end = j0 < sunk ? sunk : len;
    return j0 + ATT_TILE < end ? j0 + ATT_TILE : end;
}

/* One unit of the AVX2 attention (below): the queries g0..g1 of key/value head hk's group, of new token m; scores
   tile by tile, the softmax per query (exp_neg, a fixed order), then the weighted values. Compiled once for float32
   and once for bfloat16 caches (`bf`, each with its loads). */
ATT_INLINE void attn_unit(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap,
                          int start, float scale, int window, int sinks, float *out, float *p, int hk, int m, int g0,
                          int g1, int bf) {
    const int group = H / KV, stride = start + M, len = start + m + 1;
    const int first = window > 0 && len > window ? len - window : 0;
    const int sunk = sinks < first ? sinks : first; /* the first `sinks` positions, then the window */
    const size_t head = (size_t)hk * cap * D * (bf ? sizeof(uint16_t) : sizeof(float)); /* bytes */
    const void *K = (const char *)kc + head, *V = (const char *)vc + head;
    for (int j0 = sunk ? 0 : first; j0 < len; j0 = next_tile(j0, sunk, first)) {
        const int j1 = tile_end(j0, sunk, len);
        for (int g = g0; g < g1; g++) {
            const int h = hk * group + g;
            scores_avx2(q + ((size_t)m * H + h) * D, K, D, j0, j1, scale, p + ((size_t)m * H + h) * stride, bf);
        }
    }
    for (int g = g0; g < g1; g++) {
        const int h = hk * group + g;
        softmax_avx2(p + ((size_t)m * H + h) * stride, sunk, first, len);
        memset(out + ((size_t)m * H + h) * D, 0, sizeof(float) * D);
    }
    for (int j0 = sunk ? 0 : first; j0 < len; j0 = next_tile(j0, sunk, first)) {
        const int j1 = tile_end(j0, sunk, len);
        for (int g = g0; g < g1; g++) {
            const int h = hk * group + g;
            mix_avx2(p + ((size_t)m * H + h) * stride, V, D, j0, j1, out + ((size_t)m * H + h) * D, bf);
        }
    }
}

#define ATT_UNIT_ARGS                                                                                                  \
    const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap, int start, float scale,      \
        int window, int sinks, float *out, float *p, int hk, int m, int g0, int g1
__attribute__((target("avx2,fma"))) static void attn_unit_f32(ATT_UNIT_ARGS) {
    attn_unit(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, hk, m, g0, g1, 0);
}
__attribute__((target("avx2,fma"))) static void attn_unit_bf16(ATT_UNIT_ARGS) {
    attn_unit(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, hk, m, g0, g1, 1);
}

/* The AVX2 attention: per (key/value head, new token) the group's queries share each tile of keys and values while
   it is in L1. Units run on `threads` OpenMP threads; every query's arithmetic is the same whatever the threads or
   the number of new tokens. p: (H * M) rows of start + M floats. */
__attribute__((target("avx2,fma"))) static void attn_tiled_avx2(const float *q, const void *kc, const void *vc,
                                                                 int M, int H, int KV, int D, int cap, int start,
                                                                 float scale, int window, int sinks, float *out,
                                                                 float *p, int threads, int bf) {
    /* a unit: one key/value head's queries of one new token, all of its group (they share each tile of keys and
       values), or one query each where that leaves fewer than two units per thread (a decode step on 2 threads: 3
       units for SmolLM2, 9 this way). How the work is cut changes no result (each score and each sum is computed in
       one order). */
    const int group = H / KV;
    const int per = threads > 1 && KV * M < 2 * threads ? 1 : group, units = KV * M * (group / per);
    const int parts = threads > 1 && units > 1 ? (threads < units ? threads : units) : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
#endif
    for (int u = 0; u < units; u++) {
        const int gb = u % (group / per), hk = u / (group / per) / M, m = u / (group / per) % M;
        (bf ? attn_unit_bf16 : attn_unit_f32)(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, hk, m,
                                              gb * per, gb * per + per);
    }
}
#endif

/* out [M, H, D]: token m attends to cache positions 0..start+m (causal), only the last `window` of them when
   window > 0 (a sliding-window layer), and then also the first `sinks` positions (attention sinks: a draft's sparse
   view of a long context, StreamingLLM's); head h reads key/value head h / (H/KV). With AVX2 and a head size that is a
   multiple of 8, the tiled kernel above on `threads` threads; else one query at a time. The caches hold float32
   (bf = 0) or bfloat16 (bf = 1: half the bytes a step reads; widened exactly, the arithmetic in float32). Returns 1
   when the scratch cannot be allocated (or a bfloat16 head is over 1,024 wide). */
int lean_attention_kv(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap,
                      int start, float scale, int window, int sinks, float *out, int simd, int threads, int bf) {
    if (bf && D > 1024) return 1;
#if defined(__x86_64__) || defined(__i386__)
    if (simd && D % 8 == 0) {
        float *p = malloc(sizeof(float) * (size_t)(start + M) * H * M);
        if (!p) return 1;
        attn_tiled_avx2(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, threads, bf);
        free(p);
        return 0;
    }
#endif
    (void)threads;
    float *p = malloc(sizeof(float) * (size_t)(start + M));
    if (!p) return 1;
    CHOOSE(attn, simd)(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, p, bf);
    free(p);
    return 0;
}

/* lean_attention_kv over float32 caches */
int lean_attention(const float *q, const float *kc, const float *vc, int M, int H, int KV, int D, int cap, int start,
                   float scale, int window, int sinks, float *out, int simd, int threads) {
    return lean_attention_kv(q, kc, vc, M, H, KV, D, cap, start, scale, window, sinks, out, simd, threads, 0);
}

/* out [n] = silu(gate) * up */
void lean_silu_mul(const float *gate, const float *up, int n, float *out) {
    for (int i = 0; i < n; i++) {
        const float g = gate[i];
        out[i] = g / (1.f + expf(-g)) * up[i];
    }
}

/* out [n] = gelu_tanh(gate) * up, GELU's tanh approximation (Gemma's "gelu_pytorch_tanh"):
   0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), computed as g / (1 + exp(-2 u)) (the same function:
   0.5 (1 + tanh(u)) = sigmoid(2 u)), one expf where tanhf costs several */
void lean_gelu_tanh_mul(const float *gate, const float *up, int n, float *out) {
    const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
    for (int i = 0; i < n; i++) {
        const float g = gate[i];
        const float u = c * (g + 0.044715f * g * g * g);
        out[i] = g / (1.f + expf(-2.f * u)) * up[i];
    }
}
