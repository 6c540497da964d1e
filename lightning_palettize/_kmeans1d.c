/*
 * Exact weighted 1-D k-means by dynamic programming over sorted bins.
 *
 * Optimal 1-D clusters are contiguous runs of the sorted values, so with prefix sums of the bin
 * weights w, w*x and w*x^2 the cost of any run is O(1) and
 *     D[k][i] = min_{k-1 <= j < i} D[k-1][j] + cost(j, i)
 * gives the optimum. The squared-error cost satisfies the quadrangle inequality, so the layer
 * matrices are totally monotone and SMAWK solves each layer in O(m): O(k m) time in all, and
 * O(k m) memory for the int32 back-pointers.
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
 * keeps the matrix totally monotone, so SMAWK finds the row minima in O(m).
 */
static inline double entry(const ctx_t *c, int64_t i, int64_t j) {
    if (j == 0) return c->prev[i] + run_cost(c, 0, i + 1);
    if (j > i) return c->prev[i];
    return c->prev[j - 1] + run_cost(c, j, i + 1);
}

static int smawk(const ctx_t *c, const int64_t *rows, int64_t nr, const int64_t *cols, int64_t nc,
                 int64_t *res) {
    if (nr == 0) return 0;
    int64_t *st = (int64_t *)malloc(sizeof(int64_t) * (size_t)(nr + nr / 2 + 1));
    if (!st) return -1;
    int64_t *odd = st + nr;
    int64_t ns = 0;
    /* REDUCE: keep at most nr columns that can still hold a row minimum. */
    for (int64_t q = 0; q < nc; ++q) {
        int64_t col = cols[q];
        while (ns > 0) {
            int64_t row = rows[ns - 1];
            if (entry(c, row, col) >= entry(c, row, st[ns - 1])) break;
            --ns;
        }
        if (ns < nr) st[ns++] = col;
    }
    int64_t no = nr / 2;
    for (int64_t t = 0; t < no; ++t) odd[t] = rows[2 * t + 1];
    if (smawk(c, odd, no, st, ns, res)) {
        free(st);
        return -1;
    }
    /* INTERPOLATE: even rows search between the minima of their odd neighbours. */
    int64_t start = 0;
    for (int64_t r = 0; r < nr; r += 2) {
        int64_t row = rows[r];
        int64_t stop = ns - 1;
        if (r < nr - 1) {
            int64_t target = res[rows[r + 1]];
            stop = start;
            while (st[stop] != target) ++stop;
        }
        int64_t best = st[start];
        double bv = entry(c, row, best);
        for (int64_t q = start + 1; q <= stop; ++q) {
            double v = entry(c, row, st[q]);
            if (v < bv) {
                bv = v;
                best = st[q];
            }
        }
        res[row] = best;
        start = stop;
    }
    free(st);
    return 0;
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
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)m);
    int32_t *arg = (int32_t *)malloc(sizeof(int32_t) * (size_t)(kk - 1) * (size_t)m);
    if (!d || !idx || !arg) {
        free(d);
        free(idx);
        free(arg);
        return -1;
    }
    double *prev = d, *cur = d + m;
    int64_t *iota = idx, *res = idx + m;
    for (int64_t i = 0; i < m; ++i) iota[i] = i;
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
        failed = smawk(&c, iota, m, iota, m, res);
        for (int64_t i = 0; i < m && !failed; ++i) {
            cur[i] = entry(&c, i, res[i]);
            a[i] = (int32_t)res[i];
        }
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

/* Returns 0 on success, -1 on allocation failure. */
static int solve_group(const double *w, const double *s1, const double *s2, const int32_t *key,
                       int64_t m, int64_t k, int64_t shift, int64_t *out) {
    double *p = (double *)malloc(sizeof(double) * 3 * (size_t)(m + 1));
    if (!p) return -1;
    double *p0 = p, *p1 = p + (m + 1), *p2 = p + 2 * (m + 1);
    p0[0] = p1[0] = p2[0] = 0.0;
    for (int64_t i = 0; i < m; ++i) {
        p0[i + 1] = p0[i] + w[i];
        p1[i + 1] = p1[i] + s1[i];
        p2[i + 1] = p2[i] + s2[i];
    }
    int failed = 0;
    int64_t nc = 0;
    int64_t *cut = NULL;
    if (shift > 0 && k < m) {
        /* coarse level: merge bins whose keys agree above the low `shift` bits */
        cut = (int64_t *)malloc(sizeof(int64_t) * (size_t)(m + 1));
        if (!cut) {
            free(p);
            return -1;
        }
        cut[0] = 0;
        for (int64_t i = 1; i < m; ++i)
            if ((key[i] >> shift) != (key[i - 1] >> shift)) cut[++nc] = i;
        cut[++nc] = m;
    }
    if (cut == NULL || nc <= 2 * k) {
        failed = dp_starts(p0, p1, p2, m, k, out);
    } else {
        double *q = (double *)malloc(sizeof(double) * 3 * (size_t)(nc + 1));
        if (!q) {
            free(cut);
            free(p);
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
            int64_t kk = k;
            int64_t win = (int64_t)2 << shift;
            for (int round = 0; round < 16; ++round) {
                int r = window_refine(p0, p1, p2, m, kk, win, out);
                if (r < 0) failed = 1;
                if (r <= 0) break;
            }
        }
    }
    free(cut);
    free(p);
    return failed;
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

static PyMethodDef methods[] = {
    {"solve", py_solve, METH_VARARGS, "Exact weighted 1-D k-means over sorted bins (see source)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kmeans1d", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kmeans1d(void) { return PyModule_Create(&moddef); }
