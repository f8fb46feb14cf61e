/* budgetlm's 4-bit weight-only GEMM for CPUs: y [M, N] = x [M, K] (float32) times a weight of 4-bit codes.

   Layout: the codes are those of torch's CPU 4-bit packer (methods/quant/kernels.py): blocks of B output rows; for
   every input column a block holds B/2 bytes, byte j carrying row j in its low nibble and row B/2 + j in its high
   one. Each group of g columns of a row has a float16 scale s and zero point zp ([K/g, N] each, row-minor), and
   the weight is w = (q - zp) * s. Activations, scales and sums stay float32: the result is the exact product with
   the dequantised weight up to float32 summation order (no bfloat16 rounding, unlike torch's kernel).

   The AVX2 path decodes the codes of one column for 16 rows (8 bytes), multiplies them by up to four rows of x,
   and keeps per-group sums sum_k q x_k in registers; at the end of a group y += s * (sum - zp * sum_k x_k). A
   plain C path computes the same for any CPU. Blocks are shared among OpenMP threads. Written for budgetlm from
   the formula above; built on the host at first use (methods/quant/native/__init__.py). */
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

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) bits = sign;
        else { exp = 127 - 15 + 1; while (!(man & 0x400)) { man <<= 1; exp--; } man &= 0x3ff; bits = sign | (exp << 23) | (man << 13); }
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4); return f;
}

float q4_half_to_float(uint16_t h) { return half_to_float(h); } /* for q8.c */

/* one block of B rows, rows m0..m0+mc of x: y[m][n0 + r] = sum_k (q[r][k] - zp[gi][r]) * s[gi][r] * x[m][k] */
static void block_scalar(const float *x, int mc, int K, const uint8_t *blk, int B, const uint16_t *s,
                         const uint16_t *z, int N, int g, float *y, int n0) {
    for (int m = 0; m < mc; m++)
        for (int r = 0; r < B; r++) {
            int j = r % (B / 2), shift = r < B / 2 ? 0 : 4;
            float acc = 0.f;
            for (int gi = 0; gi < K / g; gi++) {
                float sc = half_to_float(s[(size_t)gi * N + n0 + r]), zp = half_to_float(z[(size_t)gi * N + n0 + r]);
                float ga = 0.f, xs = 0.f;
                for (int k = gi * g; k < (gi + 1) * g; k++) {
                    float q = (float)((blk[(size_t)k * (B / 2) + j] >> shift) & 15);
                    ga += q * x[(size_t)m * K + k];
                    xs += x[(size_t)m * K + k];
                }
                acc += sc * (ga - zp * xs);
            }
            y[(size_t)m * N + n0 + r] = acc;
        }
}

#ifdef HAVE_X86
/* MC rows of x (1..4) against rows n0+j..+8 (low nibbles) and n0+B/2+j..+8 (high nibbles) of one block, for every
   8-byte column slice j: per group, the unscaled sums sum_k q x_k in registers, then y += s * (sum - zp * sum_k x_k). */
#define Q4_BLOCK(MC)                                                                                                   \
    __attribute__((target("avx2,fma,f16c"))) static void block_avx2_##MC(                                             \
        const float *x, int K, const uint8_t *blk, int B, const uint16_t *s, const uint16_t *z, int N, int g,          \
        float *y, int n0, const float *xsum) {                                                                         \
        const __m128i mask = _mm_set1_epi8(15);                                                                        \
        const int half = B / 2, ng = K / g;                                                                            \
        for (int j = 0; j < half; j += 8) {                                                                            \
            __m256 acc_lo[MC], acc_hi[MC];                                                                             \
            for (int m = 0; m < MC; m++) acc_lo[m] = acc_hi[m] = _mm256_setzero_ps();                                  \
            for (int gi = 0; gi < ng; gi++) {                                                                          \
                __m256 ga_lo[MC], ga_hi[MC];                                                                           \
                for (int m = 0; m < MC; m++) ga_lo[m] = ga_hi[m] = _mm256_setzero_ps();                                \
                const uint8_t *p = blk + (size_t)gi * g * half + j;                                                    \
                const float *xk = x + (size_t)gi * g;                                                                  \
                for (int k = 0; k < g; k++) {                                                                          \
                    __m128i b0 = _mm_loadl_epi64((const __m128i *)(p + (size_t)k * half));                             \
                    __m256 l0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b0, mask)));                     \
                    __m256 h0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b0, 4), mask)));  \
                    for (int m = 0; m < MC; m++) {                                                                     \
                        __m256 xv = _mm256_broadcast_ss(xk + (size_t)m * K + k);                                       \
                        ga_lo[m] = _mm256_fmadd_ps(l0, xv, ga_lo[m]);                                                  \
                        ga_hi[m] = _mm256_fmadd_ps(h0, xv, ga_hi[m]);                                                  \
                    }                                                                                                  \
                }                                                                                                      \
                const size_t t = (size_t)gi * N + n0 + j;                                                              \
                __m256 s_lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + t)));                              \
                __m256 s_hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + t + half)));                       \
                __m256 z_lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + t)));                              \
                __m256 z_hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + t + half)));                       \
                for (int m = 0; m < MC; m++) {                                                                         \
                    __m256 xs = _mm256_broadcast_ss(xsum + (size_t)m * ng + gi);                                       \
                    acc_lo[m] = _mm256_fmadd_ps(s_lo, _mm256_fnmadd_ps(z_lo, xs, ga_lo[m]), acc_lo[m]);                \
                    acc_hi[m] = _mm256_fmadd_ps(s_hi, _mm256_fnmadd_ps(z_hi, xs, ga_hi[m]), acc_hi[m]);                \
                }                                                                                                      \
            }                                                                                                          \
            for (int m = 0; m < MC; m++) {                                                                             \
                _mm256_storeu_ps(y + (size_t)m * N + n0 + j, acc_lo[m]);                                               \
                _mm256_storeu_ps(y + (size_t)m * N + n0 + half + j, acc_hi[m]);                                        \
            }                                                                                                          \
        }                                                                                                              \
    }
Q4_BLOCK(1)
Q4_BLOCK(2)
Q4_BLOCK(3)
Q4_BLOCK(4)

static void block_avx2(const float *x, int mc, int K, const uint8_t *blk, int B, const uint16_t *s, const uint16_t *z,
                       int N, int g, float *y, int n0, const float *xsum) {
    const int ng = K / g;
    for (int m0 = 0; m0 < mc; m0 += 4) {
        const float *xm = x + (size_t)m0 * K, *sm = xsum + (size_t)m0 * ng;
        float *ym = y + (size_t)m0 * N;
        switch (mc - m0 < 4 ? mc - m0 : 4) {
        case 1: block_avx2_1(xm, K, blk, B, s, z, N, g, ym, n0, sm); break;
        case 2: block_avx2_2(xm, K, blk, B, s, z, N, g, ym, n0, sm); break;
        case 3: block_avx2_3(xm, K, blk, B, s, z, N, g, ym, n0, sm); break;
        default: block_avx2_4(xm, K, blk, B, s, z, N, g, ym, n0, sm); break;
        }
    }
}
#endif

int q4_has_simd(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* y [M, N] = x [M, K] times the 4-bit weight: packed uint8 [N/B, K, B/2] (row r of a block: nibble r / (B/2) of
   byte r % (B/2)), fp16 scales and zero points [K/g, N]. simd: 1 for the AVX2 path (checked by q4_has_simd). */
int q4_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
          int g, float *y, int threads, int simd) {
    if (B % 16 || N % B || K % g || g <= 0) return 1;
    const int nb = N / B;
    float *xsum = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1) * (size_t)(K / g));
    if (!xsum) return 2;
    for (int m = 0; m < M; m++)
        for (int gi = 0; gi < K / g; gi++) {
            float a = 0.f;
            for (int k = gi * g; k < (gi + 1) * g; k++) a += x[(size_t)m * K + k];
            xsum[m * (K / g) + gi] = a;
        }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nb > 1)
#endif
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = packed + (size_t)b * K * (B / 2);
#ifdef HAVE_X86
        if (simd) {
            block_avx2(x, M, K, blk, B, s, z, N, g, y, b * B, xsum);
            continue;
        }
#endif
        block_scalar(x, M, K, blk, B, s, z, N, g, y, b * B);
    }
    free(xsum);
    return 0;
}
