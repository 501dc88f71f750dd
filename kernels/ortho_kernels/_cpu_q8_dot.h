/* The int8-activation row dot of the INT4 GEMV (_cpu_q8_dot.c), called from _cpu_int4_gemv.c. */
#ifndef ORTHO_CPU_Q8_DOT_H
#define ORTHO_CPU_Q8_DOT_H
#include <stdint.h>

#define Q8_SB 64 /* weights per superblock, as the int16 path's SB */

/* Scale of one superblock of X rounded to the integer range [-limit, limit] (127 for int8,
 * 32767 for int16): *scale = max|x| / limit and *inv = limit / max|x| (0 for an all-zero
 * block); NaN/Inf in the block give *scale = NaN, *inv = 0, so every output of the row is NaN. */
static inline void block_scale(const float *src, int n, float limit, float *scale, float *inv) {
    float amax = 0.f;
    int finite = 1;
    for (int i = 0; i < n; ++i) {
        float a = src[i] < 0.f ? -src[i] : src[i];
        finite &= a <= 3.4e38f; /* false for NaN and Inf */
        amax = a > amax ? a : amax;
    }
    *scale = amax > 0.f ? amax / limit : 0.f;
    *inv = amax > 0.f ? limit / amax : 0.f;
    if (!finite) {
        *scale = __builtin_nanf("");
        *inv = 0.f;
    }
}

void q8_prepare_x(const float *x, int K, int group, int G, int8_t *x8, float *sx, float *xsum);
float q8_row_dot(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow, const float *x,
                 const int8_t *x8, const float *sx, const float *xsum, int K, int group, int G,
                 int vnni);
#endif
