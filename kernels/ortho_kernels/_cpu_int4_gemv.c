/* Fused dual-stream GEMV for small M on x86-64 CPUs with AVX2 + FMA + F16C.
 *
 *   Y[m, n] = sum_g s[n,g] * (sum_{k in g} q[n,k] * X~[m,k]  -  z[n,g] * sum_{k in g} X~[m,k])
 *           + alpha * sum_{j in row n} v_j * X[m, col_j]            (only when crow != NULL)
 *
 * which is X~ . dequant(W_base)^T + alpha . X . W_ortho^T with dequant(q) = (q - z) * s.
 * Operands are ortho-train's own storage, read in place (no repacking):
 *   q       uint8 (N, ceil(K/2)), two codes per byte, even k in the low nibble
 *   s, z    fp16 (N, G), G = ceil(K / group)
 *   crow    int32 (N+1), col int32 (nnz), val fp16 (nnz): CSR of the ortho stream
 *   x       fp32 (M, K) contiguous, y fp32 (M, N)
 *
 * Activations: X~ is X in 16-bit fixed point per 64-element superblock (x16 = round(x * 32767
 * / max|x|), X~ = x16 * max|x| / 32767: relative error <= 2^-16 of the superblock's largest
 * |x|, about 256x finer than the bf16 activations of torch's INT4 op). The dense K-loop is
 * then integer: nibbles widened to int16 and multiplied with x16 by vpmaddwd into int32,
 * converted to fp32 once per superblock. A superblock is 32 bytes: two 32-code blocks, each
 * with its even k in the low nibbles and odd k in the high ones; x16 is laid out to match the
 * in-lane unpack order (see prepare_x), so the loop has no shuffles. K beyond the last whole
 * superblock and the sparse term use the exact fp32 X. The zero term uses sum X~ of the same
 * X~, so the result is exactly the product with X~ up to fp32 rounding.
 * `ortho_int4_gemv_mode` with mode 1 or 2 rounds X to int8 instead (llama.cpp's Q8 activations,
 * 2^-8 of the superblock's largest |x|, dotted by vpmaddubsw or AVX-512 VNNI: _cpu_q8_dot.c).
 * group must be a multiple of 64. Rows are split in small chunks over the non-spinning pool
 * of _cpu_pool.c, with the thread count the caller passes (torch.get_num_threads()).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "_cpu_pool.h"
#include "_cpu_q8_dot.h"

#define SB 64 /* weights per superblock */

static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* Position of weight k (0..63 inside a superblock) in the x16 layout. Byte j of the 32 holds
 * k = 2j (low nibble) and 2j+1 (high nibble) of block j/16. The loop forms four int16 vectors
 * (lo nibbles unpacked low/high, hi nibbles unpacked low/high); each 256-bit vector holds
 * bytes 0-7 (or 8-15) of block 0 in its lower lane and of block 1 in its upper lane. */
static inline int x16_slot(int k) {
    int block = k / 32, j = (k % 32) / 2, odd = k & 1;
    int vec = 2 * odd + (j >= 8);   /* lo-unpacklo, lo-unpackhi, hi-unpacklo, hi-unpackhi */
    return vec * 16 + block * 8 + (j % 8);
}

/* One row of X: x16 (K / SB superblocks of 64 int16, in x16_slot order), the per-superblock
 * scale sx = max|x| / 32767, and per-group sums of X~ (exact fp32 X on the ragged tail). */
static void prepare_x(const float *x, int K, int group, int G, int16_t *x16, float *sx,
                      float *xsum) {
    const int full = K / SB;
    for (int g = 0; g < G; ++g) xsum[g] = 0.f;
    for (int b = 0; b < full; ++b) {
        const float *src = x + SB * b;
        float scale, inv;
        block_scale(src, SB, 32767.f, &scale, &inv);
        int32_t total = 0;
        for (int i = 0; i < SB; ++i) {
            int16_t v = (int16_t)lrintf(src[i] * inv);
            x16[SB * b + x16_slot(i)] = v;
            total += v;
        }
        sx[b] = scale;
        xsum[(SB * b) / group] += scale * (float)total;
    }
    for (int k = SB * full; k < K; ++k) xsum[k / group] += x[k];
}

static float row_dot(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow,
                     const float *x, const int16_t *x16, const float *sx, const float *xsum,
                     int K, int group, int G) {
    const __m256i nib = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const int full = K / SB, per_group = group / SB;
    __m256 total = _mm256_setzero_ps();
    float zterm = 0.f, tail = 0.f;
    for (int g = 0; g < G; ++g) {
        const float s = half_to_float(srow[g]);
        zterm += s * half_to_float(zrow[g]) * xsum[g];
        int b0 = g * per_group, b1 = b0 + per_group < full ? b0 + per_group : full;
        __m256 acc = _mm256_setzero_ps();
        for (int b = b0; b < b1; ++b) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qrow + 32 * b));
            __m256i lo = _mm256_and_si256(v, nib);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
            const __m256i *xb = (const __m256i *)(x16 + SB * b);
            __m256i p0 = _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), _mm256_loadu_si256(xb));
            __m256i p1 = _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), _mm256_loadu_si256(xb + 1));
            __m256i p2 = _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), _mm256_loadu_si256(xb + 2));
            __m256i p3 = _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), _mm256_loadu_si256(xb + 3));
            __m256i isum = _mm256_add_epi32(_mm256_add_epi32(p0, p1), _mm256_add_epi32(p2, p3));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(sx + b), acc);
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(s), acc, total);
        int k0 = SB * full > g * group ? SB * full : g * group;  /* ragged tail: exact fp32 */
        int k1 = g * group + group < K ? g * group + group : K;
        if (k0 < k1) {
            float t = 0.f;
            for (int k = k0; k < k1; ++k) t += (float)((qrow[k >> 1] >> (4 * (k & 1))) & 0x0F) * x[k];
            tail += s * t;
        }
    }
    return hsum256(total) + tail - zterm;
}

/* sum_{j0 <= j < j1} val[j] * x[col[j]]: 8 entries per step. X is gathered with 8 scalar
 * loads, not vpgatherdps: on AMD Zen the gather instruction is microcoded and this loop ran
 * ~1.4x slower with it (standalone 4096 rows x 41 entries: 0.108 vs 0.078 ms, best of 7). */
static float sparse_row_dot(const int32_t *col, const uint16_t *val, int j0, int j1,
                            const float *x) {
    __m256 acc = _mm256_setzero_ps();
    int j = j0;
    for (; j + 8 <= j1; j += 8) {
        const int32_t *c = col + j;
        __m256 xv = _mm256_set_ps(x[c[7]], x[c[6]], x[c[5]], x[c[4]], x[c[3]], x[c[2]], x[c[1]], x[c[0]]);
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(val + j)));
        acc = _mm256_fmadd_ps(v, xv, acc);
    }
    float tail = 0.f;
    for (; j < j1; ++j) tail += half_to_float(val[j]) * x[col[j]];
    return hsum256(acc) + tail;
}

/* Everything one call shares across threads: operands, prepared X, and the row split. */
typedef struct {
    const uint8_t *q;
    const uint16_t *s, *z;
    int M, N, K, group, G, row_bytes, full, rows_per_chunk;
    const float *x, *sx, *xsum;
    const int16_t *x16;
    const int8_t *x8;  /* mode 1, 2: X in int8 (same strides as x16) */
    int mode;          /* 0 int16 X; 1 int8 X, AVX2; 2 int8 X, AVX-512 VNNI */
    float *y;
    const int32_t *crow, *col;
    const uint16_t *val;
    float alpha;
} gemv_job;

/* Output rows [n0, n1) for every row of X: the same arithmetic whichever thread runs it,
 * so the result does not depend on the thread count or on which thread took a chunk.
 * The sparse term runs in a second pass over the chunk, after its dense rows: its loads of X
 * are at random columns, and interleaved with the dense rows' stream of packed codes (2 KiB
 * per row at K = 4096, prefetched from DRAM into L2 ahead of use) they found X evicted: with
 * cold caches alpha = 1 at rho = 1% cost 1.9x alpha = 0 on an AMD EPYC (Zen 4), against 1.1x
 * for the same entries at consecutive columns. After the dense pass the chunk's X row stays in
 * L1 for all its sparse rows. Each output is still dense + alpha * sparse, in that order. */
static void gemv_rows(const gemv_job *j, int n0, int n1) {
    const size_t xstride = (size_t)SB * (j->full + 1), sstride = (size_t)j->full + 1;
    for (int n = n0; n < n1; ++n) {
        const uint8_t *qrow = j->q + (size_t)n * j->row_bytes;
        for (int m = 0; m < j->M; ++m) {
            const float *xm = j->x + (size_t)m * j->K;
            if (j->mode) {
                j->y[(size_t)m * j->N + n] = q8_row_dot(
                    qrow, j->s + (size_t)n * j->G, j->z + (size_t)n * j->G, xm, j->x8 + m * xstride,
                    j->sx + m * sstride, j->xsum + (size_t)m * j->G, j->K, j->group, j->G, j->mode == 2);
                continue;
            }
            j->y[(size_t)m * j->N + n] = row_dot(qrow, j->s + (size_t)n * j->G, j->z + (size_t)n * j->G, xm,
                                                 j->x16 + m * xstride, j->sx + m * sstride,
                                                 j->xsum + (size_t)m * j->G, j->K, j->group, j->G);
        }
    }
    if (!j->crow) return;
    for (int m = 0; m < j->M; ++m) {
        const float *xm = j->x + (size_t)m * j->K;
        float *ym = j->y + (size_t)m * j->N;
        for (int n = n0; n < n1; ++n)
            ym[n] += j->alpha * sparse_row_dot(j->col, j->val, j->crow[n], j->crow[n + 1], xm);
    }
}

static void gemv_chunk(void *ctx, int chunk) {
    const gemv_job *j = (const gemv_job *)ctx;
    int n0 = chunk * j->rows_per_chunk, n1 = n0 + j->rows_per_chunk;
    gemv_rows(j, n0, n1 < j->N ? n1 : j->N);
}

/* Rows per chunk: ~128 KiB of packed weights (a few microseconds of work), so that claiming
 * a chunk (one atomic on a shared line) costs ~1% and a thread that loses its core holds
 * back at most one small chunk. */
static int chunk_rows(int row_bytes, int M) {
    int rows = 131072 / (row_bytes * (M < 4 ? 1 : M / 4) + 1);
    rows = rows < 8 ? 8 : rows;
    return (rows + 7) / 8 * 8;
}

/* Prepares X (serial: O(M*K), small next to the O(N*K) rows) and fills the job. Returns the
 * workspace to free, or NULL when it could not be allocated. */
static void *gemv_setup(gemv_job *j, const uint8_t *q, const uint16_t *s, const uint16_t *z,
                        int M, int N, int K, int group, const float *x, float *y,
                        const int32_t *crow, const int32_t *col, const uint16_t *val, float alpha,
                        int mode) {
    const int G = (K + group - 1) / group, full = K / SB;
    const size_t x_len = (size_t)M * SB * (full + 1), x_bytes = x_len * (mode ? 1 : 2);
    size_t bytes = (x_bytes + 63) / 64 * 64 + (size_t)M * (full + 1 + G) * sizeof(float);
    void *work = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!work) return NULL;
    int16_t *x16 = (int16_t *)work;
    int8_t *x8 = (int8_t *)work;
    float *sx = (float *)((char *)work + (x_bytes + 63) / 64 * 64), *xsum = sx + (size_t)M * (full + 1);
    for (int m = 0; m < M; ++m) {
        const float *xm = x + (size_t)m * K;
        float *sxm = sx + (size_t)m * (full + 1), *xsm = xsum + (size_t)m * G;
        if (mode)
            q8_prepare_x(xm, K, group, G, x8 + (size_t)m * SB * (full + 1), sxm, xsm);
        else
            prepare_x(xm, K, group, G, x16 + (size_t)m * SB * (full + 1), sxm, xsm);
    }
    *j = (gemv_job){q, s, z, M, N, K, group, G, (K + 1) / 2, full, 0, x, sx, xsum, x16, x8, mode,
                    y, crow, col, val, alpha};
    j->rows_per_chunk = chunk_rows(j->row_bytes, M);
    return work;
}

/* Returns 0 on success, 1 when the workspace could not be allocated, 2 for a bad mode. Rows
 * are split over up to n_threads threads of the non-spinning pool (_cpu_pool.c). mode: 0 X in
 * int16, 1 X in int8 with AVX2, 2 X in int8 with AVX-512 VNNI (the caller checked the CPU). */
int ortho_int4_gemv_mode(const uint8_t *q, const uint16_t *s, const uint16_t *z,
                         int M, int N, int K, int group,
                         const float *x, float *y,
                         const int32_t *crow, const int32_t *col, const uint16_t *val, float alpha,
                         int n_threads, int mode) {
    if (mode < 0 || mode > 2) return 2;
    gemv_job j;
    void *work = gemv_setup(&j, q, s, z, M, N, K, group, x, y, crow, col, val, alpha, mode);
    if (!work) return 1;
    pool_run((N + j.rows_per_chunk - 1) / j.rows_per_chunk, n_threads, gemv_chunk, &j);
    free(work);
    return 0;
}

int ortho_int4_gemv(const uint8_t *q, const uint16_t *s, const uint16_t *z,
                    int M, int N, int K, int group,
                    const float *x, float *y,
                    const int32_t *crow, const int32_t *col, const uint16_t *val, float alpha,
                    int n_threads) {
    return ortho_int4_gemv_mode(q, s, z, M, N, K, group, x, y, crow, col, val, alpha, n_threads, 0);
}

#ifdef _OPENMP
/* The same GEMV with the rows split by an OpenMP static schedule: what this library did
 * before the pool, kept so the benchmark can show both under load. Only in the separate
 * build with -fopenmp (cpu_gemv.omp_library); the op's library has no OpenMP runtime. */
int ortho_int4_gemv_omp(const uint8_t *q, const uint16_t *s, const uint16_t *z,
                        int M, int N, int K, int group,
                        const float *x, float *y,
                        const int32_t *crow, const int32_t *col, const uint16_t *val, float alpha,
                        int n_threads) {
    gemv_job j;
    void *work = gemv_setup(&j, q, s, z, M, N, K, group, x, y, crow, col, val, alpha, 0);
    if (!work) return 1;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int n = 0; n < N; ++n) gemv_rows(&j, n, n + 1);
    free(work);
    return 0;
}
#endif

typedef struct {
    const uint8_t *q;
    const uint16_t *s, *z;
    int n0, K, group, G, row_bytes, rows_per_chunk, n1;
    float *out;
} dequant_job;

/* (q - z) * s in fp32 for rows of one chunk: exact (|q - z| <= 15 times an fp16 scale fits
 * in fp32's 24 bits), hence bit for bit `kernels.packing.group_dequantise`. */
static void dequant_chunk(void *ctx, int chunk) {
    const dequant_job *j = (const dequant_job *)ctx;
    int r0 = j->n0 + chunk * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->n1) r1 = j->n1;
    for (int n = r0; n < r1; ++n) {
        const uint8_t *qrow = j->q + (size_t)n * j->row_bytes;
        float *o = j->out + (size_t)(n - j->n0) * j->K;
        for (int g = 0; g < j->G; ++g) {
            const float sc = half_to_float(j->s[(size_t)n * j->G + g]);
            const float zs = half_to_float(j->z[(size_t)n * j->G + g]);
            int k1 = (g + 1) * j->group < j->K ? (g + 1) * j->group : j->K;
            int k = g * j->group;
            if (!(k & 1)) { /* 16 codes (8 bytes) at a time: the same (q - z)·s, sub then mul */
                const __m256 vs = _mm256_set1_ps(sc), vz = _mm256_set1_ps(zs);
                const __m128i low4 = _mm_set1_epi8(0x0F);
                for (; k + 16 <= k1; k += 16) {
                    __m128i b = _mm_loadl_epi64((const __m128i *)(qrow + (k >> 1)));
                    __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, low4),   /* codes k..k+15, */
                                                  _mm_and_si128(_mm_srli_epi16(b, 4), low4)); /* in order */
                    __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
                    __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
                    _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(f0, vz), vs));
                    _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(_mm256_sub_ps(f1, vz), vs));
                }
            }
            for (; k < k1; ++k) /* an odd group start, or the tail of a group */
                o[k] = ((float)((qrow[k >> 1] >> (4 * (k & 1))) & 0x0F) - zs) * sc;
        }
    }
}

/* Dense fp32 rows [n0, n1) of dequant(base) into out ((n1 - n0), K), on the pool. */
void ortho_int4_dequant(const uint8_t *q, const uint16_t *s, const uint16_t *z, int n0, int n1,
                        int K, int group, float *out, int n_threads) {
    dequant_job j = {q, s, z, n0, K, group, (K + group - 1) / group, (K + 1) / 2, 0, n1, out};
    j.rows_per_chunk = chunk_rows(K * 4, 1);
    pool_run((n1 - n0 + j.rows_per_chunk - 1) / j.rows_per_chunk, n_threads, dequant_chunk, &j);
}
