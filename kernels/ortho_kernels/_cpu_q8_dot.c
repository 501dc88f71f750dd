/* The INT4 GEMV's row dot with X in int8 per 64-element superblock, as llama.cpp's Q8 blocks:
 *
 *   x8 = round(x * 127 / max_b|x|),  X~ = x8 * max_b|x| / 127,  |X~ - x| <= max_b|x| / 254
 *
 * (the error-bound derivation is in ortho_kernels/error_bounds.py, "gemv_int8"). The codes are
 * unsigned 4-bit and x8 signed 8-bit, which is exactly the operand pair of the u8 x s8 dot
 * instructions: AVX-512 VNNI vpdpbusd (4 products summed into each int32 lane, one
 * instruction per 64 weights) where the CPU has it, else AVX2 vpmaddubsw (pairs into int16:
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
        float amax = 0.f;
        int finite = 1;
        for (int i = 0; i < Q8_SB; ++i) {
            float a = fabsf(src[i]);
            finite &= a <= 3.4e38f; /* false for NaN and Inf */
            amax = a > amax ? a : amax;
        }
        float scale = amax > 0.f ? amax / 127.f : 0.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        if (!finite) { /* NaN/Inf in X: every output of this row of X becomes NaN */
            scale = NAN;
            inv = 0.f;
        }
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

/* sum over superblocks [b0, b1) of sx_b * sum_k q_k x8_k, 8 fp32 lanes (AVX2). */
static __m256 dense_avx2(const uint8_t *qrow, const int8_t *x8, const float *sx, int b0, int b1) {
    const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = b0; b < b1; ++b) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qrow + 32 * b));
        __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        const __m256i *xb = (const __m256i *)(x8 + Q8_SB * b);
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(xb)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256(xb + 1)));
        __m256i isum = _mm256_madd_epi16(p, ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(sx + b), acc);
    }
    return acc;
}

/* The same with AVX-512 VNNI: one vpdpbusd per superblock (low nibbles in the lower 256
 * bits, high nibbles in the upper, against x8's even/odd halves). Its int32 lane i + 8 is
 * exactly the AVX2 loop's lane i, so the halves are added (exact) before the fp32 arithmetic,
 * which is then the AVX2 loop's, operation for operation: both give the same bits. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static __m256 dense_vnni(const uint8_t *qrow, const int8_t *x8, const float *sx, int b0, int b1) {
    const __m256i nib = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    for (int b = b0; b < b1; ++b) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qrow + 32 * b));
        __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        __m512i wide = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes,
                                           _mm512_loadu_si512((const void *)(x8 + Q8_SB * b)));
        __m256i isum = _mm256_add_epi32(_mm512_castsi512_si256(wide), _mm512_extracti64x4_epi64(wide, 1));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_broadcast_ss(sx + b), acc);
    }
    return acc;
}

float q8_row_dot(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow, const float *x,
                 const int8_t *x8, const float *sx, const float *xsum, int K, int group, int G,
                 int vnni) {
    const int full = K / Q8_SB, per_group = group / Q8_SB;
    __m256 total = _mm256_setzero_ps();
    float zterm = 0.f, tail = 0.f;
    for (int g = 0; g < G; ++g) {
        const float s = _cvtsh_ss(srow[g]);
        zterm += s * _cvtsh_ss(zrow[g]) * xsum[g];
        int b0 = g * per_group, b1 = b0 + per_group < full ? b0 + per_group : full;
        __m256 acc = vnni ? dense_vnni(qrow, x8, sx, b0, b1) : dense_avx2(qrow, x8, sx, b0, b1);
        total = _mm256_fmadd_ps(_mm256_set1_ps(s), acc, total);
        int k0 = Q8_SB * full > g * group ? Q8_SB * full : g * group; /* ragged tail: exact fp32 */
        int k1 = g * group + group < K ? g * group + group : K;
        if (k0 < k1) {
            float t = 0.f;
            for (int k = k0; k < k1; ++k) t += (float)((qrow[k >> 1] >> (4 * (k & 1))) & 0x0F) * x[k];
            tail += s * t;
        }
    }
    return hsum256_q8(total) + tail - zterm;
}
