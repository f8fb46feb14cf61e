/* One decode step of a Llama- or Gemma-3-architecture model in one call, for budgetlm's lean runtime
   (decode/lean_step.py): embedding gather -> per layer: RMSNorm, q/k/v projections, (Gemma: per-head RMSNorm of
   queries and keys), rotary + key/value store, causal attention (Gemma's sliding layers: over their window, with
   their own rotary table), o_proj, (Gemma: RMSNorm of the attention output), residual add + RMSNorm, gate/up,
   SiLU(gate) * up (Gemma: GELU-tanh), down, (Gemma: RMSNorm of the MLP output), residual add -> final RMSNorm ->
   lm_head logits of the last rows (Gemma: the final soft-cap where the model has one). A step of M <= 16 tokens of a
   small model costs ~9-15 Python/ctypes calls per layer otherwise (~10 us each): here the model is a descriptor
   built once (weights' pointers, norms, shapes) and the step walks it.
   The glue is ops.c's functions, the 4- and 8-bit products q4.c's, q4a8.c's, q4bf.c's and q8.c's (called with the arguments their
   Python bindings check once, methods/quant/native/__init__.py); float32 Linears take `step_dense_mm` below, a
   product for few rows of x (W rows in chunks that stay in L1 while every row of x passes over them). The formulas
   are those of transformers' Llama and Gemma 3 forwards (Gemma's norms multiply by 1 + w: the descriptor holds
   1 + w); written for budgetlm. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define STEP_X86 1
#endif

/* ops.c */
void lean_rms_norm(const float *x, const float *w, int M, int D, float eps, float *out, int simd);
void lean_add_rms_norm(float *h, const float *delta, const float *w, int M, int D, float eps, float *out, int simd);
void lean_rope_store_kv(float *q, const float *k, const float *v, const float *cos_, const float *sin_, int M, int H,
                        int KV, int D, void *kc, void *vc, int cap, int start, int bf);
int lean_attention_kv(const float *q, const void *kc, const void *vc, int M, int H, int KV, int D, int cap,
                      int start, float scale, int window, int sinks, float *out, int simd, int threads, int bf);
void lean_silu_mul(const float *gate, const float *up, int n, float *out);
void lean_gelu_tanh_mul(const float *gate, const float *up, int n, float *out);
/* q4.c, q8.c */
int q4_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
          int g, float *y, int threads, int simd);
int q8_mm(const float *x, int M, int K, const int8_t *q, int N, const uint16_t *s, float *y, int threads, int simd);
/* q4a8.c: q4_mm's arguments, activations quantised to int8 per block of 32 (lossy) */
int q4a8_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
            int g, float *y, int threads, int simd);
/* q4bf.c: q4_mm's arguments, activations rounded to bfloat16 (lossy); its AVX-512 BF16 path checks the CPU itself */
int q4bf_mm(const float *x, int M, int K, const uint8_t *packed, int N, int B, const uint16_t *s, const uint16_t *z,
            int g, float *y, int threads, int simd);
int q8bf_mm(const float *x, int M, int K, const uint8_t *packed, const uint16_t *s, const uint16_t *z,
            const uint8_t *packed2, const uint16_t *s2, const uint16_t *z2, int N, int B, int g, float *y, int threads,
            int simd);

/* -- float32 y [M, N] = x [M, K] W^T, W [N, K] row-major ------------------------------------------------------- */
static void dense_rows_scalar(const float *x, int M, int K, const float *w, int n0, int n1, int N, float *y) {
    for (int n = n0; n < n1; n++)
        for (int m = 0; m < M; m++) {
            const float *a = x + (size_t)m * K, *b = w + (size_t)n * K;
            float s = 0.f;
            for (int k = 0; k < K; k++) s += a[k] * b[k];
            y[(size_t)m * N + n] = s;
        }
}

#ifdef STEP_X86
/* [sum of a's lanes, b's, c's, d's]: the four rows' results, stored at once */
__attribute__((target("avx2,fma"))) static inline __m128 sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

/* four rows of W against MC rows of x (K a multiple of 8): 4 * MC independent sums */
#define DENSE_4(MC)                                                                                                    \
    __attribute__((target("avx2,fma"))) static void dense4_##MC(const float *x, int K, const float *w, float *y,      \
                                                                 int N, const float *pf) {                             \
        __m256 acc[MC][4];                                                                                             \
        for (int m = 0; m < MC; m++)                                                                                   \
            for (int r = 0; r < 4; r++) acc[m][r] = _mm256_setzero_ps();                                               \
        for (int k = 0; k < K; k += 8) {                                                                               \
            if (pf && (k & 15) == 0)                                                                                   \
                for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(pf + (size_t)r * K + k), _MM_HINT_T0);        \
            __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k);                                       \
            __m256 w2 = _mm256_loadu_ps(w + 2 * (size_t)K + k), w3 = _mm256_loadu_ps(w + 3 * (size_t)K + k);           \
            for (int m = 0; m < MC; m++) {                                                                             \
                __m256 xv = _mm256_loadu_ps(x + (size_t)m * K + k);                                                    \
                acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);                                                        \
                acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);                                                        \
                acc[m][2] = _mm256_fmadd_ps(w2, xv, acc[m][2]);                                                        \
                acc[m][3] = _mm256_fmadd_ps(w3, xv, acc[m][3]);                                                        \
            }                                                                                                          \
        }                                                                                                              \
        for (int m = 0; m < MC; m++)                                                                                   \
            _mm_storeu_ps(y + (size_t)m * N, sums4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));                       \
    }
DENSE_4(1)
DENSE_4(2)
DENSE_4(3)

#define PREFETCH_ROWS 16

static void dense_rows_avx2(const float *x, int M, int K, const float *w, int n0, int n1, int N, float *y) {
    int n = n0;
    for (; n + 4 <= n1; n += 4)
        for (int m0 = 0; m0 < M;) {
            const float *xm = x + (size_t)m0 * K;
            float *ym = y + (size_t)m0 * N + n;
            /* the first pass over these four rows fetches the rows PREFETCH_ROWS on, so that memory streams while
               the passes of the other rows of x compute (one row of x: the hardware's own prefetch suffices) */
            const float *pf = M > 1 && m0 == 0 ? w + (size_t)(n + PREFETCH_ROWS) * K : NULL;
            /* three rows of x a pass where three or more are left (12 sums: more FMAs per load), then two, then one;
               every y element is the same sum in the same order whichever pass computes it */
            const int left = M - m0;
            if (left >= 3 && left != 4) dense4_3(xm, K, w + (size_t)n * K, ym, N, pf), m0 += 3;
            else if (left >= 2) dense4_2(xm, K, w + (size_t)n * K, ym, N, pf), m0 += 2;
            else dense4_1(xm, K, w + (size_t)n * K, ym, N, pf), m0 += 1;
        }
    if (n < n1) dense_rows_scalar(x, M, K, w, n, n1, N, y);
}
#endif

/* y [M, N] = x [M, K] W^T for float32 W [N, K]; each OpenMP thread takes a range of rows (multiples of 4) */
void step_dense_mm(const float *x, int M, int K, const float *w, int N, float *y, int threads, int simd) {
    const int parts = threads > 1 && N >= 64 * threads ? threads : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static) if (parts > 1)
#endif
    for (int p = 0; p < parts; p++) {
        const int n0 = (int)((int64_t)N * p / parts) & ~3;
        const int n1 = p + 1 == parts ? N : (int)((int64_t)N * (p + 1) / parts) & ~3;
#ifdef STEP_X86
        if (simd && K % 8 == 0) dense_rows_avx2(x, M, K, w, n0, n1, N, y);
        else
#endif
            dense_rows_scalar(x, M, K, w, n0, n1, N, y);
    }
    (void)simd;
}

/* -- the model descriptor (decode/lean_step.py builds it with ctypes; the field order is the Python one) -------- */
enum { STEP_DENSE = 0, STEP_Q4 = 1, STEP_Q8 = 2, STEP_Q4BF = 3, STEP_Q8BF = 4 };

typedef struct {
    int64_t kind, n, k, block, group; /* block, group: q4, q4bf and q8bf only */
    const void *w;                    /* float32 [n, k] | q4, q4bf packed uint8 [n, k/2] | q8 int8 [n, k] */
    const void *s, *z;                /* q4, q4bf: fp16 scales, zero points [k/group, n]; q8: fp16 scales [n] */
    int64_t act8;                     /* q4: calls of at most act8 rows take q4a8 (the layer's "q4a8" kernel) */
    const void *w2, *s2, *z2;         /* q8bf: the low half (w, s, z: the high half), as q4bf's arguments */
} step_linear;

typedef struct {
    const float *norm1, *norm2; /* the norms before attention and before the MLP [hidden] (Llama: input_layernorm,
                                   post_attention_layernorm; Gemma: input_layernorm, pre_feedforward_layernorm) */
    double eps1, eps2;
    step_linear q, k, v, o, gate, up, down;
    /* Gemma 3 (NULL for Llama): post_attention_layernorm, post_feedforward_layernorm [hidden] (on the attention's and
       the MLP's outputs before the residual add), q_norm, k_norm [head_dim] (per head, before the rotary) */
    const float *post_attn, *post_mlp, *qnorm, *knorm;
    double eps_attn, eps_mlp, eps_q, eps_k;
    int64_t window; /* a sliding-window layer's window (0: attends to every position) */
    int64_t rope;   /* which rotary table: 0 (cos, sin) or 1 (cos2, sin2) */
} step_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    double scale, eps; /* attention scale, final norm's epsilon */
    const float *embed; /* float32 [vocab, hidden], or NULL: the caller passes the embedded tokens */
    const float *norm;  /* final norm's weight */
    const step_layer *layer;
    step_linear head;
    int64_t window, sinks; /* attention over the first `sinks` and the last `window` positions only (0: all) */
    int64_t act;           /* the MLP's activation: 0 SiLU, 1 GELU's tanh approximation */
    double softcap;        /* logits = softcap * tanh(logits / softcap) where > 0 (Gemma's final soft-cap) */
    int64_t kv_bf16;       /* the caches hold bfloat16 (a draft's: half the bytes its attention reads), else float32 */
} step_model;

static int linear(const step_linear *L, const float *x, int M, float *y, int threads, int simd) {
    switch (L->kind) {
    case STEP_DENSE:
        step_dense_mm(x, M, (int)L->k, (const float *)L->w, (int)L->n, y, threads, simd);
        return 0;
    case STEP_Q4:
        if (M <= L->act8)
            return q4a8_mm(x, M, (int)L->k, (const uint8_t *)L->w, (int)L->n, (int)L->block, (const uint16_t *)L->s,
                           (const uint16_t *)L->z, (int)L->group, y, threads, simd);
        return q4_mm(x, M, (int)L->k, (const uint8_t *)L->w, (int)L->n, (int)L->block, (const uint16_t *)L->s,
                     (const uint16_t *)L->z, (int)L->group, y, threads, simd);
    case STEP_Q4BF: /* the layer's "q4bf" kernel: bfloat16 activations at every row count, as on its own path */
        return q4bf_mm(x, M, (int)L->k, (const uint8_t *)L->w, (int)L->n, (int)L->block, (const uint16_t *)L->s,
                       (const uint16_t *)L->z, (int)L->group, y, threads, simd);
    case STEP_Q8:
        return q8_mm(x, M, (int)L->k, (const int8_t *)L->w, (int)L->n, (const uint16_t *)L->s, y, threads, simd);
    case STEP_Q8BF: /* the layer's "q8bf" kernel: q4bf on the high half plus q4bf on the low half */
        return q8bf_mm(x, M, (int)L->k, (const uint8_t *)L->w, (const uint16_t *)L->s, (const uint16_t *)L->z,
                       (const uint8_t *)L->w2, (const uint16_t *)L->s2, (const uint16_t *)L->z2, (int)L->n,
                       (int)L->block, (int)L->group, y, threads, simd);
    }
    return 9;
}

/* floats of scratch a step of M tokens needs */
int64_t lean_step_scratch(const step_model *md, int M) {
    const int64_t D = md->hidden, A = md->heads * md->head_dim, KV = md->kv_heads * md->head_dim;
    return (int64_t)M * (3 * D + 2 * A + 2 * KV + 2 * md->inter);
}

/* M new tokens `ids` (or their embeddings h_in [M, hidden] when md->embed is NULL) at positions start..start+M of
   the caches kc[l], vc[l] ([kv_heads, cap, head_dim] each, float32 or md->kv_bf16, written at those positions); cos, sin [M, head_dim]
   (the rotary tables of those positions; cos2, sin2: the second table, of the layers whose `rope` is 1); logits
   [rows, vocab] of the last `rows` tokens. Returns 0, or: 1 a product refused its shape, 2 no memory, 3 a token id
   outside the vocabulary. */
int lean_step(const step_model *md, const int64_t *ids, const float *h_in, int M, int start, int rows,
              void *const *kc, void *const *vc, int cap, const float *cos_, const float *sin_, const float *cos2,
              const float *sin2, float *scratch, float *logits, int threads, int simd) {
    const int D = (int)md->hidden, H = (int)md->heads, KV = (int)md->kv_heads, hd = (int)md->head_dim;
    const int I = (int)md->inter;
    float *h = scratch, *a = h + (size_t)M * D, *t = a + (size_t)M * D, *q = t + (size_t)M * D;
    float *o = q + (size_t)M * H * hd, *k = o + (size_t)M * H * hd, *v = k + (size_t)M * KV * hd;
    float *gate = v + (size_t)M * KV * hd, *up = gate + (size_t)M * I;
    int err;
    if (md->embed) {
        for (int m = 0; m < M; m++) {
            if (ids[m] < 0 || ids[m] >= md->vocab) return 3;
            memcpy(h + (size_t)m * D, md->embed + (size_t)ids[m] * D, sizeof(float) * D);
        }
    } else {
        memcpy(h, h_in, sizeof(float) * (size_t)M * D);
    }
    for (int l = 0; l < md->layers; l++) {
        const step_layer *L = md->layer + l;
        if (l == 0) lean_rms_norm(h, L->norm1, M, D, (float)L->eps1, a, simd);
        else lean_add_rms_norm(h, t, L->norm1, M, D, (float)L->eps1, a, simd);
        if ((err = linear(&L->q, a, M, q, threads, simd)) || (err = linear(&L->k, a, M, k, threads, simd)) ||
            (err = linear(&L->v, a, M, v, threads, simd)))
            return err == 2 ? 2 : 1;
        if (L->qnorm) lean_rms_norm(q, L->qnorm, M * H, hd, (float)L->eps_q, q, simd); /* in place, per head */
        if (L->knorm) lean_rms_norm(k, L->knorm, M * KV, hd, (float)L->eps_k, k, simd);
        lean_rope_store_kv(q, k, v, L->rope ? cos2 : cos_, L->rope ? sin2 : sin_, M, H, KV, hd, kc[l], vc[l], cap,
                           start, (int)md->kv_bf16);
        /* the layer's own window, narrowed by the model's sparse view (a draft's) where that is narrower; the sinks
           come with a window */
        int64_t window = L->window;
        if (md->window && (!window || md->window < window)) window = md->window;
        if (lean_attention_kv(q, kc[l], vc[l], M, H, KV, hd, cap, start, (float)md->scale, (int)window,
                              window ? (int)md->sinks : 0, o, simd, threads, (int)md->kv_bf16))
            return 2;
        if ((err = linear(&L->o, o, M, t, threads, simd))) return err == 2 ? 2 : 1;
        if (L->post_attn) lean_rms_norm(t, L->post_attn, M, D, (float)L->eps_attn, t, simd);
        lean_add_rms_norm(h, t, L->norm2, M, D, (float)L->eps2, a, simd);
        if ((err = linear(&L->gate, a, M, gate, threads, simd)) || (err = linear(&L->up, a, M, up, threads, simd)))
            return err == 2 ? 2 : 1;
        if (md->act == 1) lean_gelu_tanh_mul(gate, up, M * I, gate);
        else lean_silu_mul(gate, up, M * I, gate);
        if ((err = linear(&L->down, gate, M, t, threads, simd))) return err == 2 ? 2 : 1;
        if (L->post_mlp) lean_rms_norm(t, L->post_mlp, M, D, (float)L->eps_mlp, t, simd);
    }
    for (size_t i = 0; i < (size_t)M * D; i++) h[i] += t[i];
    const float *last = h + (size_t)(M - rows) * D;
    lean_rms_norm(last, md->norm, rows, D, (float)md->eps, a, simd);
    if ((err = linear(&md->head, a, rows, logits, threads, simd))) return err == 2 ? 2 : 1;
    if (md->softcap > 0) {
        const float c = (float)md->softcap;
        for (size_t i = 0; i < (size_t)rows * md->head.n; i++) logits[i] = tanhf(logits[i] / c) * c;
    }
    return 0;
}
