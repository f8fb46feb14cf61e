/* budgetlm's 8-bit weight-only GEMM for CPUs: y [M, N] = x [M, K] (float32) times W, W[n, k] = q[n, k] * s[n], with
   int8 codes q [N, K] row-major (QuantLinear's stored form of a symmetric per-channel 8-bit grid) and float16
   per-row scales s [N]. Activations and sums are float32: the exact product with the dequantised weight up to float32
   summation order. The AVX2 path widens 8 codes at a time to float32 and accumulates two rows of W against up to
   four rows of x; a plain C path computes the same on any CPU. Rows are shared among OpenMP threads. Written for
   budgetlm from the formula above; built with q4.c (methods/quant/native/__init__.py). */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define Q8_X86 1
#endif

float q4_half_to_float(uint16_t h);

static void rows_scalar(const float *x, int M, int K, const int8_t *q, const uint16_t *s, int n0, int n1, int N,
                        float *y) {
    for (int n = n0; n < n1; n++) {
        const float sc = q4_half_to_float(s[n]);
        for (int m = 0; m < M; m++) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) acc += (float)q[(size_t)n * K + k] * x[(size_t)m * K + k];
            y[(size_t)m * N + n] = acc * sc;
        }
    }
}

#ifdef Q8_X86
__attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

#define Q8_ROWS(MC)                                                                                                    \
    __attribute__((target("avx2,fma,f16c"))) static void pair_avx2_##MC(const float *x, int K, const int8_t *q0,     \
                                                                         const int8_t *q1, float s0, float s1,       \
                                                                         float *y0, float *y1, int N) {               \
        __m256 a0[MC], a1[MC];                                                                                         \
        for (int m = 0; m < MC; m++) a0[m] = a1[m] = _mm256_setzero_ps();                                              \
        for (int k = 0; k < K; k += 8) {                                                                               \
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q0 + k))));         \
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q1 + k))));         \
            for (int m = 0; m < MC; m++) {                                                                             \
                __m256 xv = _mm256_loadu_ps(x + (size_t)m * K + k);                                                    \
                a0[m] = _mm256_fmadd_ps(w0, xv, a0[m]);                                                                \
                a1[m] = _mm256_fmadd_ps(w1, xv, a1[m]);                                                                \
            }                                                                                                          \
        }                                                                                                              \
        for (int m = 0; m < MC; m++) {                                                                                 \
            y0[(size_t)m * N] = hsum(a0[m]) * s0;                                                                      \
            y1[(size_t)m * N] = hsum(a1[m]) * s1;                                                                      \
        }                                                                                                              \
    }
Q8_ROWS(1)
Q8_ROWS(2)
Q8_ROWS(3)
Q8_ROWS(4)

static void rows_avx2(const float *x, int M, int K, const int8_t *q, const uint16_t *s, int n0, int n1, int N,
                      float *y) {
    for (int n = n0; n + 1 < n1; n += 2) {
        const int8_t *q0 = q + (size_t)n * K, *q1 = q0 + K;
        const float s0 = q4_half_to_float(s[n]), s1 = q4_half_to_float(s[n + 1]);
        for (int m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + (size_t)m0 * K;
            float *y0 = y + (size_t)m0 * N + n, *y1 = y0 + 1;
            switch (M - m0 < 4 ? M - m0 : 4) {
            case 1: pair_avx2_1(xm, K, q0, q1, s0, s1, y0, y1, N); break;
            case 2: pair_avx2_2(xm, K, q0, q1, s0, s1, y0, y1, N); break;
            case 3: pair_avx2_3(xm, K, q0, q1, s0, s1, y0, y1, N); break;
            default: pair_avx2_4(xm, K, q0, q1, s0, s1, y0, y1, N); break;
            }
        }
    }
    if ((n1 - n0) % 2) rows_scalar(x, M, K, q, s, n1 - 1, n1, N, y);
}
#endif

/* returns 1 when K is not a multiple of 8 or N is odd (the caller then takes another path) */
int q8_mm(const float *x, int M, int K, const int8_t *q, int N, const uint16_t *s, float *y, int threads, int simd) {
    if (K % 8 || N % 2 || M < 1) return 1;
    const int chunk = 64, nchunks = (N + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && nchunks > 1)
#endif
    for (int c = 0; c < nchunks; c++) {
        const int n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
#ifdef Q8_X86
        if (simd) {
            rows_avx2(x, M, K, q, s, n0, n1, N, y);
            continue;
        }
#endif
        rows_scalar(x, M, K, q, s, n0, n1, N, y);
    }
    return 0;
}
