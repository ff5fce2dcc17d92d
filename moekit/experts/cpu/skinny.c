/* Skinny products for decode on CPU: out[r, o] = sum_i x[r, i] * w[o, i] for a few rows r.
 *
 * At a few rows per expert the product is bound by reading w once from memory. BLAS GEMMs pack
 * w first (reading it twice); these loops stream each row of w once, four rows at a time (two
 * where the CPU has only 16 vector registers), and reuse them from L1 for every group of up to
 * six x rows. Built at run time with the host's
 * compiler and -march=native (moekit/experts/cpu/build.py); the vector type is a GCC/Clang
 * extension, so the same source compiles to AVX2, AVX-512 or NEON.
 *
 * moekit_skinny_grouped_nn is the same for out[r, n] = sum_k x[r, k] * w[k, n] (the products of
 * the backward pass, x @ W without a transpose): it streams the rows of w in order, adding each
 * to the rows' outputs, which stay in L1.
 *
 * Layouts (float32, row-major, contiguous):
 *   x   [R, K]  rows grouped by expert: counts[e] rows for expert e, in expert order
 *   w   [E, N, K] (grouped) or [E, K, N] (grouped_nn), w_expert_stride floats between experts
 *   out [R, N]
 *
 * The forward products of moekit_skinny_ffn also read half-size weights (bfloat16 or float16,
 * WEIGHTS_BF16 / WEIGHTS_F16): each group of eight is widened to float32 in registers as it is
 * loaded (bfloat16: its 16 bits become the top half of a float; float16: F16C's vcvtph2ps where
 * the compiler targets it, else an exact conversion in C), and every product and sum is float32,
 * so the result is the float32 product with the weights converted exactly.
 *
 * Where the CPU has AVX512-BF16, bfloat16 x meets bfloat16 weights on its dot product instead
 * (BF16_DOT below): a layer held in bfloat16, or float32 x that torch's float32 matmul precision
 * lets the kernel round to bfloat16.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#if (defined(__F16C__) && defined(__AVX__)) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float vec8 __attribute__((vector_size(32)));

/* An empty asm that claims to change v: the compiler keeps v in a register rather than folding
 * a fresh load of it into every multiply-add. Only where vec8 is one register (x86 with AVX);
 * elsewhere the compiler's own choice stands. */
#if defined(__AVX__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

enum { LANES = 8, ROW_GROUP = 6, PREFETCH_AHEAD = 32 * 1024 };

/* Weight rows streamed together: four where the CPU has 32 vector registers (AVX-512VL lets the
 * compiler use ymm16-31; at S3 the bfloat16-weight decode is 5-12% faster than with two), else
 * two. Either way each output keeps its own accumulator, summed over i in the same order, so the
 * results are the same bits on every machine kind. Also the width of a thread's work unit. */
#if defined(__AVX512VL__)
enum { WEIGHT_ROWS = 4 };
#else
enum { WEIGHT_ROWS = 2 };
#endif

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* How an expert's weights are stored (moekit/experts/cpu/decode.py passes the same numbers). */
enum { WEIGHTS_F32 = 0, WEIGHTS_BF16 = 1, WEIGHTS_F16 = 2 };
/* How x is stored: float32, or bfloat16 (only with WEIGHTS_BF16: a layer held in bfloat16);
 * X_F32_AS_BF16 is float32 x the caller lets the kernel round to bfloat16 (only with
 * WEIGHTS_BF16; torch's float32 matmul precision "bf16", moekit/experts/cpu/decode.py). */
enum { X_F32 = 0, X_BF16 = 1, X_F32_AS_BF16 = 2 };

/* ---- bfloat16 x against bfloat16 weights on the CPU's bf16 dot product (AVX512-BF16) ----
 *
 * vdpbf16ps adds two products of bfloat16 pairs to each float32 lane: twice the multiply-adds of
 * an FMA per instruction, and no widening. The products are exact (8-bit significands); each
 * lane sums float32 in pairs (elements 2l + 1, then 2l, of every 16), so the order differs from
 * the widening loops, and the instruction treats denormal inputs and results as zero. The loops
 * below take it as one more kind of product, BF16_DOT: x and w both bfloat16, sixteen elements
 * of K per step. */
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
#define NATIVE_BF16_DOT 1
#else
#define NATIVE_BF16_DOT 0
#endif
enum { BF16_DOT = 3 };

typedef uint16_t bits16x8 __attribute__((vector_size(16)));
typedef uint32_t bits32x8 __attribute__((vector_size(32)));

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
}

/* IEEE half to float, exactly (every half is a float): the fallback without F16C. */
static inline float f16_to_float(uint16_t bits) {
#if defined(__F16C__) && defined(__AVX__)
    return _cvtsh_ss(bits);
#else
    uint32_t sign = (uint32_t)(bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu,
             mantissa = bits & 0x3ffu, wide;
    if (exponent == 0x1fu) {
        wide = sign | 0x7f800000u | (mantissa << 13);          /* inf, nan */
    } else if (exponent != 0) {
        wide = sign | ((exponent + 112u) << 23) | (mantissa << 13);  /* bias 15 -> 127 */
    } else {
        float f = (float)mantissa * 0x1p-24f;                  /* zero and subnormals */
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &wide, sizeof f);
    return f;
#endif
}

static inline vec8 load8_bf16(const uint16_t *p) {
    vec8 v;
#if defined(__AVX2__)
    /* one widening load and one shift (GCC splits the generic form below into six) */
    __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    memcpy(&v, &wide, sizeof v);
#else
    bits16x8 narrow;
    memcpy(&narrow, p, sizeof narrow);
    bits32x8 wide = __builtin_convertvector(narrow, bits32x8) << 16;
    memcpy(&v, &wide, sizeof v);
#endif
    return v;
}

static inline vec8 load8_f16(const uint16_t *p) {
    vec8 v;
#if defined(__F16C__) && defined(__AVX__)
    __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    memcpy(&v, &wide, sizeof v);
#else
    for (int l = 0; l < LANES; ++l) v[l] = f16_to_float(p[l]);
#endif
    return v;
}

/* Elements of K per step: eight float32 lanes, or sixteen bfloat16 (BF16_DOT, as they are). */
static inline int step_of(const int kind) { return kind == BF16_DOT ? 2 * LANES : LANES; }

/* 32 bytes from element i of a bfloat16 array, as they are (BF16_DOT's operands). */
static inline vec8 load_bf16_pairs(const uint16_t *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* One step of weights from element i of w: eight as float32, or sixteen bfloat16 pairs for
 * BF16_DOT; kind is a constant after inlining. */
static inline __attribute__((always_inline)) vec8 load8_weights(const void *w, int64_t i,
                                                                 const int kind) {
    if (kind == BF16_DOT) return load_bf16_pairs((const uint16_t *)w + i);
    if (kind == WEIGHTS_BF16) return load8_bf16((const uint16_t *)w + i);
    if (kind == WEIGHTS_F16) return load8_f16((const uint16_t *)w + i);
    return load8((const float *)w + i);
}

static inline __attribute__((always_inline)) float load1_weight(const void *w, int64_t i,
                                                                const int kind) {
    if (kind == WEIGHTS_BF16 || kind == BF16_DOT) return bf16_to_float(((const uint16_t *)w)[i]);
    if (kind == WEIGHTS_F16) return f16_to_float(((const uint16_t *)w)[i]);
    return ((const float *)w)[i];
}

/* x is float32 for every kind but BF16_DOT, where it is bfloat16. */
static inline size_t x_bytes_of(const int kind) {
    return kind == BF16_DOT ? sizeof(uint16_t) : sizeof(float);
}

static inline __attribute__((always_inline)) vec8 load8_x(const void *x, int64_t i,
                                                           const int kind) {
    if (kind == BF16_DOT) return load_bf16_pairs((const uint16_t *)x + i);
    return load8((const float *)x + i);
}

static inline __attribute__((always_inline)) float load1_x(const void *x, int64_t i,
                                                           const int kind) {
    if (kind == BF16_DOT) return bf16_to_float(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

/* acc + w * x lane by lane, or for BF16_DOT each lane plus its two bfloat16 products. */
static inline __attribute__((always_inline)) vec8 multiply_add(vec8 acc, vec8 w, vec8 x,
                                                               const int kind) {
#if NATIVE_BF16_DOT
    if (kind == BF16_DOT) {
        __m256 sums;
        __m256bh w_pairs, x_pairs;
        memcpy(&sums, &acc, sizeof sums);
        memcpy(&w_pairs, &w, sizeof w_pairs);
        memcpy(&x_pairs, &x, sizeof x_pairs);
        sums = _mm256_dpbf16_ps(sums, w_pairs, x_pairs);
        memcpy(&acc, &sums, sizeof acc);
        return acc;
    }
#else
    (void)kind;
#endif
    return acc + w * x;
}

static inline const char *weight_address(const void *w, int64_t i, const int kind) {
    return (const char *)w + i * (kind == WEIGHTS_F32 ? 4 : 2);
}

static inline float sum8(vec8 v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; ++l) s += v[l];
    return s;
}

/* out[r, o + q] for q < wrows (wrows <= WEIGHT_ROWS) and r < rows (rows <= ROW_GROUP): wrows weight
 * rows against the group. Inlined with constant wrows and rows, so the wrows * rows accumulators
 * stay in registers (24 of the 32 of AVX-512VL at four weight rows and six x rows, with the four
 * weight vectors and one x vector; 12 of the 16 of AVX2 at two weight rows). */
static inline __attribute__((always_inline)) void weight_rows_times_group(
    const void *x, const void *w, float *out, int64_t K, int64_t N, int64_t o, const int wrows,
    const int rows, const int kind) {
    vec8 acc[WEIGHT_ROWS][ROW_GROUP];
    for (int q = 0; q < wrows; ++q)
        for (int r = 0; r < rows; ++r) acc[q][r] = (vec8){0};
    int64_t i = 0;
    for (; i + step_of(kind) <= K; i += step_of(kind)) {
        vec8 wv[WEIGHT_ROWS];
        for (int q = 0; q < wrows; ++q) {
            wv[q] = load8_weights(w, (o + q) * K + i, kind);
            /* PREFETCH_AHEAD bytes down each row's stream, into L2 only: at S3 this is 1.4x
             * faster than the same into L1 (where the lines evicted the x rows) and than none */
            __builtin_prefetch(weight_address(w, (o + q) * K + i, kind) + PREFETCH_AHEAD, 0, 2);
            KEEP_IN_REGISTER(wv[q]);
        }
        for (int r = 0; r < rows; ++r) {
            vec8 xv = load8_x(x, r * K + i, kind);
            KEEP_IN_REGISTER(xv);
            for (int q = 0; q < wrows; ++q) acc[q][r] = multiply_add(acc[q][r], wv[q], xv, kind);
        }
    }
    for (int q = 0; q < wrows; ++q)
        for (int r = 0; r < rows; ++r) {
            float s = sum8(acc[q][r]);
            for (int64_t j = i; j < K; ++j)
                s = fmaf(load1_weight(w, (o + q) * K + j, kind), load1_x(x, r * K + j, kind), s);
            out[r * N + o + q] = s;
        }
}

static inline __attribute__((always_inline)) void weight_rows_times_all(
    const void *x, const void *w, float *out, int64_t n, int64_t K, int64_t N, int64_t o,
    const int wrows, const int kind) {
    for (int64_t r0 = 0; r0 < n; r0 += ROW_GROUP) {
        const char *xr = (const char *)x + r0 * K * x_bytes_of(kind);
        float *outr = out + r0 * N;
        switch (n - r0 < ROW_GROUP ? n - r0 : ROW_GROUP) {
            case 1: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 1, kind); break;
            case 2: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 2, kind); break;
            case 3: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 3, kind); break;
            case 4: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 4, kind); break;
            case 5: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 5, kind); break;
            default: weight_rows_times_group(xr, w, outr, K, N, o, wrows, 6, kind); break;
        }
    }
}

/* One weight row in scalar multiply-adds (float32 x): the last row of an odd count. */
static inline __attribute__((always_inline)) void single_row_dot(
    const float *x, const void *w, float *out, int64_t n, int64_t K, int64_t N, int64_t o,
    const int kind) {
    for (int64_t r = 0; r < n; ++r) {
        float s = 0.0f;
        for (int64_t j = 0; j < K; ++j) s = fmaf(load1_weight(w, o * K + j, kind), x[r * K + j], s);
        out[r * N + o] = s;
    }
}

/* Weight rows [o0, o1) of one expert against all its n rows; kind: how w (and x) are stored. On
 * the dot product every row takes the vector loop, so all rows sum in one order. */
static inline __attribute__((always_inline)) void expert_rows_of(
    const void *x, const void *w, float *out, int64_t n, int64_t K, int64_t N, int64_t o0,
    int64_t o1, const int kind) {
    int64_t o = o0;
    for (; o + WEIGHT_ROWS <= o1; o += WEIGHT_ROWS)
        weight_rows_times_all(x, w, out, n, K, N, o, WEIGHT_ROWS, kind);
    for (; o + 2 <= o1; o += 2) weight_rows_times_all(x, w, out, n, K, N, o, 2, kind);
    if (o < o1 && kind == BF16_DOT) weight_rows_times_all(x, w, out, n, K, N, o, 1, kind);
    else if (o < o1) single_row_dot(x, w, out, n, K, N, o, kind);
}

static void expert_rows(const void *x, const void *w, float *out, int64_t n, int64_t K, int64_t N,
                        int64_t o0, int64_t o1) {
    expert_rows_of(x, w, out, n, K, N, o0, o1, WEIGHTS_F32);
}

static void expert_rows_bf16(const void *x, const void *w, float *out, int64_t n, int64_t K,
                             int64_t N, int64_t o0, int64_t o1) {
    expert_rows_of(x, w, out, n, K, N, o0, o1, WEIGHTS_BF16);
}

static void expert_rows_f16(const void *x, const void *w, float *out, int64_t n, int64_t K,
                            int64_t N, int64_t o0, int64_t o1) {
    expert_rows_of(x, w, out, n, K, N, o0, o1, WEIGHTS_F16);
}

#if NATIVE_BF16_DOT
/* bfloat16 x rows against bfloat16 weights, on the dot product */
static void expert_rows_dot(const void *x, const void *w, float *out, int64_t n, int64_t K,
                            int64_t N, int64_t o0, int64_t o1) {
    expert_rows_of(x, w, out, n, K, N, o0, o1, BF16_DOT);
}

/* dst[i] = src[i] rounded to bfloat16 (to nearest, ties to even; denormals to zero and NaN
 * quiet, as vcvtneps2bf16 does), eight at a time on the instruction. */
static void round_to_bf16(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        __m128bh rounded = _mm256_cvtneps_pbh(_mm256_loadu_ps(src + i));
        memcpy(dst + i, &rounded, sizeof rounded);
    }
    for (; i < n; ++i) {
        uint32_t bits;
        memcpy(&bits, src + i, sizeof bits);
        if ((bits & 0x7fffffffu) > 0x7f800000u) dst[i] = (uint16_t)((bits >> 16) | 0x40u);
        else if ((bits & 0x7f800000u) == 0) dst[i] = (uint16_t)((bits >> 16) & 0x8000u);
        else dst[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
}
#endif

/* Whether this build multiplies bfloat16 x by bfloat16 weights on the CPU's dot product. */
int moekit_skinny_native_bf16_dot(void) { return NATIVE_BF16_DOT; }

/* ---- x @ W: out[r, n] = sum_k x[r, k] * w[k, n] ---- */

enum { AXPY_GROUP = 4, COLUMN_UNIT = 16 };

static inline void store8(float *p, vec8 v) { memcpy(p, &v, sizeof v); }

/* out[r, lo:hi] += x[r, k] * w[k, lo:hi] (+ x[r, k + 1] * w[k + 1, lo:hi] when pair == 2) for
 * r < rows (rows <= AXPY_GROUP): weight rows streamed contiguously, two at a time, into the
 * rows' outputs, which stay in L1. Inlined with constant rows and pair. */
static inline __attribute__((always_inline)) void group_axpy(
    const float *x, const float *w, float *out, int64_t K, int64_t N, int64_t k, int64_t lo,
    int64_t hi, const int rows, const int pair) {
    const float *w0 = w + k * N, *w1 = pair == 2 ? w0 + N : w0;
    vec8 xa[AXPY_GROUP], xb[AXPY_GROUP];
    for (int r = 0; r < rows; ++r) {
        xa[r] = (vec8){0} + x[r * K + k];
        xb[r] = (vec8){0} + (pair == 2 ? x[r * K + k + 1] : 0.0f);
    }
    int64_t j = lo;
    for (; j + LANES <= hi; j += LANES) {
        vec8 a = load8(w0 + j), b = load8(w1 + j);
        __builtin_prefetch(w0 + 4 * N + j, 0, 3);
        if (pair == 2) __builtin_prefetch(w1 + 4 * N + j, 0, 3);
        for (int r = 0; r < rows; ++r) {
            vec8 o = load8(out + r * N + j) + a * xa[r];
            if (pair == 2) o += b * xb[r];
            store8(out + r * N + j, o);
        }
    }
    for (; j < hi; ++j)
        for (int r = 0; r < rows; ++r) {  /* as the vectors above: w0's product, then w1's */
            float o = fmaf(w0[j], x[r * K + k], out[r * N + j]);
            out[r * N + j] = pair == 2 ? fmaf(w1[j], x[r * K + k + 1], o) : o;
        }
}

static inline __attribute__((always_inline)) void rows_axpy(
    const float *x, const float *w, float *out, int64_t K, int64_t N, int64_t k, int64_t lo,
    int64_t hi, int64_t rows, const int pair) {
    switch (rows) {
        case 1: group_axpy(x, w, out, K, N, k, lo, hi, 1, pair); break;
        case 2: group_axpy(x, w, out, K, N, k, lo, hi, 2, pair); break;
        case 3: group_axpy(x, w, out, K, N, k, lo, hi, 3, pair); break;
        default: group_axpy(x, w, out, K, N, k, lo, hi, 4, pair); break;
    }
}

/* Columns [lo, hi) of one expert's x @ w for all its n rows: the weight rows are read once, in
 * order, each pair applied to every group of up to four x rows while it is in L1. */
static void expert_columns(const void *x_any, const void *w_any, float *out, int64_t n,
                           int64_t K, int64_t N, int64_t lo, int64_t hi) {
    const float *x = x_any, *w = w_any;
    for (int64_t r = 0; r < n; ++r) memset(out + r * N + lo, 0, (size_t)(hi - lo) * sizeof(float));
    int64_t k = 0;
    for (; k + 2 <= K; k += 2)
        for (int64_t r0 = 0; r0 < n; r0 += AXPY_GROUP)
            rows_axpy(x + r0 * K, w, out + r0 * N, K, N, k, lo, hi,
                      n - r0 < AXPY_GROUP ? n - r0 : AXPY_GROUP, 2);
    if (k < K)
        for (int64_t r0 = 0; r0 < n; r0 += AXPY_GROUP)
            rows_axpy(x + r0 * K, w, out + r0 * N, K, N, k, lo, hi,
                      n - r0 < AXPY_GROUP ? n - r0 : AXPY_GROUP, 1);
}

typedef void (*expert_part)(const void *x, const void *w, float *out, int64_t n, int64_t K,
                            int64_t N, int64_t lo, int64_t hi);

/* A grouped product over all experts, for the calling thread of a team of nt (inside a parallel
 * region). Work units are (expert with rows, `width` output columns), split into equal contiguous
 * ranges over the threads, so experts of any size share the cores evenly; part() computes columns
 * [lo, hi) of one expert's product. first_row[e] is expert e's first row of x (x_bytes per
 * element) and out. */
static void grouped_share(expert_part part, int64_t width, const void *x, int64_t x_bytes,
                          const void *const *w_of, float *out, const int64_t *counts,
                          const int64_t *first_row, int64_t E, int64_t K, int64_t N, int64_t t,
                          int64_t nt) {
    int64_t per_expert = (N + width - 1) / width;
    int64_t active = 0;
    for (int64_t e = 0; e < E; ++e) active += counts[e] > 0;
    int64_t units = active * per_expert;
    int64_t begin = units * t / nt, end = units * (t + 1) / nt;
    /* the a-th expert with rows holds units [a * per_expert, (a + 1) * per_expert) */
    int64_t e = 0, a = 0;
    while (begin < end) {
        int64_t wanted = begin / per_expert;
        for (; counts[e] == 0 || a < wanted; ++e) a += counts[e] > 0;
        int64_t unit0 = begin % per_expert;
        int64_t left = end - wanted * per_expert, unit1 = left < per_expert ? left : per_expert;
        int64_t hi = unit1 * width < N ? unit1 * width : N;
        part((const char *)x + first_row[e] * K * x_bytes, w_of[e], out + first_row[e] * N, counts[e],
             K, N, unit0 * width, hi);
        begin = wanted * per_expert + unit1;
    }
}

static int team_size(int num_threads, int64_t work) {
    if (num_threads < 1) num_threads = 1;
    return work < num_threads ? (int)(work > 0 ? work : 1) : num_threads;
}

static void grouped(expert_part part, int64_t width, const float *x, const float *w,
                    int64_t w_expert_stride, float *out, const int64_t *counts, int64_t E,
                    int64_t K, int64_t N, int num_threads) {
    int64_t first_row[E], active = 0;
    const void *w_of[E];
    for (int64_t e = 0, row = 0; e < E; ++e) {
        w_of[e] = w + e * w_expert_stride;
        first_row[e] = row;
        row += counts[e];
        active += counts[e] > 0;
    }
    if (active == 0) return;
#pragma omp parallel num_threads(team_size(num_threads, active * ((N + width - 1) / width)))
    grouped_share(part, width, x, sizeof(float), w_of, out, counts, first_row, E, K, N,
                  omp_get_thread_num(), omp_get_num_threads());
}

/* x @ w[e]^T for w [E, N, K] */
void moekit_skinny_grouped(const float *x, const float *w, int64_t w_expert_stride, float *out,
                           const int64_t *counts, int64_t E, int64_t K, int64_t N, int num_threads) {
    grouped(expert_rows, WEIGHT_ROWS, x, w, w_expert_stride, out, counts, E, K, N, num_threads);
}

/* x @ w[e] for w [E, K, N] */
void moekit_skinny_grouped_nn(const float *x, const float *w, int64_t w_expert_stride, float *out,
                              const int64_t *counts, int64_t E, int64_t K, int64_t N,
                              int num_threads) {
    grouped(expert_columns, COLUMN_UNIT, x, w, w_expert_stride, out, counts, E, K, N,
            num_threads);
}

/* ---- the whole expert FFN of a decode step ----
 *
 * y[t] = sum_j weights[t, j] * FFN_{ids[t, j]}(x[t]), FFN_e(v) = act(v @ w1[e]^T + b1[e]) @ w2[e]^T
 * + b2[e], in one call: the assignments sorted by expert (stable), the rows gathered, both
 * products through the kernels above, the activation and the combine over the j of each token
 * in order, all in one team of threads.
 *
 * Layouts (float32 unless noted, row-major, contiguous within an expert):
 *   x [T, D]; ids [T, K] int64; weights [T, K]; kept [T, K] bool (one byte, 0 or 1), or NULL for
 *   all: an assignment with kept 0 is left out (dropped by capacity, or not an assignment)
 *   w1[e] [H, D] (H = 2F gated: rows [0, F) gate, [F, 2F) up; else H = F), w2[e] [D, F]: arrays of
 *   E pointers, each expert's matrix row-major and contiguous (an expert without rows may be NULL);
 *   b1[e] [H], b2[e] [D]: arrays of E pointers, or NULL for no bias
 *   gated: act(gate) * up, else act(h); elementwise: the MOEKIT_ACT_* code of act
 *   weight_kind: WEIGHTS_F32, WEIGHTS_BF16 or WEIGHTS_F16, how w1 and w2 are stored (the biases
 *   are float32 in every case)
 *   x_kind: X_F32; X_BF16 with WEIGHTS_BF16 (x bfloat16); X_F32_AS_BF16 with WEIGHTS_BF16 (x
 *   float32 that may be rounded to bfloat16). Where the CPU has the bf16 dot product, both
 *   products of those two run on it: x (rounded to bfloat16 if float32) and the activation
 *   rounded to bfloat16 meet the bfloat16 weights. Where it has none, bfloat16 x is widened
 *   exactly and X_F32_AS_BF16 is X_F32: float32 as always.
 *   y [T, D]; order [R] int64 (the assignment t * K + j of each of the R kept rows, grouped by
 *   expert); counts [E] int64 kept rows per expert
 * Returns 0 when y is written; 1 when an expert would get more than max_rows rows (order and
 * counts are written, y is not); -1 when an id is outside [0, E) (nothing else is written
 * reliably); -2 when scratch memory could not be allocated; -3 for an x_kind the weights do not
 * allow (nothing is written).
 */
/* The elementwise activation codes come from moekit/experts/activations.py (build.py passes them). */
#if !defined(MOEKIT_ACT_SILU) || !defined(MOEKIT_ACT_GELU) || !defined(MOEKIT_ACT_RELU)
#error "compile with -DMOEKIT_ACT_SILU=... -DMOEKIT_ACT_GELU=... -DMOEKIT_ACT_RELU=... (moekit/experts/cpu/build.py)"
#endif

static inline float silu(float v) { return v / (1.0f + expf(-v)); }
static inline float gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

static inline float activate(int elementwise, float v) {
    switch (elementwise) {
        case MOEKIT_ACT_GELU: return gelu(v);
        case MOEKIT_ACT_RELU: return v > 0.0f ? v : 0.0f;
        default: return silu(v);  /* MOEKIT_ACT_SILU; the caller checked the code */
    }
}

/* a[f] = weight * act(h + b1) for one row: h [H], b1 [H] or NULL, a [F]; gated: act(gate) * up. */
static void activate_row(int gated, int elementwise, const float *h, const float *b1, float weight,
                         float *a, int64_t F) {
    for (int64_t f = 0; f < F; ++f) {
        float v = h[f] + (b1 ? b1[f] : 0.0f);
        float value = activate(elementwise, v);
        if (gated) value *= h[F + f] + (b1 ? b1[F + f] : 0.0f);
        a[f] = weight * value;
    }
}

int moekit_skinny_ffn(const void *x, const int64_t *ids, const float *weights,
                      const uint8_t *kept, int64_t T, int64_t K, const void *const *w1,
                      const void *const *w2, const float *const *b1, const float *const *b2,
                      int64_t E, int64_t D, int64_t F, int gated, int elementwise, int weight_kind,
                      int x_kind, int64_t max_rows,
                      float *y, int64_t *order, int64_t *counts, int num_threads) {
    int64_t A = T * K, R = 0, H = gated ? 2 * F : F;
    if (x_kind != X_F32 && ((x_kind != X_BF16 && x_kind != X_F32_AS_BF16)
                            || weight_kind != WEIGHTS_BF16))
        return -3;
    for (int64_t e = 0; e < E; ++e) counts[e] = 0;
    for (int64_t i = 0; i < A; ++i) {
        if (ids[i] < 0 || ids[i] >= E) return -1;
        if (!kept || kept[i]) ++counts[ids[i]];
    }
    int64_t first_row[E], next[E], most = 0;
    for (int64_t e = 0; e < E; ++e) {
        first_row[e] = next[e] = R;
        R += counts[e];
        if (counts[e] > most) most = counts[e];
    }
    int64_t *row_of = malloc((size_t)(A > 0 ? A : 1) * sizeof(int64_t));
    if (!row_of) return -2;
    for (int64_t i = 0; i < A; ++i) {  /* a stable counting sort: by token, then j, per expert */
        row_of[i] = !kept || kept[i] ? next[ids[i]]++ : -1;
        if (row_of[i] >= 0) order[row_of[i]] = i;
    }
    if (most > max_rows) {
        free(row_of);
        return 1;
    }
    /* float32 x, h, activation and out rows, then the activation in bfloat16 (for the dot) */
    float *rows = malloc((size_t)(R * (D + H + F + D) + (R * F + 1) / 2 + 1) * sizeof(float));
    if (!rows) {
        free(row_of);
        return -2;
    }
    float *x_rows = rows, *h = x_rows + R * D, *a = h + R * H, *out = a + R * F;
    expert_part part = weight_kind == WEIGHTS_BF16 ? expert_rows_bf16
                       : weight_kind == WEIGHTS_F16 ? expert_rows_f16 : expert_rows;
    /* On the dot product the rows of x and of the activation are bfloat16 (x's in x_rows' first
     * half, the activation's after out); without it bfloat16 x is widened exactly to float32 */
    const int dot = x_kind != X_F32 && NATIVE_BF16_DOT;
    uint16_t *x16_rows = (uint16_t *)x_rows, *a16 = (uint16_t *)(out + R * D);
    expert_part product = part;
#if NATIVE_BF16_DOT
    if (dot) product = expert_rows_dot;
#endif
    /* what the two products read: x's rows, then the activation's, in float32 or bfloat16 */
    const void *x_in = dot ? (const void *)x16_rows : x_rows, *a_in = dot ? (const void *)a16 : a;
    const int64_t in_bytes = dot ? sizeof(uint16_t) : sizeof(float);
#pragma omp parallel num_threads(team_size(num_threads, R * H))
    {
        int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            int64_t token = order[r] / K;
            if (x_kind != X_BF16 && !dot) {
                memcpy(x_rows + r * D, (const float *)x + token * D, (size_t)D * sizeof(float));
            } else if (x_kind == X_BF16 && dot) {
                memcpy(x16_rows + r * D, (const uint16_t *)x + token * D, (size_t)D * sizeof(uint16_t));
            } else if (x_kind == X_BF16) {
                for (int64_t d = 0; d < D; ++d)
                    x_rows[r * D + d] = bf16_to_float(((const uint16_t *)x)[token * D + d]);
            } else {
#if NATIVE_BF16_DOT
                round_to_bf16((const float *)x + token * D, x16_rows + r * D, D);
#endif
            }
        }
        grouped_share(product, WEIGHT_ROWS, x_in, in_bytes, w1, h, counts, first_row, E, D, H, t,
                      nt);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; ++r) {
            int64_t e = ids[order[r]];
            activate_row(gated, elementwise, h + r * H, b1 ? b1[e] : NULL, weights[order[r]], a + r * F, F);
#if NATIVE_BF16_DOT
            if (dot) round_to_bf16(a + r * F, a16 + r * F, F);
#endif
        }
        grouped_share(product, WEIGHT_ROWS, a_in, in_bytes, w2, out, counts, first_row, E, F, D,
                      t, nt);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t token = 0; token < T; ++token) {
            float *y_t = y + token * D;
            memset(y_t, 0, (size_t)D * sizeof(float));
            for (int64_t j = 0; j < K; ++j) {
                int64_t i = token * K + j, e = ids[i];
                if (row_of[i] < 0) continue;
                const float *o = out + row_of[i] * D;
                for (int64_t d = 0; d < D; ++d) y_t[d] += o[d];
                if (b2)
                    for (int64_t d = 0; d < D; ++d) y_t[d] += weights[i] * b2[e][d];
            }
        }
    }
    free(rows);
    free(row_of);
    return 0;
}
