/* colearn's fused CPU merge loops (called through ctypes from colearn/kernels.py, which documents them).
 *
 * Built by setuptools as the extension colearn._kernels (optional: without a C compiler the eager PyTorch code
 * runs).  -fno-trapping-math lets the loops' selects vectorize; -ffp-contract=off keeps every result the same
 * on every CPU (no fused multiply-adds), whichever of the target clones runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 4096      /* elements whose trimming statistics are gathered while they are in L1/L2 */
#define MAX_PARTNERS 16 /* the Python side takes the eager path beyond these */
#define MAX_BRACKETS 2
#define DIGIT 11 /* bits per pass of the radix sort: 2048 buckets, whose counters stay in L1 */
enum { SUM = 0, TOTAL = 1, FREQUENCY = 2 };

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#if !defined(__GNUC__)
#define __attribute__(x)
#define restrict __restrict
#endif

/* A uniform draw in [0, 1) from a counter (splitmix64's finalizer). */
static inline double uniform(uint64_t counter) {
    uint64_t z = counter * 0x9E3779B97F4A7C15ULL + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return (double)((z ^ (z >> 31)) >> 11) * 0x1.0p-53;
}

#define T float
#define K uint32_t
#define ABS fabsf
#define TINY 0x1p-149f /* the smallest positive float */
#define SUFFIX f32
#include "_kernels_typed.h"
#undef T
#undef K
#undef ABS
#undef TINY
#undef SUFFIX

#define T double
#define K uint64_t
#define ABS fabs
#define TINY 0x1p-1074 /* the smallest positive double */
#define SUFFIX f64
#include "_kernels_typed.h"

#undef T
#undef K
#undef ABS
#undef TINY
#undef SUFFIX

/* bracket_counts, float: the magnitudes inside a bracket are a few percent, at random; AVX-512's compressing store
 * writes a vector's worth of them at a time, where the portable loop writes every element (~0.9 against ~1.4 ns an
 * element for two partners on a one-off 24.6M-element benchmark, near the memory's speed). */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

static inline __attribute__((always_inline, target("avx512f"))) void counts_avx512_impl(
    const float *base, const float *const *p, int64_t n, int np, const float *blo, const float *bhi, int nb,
    int64_t *above, float *const *inside, int64_t *found) {
    __m512 low[MAX_PARTNERS * MAX_BRACKETS], high[MAX_PARTNERS * MAX_BRACKETS];
    int64_t over[MAX_PARTNERS * MAX_BRACKETS] = {0}, count[MAX_PARTNERS * MAX_BRACKETS];
    for (int r = 0; r < np * nb; r++) {
        low[r] = _mm512_set1_ps(blo[r] > 0 ? blo[r] : 0x1p-149f); /* a magnitude of 0 is never inside */
        high[r] = _mm512_set1_ps(bhi[r]);
        count[r] = found[r];
    }
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 valid = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(valid, base + j);
        for (int i = 0; i < np; i++) {
            const __m512 m = _mm512_abs_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, p[i] + j), x));
            for (int k = 0; k < nb; k++) {
                const int r = i * nb + k;
                const __mmask16 up = _mm512_mask_cmp_ps_mask(valid, m, high[r], _CMP_GT_OQ);
                const __mmask16 in = _mm512_mask_cmp_ps_mask(valid, m, low[r], _CMP_GE_OQ) &
                                     _mm512_mask_cmp_ps_mask(valid, m, high[r], _CMP_LE_OQ);
                over[r] += __builtin_popcount(up);
                _mm512_mask_compressstoreu_ps(inside[r] + count[r], in, m);
                count[r] += __builtin_popcount(in);
            }
        }
    }
    for (int r = 0; r < np * nb; r++) {
        above[r] += over[r];
        found[r] = count[r];
    }
}

__attribute__((target("avx512f"))) static void counts_avx512(const float *base, const float *const *p, int64_t n,
                                                             int np, const float *blo, const float *bhi, int nb,
                                                             int64_t *above, float *const *inside, int64_t *found) {
    if (np == 2 && nb == 1) counts_avx512_impl(base, p, n, 2, blo, bhi, 1, above, inside, found);
    else if (np == 2 && nb == 2) counts_avx512_impl(base, p, n, 2, blo, bhi, 2, above, inside, found);
    else counts_avx512_impl(base, p, n, np, blo, bhi, nb, above, inside, found);
}
#define HAS_AVX512() (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"))
#else
#define HAS_AVX512() 0
#define counts_avx512 counts_portable_f32
#endif

/* See counts_portable in _kernels_typed.h. */
void bracket_counts_f32(const float *base, const float *const *p, int64_t n, int np, const float *blo,
                        const float *bhi, int nb, int64_t *above, float *const *inside, int64_t *found) {
    (HAS_AVX512() ? counts_avx512 : counts_portable_f32)(base, p, n, np, blo, bhi, nb, above, inside, found);
}

void bracket_counts_f64(const double *base, const double *const *p, int64_t n, int np, const double *blo,
                        const double *bhi, int nb, int64_t *above, double *const *inside, int64_t *found) {
    counts_portable_f64(base, p, n, np, blo, bhi, nb, above, inside, found);
}

/* An importable module with no functions: Python finds the library's path through it. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "colearn's fused CPU merge loops", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
