/* imagegpt.cpu._kernels: the decode step's CPU kernels on x86-64 CPUs with AVX2, FMA and F16C; the float32 and
 * bfloat16 linear layers also have AVX-512F tiles, taken where the caller asks for them (avx512 arguments).
 *
 * decode_attention: a decode step of a batch of images reads every cached key and value once, so on a CPU
 * its attention is bound by memory traffic. PyTorch's CPU SDPA kernel reads a float32 cache below the
 * bandwidth, and a bfloat16, float16 or int8 one only once widened to float32 whole (docs/performance.md).
 * This kernel streams the cache once in any of the four dtypes, widening to float32 in registers, and
 * computes in float32: softmax(q . K^T / sqrt(hs)) V, with q (and the result) in float32. Layout (strides
 * in elements): for image b and head h, q[b, h, :] starts at b * q_sb + h * q_sh; row s of the keys at
 * b * kv_sb + h * kv_sh + s * kv_ss (the same for the values; an int8 row's scale at b * s_sb + h * s_sh +
 * s); the result goes to b * o_sb + h * o_sh. The last dimension (hs, a multiple of 8) is contiguous
 * everywhere.
 *
 * pack_linear / packed_linear: few-rows linear layers on weights packed once (see below), float32 or
 * bfloat16 (widened in registers: half the bytes to stream), on AVX2 or AVX-512F tiles; or int8.
 *
 * decode_blocks: whole pre-norm blocks, one after another, for one new token per image, on packed weights
 * and a KV cache. A decode step of a batch of 16 is bound by memory traffic: it reads every weight and every
 * cached key and value once, so the kernels are laid out to stream (see STREAM_AHEAD, prefetch_pairs, claim).
 *
 * Work is split over PyTorch's OpenMP pool (`threads` of it); built without OpenMP (setup.py enables it on
 * Linux) the kernels run on the calling thread. Built by setup.py as an optional extension; imagegpt.cpu.ops
 * registers each entry point as a PyTorch operator that checks its tensors before handing over their
 * addresses, and sampling runs on PyTorch alone where the extension is missing or the CPU lacks
 * AVX2/FMA/F16C. Whether to take the AVX-512F tiles is decided in one place, imagegpt.cpu.ops.avx512 (the CPU
 * and IMAGEGPT_CPU_AVX512), and passed to every call; a call that asks for them where the CPU lacks AVX-512F
 * is refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* cache and weight dtypes, as imagegpt.cpu.ops passes them (the argument checks use them on every CPU); an
 * I8 cache holds round(x / scale) per cached row of hs, scale = max |x| / 127 in a float32 array beside it
 * (the keys' and the values' own), so q . k = scale * (q . k8) and p v = (p scale) v8 */
enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 };

#if defined(__GNUC__) && defined(__x86_64__) && !defined(_WIN32) && !defined(IMAGEGPT_NO_X86)
#define IMAGEGPT_AVX2 1
#include <immintrin.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TARGET __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline)) TARGET

#define ELEMENT_SIZE(dt) ((dt) == F32 ? 4 : (dt) == I8 ? 1 : 2)

/* How far ahead (bytes) both passes prefetch the keys and values of a half-precision or int8 cache: their
 * rows go by too fast for the hardware prefetcher alone (about 10% faster bfloat16 and 25% faster int8
 * attention late in an image, docs/performance.md). Not for float32, whose rows the hardware keeps up with. */
#define PREFETCH 1024

/* 8 cached elements widened to float32. dt is a compile-time constant wherever this is inlined. */
INLINE __m256 load8(const void *p, int dt) {
    if (dt == F32) return _mm256_loadu_ps((const float *)p);
    if (dt == I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* exp(x) for x <= 0 (x - max of a softmax): 2^(x log2 e) as 2^n * 2^f, |f| <= 1/2, 2^f by a degree-6
 * polynomial (EXP2_POLY, highest power first); relative error about 2e-7. Below -80 the result is flushed
 * to exp(-80) ~ 2e-35, which no softmax over at least one exp(0) = 1 can tell from 0. exp16 (AVX-512)
 * computes the same numbers, step for step. */
static const float EXP2_POLY[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                   5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};

INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-80.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_POLY[i]));
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

INLINE float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

/* [first, last) of thread t of n's even share of `total` items */
static inline void share(int total, int t, int n, int *first, int *last) {
    *first = (int)((long long)total * t / n);
    *last = (int)((long long)total * (t + 1) / n);
}

typedef struct {
    const float *q;
    const char *k, *v;
    float *out;
    Py_ssize_t q_sb, q_sh, kv_sb, kv_sh, kv_ss, o_sb, o_sh;
    int nh, hs, length, dt;
    float scale;
    const float *ks, *vs; /* I8: the rows' scales, (b, h, s) at b * s_sb + h * s_sh + s */
    Py_ssize_t s_sb, s_sh;
    int first, last; /* the (b, h) pairs [first, last) of this share, b * nh + h */
    int failed;      /* set when the scores buffer could not be allocated */
} Job;

/* out[:w] = sum_s p[s] * V[s, d0 : d0 + w] for a strip of W = 8 * N dimensions, N accumulators. */
#define V_STRIP(N)                                                                                         \
    INLINE void v_strip##N(const char *vb, Py_ssize_t row, const float *p, int length, float *out, int dt, \
                           int es) {                                                                       \
        __m256 o[N];                                                                                       \
        for (int j = 0; j < N; j++) o[j] = _mm256_setzero_ps();                                            \
        for (int s = 0; s < length; s++) {                                                                 \
            const char *r = vb + s * row;                                                                  \
            if (dt != F32)                                                                                 \
                for (int at = 0; at < 8 * N * es; at += 64) _mm_prefetch(r + PREFETCH + at, _MM_HINT_T0); \
            __m256 w = _mm256_broadcast_ss(p + s);                                                         \
            for (int j = 0; j < N; j++) o[j] = _mm256_fmadd_ps(w, load8(r + 8 * j * es, dt), o[j]);        \
        }                                                                                                  \
        for (int j = 0; j < N; j++) _mm256_storeu_ps(out + 8 * j, o[j]);                                   \
    }
V_STRIP(8)
V_STRIP(4)
V_STRIP(2)
V_STRIP(1)

INLINE void attend_dt(const Job *job, float *scores, int dt) {
    const int es = ELEMENT_SIZE(dt), hs = job->hs, length = job->length;
    const Py_ssize_t row = job->kv_ss * es; /* bytes from one cached position to the next */
    for (int i = job->first; i < job->last; i++) {
        const int b = i / job->nh, h = i % job->nh;
        const float *q = job->q + b * job->q_sb + h * job->q_sh;
        const char *kb = job->k + (b * job->kv_sb + h * job->kv_sh) * es;
        const char *vb = job->v + (b * job->kv_sb + h * job->kv_sh) * es;
        float *out = job->out + b * job->o_sb + h * job->o_sh;
        const float *ks = dt == I8 ? job->ks + b * job->s_sb + h * job->s_sh : NULL;
        const float *vs = dt == I8 ? job->vs + b * job->s_sb + h * job->s_sh : NULL;

        /* scores = q . K^T * scale, four keys at a time (one horizontal sum for four) */
        int s = 0;
        for (; s + 4 <= length; s += 4) {
            const char *r = kb + s * row;
            if (dt != F32) /* half-precision rows go by too fast for the hardware prefetcher alone */
                for (Py_ssize_t at = 0; at < 4 * row; at += 64) _mm_prefetch(r + PREFETCH + at, _MM_HINT_T0);
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int d = 0; d < hs; d += 8) {
                __m256 qd = _mm256_loadu_ps(q + d);
                a0 = _mm256_fmadd_ps(qd, load8(r + d * es, dt), a0);
                a1 = _mm256_fmadd_ps(qd, load8(r + row + d * es, dt), a1);
                a2 = _mm256_fmadd_ps(qd, load8(r + 2 * row + d * es, dt), a2);
                a3 = _mm256_fmadd_ps(qd, load8(r + 3 * row + d * es, dt), a3);
            }
            __m256 h4 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            __m128 four = _mm_add_ps(_mm256_castps256_ps128(h4), _mm256_extractf128_ps(h4, 1));
            four = _mm_mul_ps(four, _mm_set1_ps(job->scale));
            if (dt == I8) four = _mm_mul_ps(four, _mm_loadu_ps(ks + s));
            _mm_storeu_ps(scores + s, four);
        }
        for (; s < length; s++) {
            const char *r = kb + s * row;
            __m256 a = _mm256_setzero_ps();
            for (int d = 0; d < hs; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(r + d * es, dt), a);
            scores[s] = hsum(a) * job->scale * (dt == I8 ? ks[s] : 1.0f);
        }

        /* softmax, in place */
        float top = scores[0];
        for (s = 1; s < length; s++) top = scores[s] > top ? scores[s] : top;
        __m256 mv = _mm256_set1_ps(top), total = _mm256_setzero_ps();
        for (s = 0; s + 8 <= length; s += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + s), mv));
            _mm256_storeu_ps(scores + s, e);
            total = _mm256_add_ps(total, e);
        }
        float sum = hsum(total);
        for (; s < length; s++) {
            float e = expf(scores[s] - top);
            scores[s] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
        if (dt == I8) /* the values' scales ride on the weights */
            for (s = 0; s < length; s++) scores[s] *= inv * vs[s];
        else
            for (s = 0; s < length; s++) scores[s] *= inv;

        /* out = scores . V, in strips of 64, 32, 16 and 8 dimensions (8 accumulators at most) */
        int d = 0;
        for (; d + 64 <= hs; d += 64) v_strip8(vb + d * es, row, scores, length, out + d, dt, es);
        if (d + 32 <= hs) {
            v_strip4(vb + d * es, row, scores, length, out + d, dt, es);
            d += 32;
        }
        if (d + 16 <= hs) {
            v_strip2(vb + d * es, row, scores, length, out + d, dt, es);
            d += 16;
        }
        if (d + 8 <= hs) v_strip1(vb + d * es, row, scores, length, out + d, dt, es);
    }
}

static TARGET void attend(Job *job) {
    float *scores = malloc(((size_t)job->length + 8) * sizeof(float));
    if (scores == NULL) {
        job->failed = 1;
        return;
    }
    if (job->dt == F32)
        attend_dt(job, scores, F32);
    else if (job->dt == BF16)
        attend_dt(job, scores, BF16);
    else if (job->dt == F16)
        attend_dt(job, scores, F16);
    else
        attend_dt(job, scores, I8);
    free(scores);
}



/* ---- few-rows linear layers: out = act(x W^T + b) for up to a few dozen rows (a decode step's batch) ----
 *
 * At 16 rows a decode step's multiplies are bound by streaming the weights through the FMA units, and the
 * library GEMMs reach a third of the FMA peak here. The weight is packed once (pack_linear) into column
 * blocks of 16, each [K][16] contiguous, so a 6 x 16 tile of the output keeps 12 accumulators in
 * registers while the block streams past once from memory (and up to twice more from L2 for the other row
 * tiles). Columns beyond N are zero padding. The bias is padded to the blocks too. act: 0 none, 1 silu,
 * 2 none and added to out (a residual connection). */

/* silu(z) = z / (1 + exp(-z)), exp's argument clamped to [-80, 80] (silu is then z or 0 to float32) */
INLINE __m256 silu8(__m256 z) {
    __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), _mm256_set1_ps(80.0f)));
    return _mm256_div_ps(z, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* bias, activation and store (or residual add) of one row of a 16-column tile */
INLINE void tile_store(__m256 v0, __m256 v1, const float *bias, int act, float *out, int cols) {
    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
    if (act == 1) {
        v0 = silu8(v0);
        v1 = silu8(v1);
    }
    if (cols == 16) {
        if (act == 2) { /* a residual: added to what out holds */
            v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
            v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out + 8));
        }
        _mm256_storeu_ps(out, v0);
        _mm256_storeu_ps(out + 8, v1);
    } else { /* the last, partial block */
        float row[16];
        _mm256_storeu_ps(row, v0);
        _mm256_storeu_ps(row + 8, v1);
        for (int j = 0; j < cols; j++) out[j] = act == 2 ? out[j] + row[j] : row[j];
    }
}

INLINE void linear_tile(const float *x, Py_ssize_t ldx, const char *block, const char *next, int K, int R,
                        const float *bias, int act, float *out, Py_ssize_t ldo, int cols, int wt) {
    const int es = ELEMENT_SIZE(wt); /* wt (F32 or BF16) a constant in each copy */
    /* every loop over r is unrolled: indexed by a variable, the accumulators would live in memory */
    __m256 c0[6], c1[6];
#pragma GCC unroll 6
    for (int r = 0; r < 6; r++) c0[r] = c1[r] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m256 w0 = load8(block + es * 16 * k, wt), w1 = load8(block + es * (16 * k + 8), wt);
        /* the next block's line at this k into L2: its weights stream in while this block computes */
        _mm_prefetch(next + es * 16 * k, _MM_HINT_T1);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
            c0[r] = _mm256_fmadd_ps(a, w0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, w1, c1[r]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) tile_store(c0[r], c1[r], bias, act, out + r * ldo, cols);
}

/* rows [m, m + R) of one column block; R and wt are constants in each case, so each tile is compiled for them */
#define LINEAR_ROWS(NAME, WT)                                                                                 \
    static TARGET void NAME(const float *x, Py_ssize_t ldx, const char *block, const char *next, int K, int R, \
                            const float *bias, int act, float *out, Py_ssize_t ldo, int cols) {               \
        switch (R) {                                                                                          \
        case 6: linear_tile(x, ldx, block, next, K, 6, bias, act, out, ldo, cols, WT); break;                 \
        case 5: linear_tile(x, ldx, block, next, K, 5, bias, act, out, ldo, cols, WT); break;                 \
        case 4: linear_tile(x, ldx, block, next, K, 4, bias, act, out, ldo, cols, WT); break;                 \
        case 3: linear_tile(x, ldx, block, next, K, 3, bias, act, out, ldo, cols, WT); break;                 \
        case 2: linear_tile(x, ldx, block, next, K, 2, bias, act, out, ldo, cols, WT); break;                 \
        default: linear_tile(x, ldx, block, next, K, 1, bias, act, out, ldo, cols, WT); break;                \
        }                                                                                                     \
    }
LINEAR_ROWS(linear_rows, F32)
LINEAR_ROWS(linear_rows_bf16, BF16)

/* ---- the same tiles on AVX-512F: one zmm register holds a block's 16 columns at one k ----
 *
 * Twice the multiply-adds per instruction of AVX2, and 32 registers: a tile of up to 16 rows keeps one
 * accumulator per row, so a decode step's batch of 16 reads each column block once. Each output is the
 * same chain of FMAs over k as the AVX2 tile's, and exp16 is exp8 lane for lane, so the two paths give the
 * same numbers bit for bit. Compiled for AVX-512F whatever the build machine, and taken only where the
 * caller says so (imagegpt.cpu.ops.avx512 decides, from the CPU and IMAGEGPT_CPU_AVX512). */

#define TARGET512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define INLINE512 static inline __attribute__((always_inline)) TARGET512

/* How far ahead (bytes) the AVX-512 tile asks for its weights' lines, into L2. A thread's share of column
 * blocks lies in one piece of memory, one stream, which this keeps ahead of the tile across the blocks' ends
 * and the 4 KiB pages, where the hardware prefetcher stops. (The AVX2 tile asks for the next block's line at
 * each k, a block another thread may take: docs/performance.md compares the two.) */
#define STREAM_AHEAD 8192

INLINE512 __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-80.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

INLINE512 __m512 silu16(__m512 z) {
    __m512 e = exp16(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), _mm512_set1_ps(80.0f)));
    return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

/* tile_store for one row of 16 columns: the last, partial block's columns past `cols` are masked off */
INLINE512 void tile_store16(__m512 v, const float *bias, int act, float *out, int cols) {
    const __mmask16 keep = (__mmask16)((1u << cols) - 1);
    v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if (act == 1) v = silu16(v);
    if (act == 2) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(keep, out)); /* a residual */
    _mm512_mask_storeu_ps(out, keep, v);
}

/* 16 weights widened to float32: F32, or BF16 (exactly: a bfloat16 is a float32's top half) */
INLINE512 __m512 load16(const char *p, int wt) {
    if (wt == F32) return _mm512_loadu_ps((const float *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

INLINE512 void linear_tile16(const float *x, Py_ssize_t ldx, const char *block, int K, int R, const float *bias,
                             int act, float *out, Py_ssize_t ldo, int cols, int wt) {
    const int es = ELEMENT_SIZE(wt);
    __m512 c[16]; /* every loop over r unrolled, as in linear_tile */
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) c[r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        const __m512 w = load16(block + es * 16 * k, wt);
        _mm_prefetch(block + es * 16 * k + STREAM_AHEAD, _MM_HINT_T1);
#pragma GCC unroll 16
        for (int r = 0; r < R; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), w, c[r]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; r++) tile_store16(c[r], bias, act, out + r * ldo, cols);
}

/* rows [m, m + R) of one column block, R <= 16 */
#define TILE16(R, WT) linear_tile16(x, ldx, block, K, R, bias, act, out, ldo, cols, WT)
#define LINEAR_ROWS16(NAME, WT)                                                                              \
    static TARGET512 void NAME(const float *x, Py_ssize_t ldx, const char *block, int K, int R,              \
                               const float *bias, int act, float *out, Py_ssize_t ldo, int cols) {           \
        switch (R) {                                                                                         \
        case 16: TILE16(16, WT); break;                                                                      \
        case 15: TILE16(15, WT); break;                                                                      \
        case 14: TILE16(14, WT); break;                                                                      \
        case 13: TILE16(13, WT); break;                                                                      \
        case 12: TILE16(12, WT); break;                                                                      \
        case 11: TILE16(11, WT); break;                                                                      \
        case 10: TILE16(10, WT); break;                                                                      \
        case 9: TILE16(9, WT); break;                                                                        \
        case 8: TILE16(8, WT); break;                                                                        \
        case 7: TILE16(7, WT); break;                                                                        \
        case 6: TILE16(6, WT); break;                                                                        \
        case 5: TILE16(5, WT); break;                                                                        \
        case 4: TILE16(4, WT); break;                                                                        \
        case 3: TILE16(3, WT); break;                                                                        \
        case 2: TILE16(2, WT); break;                                                                        \
        default: TILE16(1, WT); break;                                                                       \
        }                                                                                                    \
    }
LINEAR_ROWS16(linear_rows16, F32)
LINEAR_ROWS16(linear_rows16_bf16, BF16)
#undef TILE16

/* out = act(x W^T + b) for column blocks [first, last) of a packed weight, float32 or bfloat16 (wt), all M
 * rows; on AVX-512F in tiles of up to 16 rows, else in tiles of up to 6. bfloat16 weights are widened to
 * float32 in registers: the same FMAs as float32 weights of those values, on half the bytes. */
static TARGET void linear_blocks(const float *x, Py_ssize_t ldx, int M, int K, const void *packed, int N,
                                 const float *bias, int act, float *out, Py_ssize_t ldo, int first, int last,
                                 int avx512, int wt) {
    const int rows = avx512 ? 16 : 6;
    const Py_ssize_t size = (Py_ssize_t)K * 16 * ELEMENT_SIZE(wt); /* bytes of a column block */
    for (int nb = first; nb < last; nb++) {
        const char *block = (const char *)packed + nb * size;
        const char *next = nb + 1 < (N + 15) / 16 ? block + size : block;
        const int cols = N - 16 * nb < 16 ? N - 16 * nb : 16;
        for (int m = 0; m < M; m += rows) {
            const int R = M - m < rows ? M - m : rows;
            const float *xm = x + m * ldx, *b = bias + 16 * nb;
            float *o = out + m * ldo + 16 * nb;
            if (avx512 && wt == BF16)
                linear_rows16_bf16(xm, ldx, block, K, R, b, act, o, ldo, cols);
            else if (avx512)
                linear_rows16(xm, ldx, block, K, R, b, act, o, ldo, cols);
            else if (wt == BF16)
                linear_rows_bf16(xm, ldx, block, next, K, R, b, act, o, ldo, cols);
            else
                linear_rows(xm, ldx, block, next, K, R, b, act, o, ldo, cols);
        }
    }
}

/* ---- the same layers on int8 weights (weight_dtype="int8"): out = act(sx sw (qx . qw) + b) ----
 *
 * Each weight row (an output column) is quantized with its own scale sw and each input row with its own, sx,
 * by quantize_row (below): round(x / s), s = max |x| / 127. The products are summed exactly in int32. The
 * weight is packed into column blocks of 16, each [K / 4][16][4] bytes: for 4 consecutive k the 16 columns'
 * bytes side by side, so one 32-byte load holds 8 columns x 4 k, and an input row's 4 bytes at k broadcast
 * to every 32-bit lane meet their columns. vpmaddubsw multiplies unsigned by signed bytes and adds pairs into
 * int16, vpmaddwd adds pairs of those into int32; the unsigned operand is the input's |qx|, the weights take
 * the input's signs (vpsignb), so a product is at most 127 x 127 and a pair fits int16 without saturating.
 * About twice float32 FMA's multiply-adds per cycle, on a quarter of the bytes (docs/performance.md). A
 * 4 x 16 tile keeps 8 int32 accumulators in registers. */

INLINE __m256i broadcast4(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

typedef struct {
    const int8_t *q;  /* rows quantized, (M, K) */
    const uint8_t *a; /* |q| */
    const float *s;   /* a scale per row */
    int ld;           /* K */
} QuantRows;

INLINE void linear_tile_i8(const QuantRows *x, int m, const int8_t *block, const int8_t *next, int K, int R,
                           const float *scales, const float *bias, int act, float *out, Py_ssize_t ldo,
                           int cols) {
    __m256i c0[4], c1[4];
    const int8_t *q = x->q + (Py_ssize_t)m * x->ld;
    const uint8_t *a = x->a + (Py_ssize_t)m * x->ld;
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) c0[r] = c1[r] = _mm256_setzero_si256();
    for (int k = 0; k < K; k += 4) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(block + 16 * k));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(block + 16 * k + 32));
        _mm_prefetch((const char *)(next + 16 * k), _MM_HINT_T1);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256i sign = broadcast4(q + r * x->ld + k), mag = broadcast4(a + r * x->ld + k);
            c0[r] = _mm256_add_epi32(c0[r],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(w0, sign)), ones));
            c1[r] = _mm256_add_epi32(c1[r],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(w1, sign)), ones));
        }
    }
    const __m256 s0 = _mm256_loadu_ps(scales), s1 = _mm256_loadu_ps(scales + 8);
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const __m256 sx = _mm256_set1_ps(x->s[m + r]);
        tile_store(_mm256_mul_ps(_mm256_cvtepi32_ps(c0[r]), _mm256_mul_ps(sx, s0)),
                   _mm256_mul_ps(_mm256_cvtepi32_ps(c1[r]), _mm256_mul_ps(sx, s1)), bias, act, out + r * ldo,
                   cols);
    }
}

static TARGET void linear_blocks_i8(const QuantRows *x, int M, int K, const int8_t *packed, int N,
                                    const float *scales, const float *bias, int act, float *out, Py_ssize_t ldo,
                                    int first, int last) {
    for (int nb = first; nb < last; nb++) {
        const int8_t *block = packed + (Py_ssize_t)nb * K * 16;
        const int8_t *next = nb + 1 < (N + 15) / 16 ? block + (Py_ssize_t)K * 16 : block;
        const int cols = N - 16 * nb < 16 ? N - 16 * nb : 16;
        const float *s = scales + 16 * nb, *b = bias + 16 * nb;
        for (int m = 0; m < M; m += 4) {
            float *o = out + m * ldo + 16 * nb;
            switch (M - m < 4 ? M - m : 4) { /* R a constant in each tile */
            case 4: linear_tile_i8(x, m, block, next, K, 4, s, b, act, o, ldo, cols); break;
            case 3: linear_tile_i8(x, m, block, next, K, 3, s, b, act, o, ldo, cols); break;
            case 2: linear_tile_i8(x, m, block, next, K, 2, s, b, act, o, ldo, cols); break;
            default: linear_tile_i8(x, m, block, next, K, 1, s, b, act, o, ldo, cols); break;
            }
        }
    }
}

/* ---- a whole transformer block for one new token per image ----
 *
 * x (M, C) rows, in place: x += proj(attention(qkv(norm1(x)))); x += out(silu(fc(norm2(x)))), where the
 * packed fc carries quick-GELU's 1.702 and out its 1 / 1.702 (imagegpt.cpu.engine). The new key and
 * value are written into the cache at `pos` (rounded to its dtype as PyTorch rounds: to nearest, ties to
 * even) and the attention reads positions [0, pos]. One parallel region, barriers between the phases: a
 * decode step of a small model is otherwise a few hundred short kernels, each a round trip through Python.
 * The weights are float32, bfloat16 or int8 (wt, a dtype code); with int8 weights each linear layer's input
 * rows are quantized first (quantize_rows). */

typedef struct {
    float *x;
    int M, C, nh, N_fc, dt, pos, wt;
    int avx512; /* the linear layers take their AVX-512F tiles */
    const float *ln1, *ln2;
    float eps;
    const void *w[4];  /* qkv, proj, fc, out: packed float32, bfloat16 or int8 blocks (wt) */
    const float *b[4]; /* their padded biases */
    const float *s[4]; /* int8: their padded column scales */
    char *k, *v;
    Py_ssize_t kv_sb, kv_sh, kv_ss;
    float *ks, *vs; /* I8: the scales (see Job) */
    Py_ssize_t s_sb, s_sh;
    float *xn, *qkv, *y, *h; /* scratch: M x C, M x 3C, M x C, M x N_fc */
    int8_t *rq;              /* int8 weights' scratch: M x max(C, N_fc) quantized rows, as many |q|, M scales */
    uint8_t *ra;
    float *rs;
    int claimed[5]; /* work handed out so far in the four linear layers' phases and attention's (claim) */
} BlockJob;
/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * g for rows [first, last) */
static TARGET void rms_rows(const float *x, int C, const float *g, float eps, float *out, int first, int last) {
    for (int m = first; m < last; m++) {
        const float *r = x + (Py_ssize_t)m * C;
        __m256 acc = _mm256_setzero_ps();
        int c = 0;
        for (; c + 8 <= C; c += 8) {
            __m256 a = _mm256_loadu_ps(r + c);
            acc = _mm256_fmadd_ps(a, a, acc);
        }
        float ss = hsum(acc);
        for (; c < C; c++) ss += r[c] * r[c];
        const float inv = 1.0f / sqrtf(ss / (float)C + eps);
        float *o = out + (Py_ssize_t)m * C;
        for (c = 0; c < C; c++) o[c] = r[c] * inv * g[c];
    }
}

/* float32 -> bfloat16, to nearest with ties to even (NaN stays a quiet NaN), as c10::BFloat16 rounds */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* x (n, a multiple of 8) -> round(x / scale) in [-127, 127] with scale = max |x| / 127 (1 where x is all
 * zeros), rounded to nearest even: the same numbers as imagegpt.model.quantize_int8 */
static TARGET void quantize_row(const float *x, int n, int8_t *out, float *scale_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 top = _mm256_setzero_ps();
    for (int d = 0; d < n; d += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + d)));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_shuffle_ps(t, t, 1));
    const float amax = _mm_cvtss_f32(t), scale = amax / 127.0f;
    const __m256 divisor = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
    for (int d = 0; d < n; d += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + d), divisor);
        v = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
        __m256i i = _mm256_cvtps_epi32(v); /* the current rounding mode: to nearest, ties to even */
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(out + d), _mm_packs_epi16(w, w));
    }
    *scale_out = scale > 0.0f ? scale : 1.0f;
}

/* the new key and value of (image, head) pairs [first, last), b * nh + h, into the cache at pos */
static TARGET void write_cache(const BlockJob *j, int first, int last) {
    const int C = j->C, hs = C / j->nh, es = ELEMENT_SIZE(j->dt);
    for (int i = first; i < last; i++) {
        const int b = i / j->nh, h = i % j->nh;
        const Py_ssize_t at = ((Py_ssize_t)b * j->kv_sb + h * j->kv_sh + (Py_ssize_t)j->pos * j->kv_ss) * es;
        for (int which = 0; which < 2; which++) {
            const float *src = j->qkv + (Py_ssize_t)b * 3 * C + (1 + which) * C + h * hs;
            char *dst = (which ? j->v : j->k) + at;
            if (j->dt == I8) {
                float *scale = (which ? j->vs : j->ks) + b * j->s_sb + h * j->s_sh + j->pos;
                quantize_row(src, hs, (int8_t *)dst, scale);
            } else if (j->dt == F32) {
                memcpy(dst, src, (size_t)hs * 4);
            } else if (j->dt == BF16) {
                for (int d = 0; d < hs; d++) ((uint16_t *)dst)[d] = to_bf16(src[d]);
            } else {
                for (int d = 0; d < hs; d += 8)
                    _mm_storeu_si128((__m128i *)(dst + 2 * d),
                                     _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
            }
        }
    }
}

/* rows [first, last) of x (ld apart, n wide) quantized into r (int8 weights' input), n a multiple of 8 */
static TARGET void quantize_rows(QuantRows r, const float *x, Py_ssize_t ld, int first, int last) {
    const int n = r.ld;
    for (int m = first; m < last; m++) {
        int8_t *q = (int8_t *)r.q + (Py_ssize_t)m * n;
        uint8_t *a = (uint8_t *)r.a + (Py_ssize_t)m * n;
        quantize_row(x + m * ld, n, q, (float *)r.s + m);
        for (int d = 0; d < n; d++) a[d] = (uint8_t)(q[d] < 0 ? -q[d] : q[d]);
    }
}

/* thread t of n's share of the block; barrier() separates the phases */
#ifdef _OPENMP
#define BARRIER() _Pragma("omp barrier")
#else
#define BARRIER()
#endif

/* the block's quantized rows, K wide (int8 weights' input) */
INLINE QuantRows block_rows(const BlockJob *j, int K) { return (QuantRows){j->rq, j->ra, j->rs, K}; }

/* The next share of a phase's `total` items into [first, last), or 0 when all are taken. The items go to
 * whichever thread is free: split evenly in advance, a phase lasts as long as the slower core's half, and on
 * a shared machine one core is often slower (docs/performance.md). A share is a part of what is left (1 / 2n
 * of it for n threads, guided scheduling): long runs first, which stream from memory best, then shorter ones,
 * so that the threads finish close together. */
static inline int claim(int *claimed, int total, int threads, int *first, int *last) {
    int at = __atomic_load_n(claimed, __ATOMIC_RELAXED), size;
    do {
        if (at >= total) return 0;
        size = (total - at) / (2 * threads);
        size = size > 1 ? size : 1;
    } while (!__atomic_compare_exchange_n(claimed, &at, at + size, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    *first = at;
    *last = at + size;
    return 1;
}

/* Before the pairs [first, last) are attended: their cache rows at pos fetched (to be written), and the first
 * PREFETCH bytes of their keys and values asked for. Each pair's two streams start cold; met one after the
 * other, each start waits a round trip to memory, asked for together the round trips overlap. */
static TARGET void prefetch_pairs(const BlockJob *j, int first, int last) {
    const int es = ELEMENT_SIZE(j->dt), row = j->C / j->nh * es;
    const Py_ssize_t held = (Py_ssize_t)(j->pos + 1) * j->kv_ss * es; /* bytes from the first key past the last */
    for (int i = first; i < last; i++) {
        const Py_ssize_t base = ((Py_ssize_t)(i / j->nh) * j->kv_sb + (i % j->nh) * j->kv_sh) * es;
        const Py_ssize_t at = base + (Py_ssize_t)j->pos * j->kv_ss * es;
        for (int d = 0; d < row; d += 64) {
            _mm_prefetch(j->k + at + d, _MM_HINT_T0);
            _mm_prefetch(j->v + at + d, _MM_HINT_T0);
        }
        for (Py_ssize_t d = 0; d < PREFETCH && d < held; d += 64) {
            _mm_prefetch(j->k + base + d, _MM_HINT_T0);
            _mm_prefetch(j->v + base + d, _MM_HINT_T1);
        }
    }
}

/* layer i of the block (0 qkv, 1 proj, 2 fc, 3 out) over its input `in` (M, K), in chunks of column blocks
 * claimed in turn; int8 weights take the input as quantize_rows left it */
static TARGET void block_linear(BlockJob *j, int i, const float *in, int K, int N, int act, float *out,
                                int ldo, int threads) {
    int first, last;
    while (claim(&j->claimed[i], (N + 15) / 16, threads, &first, &last)) {
        if (j->wt == I8) {
            const QuantRows rows = block_rows(j, K);
            linear_blocks_i8(&rows, j->M, K, j->w[i], N, j->s[i], j->b[i], act, out, ldo, first, last);
        } else {
            linear_blocks(in, K, j->M, K, j->w[i], N, j->b[i], act, out, ldo, first, last, j->avx512, j->wt);
        }
    }
}

static TARGET int block_share(BlockJob *j, int t, int n) {
    const int M = j->M, C = j->C, hs = C / j->nh;
    int first, last, failed = 0;
    share(M, t, n, &first, &last);
    rms_rows(j->x, C, j->ln1, j->eps, j->xn, first, last);
    if (j->wt == I8) quantize_rows(block_rows(j, C), j->xn, C, first, last);
    BARRIER();
    block_linear(j, 0, j->xn, C, 3 * C, 0, j->qkv, 3 * C, n);
    BARRIER();
    Job att = {j->qkv, j->k, j->v, j->y, 3 * C, hs, j->kv_sb, j->kv_sh, j->kv_ss, C, hs, j->nh, hs, j->pos + 1,
               j->dt, (float)(1.0 / sqrt((double)hs)), j->ks, j->vs, j->s_sb, j->s_sh, 0, 0, 0};
    /* a pair's new key and value are read by its own attention alone: written just before it */
    while (!att.failed && claim(&j->claimed[4], M * j->nh, n, &att.first, &att.last)) {
        prefetch_pairs(j, att.first, att.last);
        write_cache(j, att.first, att.last);
        attend(&att);
    }
    failed |= att.failed;
    BARRIER();
    if (j->wt == I8) { /* an image's heads may come from both threads: its row is whole only now */
        share(M, t, n, &first, &last);
        quantize_rows(block_rows(j, C), j->y, C, first, last);
        BARRIER();
    }
    block_linear(j, 1, j->y, C, C, 2, j->x, C, n);
    BARRIER();
    share(M, t, n, &first, &last);
    rms_rows(j->x, C, j->ln2, j->eps, j->xn, first, last);
    if (j->wt == I8) quantize_rows(block_rows(j, C), j->xn, C, first, last);
    BARRIER();
    block_linear(j, 2, j->xn, C, j->N_fc, 1, j->h, j->N_fc, n);
    BARRIER();
    if (j->wt == I8) {
        share(M, t, n, &first, &last);
        quantize_rows(block_rows(j, j->N_fc), j->h, j->N_fc, first, last);
        BARRIER();
    }
    block_linear(j, 3, j->h, j->N_fc, C, 2, j->x, C, n);
    return failed;
}

static int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* whether the CPU (and the OS, which must save the zmm registers: libgcc checks both) runs AVX-512F */
static int cpu_avx512(void) {
    __builtin_cpu_init();
    return cpu_supported() && __builtin_cpu_supports("avx512f");
}
#else
#define IMAGEGPT_AVX2 0
static int cpu_supported(void) { return 0; }
static int cpu_avx512(void) { return 0; }
#endif

/* 0 after setting an exception unless the kernels run here, and AVX-512F too where `avx512` asks for it */
static int check_cpu(int avx512) {
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "imagegpt.cpu._kernels needs an x86-64 CPU with AVX2, FMA and F16C");
        return 0;
    }
    if (avx512 && !cpu_avx512()) {
        PyErr_SetString(PyExc_RuntimeError, "imagegpt.cpu._kernels: this CPU lacks AVX-512F (avx512 must be 0)");
        return 0;
    }
    return 1;
}

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, ks, vs, out;
    Py_ssize_t q_sb, q_sh, kv_sb, kv_sh, kv_ss, s_sb, s_sh, o_sb, o_sh;
    int batch, nh, hs, length, dt, threads;
    float scale;
    if (!PyArg_ParseTuple(args, "KnnKKnnnKKnnKnniiiiifi", &q, &q_sb, &q_sh, &k, &v, &kv_sb, &kv_sh, &kv_ss, &ks,
                          &vs, &s_sb, &s_sh, &out, &o_sb, &o_sh, &batch, &nh, &hs, &length, &dt, &scale,
                          &threads))
        return NULL;
    if (!check_cpu(0)) return NULL;
    if (batch < 0 || nh < 1 || hs < 8 || hs % 8 != 0 || length < 1 || dt < 0 || dt > 3 ||
        (dt == 3 && (ks == 0 || vs == 0))) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: bad shape, dtype code or int8 scales");
        return NULL;
    }
#if IMAGEGPT_AVX2
    const int pairs = batch * nh;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    Job job = {(const float *)(uintptr_t)q, (const char *)(uintptr_t)k, (const char *)(uintptr_t)v,
               (float *)(uintptr_t)out, q_sb, q_sh, kv_sb, kv_sh, kv_ss, o_sb, o_sh, nh, hs, length, dt,
               scale, (const float *)(uintptr_t)ks, (const float *)(uintptr_t)vs, s_sb, s_sh, 0, pairs, 0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
#ifdef _OPENMP
    /* PyTorch's own OpenMP pool when torch loaded libgomp.so.1 first (imagegpt.cpu.ops imports torch
     * first): its threads are awake right after the step's matrix multiplies, and no second pool competes
     * with them for the cores. */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Job mine = job;
        share(pairs, omp_get_thread_num(), omp_get_num_threads(), &mine.first, &mine.last);
        attend(&mine);
        failed |= mine.failed;
    }
#else /* no OpenMP (setup.py uses it on Linux): one thread */
    attend(&job);
    failed = job.failed;
#endif
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *pack_linear(PyObject *self, PyObject *args) {
    unsigned long long w, packed;
    int N, K;
    Py_ssize_t ldw;
    float scale;
    if (!PyArg_ParseTuple(args, "KiinfK", &w, &N, &K, &ldw, &scale, &packed)) return NULL;
    if (N < 1 || K < 1 || ldw < K) {
        PyErr_SetString(PyExc_ValueError, "pack_linear: bad shape");
        return NULL;
    }
    const float *W = (const float *)(uintptr_t)w;
    float *P = (float *)(uintptr_t)packed;
    const int blocks = (N + 15) / 16;
    Py_BEGIN_ALLOW_THREADS;
    /* row by row of W (contiguous reads); a block's 16 rows fill its [K][16] lines while they are in cache */
#pragma omp parallel for schedule(static)
    for (int nb = 0; nb < blocks; nb++) {
        float *block = P + (Py_ssize_t)nb * K * 16;
        for (int j = 0; j < 16; j++) {
            const int n = 16 * nb + j;
            const float *row = W + (Py_ssize_t)n * ldw;
            for (int k = 0; k < K; k++) block[16 * k + j] = n < N ? row[k] * scale : 0.0f;
        }
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* pack_linear_int8: weight (N, K) * scale, each row (an output column) quantized as quantize_row quantizes
 * (imagegpt.model.quantize_int8's numbers), into column blocks of 16, each [K / 4][16][4] bytes, and the
 * column scales; the padding columns are zeros with scale 0. K a multiple of 8. */
static PyObject *pack_linear_int8(PyObject *self, PyObject *args) {
    unsigned long long w, packed, scales;
    int N, K;
    Py_ssize_t ldw;
    float scale;
    if (!PyArg_ParseTuple(args, "KiinfKK", &w, &N, &K, &ldw, &scale, &packed, &scales)) return NULL;
    if (!check_cpu(0)) return NULL;
    if (N < 1 || K < 8 || K % 8 != 0 || ldw < K) {
        PyErr_SetString(PyExc_ValueError, "pack_linear_int8: bad shape");
        return NULL;
    }
#if IMAGEGPT_AVX2
    const float *W = (const float *)(uintptr_t)w;
    int8_t *P = (int8_t *)(uintptr_t)packed;
    float *S = (float *)(uintptr_t)scales;
    const int blocks = (N + 15) / 16;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
#pragma omp parallel reduction(| : failed)
    {
        float *row = malloc((size_t)K * (sizeof(float) + 1)); /* a scaled weight row, then its int8 */
        int8_t *q = (int8_t *)(row + K);
        failed = row == NULL;
#pragma omp for schedule(static)
        for (int nb = 0; nb < blocks; nb++) {
            if (row == NULL) continue;
            int8_t *block = P + (Py_ssize_t)nb * K * 16;
            for (int j = 0; j < 16; j++) {
                const int n = 16 * nb + j;
                if (n < N) {
                    for (int k = 0; k < K; k++) row[k] = W[(Py_ssize_t)n * ldw + k] * scale;
                    quantize_row(row, K, q, S + n);
                } else {
                    for (int k = 0; k < K; k++) q[k] = 0;
                    S[n] = 0.0f;
                }
                for (int k = 0; k < K; k++) block[16 * (k & ~3) + 4 * j + (k & 3)] = q[k];
            }
        }
        free(row);
    }
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *packed_linear(PyObject *self, PyObject *args) {
    unsigned long long x, packed, bias, out, scales;
    Py_ssize_t ldx, ldo;
    int M, K, N, act, threads, avx512, wt;
    if (!PyArg_ParseTuple(args, "KniiKiKiKnKiii", &x, &ldx, &M, &K, &packed, &N, &bias, &act, &out, &ldo,
                          &scales, &threads, &avx512, &wt))
        return NULL;
    if (!check_cpu(avx512)) return NULL;
    if (M < 0 || K < 1 || N < 1 || ldx < K || ldo < N || act < 0 || act > 2 || (scales && K % 8 != 0) ||
        (scales ? wt != I8 : wt != F32 && wt != BF16)) {
        PyErr_SetString(PyExc_ValueError, "packed_linear: bad shape, activation or weight dtype code");
        return NULL;
    }
#if IMAGEGPT_AVX2
    const float *X = (const float *)(uintptr_t)x, *B = (const float *)(uintptr_t)bias;
    const float *S = (const float *)(uintptr_t)scales;
    float *O = (float *)(uintptr_t)out;
    QuantRows rows = {NULL, NULL, NULL, K}; /* int8 weights (scales given): x quantized here */
    if (S != NULL && M > 0) {
        char *buffer = malloc((size_t)M * (2 * (size_t)K + 4));
        if (buffer == NULL) return PyErr_NoMemory();
        rows.q = (const int8_t *)buffer;
        rows.a = (const uint8_t *)(buffer + (size_t)M * K);
        rows.s = (const float *)(buffer + 2 * (size_t)M * K);
    }
    const int blocks = (N + 15) / 16;
    if (threads > blocks) threads = blocks;
    if (threads < 1) threads = 1;
    Py_BEGIN_ALLOW_THREADS;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        int first, last, t = omp_get_thread_num(), n = omp_get_num_threads();
        if (S != NULL) {
            share(M, t, n, &first, &last);
            quantize_rows(rows, X, ldx, first, last);
#pragma omp barrier
        }
        share(blocks, t, n, &first, &last);
        if (S != NULL)
            linear_blocks_i8(&rows, M, K, (const int8_t *)(uintptr_t)packed, N, S, B, act, O, ldo, first, last);
        else
            linear_blocks(X, ldx, M, K, (const void *)(uintptr_t)packed, N, B, act, O, ldo, first, last, avx512,
                          wt);
    }
#else
    if (S != NULL) {
        quantize_rows(rows, X, ldx, 0, M);
        linear_blocks_i8(&rows, M, K, (const int8_t *)(uintptr_t)packed, N, S, B, act, O, ldo, 0, blocks);
    } else {
        linear_blocks(X, ldx, M, K, (const void *)(uintptr_t)packed, N, B, act, O, ldo, 0, blocks, avx512, wt);
    }
#endif
    Py_END_ALLOW_THREADS;
    free((void *)rows.q);
#endif
    Py_RETURN_NONE;
}

/* decode_blocks: `layers` blocks one after another (one parallel region, a barrier between blocks), their
 * operands in a table of TABLE_WIDTH pointers per block (imagegpt.cpu.ops.decode_blocks): ln1, ln2, then
 * (w, b, s) of qkv, proj, fc and out, then k, v, ks, vs. Every block has the same shapes and cache layout. */
enum { TABLE_WIDTH = 18 };

static PyObject *decode_blocks(PyObject *self, PyObject *args) {
    unsigned long long x, table, scratch, qscratch, final;
    int M, C, nh, N_fc, wt, layers, dt, pos, threads, avx512;
    float eps;
    Py_ssize_t kv_sb, kv_sh, kv_ss, s_sb, s_sh;
    if (!PyArg_ParseTuple(args, "KiiifiiiinnnnnKiKKiiK", &x, &M, &C, &nh, &eps, &N_fc, &wt, &layers, &dt, &kv_sb,
                          &kv_sh, &kv_ss, &s_sb, &s_sh, &table, &pos, &scratch, &qscratch, &threads, &avx512,
                          &final))
        return NULL;
    if (!check_cpu(avx512)) return NULL;
    const unsigned long long *T = (const unsigned long long *)(uintptr_t)table;
    const int wq = wt == I8;
    int bad = (wt != F32 && wt != BF16 && !wq) || M < 1 || layers < 1 || nh < 1 || C < 8 || C % nh != 0 ||
              (C / nh) % 8 != 0 || N_fc < 1 || dt < 0 || dt > 3 || pos < 0 || kv_ss < C / nh ||
              (wq && (N_fc % 8 != 0 || qscratch == 0));
    for (int l = 0; !bad && l < layers; l++) {
        const unsigned long long *p = T + (Py_ssize_t)l * TABLE_WIDTH;
        bad = (dt == I8 && (p[16] == 0 || p[17] == 0)) || (wq && (!p[4] || !p[7] || !p[10] || !p[13]));
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "decode_blocks: bad shape, dtype code or int8 operands");
        return NULL;
    }
#if IMAGEGPT_AVX2
    BlockJob *jobs = calloc((size_t)layers, sizeof(BlockJob));
    if (jobs == NULL) return PyErr_NoMemory();
    float *S = (float *)(uintptr_t)scratch;
    const Py_ssize_t widest = C > N_fc ? C : N_fc;
    int8_t *Q = (int8_t *)(uintptr_t)qscratch;
    for (int l = 0; l < layers; l++) {
        const unsigned long long *p = T + (Py_ssize_t)l * TABLE_WIDTH;
        BlockJob job = {(float *)(uintptr_t)x, M, C, nh, N_fc, dt, pos, wt, avx512,
                        (const float *)(uintptr_t)p[0], (const float *)(uintptr_t)p[1], eps, {0}, {0}, {0},
                        (char *)(uintptr_t)p[14], (char *)(uintptr_t)p[15], kv_sb, kv_sh, kv_ss,
                        (float *)(uintptr_t)p[16], (float *)(uintptr_t)p[17], s_sb, s_sh, S,
                        S + (Py_ssize_t)M * C, S + (Py_ssize_t)M * 4 * C, S + (Py_ssize_t)M * 5 * C, Q,
                        (uint8_t *)(Q + M * widest), (float *)(uintptr_t)(Q + 2 * M * widest), {0}};
        for (int i = 0; i < 4; i++) {
            job.w[i] = (const void *)(uintptr_t)p[2 + 3 * i];
            job.b[i] = (const float *)(uintptr_t)p[3 + 3 * i];
            job.s[i] = (const float *)(uintptr_t)p[4 + 3 * i];
        }
        jobs[l] = job;
    }
    if (threads < 1) threads = 1;
    float *X = (float *)(uintptr_t)x;
    const float *G = (const float *)(uintptr_t)final;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        for (int l = 0; l < layers; l++) {
            failed |= block_share(&jobs[l], t, n);
            BARRIER(); /* block l's output rows are whole before block l + 1 reads them */
        }
        if (final) { /* the final norm, in place: each row's mean square is taken before it is written */
            int first, last;
            share(M, t, n, &first, &last);
            rms_rows(X, C, G, eps, X, first, last);
        }
    }
#else
    for (int l = 0; l < layers; l++) failed |= block_share(&jobs[l], 0, 1);
    if (final) rms_rows(X, C, G, eps, X, 0, M);
#endif
    Py_END_ALLOW_THREADS;
    free(jobs);
    if (failed) return PyErr_NoMemory();
#endif
    Py_RETURN_NONE;
}

static PyObject *supported(PyObject *self, PyObject *args) { return PyBool_FromLong(cpu_supported()); }

static PyObject *supports_avx512(PyObject *self, PyObject *args) { return PyBool_FromLong(cpu_avx512()); }

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(q, q_sb, q_sh, k, v, kv_sb, kv_sh, kv_ss, k_scale, v_scale, s_sb, s_sh, out, o_sb, o_sh, "
     "batch, nh, hs, length, dtype_code, scale, threads): one-token attention over a KV cache (int8: with its "
     "rows' scales), on raw pointers (see imagegpt.cpu.ops)."},
    {"pack_linear", pack_linear, METH_VARARGS,
     "pack_linear(weight, N, K, ldw, scale, packed): weight (N, K) * scale into column blocks of 16, "
     "[ceil(N / 16)][K][16] floats, zero-padded (see imagegpt.cpu.ops)."},
    {"pack_linear_int8", pack_linear_int8, METH_VARARGS,
     "pack_linear_int8(weight, N, K, ldw, scale, packed, scales): weight (N, K) * scale quantized per row "
     "into int8 column blocks of 16, [ceil(N / 16)][K / 4][16][4] bytes, and the rows' scales (see "
     "imagegpt.cpu.ops)."},
    {"packed_linear", packed_linear, METH_VARARGS,
     "packed_linear(x, ldx, M, K, packed, N, bias, act, out, ldo, scales, threads, avx512, weight_code): out "
     "(M, N) = act(x (M, K) W^T + bias) on a packed weight and a bias padded to the blocks; act 0 none, 1 "
     "silu, 2 none added to out; weight_code 0 float32 or 1 bfloat16 (pack_linear's layout), or 3 int8 "
     "(pack_linear_int8) with scales (not 0), its column scales, x then quantized per row; avx512 (not 0): "
     "float weights take the AVX-512F tiles (supports_avx512())."},
    {"decode_blocks", decode_blocks, METH_VARARGS,
     "decode_blocks(x, M, C, nh, eps, N_fc, weight_code, layers, dtype_code, kv_sb, kv_sh, kv_ss, s_sb, "
     "s_sh, table, pos, scratch, int8_scratch, threads, avx512, final_norm): `layers` transformer blocks for "
     "one new token per image, in place on x (M, C), each writing its key and value into its cache at pos "
     "(int8: with their scales), then x normed by final_norm's C weights (0: not); table: 18 pointers per "
     "block (ln1, ln2, (w, b, s) of qkv, proj, fc and out, k, v, k_scale, v_scale); scratch holds M (5 C + "
     "N_fc) floats, int8_scratch (weight_code 3, int8) 2 M max(C, N_fc) + 4 M bytes (see imagegpt.cpu.ops)."},
    {"supported", supported, METH_NOARGS, "whether this CPU can run the kernels"},
    {"supports_avx512", supports_avx512, METH_NOARGS,
     "whether this CPU runs the AVX-512F paths (packed_linear's and decode_blocks' avx512 argument)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
