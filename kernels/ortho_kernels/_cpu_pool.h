/* The non-spinning thread pool of ortho-train's CPU kernels (see _cpu_pool.c for why). */
#ifndef ORTHO_CPU_POOL_H
#define ORTHO_CPU_POOL_H

typedef void (*chunk_fn)(void *ctx, int chunk);

/* Run fn(ctx, i) for i in [0, n_chunks) on up to n_threads threads, the caller included;
 * returns when every chunk is done. Chunks must be independent. */
void pool_run(int n_chunks, int n_threads, chunk_fn fn, void *ctx);

/* Worker threads started so far (for tests and the benchmark). */
int pool_workers(void);

/* Calls still to run on the caller alone after a straggler wait (see _cpu_pool.c). */
int pool_alone_left(void);

#endif
