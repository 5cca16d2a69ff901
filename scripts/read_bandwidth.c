// Two-thread sequential read bandwidth for buffers of several sizes: the ceiling a batch-1 decode
// step (which streams every weight byte once) can reach on this machine. Best of many passes.
//   gcc -O3 -march=native -fopenmp scripts/read_bandwidth.c -o /tmp/bw && /tmp/bw      (hardware prefetch)
//   gcc -O3 -march=native -fopenmp -DPF=1024 scripts/read_bandwidth.c -o /tmp/bw && /tmp/bw   (+ software, 1 KB ahead)
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const size_t mb[] = {64, 200, 256, 400, 1536};
    for (int s = 0; s < 5; s++) {
        const size_t n = mb[s] << 20;
        char* buf = aligned_alloc(64, n);
        memset(buf, 1, n);
        double best = 1e9;
        volatile long sink = 0;
        for (int r = 0; r < (int)(4e9 / n) + 2; r++) {
            const double t0 = now();
#pragma omp parallel num_threads(2)
            {
                const char* p = buf + omp_get_thread_num() * (n / 2);
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (size_t i = 0; i < n / 2; i += 256) {
#ifdef PF
                    for (int l = 0; l < 256; l += 64) _mm_prefetch(p + i + PF + l, _MM_HINT_T0);
#endif
                    a0 = _mm512_add_epi32(a0, _mm512_load_si512(p + i));
                    a1 = _mm512_add_epi32(a1, _mm512_load_si512(p + i + 64));
                    a2 = _mm512_add_epi32(a2, _mm512_load_si512(p + i + 128));
                    a3 = _mm512_add_epi32(a3, _mm512_load_si512(p + i + 192));
                }
                sink += _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
            }
            const double dt = now() - t0;
            if (dt < best) best = dt;
        }
        printf("%5zu MB: %.1f GB/s\n", mb[s], n / best / 1e9);
        free(buf);
    }
    return 0;
}
