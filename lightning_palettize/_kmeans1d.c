/*
 * Exact weighted 1-D k-means by dynamic programming over sorted bins.
 *
 * Optimal 1-D clusters are contiguous runs of the sorted values, so with prefix sums of the bin
 * weights w, w*x and w*x^2 the cost of any run is O(1) and
 *     D[k][i] = min_{k-1 <= j < i} D[k-1][j] + cost(j, i)
 * gives the optimum. The squared-error cost satisfies the quadrangle inequality, so the layer
 * matrices are totally monotone: the argmin of row i never decreases with i, and divide and
 * conquer solves each layer in O(m log m) entries (O(k m log m) time in all, O(k m) memory for
 * the int32 back-pointers).
 *
 * Python signature (all buffers C-contiguous, the GIL is released while solving):
 *     solve(w, s1, s2, key, offsets, k, out, g0, g1, shift)
 *       w, s1, s2 : float64[T]  per-bin weight, weighted sum and weighted sum of squares,
 *                               the bins of group g are [offsets[g], offsets[g+1]) in sorted order
 *       key       : int32[T]    each bin's ordered 16-bit code (only read when shift > 0)
 *       offsets   : int64[G+1]
 *       shift     : 0 = exact DP over all bins. > 0: solve exactly over coarse bins (codes that
 *                   agree above their low `shift` bits), then refine every boundary exactly
 *                   within a window of fine bins around it, re-centring until no boundary sits
 *                   on a window edge.
 *       k         : number of clusters
 *       out       : int64[G*(k+1)] written for groups g0..g1-1: the bin index where each cluster
 *                   starts, then the group's bin count. Clusters past min(k, m) are empty (start m).
 *
 *     codes(jobs, inertia, flag, g0, g1)
 *       fast mode of kmeans.py fused for CPU tensors: per LUT group (of any number of tensors),
 *       the histogram of 16-bit float codes, the DP above over the present codes, centroids and
 *       every element's label in one place (see py_codes below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const double *p0, *p1, *p2; /* prefix sums over bins, length m+1 */
    const double *prev;         /* D[k-1][.] */
} ctx_t;

/* Squared error of bins [a, b) around their weighted mean, from prefix sums. */
static inline double seg_cost(const double *p0, const double *p1, const double *p2, int64_t a,
                              int64_t b) {
    double s0 = p0[b] - p0[a];
    if (s0 <= 0.0) return 0.0;
    double s1 = p1[b] - p1[a];
    double v = (p2[b] - p2[a]) - s1 * s1 / s0;
    return v > 0.0 ? v : 0.0;
}

static inline double run_cost(const ctx_t *c, int64_t a, int64_t b) {
    return seg_cost(c->p0, c->p1, c->p2, a, b);
}

/*
 * Matrix of layer k: row i = last bin of the prefix, column j = first bin of the last cluster.
 * For j > i the last cluster is empty and the entry is D[k-1][i]; j == 0 likewise adds the whole
 * prefix as one cluster to D[k-1][i]. Neither can beat the true minimum, and this completion
 * keeps the matrix totally monotone: the (leftmost) argmin of a row never moves left as the
 * row index grows, which is what dc_rows relies on.
 */
static inline double entry(const ctx_t *c, int64_t i, int64_t j) {
    if (j == 0) return c->prev[i] + run_cost(c, 0, i + 1);
    if (j > i) return c->prev[i];
    return c->prev[j - 1] + run_cost(c, j, i + 1);
}

/* Row minima of a layer matrix by divide and conquer over its monotone argmins: rows
 * [ilo, ihi], candidate columns [jlo, jhi]. O(m log m) entries per layer; SMAWK needs O(m),
 * but its entries come in dependent, branchy chains: measured here the scan below is 1.2-3.5x
 * faster from 1,000 to 1,000,000 bins. */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
/* the scan is bound by double division: 4-wide AVX2 where the CPU has it (chosen at load) */
#define LP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LP_VECTOR_CLONES
#endif

LP_VECTOR_CLONES
static void dc_rows(const ctx_t *c, int64_t ilo, int64_t ihi, int64_t jlo, int64_t jhi,
                    double *cur, int64_t *res) {
    if (jhi - jlo < 8) {
        /* few candidate columns: scan them all for every row, no further recursion */
        for (int64_t i = ilo; i <= ihi; ++i) {
            int64_t best = jlo;
            double bv = INFINITY;
            for (int64_t j = jlo; j <= jhi; ++j) {
                double v = entry(c, i, j);
                if (v < bv) {
                    bv = v;
                    best = j;
                }
            }
            cur[i] = bv;
            res[i] = best;
        }
        return;
    }
    while (ilo <= ihi) {
        int64_t i = ilo + (ihi - ilo) / 2;
        const double *p0 = c->p0, *p1 = c->p1, *p2 = c->p2, *prev = c->prev;
        double P0 = p0[i + 1], P1 = p1[i + 1], P2 = p2[i + 1];
        int64_t best = jlo;
        double bv = INFINITY;
        int64_t j = jlo;
        if (j == 0) {
            bv = entry(c, i, 0);
            best = 0;
            j = 1;
        }
        int64_t jend = jhi < i ? jhi : i;
        /* entries a block at a time: a branch-free loop the compiler vectorises, then the
         * argmin (leftmost) over the block */
        double buf[64];
        while (j <= jend) {
            int64_t nb = jend - j + 1 < 64 ? jend - j + 1 : 64;
            for (int64_t t = 0; t < nb; ++t) {
                double s0 = P0 - p0[j + t], s1 = P1 - p1[j + t];
                double den = s0 > 0.0 ? s0 : 1.0; /* s0 == 0 only with s1 == 0: cost 0 */
                double cost = (P2 - p2[j + t]) - s1 * s1 / den;
                buf[t] = prev[j + t - 1] + (cost > 0.0 ? cost : 0.0);
            }
            for (int64_t t = 0; t < nb; ++t) {
                if (buf[t] < bv) {
                    bv = buf[t];
                    best = j + t;
                }
            }
            j += nb;
        }
        if (jhi > i && prev[i] < bv) {
            bv = prev[i];
            best = i + 1;
        }
        cur[i] = bv;
        res[i] = best;
        if (i - ilo < ihi - i) {
            dc_rows(c, ilo, i - 1, jlo, best, cur, res);
            ilo = i + 1;
            jlo = best;
        } else {
            dc_rows(c, i + 1, ihi, best, jhi, cur, res);
            ihi = i - 1;
            jhi = best;
        }
    }
}

/* DP over m bins with prefix sums p0/p1/p2; writes cluster starts (bin indices) to out[0..k]. */
static int dp_starts(const double *p0, const double *p1, const double *p2, int64_t m, int64_t k,
                     int64_t *out) {
    int64_t kk = k < m ? k : m;
    for (int64_t c = 0; c <= k; ++c) out[c] = m;
    if (m == 0) return 0;
    out[0] = 0;
    if (kk <= 1) return 0;
    double *d = (double *)malloc(sizeof(double) * 2 * (size_t)m);
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)m);
    int32_t *arg = (int32_t *)malloc(sizeof(int32_t) * (size_t)(kk - 1) * (size_t)m);
    if (!d || !idx || !arg) {
        free(d);
        free(idx);
        free(arg);
        return -1;
    }
    double *prev = d, *cur = d + m;
    int64_t *res = idx;
    ctx_t c = {p0, p1, p2, prev};
    for (int64_t i = 0; i < m; ++i) prev[i] = run_cost(&c, 0, i + 1);

    int failed = 0;
    for (int64_t layer = 1; layer < kk && !failed; ++layer) {
        int32_t *a = arg + (size_t)(layer - 1) * (size_t)m;
        c.prev = prev;
        if (layer == kk - 1) {
            /* the last layer only needs the full prefix */
            int64_t i = m - 1, best = 0;
            double bv = INFINITY;
            for (int64_t j = 0; j < m; ++j) {
                double v = entry(&c, i, j);
                if (v < bv) {
                    bv = v;
                    best = j;
                }
            }
            a[i] = (int32_t)best;
            continue;
        }
        dc_rows(&c, 0, m - 1, 0, m - 1, cur, res);
        for (int64_t i = 0; i < m; ++i) a[i] = (int32_t)res[i];
        double *t = prev;
        prev = cur;
        cur = t;
    }
    if (!failed) {
        /* Backtrack; an argmin past the prefix end (or 0) means an empty cluster. */
        int64_t end = m; /* exclusive end of the current cluster */
        for (int64_t layer = kk - 1; layer >= 1; --layer) {
            int64_t j = end > 0 ? arg[(size_t)(layer - 1) * (size_t)m + end - 1] : end;
            if (j >= end || j == 0) j = end;
            out[layer] = j;
            end = j;
        }
        for (int64_t layer = kk - 1; layer >= 1; --layer)
            if (out[layer] > out[layer + 1]) out[layer] = out[layer + 1];
    }
    free(d);
    free(idx);
    free(arg);
    return failed;
}

/* Windowed refinement: boundary t (1..kk-1) may move within window t of bins; f_t(p) is the
 * best cost of bins [0, p) split into t clusters with boundary t at p. The argmin over the
 * previous boundary is monotone in p, so each window is solved by divide and conquer. */
typedef struct {
    const double *p0, *p1, *p2;
    const double *fprev; /* f_{t-1} over window t-1 */
    int64_t lo_prev, hi_prev;
    double *fcur;
    int32_t *acur; /* argmin position (absolute bin index) */
    int64_t lo;
} wctx_t;

static inline double wcost(const wctx_t *c, int64_t a, int64_t b) {
    return seg_cost(c->p0, c->p1, c->p2, a, b);
}

static void wsolve(const wctx_t *c, int64_t plo, int64_t phi, int64_t qlo, int64_t qhi) {
    while (plo <= phi) {
        int64_t p = plo + (phi - plo) / 2;
        int64_t qend = qhi < p - 1 ? qhi : p - 1;
        int64_t best = qlo;
        double bv = INFINITY;
        for (int64_t q = qlo; q <= qend; ++q) {
            double f = c->fprev[q - c->lo_prev];
            if (f == INFINITY) continue;
            double v = f + wcost(c, q, p);
            if (v < bv) {
                bv = v;
                best = q;
            }
        }
        c->fcur[p - c->lo] = bv;
        c->acur[p - c->lo] = (int32_t)best;
        if (p - plo < phi - p) {
            wsolve(c, plo, p - 1, qlo, best);
            plo = p + 1;
            qlo = best;
        } else {
            wsolve(c, p + 1, phi, best, qhi);
            phi = p - 1;
            qhi = best;
        }
    }
}

/* Returns 1 if a boundary ended on an open window edge (caller re-centres and repeats),
 * 0 if not, -1 on allocation failure. st[0..kk] in/out. */
static int window_refine(const double *p0, const double *p1, const double *p2, int64_t m,
                         int64_t kk, int64_t win, int64_t *st) {
    int64_t span = 2 * win + 1;
    double *f = (double *)malloc(sizeof(double) * (size_t)(kk + 1) * (size_t)span);
    int32_t *arg = (int32_t *)malloc(sizeof(int32_t) * (size_t)(kk + 1) * (size_t)span);
    int64_t *lo = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(kk + 1));
    if (!f || !arg || !lo) {
        free(f);
        free(arg);
        free(lo);
        return -1;
    }
    int64_t *hi = lo + (kk + 1);
    lo[0] = hi[0] = 0;
    f[0] = 0.0;
    for (int64_t t = 1; t < kk; ++t) {
        lo[t] = st[t] - win < 1 ? 1 : st[t] - win;
        hi[t] = st[t] + win > m - 1 ? m - 1 : st[t] + win;
    }
    lo[kk] = hi[kk] = m;
    for (int64_t t = 1; t <= kk; ++t) {
        wctx_t c = {p0, p1, p2, f + (t - 1) * span, lo[t - 1], hi[t - 1], f + t * span,
                    arg + t * span, lo[t]};
        for (int64_t p = lo[t]; p <= hi[t]; ++p) c.fcur[p - lo[t]] = INFINITY;
        int64_t plo = lo[t], phi = hi[t];
        if (plo <= lo[t - 1]) plo = lo[t - 1] + 1; /* need q < p */
        wsolve(&c, plo, phi, lo[t - 1], hi[t - 1]);
    }
    int edge = 0;
    int64_t p = m;
    if (f[kk * span] == INFINITY) edge = 1; /* windows could not be chained: re-centre */
    else {
        for (int64_t t = kk; t >= 1; --t) {
            int64_t q = arg[t * span + (p - lo[t])];
            if (t > 1) {
                st[t - 1] = q;
                if ((q == lo[t - 1] && lo[t - 1] > 1) || (q == hi[t - 1] && hi[t - 1] < m - 1))
                    edge = 1;
            }
            p = q;
        }
    }
    free(f);
    free(arg);
    free(lo);
    return edge;
}

/* |value| code (15 bits) of a value-order 16-bit key */
static inline int32_t magnitude_code(int32_t key) {
    return key < 0x8000 ? 0x7FFF - key : key - 0x8000;
}

/* Coarse block of a value-order key: the low `shift` bits of the magnitude code merged in the
 * top three 1024-code ranges (binades for fp16 codes) below the group's largest, `shift` + d
 * bits d ranges further down (at most a whole range): blocks about as wide in value near zero
 * as at the top, where codes are 2^d times finer but the clusters are not. Monotone in the key. */
static inline int32_t coarse_id(int32_t key, int32_t etop, int64_t shift) {
    int32_t h = magnitude_code(key);
    int32_t d = etop - 2 - (h >> 10);
    int32_t sh = (int32_t)shift + (d > 0 ? d : 0);
    if (sh > 10) sh = 10;
    int32_t id = h & ~((1 << sh) - 1);
    return key < 0x8000 ? -1 - id : id;
}

/* DP over m bins given their prefix sums (see solve(): shift / key / window). Returns 0 on
 * success, -1 on allocation failure. */
static int solve_prefix(const double *p0, const double *p1, const double *p2, const int32_t *key,
                        int64_t m, int64_t k, int64_t shift, int64_t *out) {
    int failed = 0;
    int64_t nc = 0;
    int64_t *cut = NULL;
    if (shift > 0 && k < m) {
        /* coarse level: merge bins whose keys agree above the low `shift` bits */
        cut = (int64_t *)malloc(sizeof(int64_t) * (size_t)(m + 1));
        if (!cut) return -1;
        int32_t etop = magnitude_code(key[0]) >> 10, e1 = magnitude_code(key[m - 1]) >> 10;
        etop = e1 > etop ? e1 : etop;
        cut[0] = 0;
        int32_t prev_id = coarse_id(key[0], etop, shift);
        for (int64_t i = 1; i < m; ++i) {
            int32_t id = coarse_id(key[i], etop, shift);
            if (id != prev_id) cut[++nc] = i;
            prev_id = id;
        }
        cut[++nc] = m;
    }
    if (cut == NULL || nc <= 2 * k) {
        failed = dp_starts(p0, p1, p2, m, k, out);
    } else {
        double *q = (double *)malloc(sizeof(double) * 3 * (size_t)(nc + 1));
        if (!q) {
            free(cut);
            return -1;
        }
        for (int64_t t = 0; t <= nc; ++t) {
            q[t] = p0[cut[t]];
            q[(nc + 1) + t] = p1[cut[t]];
            q[2 * (nc + 1) + t] = p2[cut[t]];
        }
        failed = dp_starts(q, q + (nc + 1), q + 2 * (nc + 1), nc, k, out);
        free(q);
        if (!failed) {
            for (int64_t c = 0; c <= k; ++c) out[c] = cut[out[c]];
            /* window: two coarse bins' worth of fine bins on each side (at least 2 << shift) */
            int64_t win = (int64_t)2 << shift;
            int64_t per = 2 * ((m + nc - 1) / nc);
            if (per > win) win = per;
            for (int round = 0; round < 16; ++round) {
                int r = window_refine(p0, p1, p2, m, k, win, out);
                if (r < 0) failed = 1;
                if (r <= 0) break;
            }
        }
    }
    free(cut);
    return failed;
}

/* Returns 0 on success, -1 on allocation failure. */
static int solve_group(const double *w, const double *s1, const double *s2, const int32_t *key,
                       int64_t m, int64_t k, int64_t shift, int64_t *out) {
    double *p = (double *)malloc(sizeof(double) * 3 * (size_t)(m + 1));
    if (!p) return -1;
    double *p0 = p, *p1 = p + (m + 1), *p2 = p + 2 * (m + 1);
    p0[0] = p1[0] = p2[0] = 0.0;
    double r0 = 0.0, r1 = 0.0, r2 = 0.0;
    for (int64_t i = 0; i < m; ++i) {
        r0 += w[i];
        r1 += s1[i];
        r2 += s2[i];
        p0[i + 1] = r0;
        p1[i + 1] = r1;
        p2[i + 1] = r2;
    }
    int failed = solve_prefix(p0, p1, p2, key, m, k, shift, out);
    free(p);
    return failed;
}

/* ------------------------------------------------------------------------------------------ */
/* Fused fast mode on the CPU: 16-bit code histogram, DP and labels of a group in one place.  */
/* ------------------------------------------------------------------------------------------ */

/* IEEE binary16 / bfloat16 bit pattern -> float32 (exact) */
static inline float f16_to_f32(uint32_t h) {
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    float v;
    if (e == 0) {
        v = (float)m * 5.9604644775390625e-8f; /* subnormal: m * 2^-24 */
    } else if (e == 31) {
        v = m ? NAN : INFINITY;
    } else {
        uint32_t u = ((e + 112u) << 23) | (m << 13);
        memcpy(&v, &u, sizeof(v));
    }
    return (h & 0x8000u) ? -v : v;
}

static inline float bf16_to_f32(uint32_t h) {
    uint32_t u = h << 16;
    float v;
    memcpy(&v, &u, sizeof(v));
    return v;
}

/* float32 -> IEEE binary16 bit pattern, round to nearest even (what torch's .half() does). */
static inline uint32_t f32_to_f16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u);
    if (a >= 0x477FF000u) return sign | 0x7C00u; /* rounds to infinity */
    if (a >= 0x38800000u) {                       /* normal half */
        uint32_t m = a - 0x38000000u;              /* exponent rebiased from 127 to 15 */
        m += 0x0FFFu + ((m >> 13) & 1u);
        return sign | (m >> 13);
    }
    uint32_t e = a >> 23; /* half subnormal or zero: units of 2^-24 */
    if (e < 102u) return sign;
    uint32_t mm = (a & 0x7FFFFFu) | 0x800000u;
    uint32_t sh = 126u - e; /* 14..24 */
    uint32_t r = mm >> sh, rem = mm & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return sign | r;
}

/* value-order key of a 16-bit float pattern: negatives reversed below positives */
static inline uint32_t order_key(uint32_t raw) {
    return raw >= 0x8000u ? raw ^ 0xFFFFu : raw ^ 0x8000u;
}

/* inputs of the fused fast mode: float32 clustered by its fp16 codes, fp16, bf16 */
enum { IN_F32 = 0, IN_F16 = 1, IN_BF16 = 2 };

/* the value of a value-order key (fp16 codes for IN_F32 and IN_F16, bf16 for IN_BF16) */
static inline double key_value(uint32_t key, int kind) {
    uint32_t raw = key >= 0x8000u ? key ^ 0x8000u : key ^ 0xFFFFu;
    return kind == IN_BF16 ? (double)bf16_to_f32(raw) : (double)f16_to_f32(raw);
}

/* The clusters of m bins in ascending value order from their prefix sums p (3 rows of m + 1:
 * weight, weight * (value - mu), weight * (value - mu)^2): the DP (keys for the coarse level
 * when shift > 0), centroids (weighted mean; the plain mean, from bval and the element counts
 * bc, for a cluster without weight; bc NULL: the weights are the counts), empty slots, only at
 * the end, repeating the last centroid, the summed error and each bin's cluster in binlab.
 * *coarse is set when a cluster spans fewer than 32 bins that hold more than two elements
 * each on average (the fast mode's sign of too coarse codes). */
static int clusters_from_prefix(const double *p, double mu, const double *bval,
                                const double *bc, const int32_t *bkey, int64_t m, int64_t k,
                                int64_t shift, int64_t *st, uint8_t *binlab, float *cent,
                                double *inertia, int *coarse) {
    const double *p0 = p, *p1 = p + (m + 1), *p2 = p + 2 * (m + 1);
    if (solve_prefix(p0, p1, p2, bkey, m, k, shift, st)) return -1;
    double tot = 0.0, last = 0.0;
    *coarse = 0;
    for (int64_t c = 0; c < k; ++c) {
        int64_t a = st[c], b = st[c + 1];
        double sc = 0.0, sv = 0.0;
        if (b > a) memset(binlab + a, (int)c, (size_t)(b - a));
        if (bc == NULL) {
            sc = p0[b] - p0[a]; /* counts are the weights: no second sum (sv is not read) */
        } else {
            for (int64_t t = a; t < b; ++t) {
                sc += bc[t];
                sv += bc[t] * bval[t];
            }
        }
        if (sc <= 0.0) {
            cent[c] = (float)last;
            continue;
        }
        double sw = p0[b] - p0[a], sx = p1[b] - p1[a], sxx = p2[b] - p2[a];
        double cc = sw > 0.0 ? mu + sx / sw : sv / sc;
        if (sw > 0.0) {
            double err = sxx - sx * sx / sw;
            tot += err > 0.0 ? err : 0.0;
        }
        last = cc;
        cent[c] = (float)cc;
        if ((b - a) < 32 && sc > 2.0 * (double)(b - a)) *coarse = 1;
    }
    *inertia = tot;
    return 0;
}

/* clusters_from_prefix of m bins given as arrays (value, weight, element count; bc == bw when
 * the weights are the counts): the prefix sums, centred on the weighted mean so that the DP's
 * differences do not cancel, go to p (scratch of 3 (m + 1) doubles). */
static int cluster_bins(const double *bval, const double *bw, const double *bc,
                        const int32_t *bkey, int64_t m, int64_t k, int64_t shift, double *p,
                        int64_t *st, uint8_t *binlab, float *cent, double *inertia, int *coarse) {
    /* the centre only has to be near the data: four sums at a time, not one long chain */
    double wt4[4] = {0.0, 0.0, 0.0, 0.0}, wv4[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t b4 = 0;
    for (; b4 + 4 <= m; b4 += 4)
        for (int t = 0; t < 4; ++t) {
            wt4[t] += bw[b4 + t];
            wv4[t] += bw[b4 + t] * bval[b4 + t];
        }
    for (; b4 < m; ++b4) {
        wt4[0] += bw[b4];
        wv4[0] += bw[b4] * bval[b4];
    }
    double wtot = (wt4[0] + wt4[1]) + (wt4[2] + wt4[3]), wv = (wv4[0] + wv4[1]) + (wv4[2] + wv4[3]);
    double mu = wtot > 0.0 ? wv / wtot : 0.0;
    double *p0 = p, *p1 = p + (m + 1), *p2 = p + 2 * (m + 1);
    p0[0] = p1[0] = p2[0] = 0.0;
    double r0 = 0.0, r1 = 0.0, r2 = 0.0; /* running sums in registers (the rows may alias) */
    for (int64_t b = 0; b < m; ++b) {
        double d = bval[b] - mu, wt = bw[b];
        r0 += wt;
        r1 += wt * d;
        r2 += wt * d * d;
        p0[b + 1] = r0;
        p1[b + 1] = r1;
        p2[b + 1] = r2;
    }
    return clusters_from_prefix(p, mu, bc == bw ? NULL : bval, bc == bw ? NULL : bc, bkey, m, k,
                                shift, st, binlab, cent, inertia, coarse);
}

typedef struct {
    int32_t *cnt;    /* [65536] elements per code */
    uint64_t *seen;  /* [1024] bitmap of present codes */
    uint16_t *ekey;  /* [n] each element's code, kept from the histogram pass for the labels */
    double *wsum;    /* [65536] summed weight per code (weighted only) */
    uint8_t *lab;    /* [65536] label of each present code */
    uint8_t *binlab; /* [65536] label of each bin */
    int32_t *bkey;   /* [65536] code of each bin */
    double *bval;    /* [65536] value of each bin (weighted only) */
    double *bw;      /* [65536] summed weight per bin (weighted only) */
    double *bc;      /* [65536] element count per bin (weighted only) */
    double *p;       /* [3 * 65537] prefix sums */
    int64_t starts[257];
} codes_ws_t;

static void codes_ws_free(codes_ws_t *s) {
    free(s->cnt);
    free(s->seen);
    free(s->ekey);
    free(s->wsum);
    free(s->lab);
    free(s->binlab);
    free(s->bkey);
    free(s->bval);
    free(s->bw);
    free(s->bc);
    free(s->p);
}

#if defined(_MSC_VER)
#define LP_TLS __declspec(thread)
#else
#define LP_TLS _Thread_local
#endif

/* Each thread keeps its workspace between calls (fresh ~4 MB per call cost more in page
 * faults than small layers take to solve). The count tables are all zero between groups
 * (cleared behind the scan); the element-code buffer is kept up to KEEP_EKEY elements. */
#define KEEP_EKEY ((int64_t)1 << 21)
static LP_TLS codes_ws_t tls_ws;
static LP_TLS int64_t tls_ekey_cap;

static codes_ws_t *codes_ws_get(int weighted, int64_t group_n) {
    const size_t n = 65536;
    codes_ws_t *s = &tls_ws;
    if (!s->cnt) {
        s->cnt = (int32_t *)calloc(n, sizeof(int32_t));
        s->seen = (uint64_t *)calloc(n / 64, sizeof(uint64_t));
        s->lab = (uint8_t *)malloc(n);
        s->binlab = (uint8_t *)malloc(n);
        s->bkey = (int32_t *)malloc(n * sizeof(int32_t));
        s->bval = (double *)malloc(n * sizeof(double));
        s->bw = (double *)malloc(n * sizeof(double));
        s->bc = (double *)malloc(n * sizeof(double));
        s->p = (double *)malloc(3 * (n + 1) * sizeof(double));
        if (!s->cnt || !s->seen || !s->lab || !s->binlab || !s->bkey || !s->bval || !s->bw ||
            !s->bc || !s->p) {
            codes_ws_free(s);
            memset(s, 0, sizeof(*s));
            tls_ekey_cap = 0;
            return NULL;
        }
    }
    if (weighted && !s->wsum && !(s->wsum = (double *)calloc(n, sizeof(double)))) return NULL;
    int64_t need = group_n > 0 ? group_n : 1;
    if (need > tls_ekey_cap) {
        free(s->ekey);
        s->ekey = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)need);
        tls_ekey_cap = s->ekey ? need : 0;
        if (!s->ekey) return NULL;
    }
    return s;
}

/* after a call: drop a large element-code buffer (the tables stay) */
static void codes_ws_trim(void) {
    if (tls_ekey_cap > KEEP_EKEY) {
        free(tls_ws.ekey);
        tls_ws.ekey = NULL;
        tls_ekey_cap = 0;
    }
}

/* code (value-order key) of element i */
static inline uint32_t elem_key(const void *x, int kind, float sf, int64_t i) {
    if (kind == IN_F32) return order_key(f32_to_f16_bits(((const float *)x)[i] * sf));
    return order_key(((const uint16_t *)x)[i]);
}

/* out[i] = value-order key of element i (x * sf rounded to binary16 for float32 input). */
static void element_keys_scalar(const void *x, int kind, float sf, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = (uint16_t)elem_key(x, kind, sf, i);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* F16C converts 8 floats at once, rounding to nearest even like the scalar code */
__attribute__((target("avx2,f16c"))) static void element_keys_f16c(const float *x, float sf,
                                                                     int64_t n, uint16_t *out) {
    const __m256 scale = _mm256_set1_ps(sf);
    const __m128i sign = _mm_set1_epi16((short)0x8000), ones = _mm_set1_epi16((short)0xFFFF);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* order_key: negatives (sign bit set) ^ 0xFFFF, others ^ 0x8000 */
        __m128i neg = _mm_srai_epi16(h, 15); /* 0xFFFF where negative */
        __m128i flip = _mm_or_si128(sign, _mm_and_si128(neg, ones));
        _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(h, flip));
    }
    for (; i < n; ++i) out[i] = (uint16_t)order_key(f32_to_f16_bits(x[i] * sf));
}
#endif

static void element_keys(const void *x, int kind, float sf, int64_t n, uint16_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (kind == IN_F32 && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2")) {
        element_keys_f16c((const float *)x, sf, n, out);
        return;
    }
#endif
    element_keys_scalar(x, kind, sf, n, out);
}

/* The next present code of the 1024-word bitmap `seen`, in ascending order, into *kk; 0 when
 * none is left. *word and *bits are the cursor (both 0 to start); clear: zero each word of
 * the bitmap as it is taken. */
static inline int next_code(uint64_t *seen, uint32_t *word, uint64_t *bits, int clear,
                            uint32_t *kk) {
    while (!*bits) {
        if (*word >= 1024u) return 0;
        *bits = seen[*word];
        if (clear) seen[*word] = 0;
        ++*word;
    }
    *kk = ((*word - 1) << 6) | (uint32_t)__builtin_ctzll(*bits);
    *bits &= *bits - 1;
    return 1;
}

/* Low code bits the coarse level merges for m bins and k clusters (0: the exact DP over every
 * bin); the torch program in kmeans.py calls it too (py_coarse_shift). */
static int64_t coarse_shift(int64_t m, int64_t k) {
    if (m <= 2048) return 0;
    int64_t bl = 0;
    for (int64_t q = k / 16; q > 0; q >>= 1) ++bl;
    int64_t shift = 4 - (bl - 1 > 0 ? bl - 1 : 0);
    return shift < 0 ? 0 : (shift > 4 ? 4 : shift);
}

/* One group of n elements (kind: IN_*). Writes labels[n], cent[k], *inertia, *flag (1: fp32
 * group too coarsely resolved by its codes, or scale out of float range: the caller re-solves
 * it exactly; 2: x holds NaN or Inf, nothing else written). Returns -1 on failure. */
static int codes_group(const void *x, int kind, const float *w, int64_t n, int64_t k,
                       codes_ws_t *s, uint8_t *labels, float *cent, double *inertia,
                       uint8_t *flag) {
    double scale = 1.0;
    float sf = 1.0f;
    *flag = 0;
    if (kind == IN_F32) {
        const float *xf = (const float *)x;
        /* eight independent maxima (no dependency chain through one accumulator) */
        float mx[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            for (int t = 0; t < 8; ++t) {
                float a = fabsf(xf[i + t]);
                mx[t] = a > mx[t] ? a : mx[t];
            }
        for (; i < n; ++i) {
            float a = fabsf(xf[i]);
            mx[0] = a > mx[0] ? a : mx[0];
        }
        float amax = 0.0f;
        for (int t = 0; t < 8; ++t) amax = mx[t] > amax ? mx[t] : amax;
        if (isinf(amax)) { /* (NaN does not win a comparison: the codes below catch it) */
            *flag = 2;
            return 0;
        }
        int e2 = 1;
        if (amax > 0.0f) frexp((double)amax, &e2);
        int e = amax > 0.0f ? e2 - 1 : 0;
        if (14 - e > 126) { /* weights below ~2^-112: let the exact path take them */
            *flag = 1;
            return 0;
        }
        scale = ldexp(1.0, 14 - e);
        sf = (float)scale;
    }
    /* every element's code (value-order key), then the histogram */
    element_keys(x, kind, sf, n, s->ekey);
    int32_t *cnt = s->cnt;
    uint64_t *seen = s->seen;
    const uint16_t *ek = s->ekey;
    if (w == NULL) {
        for (int64_t i = 0; i < n; ++i) {
            uint32_t kk = ek[i];
            cnt[kk]++;
            seen[kk >> 6] |= (uint64_t)1 << (kk & 63u);
        }
    } else {
        double *ws = s->wsum;
        for (int64_t i = 0; i < n; ++i) {
            uint32_t kk = ek[i];
            cnt[kk]++;
            ws[kk] += (double)w[i];
            seen[kk >> 6] |= (uint64_t)1 << (kk & 63u);
        }
    }
    /* present codes in value order (set bits of the bitmap); the tables are cleared behind
     * the last pass over them */
    int64_t m = 0;
    int32_t *bkey = s->bkey;
    const double inv = 1.0 / scale; /* a power of two: exact */
    int64_t shift_m = 0;            /* bins, for the coarse level's shift */
    int coarse = 0;
    int failed;
    if (w == NULL) {
        /* the counts are the weights: the centre in a first pass, then the prefix sums
         * straight from the tables (no per-bin value and weight arrays) */
        double s0 = 0.0, s1 = 0.0;
        uint32_t word = 0, kk;
        uint64_t bits = 0;
        while (next_code(seen, &word, &bits, 0, &kk)) {
            ++m;
            s0 += (double)cnt[kk];
            s1 += (double)cnt[kk] * key_value(kk, kind);
        }
        double mu = s1 / s0 * inv;
        double *p0 = s->p, *p1 = s->p + (m + 1), *p2 = s->p + 2 * (m + 1);
        double r0 = 0.0, r1 = 0.0, r2 = 0.0;
        p0[0] = p1[0] = p2[0] = 0.0;
        int64_t b = 0;
        word = 0;
        while (next_code(seen, &word, &bits, 1, &kk)) {
            double c = (double)cnt[kk], d = key_value(kk, kind) * inv - mu;
            cnt[kk] = 0;
            bkey[b++] = (int32_t)kk;
            r0 += c;
            r1 += c * d;
            r2 += c * d * d;
            p0[b] = r0;
            p1[b] = r1;
            p2[b] = r2;
        }
        /* NaN and Inf codes sort past every finite one: only the two ends can hold them */
        if (!isfinite(key_value(bkey[0], kind)) || !isfinite(key_value(bkey[m - 1], kind))) {
            *flag = 2;
            return 0;
        }
        shift_m = coarse_shift(m, k);
        failed = clusters_from_prefix(s->p, mu, NULL, NULL, bkey, m, k, shift_m, s->starts,
                                      s->binlab, cent, inertia, &coarse);
    } else {
        double *bval = s->bval, *bw = s->bw, *bc = s->bc, *wsum = s->wsum;
        uint32_t word = 0, kk;
        uint64_t bits = 0;
        while (next_code(seen, &word, &bits, 1, &kk)) {
            bkey[m] = (int32_t)kk;
            bval[m] = key_value(kk, kind) * inv;
            bw[m] = wsum[kk];
            bc[m] = (double)cnt[kk];
            wsum[kk] = 0.0;
            cnt[kk] = 0;
            ++m;
        }
        if (!isfinite(bval[0]) || !isfinite(bval[m - 1])) {
            *flag = 2;
            return 0;
        }
        shift_m = coarse_shift(m, k);
        failed = cluster_bins(bval, bw, bc, bkey, m, k, shift_m, s->p, s->starts, s->binlab,
                              cent, inertia, &coarse);
    }
    if (failed) return -1;
    if (kind == IN_F32 && coarse) *flag = 1;
    {
        uint8_t *lab_w = s->lab;
        const uint8_t *binlab = s->binlab;
        for (int64_t b = 0; b < m; ++b) lab_w[bkey[b]] = binlab[b];
    }
    const uint8_t *lab = s->lab; /* locals: stores to labels may not alias the workspace */
    for (int64_t i = 0; i < n; ++i) labels[i] = lab[ek[i]];
    return 0;
}

/*
 * codes(jobs, inertia, flag, g0, g1)
 *   jobs    : int64[J * 7], one row per LUT group, from any number of tensors: the address of
 *             its n elements x, their kind (IN_F32, IN_F16, IN_BF16), the address of float32[n]
 *             importances w (0: none), n, k (1..256), the address of uint8[n] labels (out) and
 *             of float32[k] centroids (out)
 *   inertia : float64[J] out;  flag: uint8[J] out (see codes_group)
 * Jobs g0..g1-1 are solved with the GIL released. The caller keeps every addressed buffer
 * alive and sized as the row says.
 */
enum { JOB_X, JOB_KIND, JOB_W, JOB_N, JOB_K, JOB_LABELS, JOB_CENT, JOB_FIELDS };

static PyObject *py_codes(PyObject *self, PyObject *args) {
    Py_buffer bj, bi, bf;
    long long g0, g1;
    if (!PyArg_ParseTuple(args, "y*w*w*LL", &bj, &bi, &bf, &g0, &g1)) return NULL;
    PyObject *ret = NULL;
    const int64_t *jobs = (const int64_t *)bj.buf;
    int64_t nj = bi.len / (Py_ssize_t)sizeof(double), nmax = 0;
    int bad = bj.len != nj * JOB_FIELDS * (Py_ssize_t)sizeof(int64_t) || bf.len != nj || g0 < 0 ||
              g1 > nj || g0 > g1;
    for (int64_t q = g0; q < g1 && !bad; ++q) {
        const int64_t *job = jobs + q * JOB_FIELDS;
        bad = job[JOB_KIND] < IN_F32 || job[JOB_KIND] > IN_BF16 || job[JOB_N] < 1 ||
              job[JOB_K] < 1 || job[JOB_K] > 256 || !job[JOB_X] || !job[JOB_LABELS] ||
              !job[JOB_CENT];
        if (job[JOB_N] > nmax) nmax = job[JOB_N];
    }
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "_kmeans1d.codes: inconsistent arguments");
        goto done;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS codes_ws_t *ws = NULL;
    for (int64_t q = g0; q < g1 && !failed; ++q) {
        const int64_t *job = jobs + q * JOB_FIELDS;
        if (!ws || job[JOB_W]) ws = codes_ws_get(job[JOB_W] != 0, nmax);
        failed = !ws || codes_group((const void *)(uintptr_t)job[JOB_X], (int)job[JOB_KIND],
                                    (const float *)(uintptr_t)job[JOB_W], job[JOB_N], job[JOB_K],
                                    ws, (uint8_t *)(uintptr_t)job[JOB_LABELS],
                                    (float *)(uintptr_t)job[JOB_CENT], (double *)bi.buf + q,
                                    (uint8_t *)bf.buf + q) != 0;
    }
    codes_ws_trim();
    Py_END_ALLOW_THREADS if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&bj);
    PyBuffer_Release(&bi);
    PyBuffer_Release(&bf);
    return ret;
}

/* ------------------------------------------------------------------------------------------ */
/* Exact mode on the CPU: every distinct float32 value is a bin.                              */
/* ------------------------------------------------------------------------------------------ */

/* order-preserving unsigned key of a float32 bit pattern */
static inline uint32_t f32_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

typedef struct {
    uint32_t *key, *key2;
    int32_t *idx, *idx2;
    double *bval, *bw, *bc, *p;
    int32_t *bstart; /* sorted position where each bin starts (m + 1) */
    uint8_t *binlab;
} exact_ws_t;

static void exact_ws_free(exact_ws_t *s) {
    free(s->key);
    free(s->key2);
    free(s->idx);
    free(s->idx2);
    free(s->bval);
    free(s->bw);
    free(s->bc);
    free(s->p);
    free(s->bstart);
    free(s->binlab);
    memset(s, 0, sizeof(*s));
}

static int exact_ws_alloc(exact_ws_t *s, int64_t n) {
    size_t u = (size_t)n;
    memset(s, 0, sizeof(*s));
    s->key = (uint32_t *)malloc(u * 4);
    s->key2 = (uint32_t *)malloc(u * 4);
    s->idx = (int32_t *)malloc(u * 4);
    s->idx2 = (int32_t *)malloc(u * 4);
    s->bval = (double *)malloc(u * 8);
    s->bw = (double *)malloc(u * 8);
    s->bc = (double *)malloc(u * 8);
    s->p = (double *)malloc(3 * (u + 1) * 8);
    s->bstart = (int32_t *)malloc((u + 1) * 4);
    s->binlab = (uint8_t *)malloc(u);
    if (!s->key || !s->key2 || !s->idx || !s->idx2 || !s->bval || !s->bw || !s->bc || !s->p ||
        !s->bstart || !s->binlab) {
        exact_ws_free(s);
        return -1;
    }
    return 0;
}

/* One group: LSD radix sort of the values (3 passes of 11 bits), bins of equal values, the
 * exact DP over them, labels through the sort permutation. */
static int exact_group(const float *x, const float *w, int64_t n, int64_t k, exact_ws_t *s,
                       uint8_t *labels, float *cent, double *inertia) {
    uint32_t *key = s->key, *key2 = s->key2;
    int32_t *idx = s->idx, *idx2 = s->idx2;
    for (int64_t i = 0; i < n; ++i) {
        key[i] = f32_key(x[i]);
        idx[i] = (int32_t)i;
    }
    for (int pass = 0; pass < 3; ++pass) {
        int sh = 11 * pass;
        uint32_t mask = pass == 2 ? 0x3FFu : 0x7FFu;
        int64_t count[2049];
        memset(count, 0, sizeof(count));
        for (int64_t i = 0; i < n; ++i) count[((key[i] >> sh) & mask) + 1]++;
        if (count[((key[0] >> sh) & mask) + 1] == n) continue; /* one bucket: order unchanged */
        for (int b = 1; b < 2049; ++b) count[b] += count[b - 1];
        for (int64_t i = 0; i < n; ++i) {
            int64_t d = count[(key[i] >> sh) & mask]++;
            key2[d] = key[i];
            idx2[d] = idx[i];
        }
        uint32_t *tk = key;
        key = key2;
        key2 = tk;
        int32_t *ti = idx;
        idx = idx2;
        idx2 = ti;
    }
    /* bins of equal values (-0.0 and +0.0 are one value) */
    int64_t m = 0;
    for (int64_t q = 0; q < n; ++q) {
        double v = (double)x[idx[q]];
        double wt = w ? (double)w[idx[q]] : 1.0;
        if (m == 0 || v != s->bval[m - 1]) {
            s->bstart[m] = (int32_t)q;
            s->bval[m] = v;
            s->bw[m] = 0.0;
            s->bc[m] = 0.0;
            ++m;
        }
        s->bw[m - 1] += wt;
        if (w) s->bc[m - 1] += 1.0;
    }
    s->bstart[m] = (int32_t)n;
    int64_t st[257];
    int coarse;
    if (cluster_bins(s->bval, s->bw, w ? s->bc : s->bw, NULL, m, k, 0, s->p, st, s->binlab, cent,
                     inertia, &coarse))
        return -1;
    for (int64_t b = 0; b < m; ++b)
        for (int32_t q = s->bstart[b]; q < s->bstart[b + 1]; ++q) labels[idx[q]] = s->binlab[b];
    return 0;
}

/*
 * exact(x, w, k, labels, cent, inertia, g0, g1): exact mode of kmeans.py for float32 CPU
 * tensors. x float32[G*N]; w float32[G*N] or None; labels uint8[G*N], cent float32[G*k],
 * inertia float64[G] out. Groups g0..g1-1 (the GIL is released).
 */
static PyObject *py_exact(PyObject *self, PyObject *args) {
    Py_buffer bx, bw, bl, bc, bi;
    PyObject *wobj;
    long long k, g0, g1;
    if (!PyArg_ParseTuple(args, "y*OLw*w*w*LL", &bx, &wobj, &k, &bl, &bc, &bi, &g0, &g1))
        return NULL;
    PyObject *ret = NULL;
    int have_w = wobj != Py_None;
    if (have_w && PyObject_GetBuffer(wobj, &bw, PyBUF_SIMPLE) < 0) goto done_nobw;
    {
        int64_t g = bi.len / (Py_ssize_t)sizeof(double);
        int64_t n = g > 0 ? bx.len / 4 / g : 0;
        if (k < 1 || k > 256 || g0 < 0 || g1 > g || g0 > g1 || bx.len != g * n * 4 ||
            bl.len != g * n || bc.len != g * k * 4 || n >= ((int64_t)1 << 31) ||
            (have_w && bw.len != g * n * 4)) {
            PyErr_SetString(PyExc_ValueError, "_kmeans1d.exact: inconsistent arguments");
            goto done;
        }
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS exact_ws_t ws;
        if (n > 0 && exact_ws_alloc(&ws, n)) failed = 1;
        for (int64_t q = g0; q < g1 && !failed && n > 0; ++q)
            failed = exact_group((const float *)bx.buf + q * n,
                                 have_w ? (const float *)bw.buf + q * n : NULL, n, k, &ws,
                                 (uint8_t *)bl.buf + q * n, (float *)bc.buf + q * k,
                                 (double *)bi.buf + q) != 0;
        if (n > 0) exact_ws_free(&ws);
        Py_END_ALLOW_THREADS if (failed) {
            PyErr_NoMemory();
            goto done;
        }
        ret = Py_None;
        Py_INCREF(ret);
    }
done:
    if (have_w) PyBuffer_Release(&bw);
done_nobw:
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bc);
    PyBuffer_Release(&bi);
    return ret;
}

/* binary16 / bfloat16 bit patterns <-> float32 (round to nearest even, as torch) */
static inline uint32_t f32_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (u >> 16) | 0x40u; /* NaN stays NaN */
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

enum { OUT_F32 = 0, OUT_F16 = 1, OUT_BF16 = 2 };

/*
 * write_lut(out, labels, lut, k, kind) -> (err, ref): out[g, i] = lut[g, labels[g, i]] rounded
 * to out's dtype (kind 0 float32, 1 float16, 2 bfloat16) for out[G*N], uint8 labels[G*N],
 * float32 lut[G*k]; returns sum((before - after)^2) and sum(before^2) in float64. One pass
 * instead of a gather, a cast, a difference and two reductions.
 */
static PyObject *py_write_lut(PyObject *self, PyObject *args) {
    Py_buffer bo, bl, bt;
    long long k;
    int kind;
    if (!PyArg_ParseTuple(args, "w*y*y*Li", &bo, &bl, &bt, &k, &kind)) return NULL;
    PyObject *ret = NULL;
    int64_t total = bl.len, g = k > 0 ? bt.len / 4 / k : 0, isz = kind == OUT_F32 ? 4 : 2;
    if (k < 1 || k > 256 || kind < OUT_F32 || kind > OUT_BF16 || bo.len != total * isz ||
        bt.len != g * k * 4 || g < 1 || total % g) {
        PyErr_SetString(PyExc_ValueError, "_kmeans1d.write_lut: inconsistent arguments");
    } else {
        double err = 0.0, ref = 0.0;
        int64_t n = total / g;
        Py_BEGIN_ALLOW_THREADS for (int64_t q = 0; q < g; ++q) {
            const uint8_t *l = (const uint8_t *)bl.buf + q * n;
            const float *t = (const float *)bt.buf + q * k;
            double e = 0.0, r = 0.0;
            if (kind == OUT_F32) {
                float *o = (float *)bo.buf + q * n;
                for (int64_t i = 0; i < n; ++i) {
                    float before = o[i], after = t[l[i]];
                    double d = (double)before - (double)after;
                    e += d * d;
                    r += (double)before * (double)before;
                    o[i] = after;
                }
            } else {
                /* the LUT rounded to the weight's dtype once, then per element a lookup */
                uint16_t tb[256];
                float tv[256];
                for (int64_t c = 0; c < k; ++c) {
                    tb[c] = (uint16_t)(kind == OUT_F16 ? f32_to_f16_bits(t[c])
                                                       : f32_to_bf16_bits(t[c]));
                    tv[c] = kind == OUT_F16 ? f16_to_f32(tb[c]) : bf16_to_f32(tb[c]);
                }
                uint16_t *o = (uint16_t *)bo.buf + q * n;
                for (int64_t i = 0; i < n; ++i) {
                    float before = kind == OUT_F16 ? f16_to_f32(o[i]) : bf16_to_f32(o[i]);
                    double d = (double)before - (double)tv[l[i]];
                    e += d * d;
                    r += (double)before * (double)before;
                    o[i] = tb[l[i]];
                }
            }
            err += e;
            ref += r;
        }
        Py_END_ALLOW_THREADS ret = Py_BuildValue("(dd)", err, ref);
    }
    PyBuffer_Release(&bo);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bt);
    return ret;
}

/* half_bits(x: float32 buffer, out: uint16 buffer): the fast mode's float32 -> binary16
 * conversion (F16C or the portable code, as dispatched), for tests */
static PyObject *py_half_bits(PyObject *self, PyObject *args) {
    Py_buffer bx, bo;
    if (!PyArg_ParseTuple(args, "y*w*", &bx, &bo)) return NULL;
    PyObject *ret = NULL;
    if (bo.len * 2 != bx.len) {
        PyErr_SetString(PyExc_ValueError, "_kmeans1d.half_bits: inconsistent arguments");
    } else {
        /* through the dispatch the fast mode uses (F16C where present), back to raw bits */
        uint16_t *o = (uint16_t *)bo.buf;
        element_keys(bx.buf, IN_F32, 1.0f, bo.len / 2, o);
        for (Py_ssize_t i = 0; i < bo.len / 2; ++i)
            o[i] = (uint16_t)(o[i] < 0x8000u ? o[i] ^ 0xFFFFu : o[i] ^ 0x8000u);
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&bx);
    PyBuffer_Release(&bo);
    return ret;
}

static PyObject *py_solve(PyObject *self, PyObject *args) {
    Py_buffer bw, b1, b2, bkey, boff, bout;
    long long k, g0, g1, shift;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*Lw*LLL", &bw, &b1, &b2, &bkey, &boff, &k, &bout, &g0,
                          &g1, &shift))
        return NULL;
    PyObject *ret = NULL;
    int64_t ngroups = boff.len / (Py_ssize_t)sizeof(int64_t) - 1;
    int64_t total = bw.len / (Py_ssize_t)sizeof(double);
    const int64_t *off = (const int64_t *)boff.buf;
    if (k < 1 || k > 256 || g0 < 0 || g1 > ngroups || g0 > g1 || b1.len != bw.len ||
        b2.len != bw.len || bkey.len * 2 != bw.len || shift < 0 || shift > 15 ||
        bout.len < (Py_ssize_t)(ngroups * (k + 1) * (int64_t)sizeof(int64_t)) ||
        (ngroups >= 0 && off[ngroups] > total)) {
        PyErr_SetString(PyExc_ValueError, "_kmeans1d.solve: inconsistent arguments");
        goto done;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS for (int64_t g = g0; g < g1 && !failed; ++g) {
        int64_t a = off[g], m = off[g + 1] - off[g];
        failed = solve_group((const double *)bw.buf + a, (const double *)b1.buf + a,
                             (const double *)b2.buf + a, (const int32_t *)bkey.buf + a, m, k,
                             shift, (int64_t *)bout.buf + g * (k + 1));
    }
    Py_END_ALLOW_THREADS if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&bw);
    PyBuffer_Release(&b1);
    PyBuffer_Release(&b2);
    PyBuffer_Release(&bkey);
    PyBuffer_Release(&boff);
    PyBuffer_Release(&bout);
    return ret;
}

/* coarse_shift(m, k): the coarse level's shift for m bins and k clusters (kmeans.py's torch
 * program asks here: one rule) */
static PyObject *py_coarse_shift(PyObject *self, PyObject *args) {
    long long m, k;
    if (!PyArg_ParseTuple(args, "LL", &m, &k)) return NULL;
    return PyLong_FromLongLong((long long)coarse_shift(m, k));
}

static PyMethodDef methods[] = {
    {"coarse_shift", py_coarse_shift, METH_VARARGS, "the coarse level's shift for m bins, k"},
    {"solve", py_solve, METH_VARARGS, "Exact weighted 1-D k-means over sorted bins (see source)."},
    {"codes", py_codes, METH_VARARGS, "Fused fast mode: 16-bit code k-means per group (see source)."},
    {"exact", py_exact, METH_VARARGS, "Exact mode: k-means over every distinct float32 value."},
    {"write_lut", py_write_lut, METH_VARARGS, "Dense LUT values into a float32 weight (see source)."},
    {"half_bits", py_half_bits, METH_VARARGS, "float32 -> binary16 bit patterns (for tests)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kmeans1d", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kmeans1d(void) { return PyModule_Create(&moddef); }
