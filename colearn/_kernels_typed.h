/* The fused loops for one element type, included by _kernels.c with T (float or double), K (the unsigned integer
 * of T's size), ABS and SUFFIX defined.  Masks are 0/1 values of T, never branches, so that the loops over
 * elements vectorize; constants are of type T, so float loops stay in float. */
#define NAME(x) CAT(x, SUFFIX)

/* The merged task vector at element j: kept values (lo < |d| <= hi) combined by `rule` (see trimmed_pass). */
static inline __attribute__((always_inline)) T NAME(merged)(T x, const T *const *p, int64_t j, int np, const T *w,
                                                            const T *lo, const T *hi, int rule) {
    T votes = 0;
    for (int i = 0; i < np; i++) {
        const T d = p[i][j] - x, m = ABS(d), kept = (T)((m > lo[i]) & (m <= hi[i]));
        if (rule == SUM) votes += w[i] * (d * kept);
        else if (rule == TOTAL) votes += d * kept;
        else votes += kept * ((T)(d > 0) - (T)(d < 0));
    }
    if (rule == SUM) return votes;
    const T majority = (T)(votes >= 0) * 2 - 1; /* ties go to + */
    T total = 0, agreeing = 0;
    for (int i = 0; i < np; i++) {
        const T d = p[i][j] - x, m = ABS(d), agrees = (T)((m > lo[i]) & (m <= hi[i]) & (d * majority > 0));
        total += w[i] * (d * agrees);
        agreeing += agrees;
    }
    return total / (agreeing > 1 ? agreeing : (T)1);
}

static inline __attribute__((always_inline)) void NAME(pass_impl)(T *restrict out, const T *restrict base,
                                                                  const T *const *p, int64_t n, int np, const T *w,
                                                                  const T *lo, const T *hi, int rule, T step) {
    for (int64_t j = 0; j < n; j++) {
        const T x = base[j];
        out[j] = x + step * NAME(merged)(x, p, j, np, w, lo, hi, rule);
    }
}

#define PASS_CASE(NP, RULE)                                                                                     \
    case (NP) * 10 + (RULE): NAME(pass_impl)(out, base, p, n, NP, w, lo, hi, RULE, step); return;
#define PASS_CASES(NP) PASS_CASE(NP, SUM) PASS_CASE(NP, TOTAL) PASS_CASE(NP, FREQUENCY)

CLONES void NAME(trimmed_pass)(T *out, const T *base, const T *const *p, int64_t n, int np, const T *w, const T *lo,
                               const T *hi, int rule, T step) {
    switch (np * 10 + rule) { /* as constants, the loops over partners unroll */
        PASS_CASES(2) PASS_CASES(3)
    default: NAME(pass_impl)(out, base, p, n, np, w, lo, hi, rule, step);
    }
}
#undef PASS_CASES
#undef PASS_CASE

static inline __attribute__((always_inline)) void NAME(counts_impl)(const T *restrict base, const T *const *p,
                                                                    int64_t n, int np, const T *blo, const T *bhi,
                                                                    int nb, int64_t *above, T *const *inside,
                                                                    int64_t *found) {
    T floor[MAX_PARTNERS * MAX_BRACKETS], magnitudes[BLOCK];
    int32_t flags[BLOCK];
    for (int r = 0; r < np * nb; r++) floor[r] = blo[r] > 0 ? blo[r] : TINY; /* a magnitude of 0 is never inside */
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t size = n - start < BLOCK ? n - start : BLOCK;
        for (int i = 0; i < np; i++) {
            const T *b = base + start, *q = p[i] + start;
            for (int64_t l = 0; l < size; l++) magnitudes[l] = ABS(q[l] - b[l]);
            for (int k = 0; k < nb; k++) {
                const int r = i * nb + k;
                const T low = floor[r], high = bhi[r];
                int32_t over = 0;
                for (int64_t l = 0; l < size; l++) {
                    over += magnitudes[l] > high;
                    flags[l] = (magnitudes[l] >= low) & (magnitudes[l] <= high);
                }
                above[r] += over;
                T *to = inside[r];
                int64_t c = found[r];
                for (int64_t l = 0; l < size; l++) { /* a few percent are inside, at random: every lane is written */
                    to[c] = magnitudes[l];           /* and kept when inside, without a branch */
                    c += flags[l];
                }
                found[r] = c;
            }
        }
    }
}

/* For partner i and bracket k (r = i * nb + k): adds to above[r] the number of magnitudes m = |p_i - base| above
 * bhi[r], and writes the nonzero m in [blo[r], bhi[r]] to inside[r] from index found[r] on, adding their number to
 * found[r].  Each inside[r] has room for n values after found[r]. */
CLONES void NAME(counts_portable)(const T *base, const T *const *p, int64_t n, int np, const T *blo, const T *bhi,
                                  int nb, int64_t *above, T *const *inside, int64_t *found) {
    if (np == 2 && nb == 1) NAME(counts_impl)(base, p, n, 2, blo, bhi, 1, above, inside, found);
    else if (np == 2 && nb == 2) NAME(counts_impl)(base, p, n, 2, blo, bhi, 2, above, inside, found);
    else NAME(counts_impl)(base, p, n, np, blo, bhi, nb, above, inside, found);
}

/* Writes into out (np x m) the magnitudes |p_i[j] - base[j]| at m sorted positions j, one uniformly at random in
 * each of m equal strata of range(n) (a fixed sequence: thresholds found from the sample are exact anyway). */
CLONES void NAME(sampled_magnitudes)(const T *base, const T *const *p, int64_t n, int np, int64_t m, T *out) {
    const double stratum = (double)n / (double)m;
    for (int64_t s = 0; s < m; s++) {
        int64_t j = (int64_t)(((double)s + uniform((uint64_t)s)) * stratum);
        j = j < n ? j : n - 1;
        const T x = base[j];
        for (int i = 0; i < np; i++) out[i * m + s] = ABS(p[i][j] - x);
    }
}

static inline __attribute__((always_inline)) void NAME(combination_impl)(T *restrict out, const T *restrict base,
                                                                         const T *const *p, int64_t n, int np,
                                                                         const T *c) {
    for (int64_t j = 0; j < n; j++) {
        const T x = base[j];
        T total = c[0] * (p[0][j] - x);
        for (int i = 1; i < np; i++) total += c[i] * (p[i][j] - x);
        out[j] = x + total;
    }
}

CLONES void NAME(combination)(T *out, const T *base, const T *const *p, int64_t n, int np, const T *c) {
    switch (np) {
    case 2: NAME(combination_impl)(out, base, p, n, 2, c); break;
    case 3: NAME(combination_impl)(out, base, p, n, 3, c); break;
    default: NAME(combination_impl)(out, base, p, n, np, c);
    }
}

CLONES void NAME(gram)(const T *base, const T *const *p, int64_t n, int np, double *out) {
    /* double sums of T products, a block at a time, in SIMD lanes */
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t stop = n - start < BLOCK ? n : start + BLOCK;
        for (int i = 0; i < np; i++)
            for (int k = i; k < np; k++) {
                const T *pi = p[i], *pk = p[k];
                double s = 0;
#pragma omp simd reduction(+ : s)
                for (int64_t j = start; j < stop; j++) s += (double)((pi[j] - base[j]) * (pk[j] - base[j]));
                out[i * np + k] += s;
            }
    }
    for (int i = 0; i < np; i++)
        for (int k = 0; k < i; k++) out[i * np + k] = out[k * np + i];
}

/* Ranks of the keys (a float's bits: non-negative floats order like their bits) in their stable ascending order,
 * by an LSD radix sort on DIGIT-bit digits.  keys and spare_keys, order and spare take turns; order starts as
 * 0..n-1.  Returns 0 when the ranks end up in `order`, 1 when in `spare`. */
CLONES int NAME(ascending_ranks)(K *keys, K *spare_keys, uint32_t *order, uint32_t *spare, int64_t n, int digits,
                                 int64_t *starts /* digits x 2^DIGIT */) {
    const K mask = ((K)1 << DIGIT) - 1;
    for (int64_t j = 0; j < n; j++) /* every digit's histogram in one pass, then offsets */
        for (int d = 0; d < digits; d++) starts[((int64_t)d << DIGIT) + ((keys[j] >> (DIGIT * d)) & mask)] += 1;
    for (int d = 0; d < digits; d++) {
        int64_t total = 0;
        for (int64_t b = 0; b < ((int64_t)1 << DIGIT); b++) {
            const int64_t c = starts[((int64_t)d << DIGIT) + b];
            starts[((int64_t)d << DIGIT) + b] = total;
            total += c;
        }
    }
    int swapped = 0;
    for (int d = 0; d < digits; d++) {
        int64_t *at = starts + ((int64_t)d << DIGIT);
        const int shift = DIGIT * d;
        if (d == digits - 1) { /* the last pass writes ranks instead of an order */
            for (int64_t j = 0; j < n; j++) spare[order[j]] = (uint32_t)at[(keys[j] >> shift) & mask]++;
            break;
        }
        for (int64_t j = 0; j < n; j++) { /* stable: equal digits keep their order; keys travel along */
            const K key = keys[j];
            const int64_t to = at[(key >> shift) & mask]++;
            spare_keys[to] = key;
            spare[to] = order[j];
        }
        K *t = keys; keys = spare_keys; spare_keys = t;
        uint32_t *u = order; order = spare; spare = u;
        swapped ^= 1;
    }
    return swapped ^ 1;
}

#undef NAME
