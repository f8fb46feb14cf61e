/* budgetlm's 4-bit GEMM with bfloat16 activations ("q4bf"): y [M, N] ~= x [M, K] (float32) times the 4-bit weight of
   q4.c (the same packed codes, the same fp16 scale and zero-point tables [K/g, N], w = (q - zp) * s).

   LOSSY on purpose, like torch's int4 kernel: each call rounds the activations to bfloat16 (round to nearest, ties
   to even; NaN stays NaN, overflow goes to infinity), xb = bf16(x), and computes the exact product of the
   dequantised weight with xb up to float32 summation order:
       y = sum_groups s * (sum_k q_k xb_k  -  zp * sum_k xb_k),
   the group sums of xb in float32 (so that the zero point acts on the same activations as the codes). The codes
   0..15 are exact in bfloat16, and a product of two bfloat16 numbers is exact in float32: only the sums round.

   The AVX-512 path (AVX512F/BW/VL + AVX512_BF16, e.g. AMD Zen 4, Intel Cooper Lake / Sapphire Rapids; run only
   where cpuid says so, q4bf_has_simd) multiplies with vdpbf16ps: a 32-bit lane holds the pair (column k, k+1) of
   one row, so one instruction adds 2 x 16 products to 16 float32 sums. The bytes of columns k and k+1 are put
   side by side in 32-bit lanes (byte of k in the low 16-bit half, byte of k+1 in the high one): for B/2 a
   multiple of 32 by interleaving 32-byte slices (vpunpck{l,h}bw, which works within 128-bit lanes, so a vector
   holds rows {j..j+7, j+16..j+23} or {j+8..j+15, j+24..j+31}; scales, zero points and results follow that order)
   and widening (vpmovzxbw), for B = 32 by widening 16 bytes of each column (vpmovzxbd) and a shift. A 32-entry
   table lookup (vpermw, index = low 5 bits of each 16-bit half: entry i holds bf16(i mod 16)) turns the low
   nibbles into the bf16 pairs of their rows, and after a shift by 4 the high nibbles into those of rows half+j..;
   x is broadcast as the bf16 pair (xb_k, xb_k+1). Up to four rows of x share one decode of the codes (the
   interleaved form is ~20% faster than the shifted one at one row, AMD Zen 4).
   Denormal bfloat16 activations (|x| < 1.2e-38) count as zero on that path (the instruction's rule).
   It needs B/2 a multiple of 16 and g even; other shapes, and other CPUs, take the plain C path, which computes
   the same sums in the same grouping. Blocks are shared among OpenMP threads. Written for budgetlm from the
   formulas above; built with q4.c (methods/quant/native/__init__.py). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

float q4_half_to_float(uint16_t h); /* q4.c */

/* float32 -> bfloat16 bits, round to nearest even (NaN kept quiet) */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x [M, K] rounded to bfloat16 bits xb [M, K] (the C API for tests: q4bf_round) */
void q4bf_round(const float *x, int64_t n, uint16_t *xb) {
    for (int64_t i = 0; i < n; i++) xb[i] = to_bf16(x[i]);
}

/* one block of B rows: y[m][n0 + r] = sum_groups s (sum_k q xb_k - zp sum_k xb_k) */
static void block_scalar(const uint16_t *xb, const float *xs, int mc, int K, const uint8_t *blk, int B,
                         const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {
    const int half = B / 2, ng = K / g;
    for (int m = 0; m < mc; m++)
        for (int r = 0; r < B; r++) {
            int j = r % half, shift = r < half ? 0 : 4;
            float acc = 0.f;
            for (int gi = 0; gi < ng; gi++) {
                float ga = 0.f;
                for (int k = gi * g; k < (gi + 1) * g; k++)
                    ga += (float)((blk[(size_t)k * half + j] >> shift) & 15) * from_bf16(xb[(size_t)m * K + k]);
                float sc = q4_half_to_float(s[(size_t)gi * N + n0 + r]);
                float zp = q4_half_to_float(z[(size_t)gi * N + n0 + r]);
                acc += sc * (ga - zp * xs[(size_t)m * ng + gi]);
            }
            y[(size_t)m * N + n0 + r] = acc;
        }
}

#ifdef HAVE_X86
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))

/* MC rows of x (1..4; xb: bf16 bits [MC][K], read as pairs (xb_k, xb_k+1)) against rows j0..j0+15 (low
   nibbles) and half+j0..half+j0+15 (high nibbles) of one block, for every 16-byte slice j0 */
#define Q4BF_BLOCK(MC)                                                                                                 \
    BF16_TARGET static void block_bf16_##MC(const uint16_t *xb, const float *xs, int K, const uint8_t *blk, int B,     \
                                            const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {    \
        const __m512i tab = _mm512_set_epi16(                                                                          \
            0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040,    \
            0x4000, 0x3f80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0,    \
            0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);                                                           \
        const int half = B / 2, ng = K / g;                                                                            \
        for (int j0 = 0; j0 < half; j0 += 16) {                                                                        \
            __m512 acc_lo[MC], acc_hi[MC];                                                                             \
            for (int m = 0; m < MC; m++) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();                                  \
            for (int gi = 0; gi < ng; gi++) {                                                                          \
                __m512 ga_lo[MC], ga_hi[MC];                                                                           \
                for (int m = 0; m < MC; m++) ga_lo[m] = ga_hi[m] = _mm512_setzero_ps();                                \
                for (int k = gi * g; k < (gi + 1) * g; k += 2) {                                                       \
                    const uint8_t *p = blk + (size_t)k * half + j0;                                                    \
                    __m512i c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));                            \
                    __m512i c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + half)));                   \
                    __m512i w = _mm512_or_si512(c0, _mm512_slli_epi32(c1, 16));                                        \
                    __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(w, tab);                                          \
                    __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab);                    \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        int pair;                                                                                      \
                        memcpy(&pair, xb + (size_t)m * K + k, 4);                                                      \
                        __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                                               \
                        ga_lo[m] = _mm512_dpbf16_ps(ga_lo[m], lo, xv);                                                 \
                        ga_hi[m] = _mm512_dpbf16_ps(ga_hi[m], hi, xv);                                                 \
                    }                                                                                                  \
                }                                                                                                      \
                const size_t t = (size_t)gi * N + n0 + j0;                                                             \
                __m512 s_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + t)));                           \
                __m512 s_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + t + half)));                    \
                __m512 z_lo = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + t)));                           \
                __m512 z_hi = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + t + half)));                    \
                for (int m = 0; m < MC; m++) {                                                                         \
                    __m512 xsm = _mm512_set1_ps(xs[(size_t)m * ng + gi]);                                              \
                    acc_lo[m] = _mm512_fmadd_ps(s_lo, _mm512_fnmadd_ps(z_lo, xsm, ga_lo[m]), acc_lo[m]);               \
                    acc_hi[m] = _mm512_fmadd_ps(s_hi, _mm512_fnmadd_ps(z_hi, xsm, ga_hi[m]), acc_hi[m]);               \
                }                                                                                                      \
            }                                                                                                          \
            for (int m = 0; m < MC; m++) {                                                                             \
                _mm512_storeu_ps(y + (size_t)m * N + n0 + j0, acc_lo[m]);                                              \
                _mm512_storeu_ps(y + (size_t)m * N + n0 + half + j0, acc_hi[m]);                                       \
            }                                                                                                          \
        }                                                                                                              \
    }
Q4BF_BLOCK(1)
Q4BF_BLOCK(2)
Q4BF_BLOCK(3)
Q4BF_BLOCK(4)

/* 8 + 8 float32 of rows r and r + 16 (fp16 table t, or y) */
#define LOAD_SPLIT(t, r)                                                                                               \
    _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)((t) + (r)))),      \
                                            _mm_loadu_si128((const __m128i *)((t) + (r) + 16)), 1))
BF16_TARGET static inline void store_split(float *y, __m512 v) {
    _mm256_storeu_ps(y, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(y + 16, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* B/2 a multiple of 32: 32-byte slices j0 of both columns, interleaved byte by byte (vpunpck{l,h}bw, in 128-bit
   lanes) and widened (vpmovzxbw): rows j0 + {0..7, 16..23} (o = 0) and j0 + {8..15, 24..31} (o = 1), low nibbles,
   and the same + half, high nibbles (o = 2, 3) */
#define Q4BF_WIDE(MC)                                                                                                  \
    BF16_TARGET static void block_wide_##MC(const uint16_t *xb, const float *xs, int K, const uint8_t *blk, int B,     \
                                            const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {    \
        const __m512i tab = _mm512_set_epi16(                                                                          \
            0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040,    \
            0x4000, 0x3f80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0,    \
            0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000);                                                           \
        const int half = B / 2, ng = K / g;                                                                            \
        for (int j0 = 0; j0 < half; j0 += 32) {                                                                        \
            const int rows[4] = {j0, j0 + 8, half + j0, half + j0 + 8};                                                \
            __m512 acc[MC][4];                                                                                         \
            for (int m = 0; m < MC; m++)                                                                               \
                for (int o = 0; o < 4; o++) acc[m][o] = _mm512_setzero_ps();                                           \
            for (int gi = 0; gi < ng; gi++) {                                                                          \
                __m512 ga[MC][4];                                                                                      \
                for (int m = 0; m < MC; m++)                                                                           \
                    for (int o = 0; o < 4; o++) ga[m][o] = _mm512_setzero_ps();                                        \
                for (int k = gi * g; k < (gi + 1) * g; k += 2) {                                                       \
                    const uint8_t *p = blk + (size_t)k * half + j0;                                                    \
                    __m256i a = _mm256_loadu_si256((const __m256i *)p);                                                \
                    __m256i b = _mm256_loadu_si256((const __m256i *)(p + half));                                       \
                    __m512i w0 = _mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(a, b));                                     \
                    __m512i w1 = _mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(a, b));                                     \
                    __m512bh wv[4] = {(__m512bh)_mm512_permutexvar_epi16(w0, tab),                                     \
                                      (__m512bh)_mm512_permutexvar_epi16(w1, tab),                                     \
                                      (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), tab),               \
                                      (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), tab)};              \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        int pair;                                                                                      \
                        memcpy(&pair, xb + (size_t)m * K + k, 4);                                                      \
                        __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);                                               \
                        for (int o = 0; o < 4; o++) ga[m][o] = _mm512_dpbf16_ps(ga[m][o], wv[o], xv);                  \
                    }                                                                                                  \
                }                                                                                                      \
                const size_t t = (size_t)gi * N + n0;                                                                  \
                for (int o = 0; o < 4; o++) {                                                                          \
                    __m512 so = LOAD_SPLIT(s + t, rows[o]), zo = LOAD_SPLIT(z + t, rows[o]);                           \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        __m512 xsm = _mm512_set1_ps(xs[(size_t)m * ng + gi]);                                          \
                        acc[m][o] = _mm512_fmadd_ps(so, _mm512_fnmadd_ps(zo, xsm, ga[m][o]), acc[m][o]);               \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            for (int m = 0; m < MC; m++)                                                                               \
                for (int o = 0; o < 4; o++) store_split(y + (size_t)m * N + n0 + rows[o], acc[m][o]);                  \
        }                                                                                                              \
    }
Q4BF_WIDE(1)
Q4BF_WIDE(2)
Q4BF_WIDE(3)
Q4BF_WIDE(4)

static void block_bf16(const uint16_t *xb, const float *xs, int mc, int K, const uint8_t *blk, int B,
                       const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {
    const int ng = K / g;
    for (int m0 = 0; m0 < mc; m0 += 4) {
        const uint16_t *xm = xb + (size_t)m0 * K;
        const float *sm = xs + (size_t)m0 * ng;
        float *ym = y + (size_t)m0 * N;
        if ((B / 2) % 32 == 0) {
            switch (mc - m0 < 4 ? mc - m0 : 4) {
            case 1: block_wide_1(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
            case 2: block_wide_2(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
            case 3: block_wide_3(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
            default: block_wide_4(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
            }
            continue;
        }
        switch (mc - m0 < 4 ? mc - m0 : 4) {
        case 1: block_bf16_1(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        case 2: block_bf16_2(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        case 3: block_bf16_3(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        default: block_bf16_4(xm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        }
    }
}
#endif

/* 1 where the AVX-512 BF16 path runs on this CPU (cpuid, checked once) */
int q4bf_has_simd(void) {
#ifdef HAVE_X86
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    }
    return known;
#else
    return 0;
#endif
}

/* the rounded activations xb [M, K] and their float32 group sums xs [M, K/g] (malloc'ed; 0 when out of memory) */
static int prepare(const float *x, int M, int K, int g, uint16_t **xb_out, float **xs_out) {
    const int ng = K / g;
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)M * K);
    float *xs = malloc(sizeof(float) * (size_t)M * ng);
    if (!xb || !xs) {
        free(xb), free(xs);
        return 0;
    }
    q4bf_round(x, (int64_t)M * K, xb);
    for (int m = 0; m < M; m++)
        for (int gi = 0; gi < ng; gi++) {
            float a = 0.f;
            for (int k = gi * g; k < (gi + 1) * g; k++) a += from_bf16(xb[(size_t)m * K + k]);
            xs[(size_t)m * ng + gi] = a;
        }
    *xb_out = xb, *xs_out = xs;
    return 1;
}

/* one block of B rows, on the AVX-512 path where `simd` */
static void block(const uint16_t *xb, const float *xs, int M, int K, const uint8_t *blk, int B, const uint16_t *s,
                  const uint16_t *z, int N, int g, float *y, int n0, int simd) {
#ifdef HAVE_X86
    if (simd) block_bf16(xb, xs, M, K, blk, B, s, z, N, g, y, n0);
    else
#endif
        block_scalar(xb, xs, M, K, blk, B, s, z, N, g, y, n0);
    (void)simd;
}

static int use_simd(int B, int simd) {
#ifdef HAVE_X86
    return simd && (B / 2) % 16 == 0 && q4bf_has_simd();
#else
    (void)B, (void)simd;
    return 0;
#endif
}

/* y [M, N] = bf16(x) [M, K] times the 4-bit weight (q4_mm's arguments). simd: 1 asks for the AVX-512 BF16 path,
   taken only where q4bf_has_simd() says the CPU runs it and the shape suits it. Returns 0, 1 for a shape it cannot
   take (B not a multiple of 16, N not whole blocks, g odd or not dividing K), 2 when out of memory. */
int q4bf_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
            int g, float *y, int threads, int simd) {
    if (B <= 0 || B % 16 || N % B || g <= 0 || g % 2 || K % g || M < 0) return 1;
    if (M == 0 || N == 0) return 0;
    const int nb = N / B;
    uint16_t *xb;
    float *xs;
    if (!prepare(x, M, K, g, &xb, &xs)) return 2;
    simd = use_simd(B, simd);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nb > 1)
#endif
    for (int b = 0; b < nb; b++) /* block b: rows b*B.., codes from byte b*B*K/2 */
        block(xb, xs, M, K, packed + (size_t)b * B * K / 2, B, s, z, N, g, y, b * B, simd);
    free(xb), free(xs);
    return 0;
}

/* The "q8bf" kernel: an 8-bit grid as two 4-bit halves (hi: packed, s, z; lo: packed2, s2, z2, each as q4bf_mm's
   arguments): y = hi(x) + lo(x), the same sums as two q4bf_mm calls added, but the activations rounded once and
   both halves of a block computed by the same thread in one parallel region (two regions and a serial sum cost
   more than the work at one token on two threads). Returns as q4bf_mm. */
int q8bf_mm(const float *x, int M, int K, const uint8_t *packed, const uint16_t *s, const uint16_t *z,
            const uint8_t *packed2, const uint16_t *s2, const uint16_t *z2, int N, int B, int g, float *y, int threads,
            int simd) {
    if (B <= 0 || B % 16 || N % B || g <= 0 || g % 2 || K % g || M < 0) return 1;
    if (M == 0 || N == 0) return 0;
    const int nb = N / B;
    uint16_t *xb;
    float *xs;
    float *lo = malloc(sizeof(float) * (size_t)M * N);
    if (!lo || !prepare(x, M, K, g, &xb, &xs)) {
        free(lo);
        return 2;
    }
    simd = use_simd(B, simd);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nb > 1)
#endif
    for (int b = 0; b < nb; b++) {
        const size_t off = (size_t)b * B * K / 2;
        block(xb, xs, M, K, packed + off, B, s, z, N, g, y, b * B, simd);
        block(xb, xs, M, K, packed2 + off, B, s2, z2, N, g, lo, b * B, simd);
        for (int m = 0; m < M; m++) {
            float *ym = y + (size_t)m * N + (size_t)b * B;
            const float *lm = lo + (size_t)m * N + (size_t)b * B;
            for (int r = 0; r < B; r++) ym[r] += lm[r];
        }
    }
    free(lo), free(xb), free(xs);
    return 0;
}
