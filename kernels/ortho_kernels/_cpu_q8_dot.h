/* The int8-activation row dot of the INT4 GEMV (_cpu_q8_dot.c), called from _cpu_int4_gemv.c. */
#ifndef ORTHO_CPU_Q8_DOT_H
#define ORTHO_CPU_Q8_DOT_H
#include <stdint.h>

#define Q8_SB 64 /* weights per superblock, as the int16 path's SB */

void q8_prepare_x(const float *x, int K, int group, int G, int8_t *x8, float *sx, float *xsum);
float q8_row_dot(const uint8_t *qrow, const uint16_t *srow, const uint16_t *zrow, const float *x,
                 const int8_t *x8, const float *sx, const float *xsum, int K, int group, int G,
                 int vnni);
#endif
