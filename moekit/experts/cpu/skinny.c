/* Skinny products for decode on CPU: out[r, o] = sum_i x[r, i] * w[o, i] for a few rows r.
 *
 * At a few rows per expert the product is bound by reading w once from memory. BLAS GEMMs pack
 * w first (reading it twice); these loops stream each row of w once, two rows at a time, and
 * reuse the pair from L1 for every group of up to six x rows. Built at run time with the host's
 * compiler and -march=native (moekit/experts/cpu/build.py); the vector type is a GCC/Clang
 * extension, so the same source compiles to AVX2, AVX-512 or NEON.
 *
 * Layouts (float32, row-major, contiguous):
 *   x   [R, K]  rows grouped by expert: counts[e] rows for expert e, in expert order
 *   w   [E, N, K] at w_expert_stride floats from one expert to the next
 *   out [R, N]
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

typedef float vec8 __attribute__((vector_size(32)));

/* An empty asm that claims to change v: the compiler keeps v in a register rather than folding
 * a fresh load of it into every multiply-add. */
#if defined(__x86_64__) || defined(__i386__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

enum { LANES = 8, ROW_PAIR = 2, ROW_GROUP = 6 };

static inline vec8 load8(const float *p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(vec8 v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; ++l) s += v[l];
    return s;
}

/* out[r, o] and out[r, o + 1] for r < rows (rows <= ROW_GROUP): two weight rows against the group.
 * Inlined with a constant rows, so the 2 * rows accumulators stay in registers (12 of the 16 of
 * AVX2 at six rows, with the two weight vectors and one x vector). */
static inline __attribute__((always_inline)) void pair_times_group(
    const float *x, const float *w, float *out, int64_t K, int64_t N, int64_t o, const int rows) {
    const float *w0 = w + o * K, *w1 = w0 + K;
    vec8 acc0[ROW_GROUP], acc1[ROW_GROUP];
    for (int r = 0; r < rows; ++r) {
        acc0[r] = (vec8){0};
        acc1[r] = (vec8){0};
    }
    int64_t i = 0;
    for (; i + LANES <= K; i += LANES) {
        vec8 a = load8(w0 + i), b = load8(w1 + i);
        /* the pair after next, at the same column: ahead of the hardware prefetcher (~1.3x) */
        __builtin_prefetch(w0 + 4 * K + i, 0, 3);
        __builtin_prefetch(w1 + 4 * K + i, 0, 3);
        KEEP_IN_REGISTER(a);
        KEEP_IN_REGISTER(b);
        for (int r = 0; r < rows; ++r) {
            vec8 xv = load8(x + r * K + i);
            acc0[r] += a * xv;
            acc1[r] += b * xv;
        }
    }
    for (int r = 0; r < rows; ++r) {
        float s0 = sum8(acc0[r]), s1 = sum8(acc1[r]);
        for (int64_t j = i; j < K; ++j) {
            s0 += w0[j] * x[r * K + j];
            s1 += w1[j] * x[r * K + j];
        }
        out[r * N + o] = s0;
        out[r * N + o + 1] = s1;
    }
}

static void single_row_dot(const float *x, const float *w, float *out, int64_t n, int64_t K,
                           int64_t N, int64_t o) {
    const float *wo = w + o * K;
    for (int64_t r = 0; r < n; ++r) {
        float s = 0.0f;
        for (int64_t j = 0; j < K; ++j) s += wo[j] * x[r * K + j];
        out[r * N + o] = s;
    }
}

/* Weight rows [o0, o1) of one expert against all its n rows. */
static void expert_rows(const float *x, const float *w, float *out, int64_t n, int64_t K, int64_t N,
                        int64_t o0, int64_t o1) {
    int64_t o = o0;
    for (; o + ROW_PAIR <= o1; o += ROW_PAIR) {
        for (int64_t r0 = 0; r0 < n; r0 += ROW_GROUP) {
            const float *xr = x + r0 * K;
            float *outr = out + r0 * N;
            switch (n - r0 < ROW_GROUP ? n - r0 : ROW_GROUP) {
                case 1: pair_times_group(xr, w, outr, K, N, o, 1); break;
                case 2: pair_times_group(xr, w, outr, K, N, o, 2); break;
                case 3: pair_times_group(xr, w, outr, K, N, o, 3); break;
                case 4: pair_times_group(xr, w, outr, K, N, o, 4); break;
                case 5: pair_times_group(xr, w, outr, K, N, o, 5); break;
                default: pair_times_group(xr, w, outr, K, N, o, 6); break;
            }
        }
    }
    if (o < o1) single_row_dot(x, w, out, n, K, N, o);
}

/* The whole grouped product. Work units are (expert with rows, pair of weight rows), split into
 * equal contiguous ranges over the threads, so experts of any size share the cores evenly. */
void moekit_skinny_grouped(const float *x, const float *w, int64_t w_expert_stride, float *out,
                           const int64_t *counts, int64_t E, int64_t K, int64_t N, int num_threads) {
    int64_t pairs = (N + ROW_PAIR - 1) / ROW_PAIR;
    int64_t active = 0;
    for (int64_t e = 0; e < E; ++e) active += counts[e] > 0;
    int64_t units = active * pairs;
    if (units == 0) return;
    int64_t first_row[E], expert_of[active];
    for (int64_t e = 0, row = 0, a = 0; e < E; ++e) {
        first_row[e] = row;
        row += counts[e];
        if (counts[e] > 0) expert_of[a++] = e;
    }
    if (num_threads < 1) num_threads = 1;
    if (num_threads > units) num_threads = (int)units;
#pragma omp parallel num_threads(num_threads)
    {
        int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t begin = units * t / nt, end = units * (t + 1) / nt;
        while (begin < end) {
            int64_t a = begin / pairs, pair0 = begin % pairs;
            int64_t pair1 = end - a * pairs < pairs ? end - a * pairs : pairs;
            int64_t e = expert_of[a], o1 = pair1 * ROW_PAIR < N ? pair1 * ROW_PAIR : N;
            expert_rows(x + first_row[e] * K, w + e * w_expert_stride, out + first_row[e] * N,
                        counts[e], K, N, pair0 * ROW_PAIR, o1);
            begin = a * pairs + pair1;
        }
    }
}
