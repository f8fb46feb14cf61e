/* budgetlm's 4-bit GEMM with 8-bit activations ("q4a8"): y [M, N] ~= x [M, K] (float32) times the 4-bit weight of
   q4.c (the same packed codes, the same fp16 scale and zero-point tables [K/g, N], w = (q - zp) * s).

   LOSSY on purpose: the activations are quantised once per call, per block of 32 along K, to int8 symmetric codes
   with round-to-nearest (ties to even): d = max|x| / 127 over the block, xq = rint(x / d) (all 0 where d == 0),
   and the product computed is the exact product of the dequantised weight with the dequantised activations
   d * xq, up to float32 summation order:
       y = sum_groups s * (sum_blocks d_b * sum_k q_k xq_k  -  zp * sum_blocks d_b * sum_k xq_k).
   The inner sums are integers: the AVX2 path multiplies unsigned codes (0..15) by signed activation codes with
   _mm256_maddubs_epi16 (pairs of products added in 16 bits), accumulates a block of 32 columns in 16 bits (at most
   8 x 2 x 15 x 127 = 30480: no overflow), then widens to 32 bits and scales by d_b in float32 once per block.
   2- and 3-bit grids use the same codes (0..15, shifted) as q4.c.

   Layout (q4.c): blocks of B rows, for every column B/2 bytes, byte j holding row j (low nibble) and row B/2 + j
   (high nibble). The AVX2 path takes 16 bytes (32 rows) of four consecutive columns k..k+3 at a time: the loads
   hold [col k | col k+1] and [col k+2 | col k+3] in the two 128-bit lanes, so interleaving their bytes pairs
   (col k, col k+2) in the low lane and (col k+1, col k+3) in the high one, for 8 rows per vector; the activation
   vector for the step holds (x_k, x_k+2) repeated in the low lane and (x_k+1, x_k+3) in the high one (built once
   per call). It needs B/2 a multiple of 16 (B = 32 with AVX2, 64 with AVX-512); other blocks take the plain C path.
   Written for budgetlm from the formulas above; built with q4.c (methods/quant/native/__init__.py). */
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

#define QB 32 /* activations per quantisation block */

float q4_half_to_float(uint16_t h); /* q4.c */

/* x [M, K] -> codes xq [M, K] and block scales d [M, K/QB] (d = NaN for a block holding a NaN or infinity, so that
   the product is NaN as the exact one would be); K a multiple of QB. */
void q4a8_quantize(const float *x, int M, int K, int8_t *xq, float *d) {
    const int nb = K / QB;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const float *v = x + (size_t)m * K + (size_t)b * QB;
            int8_t *q = xq + (size_t)m * K + (size_t)b * QB;
            float amax = 0.f;
            int finite = 1;
            for (int i = 0; i < QB; i++) {
                float a = fabsf(v[i]);
                if (!isfinite(a)) finite = 0;
                else if (a > amax) amax = a;
            }
            float db = amax / 127.f;
            d[(size_t)m * nb + b] = finite ? db : NAN;
            for (int i = 0; i < QB; i++) {
                float r = (finite && db > 0.f) ? nearbyintf(v[i] / db) : 0.f;
                q[i] = (int8_t)(r > 127.f ? 127 : r < -127.f ? -127 : (int)r);
            }
        }
}

/* one block of B rows, rows 0..mc of the quantised x */
static void block_scalar(const int8_t *xq, const float *d, const float *xs, int mc, int K, const uint8_t *blk, int B,
                         const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {
    const int half = B / 2, ng = K / g, nb = K / QB;
    for (int m = 0; m < mc; m++)
        for (int r = 0; r < B; r++) {
            int j = r % half, shift = r < half ? 0 : 4;
            float acc = 0.f;
            for (int gi = 0; gi < ng; gi++) {
                float ga = 0.f;
                for (int b = gi * (g / QB); b < (gi + 1) * (g / QB); b++) {
                    int32_t isum = 0;
                    for (int k = b * QB; k < (b + 1) * QB; k++)
                        isum += ((blk[(size_t)k * half + j] >> shift) & 15) * xq[(size_t)m * K + k];
                    ga += d[(size_t)m * nb + b] * (float)isum;
                }
                float sc = q4_half_to_float(s[(size_t)gi * N + n0 + r]);
                float zp = q4_half_to_float(z[(size_t)gi * N + n0 + r]);
                acc += sc * (ga - zp * xs[(size_t)m * ng + gi]);
            }
            y[(size_t)m * N + n0 + r] = acc;
        }
}

#ifdef HAVE_X86
/* the activation vectors of one row: for step t (columns 4t..4t+3) 32 bytes, (x_4t, x_4t+2) repeated in the low
   lane and (x_4t+1, x_4t+3) in the high one */
__attribute__((target("avx2"))) static void spread(const int8_t *xq, int K, __m256i *out) {
    for (int t = 0; t < K / 4; t++) {
        const uint8_t *p = (const uint8_t *)xq + 4 * t;
        short lo = (short)(p[0] | (p[2] << 8)), hi = (short)(p[1] | (p[3] << 8));
        _mm256_store_si256(out + t, _mm256_setr_m128i(_mm_set1_epi16(lo), _mm_set1_epi16(hi)));
    }
}

/* 16 bytes of two columns `half` bytes apart, in the two lanes (one load where the columns are adjacent) */
__attribute__((target("avx2"))) static inline __m256i load2(const uint8_t *p, int half) {
    if (half == 16) return _mm256_loadu_si256((const __m256i *)p);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                   _mm_loadu_si128((const __m128i *)(p + half)), 1);
}

/* MC rows of x (1..4) against 32 rows of one block (16-byte slice j0 of every column): rows j0..j0+15 (low nibbles)
   and half+j0..half+j0+15 (high nibbles), in four vectors of 8 rows each */
#define Q4A8_BLOCK(MC)                                                                                                 \
    __attribute__((target("avx2,fma,f16c"))) static void block_avx2_##MC(                                             \
        const __m256i *xv, const float *d, const float *xs, int K, const uint8_t *blk, int B, const uint16_t *s,       \
        const uint16_t *z, int N, int g, float *y, int n0) {                                                           \
        const __m256i mask = _mm256_set1_epi8(15);                                                                     \
        const int half = B / 2, ng = K / g, nb = K / QB, steps = K / 4;                                                \
        for (int j0 = 0; j0 < half; j0 += 16) {                                                                        \
            __m256 acc[MC][4];                                                                                         \
            for (int m = 0; m < MC; m++)                                                                               \
                for (int o = 0; o < 4; o++) acc[m][o] = _mm256_setzero_ps();                                           \
            for (int gi = 0; gi < ng; gi++) {                                                                          \
                __m256 ga[MC][4];                                                                                      \
                for (int m = 0; m < MC; m++)                                                                           \
                    for (int o = 0; o < 4; o++) ga[m][o] = _mm256_setzero_ps();                                        \
                for (int b = gi * (g / QB); b < (gi + 1) * (g / QB); b++) {                                            \
                    __m256i is[MC][4];                                                                                 \
                    for (int m = 0; m < MC; m++)                                                                       \
                        for (int o = 0; o < 4; o++) is[m][o] = _mm256_setzero_si256();                                 \
                    for (int k = b * QB; k < (b + 1) * QB; k += 4) {                                                   \
                        const uint8_t *p = blk + (size_t)k * half + j0;                                                \
                        __m256i c01 = load2(p, half), c23 = load2(p + 2 * half, half);                                 \
                        __m256i l01 = _mm256_and_si256(c01, mask), l23 = _mm256_and_si256(c23, mask);                  \
                        __m256i h01 = _mm256_and_si256(_mm256_srli_epi16(c01, 4), mask);                               \
                        __m256i h23 = _mm256_and_si256(_mm256_srli_epi16(c23, 4), mask);                               \
                        __m256i w[4] = {_mm256_unpacklo_epi8(l01, l23), _mm256_unpackhi_epi8(l01, l23),                \
                                        _mm256_unpacklo_epi8(h01, h23), _mm256_unpackhi_epi8(h01, h23)};               \
                        for (int m = 0; m < MC; m++) {                                                                 \
                            __m256i xm = _mm256_load_si256(xv + (size_t)m * steps + k / 4);                            \
                            for (int o = 0; o < 4; o++)                                                                \
                                is[m][o] = _mm256_add_epi16(is[m][o], _mm256_maddubs_epi16(w[o], xm));                 \
                        }                                                                                              \
                    }                                                                                                  \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        __m256 db = _mm256_broadcast_ss(d + (size_t)m * nb + b);                                       \
                        for (int o = 0; o < 4; o++) {                                                                  \
                            __m256i wide = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(is[m][o])),   \
                                                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(is[m][o], 1))); \
                            ga[m][o] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), db, ga[m][o]);                        \
                        }                                                                                              \
                    }                                                                                                  \
                }                                                                                                      \
                const size_t t = (size_t)gi * N + n0 + j0;                                                             \
                const size_t off[4] = {0, 8, (size_t)half, (size_t)half + 8};                                          \
                for (int o = 0; o < 4; o++) {                                                                          \
                    __m256 so = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + t + off[o])));                   \
                    __m256 zo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + t + off[o])));                   \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        __m256 xsm = _mm256_broadcast_ss(xs + (size_t)m * ng + gi);                                    \
                        acc[m][o] = _mm256_fmadd_ps(so, _mm256_fnmadd_ps(zo, xsm, ga[m][o]), acc[m][o]);               \
                    }                                                                                                  \
                }                                                                                                      \
            }                                                                                                          \
            const int rows[4] = {j0, j0 + 8, half + j0, half + j0 + 8};                                                \
            for (int m = 0; m < MC; m++)                                                                               \
                for (int o = 0; o < 4; o++) _mm256_storeu_ps(y + (size_t)m * N + n0 + rows[o], acc[m][o]);            \
        }                                                                                                              \
    }
Q4A8_BLOCK(1)
Q4A8_BLOCK(2)
Q4A8_BLOCK(3)
Q4A8_BLOCK(4)

static void block_avx2(const __m256i *xv, const float *d, const float *xs, int mc, int K, const uint8_t *blk, int B,
                       const uint16_t *s, const uint16_t *z, int N, int g, float *y, int n0) {
    const int ng = K / g, nb = K / QB, steps = K / 4;
    for (int m0 = 0; m0 < mc; m0 += 4) {
        const __m256i *xm = xv + (size_t)m0 * steps;
        const float *dm = d + (size_t)m0 * nb, *sm = xs + (size_t)m0 * ng;
        float *ym = y + (size_t)m0 * N;
        switch (mc - m0 < 4 ? mc - m0 : 4) {
        case 1: block_avx2_1(xm, dm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        case 2: block_avx2_2(xm, dm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        case 3: block_avx2_3(xm, dm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        default: block_avx2_4(xm, dm, sm, K, blk, B, s, z, N, g, ym, n0); break;
        }
    }
}
#endif

/* y [M, N] = quantised x [M, K] times the 4-bit weight (q4_mm's arguments). Returns 0, 1 for a shape it cannot take
   (B not a multiple of 16, N not whole blocks, g not a multiple of 32 or not dividing K), 2 when out of memory. */
int q4a8_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
            int g, float *y, int threads, int simd) {
    if (B <= 0 || B % 16 || N % B || g <= 0 || g % QB || K % g || M < 0) return 1;
    if (M == 0 || N == 0) return 0;
    const int nb = N / B, ng = K / g, nq = K / QB;
    int8_t *xq = malloc((size_t)M * K);
    float *d = malloc(sizeof(float) * (size_t)M * nq), *xs = malloc(sizeof(float) * (size_t)M * ng);
    void *xv = NULL;
#ifdef HAVE_X86
    simd = simd && (B / 2) % 16 == 0;
    if (simd && posix_memalign(&xv, 32, (size_t)M * K * 8)) xv = NULL;
    if (simd && !xv) {
        free(xq), free(d), free(xs);
        return 2;
    }
#else
    simd = 0;
#endif
    if (!xq || !d || !xs) {
        free(xq), free(d), free(xs), free(xv);
        return 2;
    }
    q4a8_quantize(x, M, K, xq, d);
    for (int m = 0; m < M; m++) /* sum_k of the dequantised activations per group */
        for (int gi = 0; gi < ng; gi++) {
            float a = 0.f;
            for (int b = gi * (g / QB); b < (gi + 1) * (g / QB); b++) {
                int32_t isum = 0;
                for (int k = b * QB; k < (b + 1) * QB; k++) isum += xq[(size_t)m * K + k];
                a += d[(size_t)m * nq + b] * (float)isum;
            }
            xs[(size_t)m * ng + gi] = a;
        }
#ifdef HAVE_X86
    if (simd)
        for (int m = 0; m < M; m++) spread(xq + (size_t)m * K, K, (__m256i *)xv + (size_t)m * (K / 4));
#endif
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nb > 1)
#endif
    for (int b = 0; b < nb; b++) { /* block b: rows b*B.., codes from byte b*B*K/2 */
#ifdef HAVE_X86
        if (simd) block_avx2((const __m256i *)xv, d, xs, M, K, packed + (size_t)b * B * K / 2, B, s, z, N, g, y, b * B);
        else
#endif
            block_scalar(xq, d, xs, M, K, packed + (size_t)b * B * K / 2, B, s, z, N, g, y, b * B);
    }
    free(xq), free(d), free(xs), free(xv);
    return 0;
}
