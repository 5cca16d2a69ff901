// Two-thread sequential read bandwidth: the ceiling a batch-1 decode step (which streams every
// weight byte once) can reach on this machine. Two measurements:
// - buffers of several sizes, best of many passes (the L3 helps up to ~128 MB);
// - a decode step's pattern on the 270M model: the layers' 72 MB, then the 178 MB LM head, again
//   and again (the two together do not fit in the L3), mean time per "step" over 20 steps.
//   gcc -O3 -march=native -fopenmp scripts/read_bandwidth.c -o /tmp/bw && /tmp/bw      (hardware prefetch)
//   gcc -O3 -march=native -fopenmp -DPF=1024 scripts/read_bandwidth.c -o /tmp/bw && /tmp/bw   (+ software, into the L2, 1 KB ahead)
//   ... -DPF=1024 -DSTREAMS=4 ...   (each thread reads its half as four interleaved streams, as x16_rows does)
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef STREAMS
#define STREAMS 1
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static volatile long sink;

// Reads n bytes, each thread one half as STREAMS consecutive parts read side by side, 256 bytes
// of each part per iteration.
static void read2(const char* buf, size_t n) {
#pragma omp parallel num_threads(2)
    {
        const size_t part = n / 2 / STREAMS;
        const char* p = buf + omp_get_thread_num() * (n / 2);
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t i = 0; i < part; i += 256)
            for (int s = 0; s < STREAMS; s++) {
                const char* q = p + s * part + i;
#ifdef PF
                for (int l = 0; l < 256; l += 64) _mm_prefetch(q + PF + l, _MM_HINT_T1);
#endif
                a0 = _mm512_add_epi32(a0, _mm512_load_si512(q));
                a1 = _mm512_add_epi32(a1, _mm512_load_si512(q + 64));
                a2 = _mm512_add_epi32(a2, _mm512_load_si512(q + 128));
                a3 = _mm512_add_epi32(a3, _mm512_load_si512(q + 192));
            }
        sink += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
    }
}

static char* filled(size_t n) {  // on 2 MB pages where the OS gives them, as the weights are
    char* buf = aligned_alloc(2u << 20, (n + (2u << 20) - 1) / (2u << 20) * (2u << 20));
    madvise(buf, n, MADV_HUGEPAGE);
    memset(buf, 1, n);
    return buf;
}

int main(void) {
    const size_t mb[] = {16, 64, 128, 256, 400, 1536};
    for (int s = 0; s < 6; s++) {
        const size_t n = mb[s] << 20;
        char* buf = filled(n);
        double best = 1e9;
        for (int r = 0; r < (int)(4e9 / n) + 2; r++) {
            const double t0 = now();
            read2(buf, n);
            const double dt = now() - t0;
            if (dt < best) best = dt;
        }
        printf("%5zu MB: %.1f GB/s\n", mb[s], n / best / 1e9);
        free(buf);
    }
    const size_t layers = 72ul << 20, head = 178ul << 20;
    char *a = filled(layers), *b = filled(head);
    double total = 0;
    for (int r = 0; r < 22; r++) {
        const double t0 = now();
        read2(a, layers);
        read2(b, head);
        if (r >= 2) total += now() - t0;
    }
    printf("decode-step pattern (72 MB + 178 MB): %.2f ms per step, %.1f GB/s\n", total / 20 * 1e3,
           (layers + head) / (total / 20) / 1e9);
    return 0;
}
