/* The INT4 GEMV's row dot with X in int8 per 64-element superblock, as llama.cpp's Q8 blocks:
 *
 *   x8 = round(x * 127 / max_b|x|),  X~ = x8 * max_b|x| / 127,  |X~ - x| <= max_b|x| / 254
 *
 * (the error-bound derivation is in ortho_kernels/error_bounds.py, "gemv_int8"). The codes are
 * unsigned 4-bit and x8 signed 8-bit, which is exactly the operand pair of the u8 x s8 dot
 * instructions: AVX-512 VNNI vpdpbusd (4 products summed into each int32 lane, one
 * instruction per 32 weights, on 256-bit vectors) where the CPU has it, else AVX2 vpmaddubsw (pairs into int16:
 * |2 * 15 * 127| = 3810, two of them summed 7620, far from int16 saturation) then vpmaddwd by
 * ones into int32. Both give the same exact int32 per superblock, so the result does not
 * depend on the instruction set. Layout: superblock b is bytes 32b..32b+31 of the packed row,
 * byte j holding local k = 2j (low nibble) and 2j+1 (high nibble); x8 stores per superblock
 * the 32 even-k values then the 32 odd-k values, to match the low/high nibble vectors with
 * no shuffle. Per group: s * (sum_b sx_b * sum_k q x8 - z * sum X~); the ragged K tail (past
 * the last whole superblock) uses fp32 X, as the int16 path.
 */
#include <immintrin.h>
#include <math.h>

#include "_cpu_q8_dot.h"

void q8_prepare_x(const float *x, int K, int group, int G, int8_t *x8, float *sx, float *xsum) {
    const int full = K / Q8_SB;
    for (int g = 0; g < G; ++g) xsum[g] = 0.f;
    for (int b = 0; b < full; ++b) {
        const float *src = x + Q8_SB * b;
        float scale, inv;
        block_scale(src, Q8_SB, 127.f, &scale, &inv);
        int32_t total = 0;
        for (int i = 0; i < Q8_SB; ++i) {
            int v = (int)lrintf(src[i] * inv);
            v = v > 127 ? 127 : (v < -127 ? -127 : v); /* x * 127/amax can round past 127 by an ulp */
            x8[Q8_SB * b + (i & 1) * 32 + i / 2] = (int8_t)v;
            total += v;
        }
        sx[b] = scale;
        xsum[(Q8_SB * b) / group] += scale * (float)total;
    }
    for (int k = Q8_SB * full; k < K; ++k) xsum[k / group] += x[k];
}

static inline float hsum256_q8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The exact int32 sums of one superblock, 8 lanes, lane i = sum over bytes 4i..4i+3 of q_lo·x8_even
 * + q_hi·x8_odd. AVX2: vpmaddubsw into int16 pairs, the two added, vpmaddwd by ones. */
static inline __attribute__((always_inline)) __m256i isum_avx2(__m256i lo, __m256i hi, const __m256i *xb) {
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xb)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xb + 1)));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* The same lanes with AVX-512 VNNI on 256-bit vectors (avx512vl): two vpdpbusd into one int32
 * accumulator. 256-bit, so no 512-bit frequency licence; a first version with one 512-bit
 * vpdpbusd per superblock, called per group, ran 1.8x slower than the AVX2 loop here. */
__attribute__((target("avx512f,avx512vl,avx512vnni")))
static inline __m256i isum_vnni(__m256i lo, __m256i hi, const __m256i *xb) {
    __m256i acc = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256(xb));
    return _mm256_dpbusd_epi32(acc, hi, _mm256_loadu_si256(xb + 1));
}

/* One row: per group s * (sum_b sx_b * isum_b - z * sum X~), the ragged tail in fp32. The
 * same fp32 operations whichever ISUM, so both variants give the same bits. */
#define Q8_ROW_DOT(NAME, ISUM, ATTR)                                                               \
    ATTR static float NAME(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow,       \
                           const float *x, const int8_t *x8, const float *sx, const float *xsum,  \
                           int K, int group, int G) {                                             \
        const __m256i nib = _mm256_set1_epi8(0x0F);                                                \
        const int full = K / Q8_SB, per_group = group / Q8_SB;                                     \
        __m256 total = _mm256_setzero_ps();                                                        \
        float zterm = 0.f, tail = 0.f;                                                             \
        for (int g = 0; g < G; ++g) {                                                              \
            const float s = _cvtsh_ss(srow[g]);                                                    \
            zterm += s * _cvtsh_ss(zrow[g]) * xsum[g];                                             \
            int b0 = g * per_group, b1 = b0 + per_group < full ? b0 + per_group : full;            \
            __m256 acc = _mm256_setzero_ps();                                                      \
            for (int b = b0; b < b1; ++b) {                                                        \
                __m256i v = _mm256_loadu_si256((const __m256i *)(qrow + 32 * b));                  \
                __m256i lo = _mm256_and_si256(v, nib);                                             \
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);                       \
                __m256i isum = ISUM(lo, hi, (const __m256i *)(x8 + Q8_SB * b));                    \
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(sx + b), acc); \
            }                                                                                      \
            total = _mm256_fmadd_ps(_mm256_set1_ps(s), acc, total);                                \
            int k0 = Q8_SB * full > g * group ? Q8_SB * full : g * group;                          \
            int k1 = g * group + group < K ? g * group + group : K;                                \
            if (k0 < k1) { /* ragged tail: exact fp32 */                                           \
                float t = 0.f;                                                                     \
                for (int k = k0; k < k1; ++k)                                                      \
                    t += (float)((qrow[k >> 1] >> (4 * (k & 1))) & 0x0F) * x[k];                   \
                tail += s * t;                                                                     \
            }                                                                                      \
        }                                                                                          \
        return hsum256_q8(total) + tail - zterm;                                                   \
    }

Q8_ROW_DOT(row_dot_avx2, isum_avx2, )
Q8_ROW_DOT(row_dot_vnni, isum_vnni, __attribute__((target("avx512f,avx512vl,avx512vnni"))))

float q8_row_dot(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow, const float *x,
                 const int8_t *x8, const float *sx, const float *xsum, int K, int group, int G,
                 int vnni) {
    return vnni ? row_dot_vnni(qrow, srow, zrow, x, x8, sx, xsum, K, group, G)
                : row_dot_avx2(qrow, srow, zrow, x, x8, sx, xsum, K, group, G);
}
