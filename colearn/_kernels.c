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

/* An importable module with no functions: Python finds the library's path through it. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "colearn's fused CPU merge loops", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
