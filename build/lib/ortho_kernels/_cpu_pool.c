/* A thread pool that never spins: the CPU kernels' parallel loops run here, not in OpenMP.
 *
 * Why not OpenMP: a `#pragma omp parallel for schedule(static)` region gives every thread a
 * fixed share and ends with a barrier, so the call lasts as long as the slowest thread. When
 * another process keeps a core busy, one of the two threads is descheduled for a whole
 * scheduler slice (milliseconds) while the other finishes its half and waits; libgomp's
 * waiting threads also spin before they sleep, taking CPU from the very thread they wait
 * for. A 0.4 ms GEMV then took 8 ms on a loaded 2-core machine.
 *
 * Here the caller splits the work into many small chunks that threads claim one at a time
 * from an atomic counter. The calling thread claims chunks itself right away; workers
 * (started on first use, up to the requested count) sleep on a futex and join when the
 * scheduler runs them. A worker that never gets a core claims nothing, so the call costs at
 * most the caller doing all chunks alone plus the chunks already claimed by others — it
 * degrades to the 1-thread time, never below it. Waiting is passive on both sides: workers
 * sleep in futex_wait, and the caller, once no chunk is left, sleeps until the claimed ones
 * are done (after a spin of a few microseconds, shorter than a futex round trip).
 *
 * What chunking cannot fix: a worker preempted in the middle of a chunk. The caller must
 * wait for it (the chunk reads and writes the caller's memory, so nobody else may finish it
 * and return), and on a machine with more runnable threads than cores that wait is a
 * scheduler slice, milliseconds. So the pool watches itself: when the caller, out of chunks,
 * waited longer than a quarter of its own working time (and over 20 us), the next calls run
 * on the caller alone, for a stretch that doubles while such waits recur (up to 1024 calls)
 * and halves after a clean parallel call. Under sustained load the op thus runs at its
 * 1-thread speed with a rare probe; on an idle machine every call uses every thread.
 *
 * Safety: one job at a time (a second caller that finds the pool busy runs its job alone,
 * so concurrent Python threads — ctypes releases the GIL — are correct); a forked child
 * starts with no workers (pthread_atfork), since threads do not survive fork().
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "_cpu_pool.h"

#define MAX_WORKERS 63
#define SPIN_ROUNDS 2000 /* ~ a few microseconds of _mm_pause before the caller sleeps */

/* state = gen (16 bits) | n_chunks (16 bits) | next chunk (32 bits), one word so that a
 * claim (fetch_add) also tells which job and how many chunks it had: a worker woken late
 * can never take a chunk index of one job with the size of another. */
static _Atomic uint64_t state;
static _Atomic uint32_t published;  /* futex word: generation of the latest job */
static _Atomic uint32_t done;       /* futex word: chunks finished in the current job */
static chunk_fn job_fn;             /* job parameters: valid while the job has open chunks */
static void *job_ctx;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static int n_workers;
static uint32_t generation;
static int alone_left, alone_len;  /* back-off after a call that waited for a straggler */
static int n_cpus;                 /* CPUs this process may run on, read once */

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *word, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *word, int count) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, count, NULL, NULL, 0);
}

/* Claim and run chunks of the job current at the first claim until none is left. */
static void run_chunks(void) {
    for (;;) {
        uint64_t old = atomic_fetch_add_explicit(&state, 1, memory_order_acq_rel);
        uint32_t idx = (uint32_t)old, n_chunks = (uint32_t)(old >> 32) & 0xFFFF;
        if (idx >= n_chunks) return;
        /* The job cannot finish before this chunk is counted, so job_fn/job_ctx still
         * belong to the job whose counter we advanced. */
        job_fn(job_ctx, (int)idx);
        if (atomic_fetch_add_explicit(&done, 1, memory_order_acq_rel) + 1 == n_chunks)
            futex_wake(&done, 1);
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    uint32_t seen = atomic_load_explicit(&published, memory_order_acquire);
    for (;;) {
        uint32_t now;
        while ((now = atomic_load_explicit(&published, memory_order_acquire)) == seen)
            futex_wait(&published, seen);
        seen = now;
        run_chunks();
    }
    return NULL;
}

static void forget_workers(void) { n_workers = 0; } /* fork(): the child has none */

static void ensure_workers(int wanted) {
    static int atfork_set;
    if (wanted <= n_workers) return;
    pthread_mutex_lock(&start_lock);
    if (!atfork_set) {
        pthread_atfork(NULL, NULL, forget_workers);
        atfork_set = 1;
    }
    while (n_workers < wanted && n_workers < MAX_WORKERS) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc) break; /* fewer workers: the caller still runs every unclaimed chunk */
        ++n_workers;
    }
    pthread_mutex_unlock(&start_lock);
}

static void run_alone(int n_chunks, chunk_fn fn, void *ctx) {
    for (int i = 0; i < n_chunks; ++i) fn(ctx, i); /* same chunks, same results */
}

/* After the caller's own chunks: how long it then waited decides the next calls' threads. */
static void update_backoff(int64_t worked_ns, int64_t waited_ns) {
    if (waited_ns > 20000 && waited_ns * 4 > worked_ns) {
        alone_len = alone_len ? (alone_len < 512 ? 2 * alone_len : 1024) : 8;
        alone_left = alone_len;
    } else {
        alone_len /= 2;
    }
}

void pool_run(int n_chunks, int n_threads, chunk_fn fn, void *ctx) {
    if (n_chunks <= 0) return;
    if (!n_cpus) {
        cpu_set_t set;
        n_cpus = sched_getaffinity(0, sizeof set, &set) ? 1 : CPU_COUNT(&set);
    }
    n_threads = n_threads < n_cpus ? n_threads : n_cpus; /* more threads than CPUs only queue */
    if (n_threads <= 1 || n_chunks == 1 || n_chunks > 0xFFFF || pthread_mutex_trylock(&busy)) {
        run_alone(n_chunks, fn, ctx);
        return;
    }
    if (alone_left > 0) {
        --alone_left;
        pthread_mutex_unlock(&busy);
        run_alone(n_chunks, fn, ctx);
        return;
    }
    ensure_workers(n_threads - 1);
    job_fn = fn;
    job_ctx = ctx;
    atomic_store_explicit(&done, 0, memory_order_relaxed);
    generation = (generation + 1) & 0xFFFF;
    atomic_store_explicit(&state, ((uint64_t)generation << 48) | ((uint64_t)n_chunks << 32),
                          memory_order_release);
    atomic_store_explicit(&published, generation, memory_order_release);
    int64_t t0 = now_ns();
    futex_wake(&published, n_threads - 1);
    run_chunks();
    int64_t t1 = now_ns();
    uint32_t d;
    for (int spin = 0; (d = atomic_load_explicit(&done, memory_order_acquire)) < (uint32_t)n_chunks; ++spin) {
        if (spin < SPIN_ROUNDS) _mm_pause();
        else futex_wait(&done, d);
    }
    update_backoff(t1 - t0, now_ns() - t1);
    pthread_mutex_unlock(&busy);
}

int pool_workers(void) { return n_workers; }

int pool_alone_left(void) { return alone_left; }
