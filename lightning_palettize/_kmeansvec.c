/*
 * Weighted k-means of d-dimensional float32 vectors (palettization with cluster_dim > 1):
 * k-means++ seeding, then Lloyd's iterations accelerated by Hamerly's bounds.
 *
 * Hamerly keeps, for every vector, an upper bound on the distance to its assigned centroid and a
 * lower bound on the distance to every other one. After the centroids move, the bounds move by
 * at most the centroids' shifts; a vector whose upper bound stays below its lower bound (or
 * below half the distance from its centroid to the nearest other centroid) cannot change
 * cluster and is skipped. Only the remaining vectors are scanned against all k centroids. The
 * assignments are those of plain Lloyd (up to float rounding in near ties), and in low
 * dimensions (cluster_dim 2..8) late iterations skip almost every vector.
 *
 * Each iteration, in the order of kmeans.py's torch program (the same computation elsewhere):
 *   1. centroid = weighted mean of its vectors; an empty cluster keeps its centroid;
 *   2. empty-cluster repair: the r-th empty cluster (in index order) moves onto the vector with
 *      the r-th largest weighted squared distance to its centroid before the update, if that
 *      distance is positive (the iteration then counts as repaired);
 *   3. reassignment (full scan after a repair, Hamerly otherwise);
 *   4. stop when not repaired and the inertia fell by at most tol times itself.
 *
 * Python signature (C-contiguous buffers; the GIL is released while clustering):
 *     run(x, w, u, d, k, n_init, max_iter, tol, cent, labels, inertia, j0, j1)
 *       x       float32[G*N*d]     vectors of group g at x[g*N*d ...]
 *       w       float32[G*N]       importances, or None (all 1)
 *       u       float64[G*n_init*k] uniforms of the seeding: job j = g*n_init + r (restart r of
 *                                  group g) draws its t-th centroid with u[j*k + t]
 *       cent    float32[G*k*d]     out: best centroids of each group over the jobs run
 *       labels  uint8[G*N]         out: their assignments (k <= 256)
 *       inertia float64[G]         in/out: a group's result is written by its first job in
 *                                  this call, then by any job whose inertia is below the value
 *                                  held (ties keep the earlier restart)
 *       j0, j1  jobs run, in order
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
/* the distance scans are 8-wide over centroids with AVX2 where the CPU has it (chosen at load) */
#define LP_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LP_VECTOR_CLONES
#endif

#define MAXK 256

typedef struct {
    int64_t n, d, k;
    const float *x, *w; /* the group's vectors and importances (w may be NULL) */
    float *cf;          /* centroids, k x d */
    float *cnew;        /* next centroids, k x d */
    float *ct;          /* centroids transposed, d x k (the scans run over k) */
    float *ub, *lb;     /* Hamerly's bounds per vector (ub doubles as the seeding's D^2) */
    uint8_t *lab;       /* assignment per vector */
    double *sx, *sw;    /* weighted sums per cluster, k x d and k */
    double *mu, energy; /* the group's weighted mean and sum of w * |x - mu|^2 */
    float *delta, *half;
} job_t;

static inline float wt(const job_t *j, int64_t i) { return j->w ? j->w[i] : 1.0f; }

static inline float dist2(const float *a, const float *b, int64_t d) {
    float s = 0.0f;
    for (int64_t t = 0; t < d; ++t) {
        float e = a[t] - b[t];
        s += e * e;
    }
    return s;
}

static void transpose(job_t *j) {
    for (int64_t c = 0; c < j->k; ++c)
        for (int64_t t = 0; t < j->d; ++t) j->ct[t * j->k + c] = j->cf[c * j->d + t];
}

/* Nearest and second-nearest centroid of one vector: squared distances to all k centroids
 * (over the transposed centroids, so the inner loop is over k), then one pass for the two
 * smallest. Ties go to the lower index, as torch's argmin. */
static inline void scan(const float *xi, const float *ct, int64_t d, int64_t k, float *acc,
                        int *best, float *d1, float *d2) {
    for (int64_t c = 0; c < k; ++c) {
        float e = xi[0] - ct[c];
        acc[c] = e * e;
    }
    for (int64_t t = 1; t < d; ++t) {
        const float *row = ct + t * k;
        float xt = xi[t];
        for (int64_t c = 0; c < k; ++c) {
            float e = xt - row[c];
            acc[c] += e * e;
        }
    }
    /* min, its first index, then the min of the others: branch-free reductions that vectorize
     * (a running two-smallest scan is a chain of unpredictable branches) */
    float m1 = INFINITY, m2 = INFINITY;
#pragma omp simd reduction(min : m1)
    for (int64_t c = 0; c < k; ++c) m1 = acc[c] < m1 ? acc[c] : m1;
    int64_t b = 0;
    while (b < k - 1 && acc[b] != m1) ++b; /* bounded: NaN distances never equal m1 */
    acc[b] = INFINITY;
#pragma omp simd reduction(min : m2)
    for (int64_t c = 0; c < k; ++c) m2 = acc[c] < m2 ? acc[c] : m2;
    *best = (int)b;
    *d1 = m1;
    *d2 = m2;
}

/* Every vector scanned: exact assignments and fresh bounds. */
LP_VECTOR_CLONES
static void assign_all(job_t *j) {
    float acc[MAXK];
    for (int64_t i = 0; i < j->n; ++i) {
        int b;
        float d1, d2;
        scan(j->x + i * j->d, j->ct, j->d, j->k, acc, &b, &d1, &d2);
        j->lab[i] = (uint8_t)b;
        j->ub[i] = sqrtf(d1);
        j->lb[i] = sqrtf(d2);
    }
}

/* Hamerly's pass after the centroids moved by delta[c]; keeps the sums current. Returns the
 * number of vectors that changed cluster. */
LP_VECTOR_CLONES
static int64_t assign_bounded(job_t *j) {
    int64_t k = j->k, d = j->d, changed = 0;
    float acc[MAXK];
    /* half the distance from each centroid to its nearest other centroid */
    for (int64_t c = 0; c < k; ++c) j->half[c] = INFINITY;
    for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a + 1; b < k; ++b) {
            float v = dist2(j->cf + a * d, j->cf + b * d, d);
            if (v < j->half[a]) j->half[a] = v;
            if (v < j->half[b]) j->half[b] = v;
        }
    for (int64_t c = 0; c < k; ++c) j->half[c] = 0.5f * sqrtf(j->half[c]);
    /* the largest two shifts: a vector's lower bound drops by the largest shift of a centroid
     * other than its own */
    int64_t top = 0;
    float r1 = -1.0f, r2 = 0.0f;
    for (int64_t c = 0; c < k; ++c) {
        float v = j->delta[c];
        if (v > r1) {
            r2 = r1 < 0.0f ? 0.0f : r1;
            r1 = v;
            top = c;
        } else if (v > r2) {
            r2 = v;
        }
    }
    for (int64_t i = 0; i < j->n; ++i) {
        int a = j->lab[i];
        float u = j->ub[i] + j->delta[a];
        float l = j->lb[i] - (a == top ? r2 : r1);
        float z = l > j->half[a] ? l : j->half[a];
        j->lb[i] = l;
        if (u <= z) {
            j->ub[i] = u;
            continue;
        }
        const float *xi = j->x + i * d;
        u = sqrtf(dist2(xi, j->cf + (int64_t)a * d, d));
        j->ub[i] = u;
        if (u <= z) continue;
        int b;
        float d1, d2;
        scan(xi, j->ct, d, k, acc, &b, &d1, &d2);
        j->ub[i] = sqrtf(d1);
        j->lb[i] = sqrtf(d2);
        if (b != a) {
            /* move the vector's share of the sums to its new cluster */
            double wi = wt(j, i);
            double *sa = j->sx + (int64_t)a * d, *sb = j->sx + (int64_t)b * d;
            j->sw[a] -= wi;
            j->sw[b] += wi;
            for (int64_t t = 0; t < d; ++t) {
                sa[t] -= wi * xi[t];
                sb[t] += wi * xi[t];
            }
            j->lab[i] = (uint8_t)b;
            ++changed;
        }
    }
    return changed;
}

/* The weighted sums of every cluster from scratch (for the next centroid update). */
static void sums(job_t *j) {
    int64_t d = j->d;
    memset(j->sx, 0, sizeof(double) * j->k * d);
    memset(j->sw, 0, sizeof(double) * j->k);
    for (int64_t i = 0; i < j->n; ++i) {
        const float *xi = j->x + i * d;
        int a = j->lab[i];
        double wi = wt(j, i);
        j->sw[a] += wi;
        double *s = j->sx + (int64_t)a * d;
        for (int64_t t = 0; t < d; ++t) s[t] += wi * xi[t];
    }
}

/* Inertia from the sums in O(k d): sum_i w_i |x_i - c_a|^2 = sum_i w_i |x_i - mu|^2
 * + sum_c (W_c |c - mu|^2 - 2 (c - mu).(S_c - W_c mu)), centred on the group's mean so the
 * cancellation stays far below the stopping tolerance. */
static double inertia_of(const job_t *j) {
    int64_t d = j->d;
    double v = j->energy;
    for (int64_t c = 0; c < j->k; ++c) {
        double wc = j->sw[c];
        if (wc == 0.0) continue;
        for (int64_t t = 0; t < d; ++t) {
            double e = (double)j->cf[c * d + t] - j->mu[t];
            v += wc * e * e - 2.0 * e * (j->sx[c * d + t] - wc * j->mu[t]);
        }
    }
    return v > 0.0 ? v : 0.0;
}

/* The exact inertia of the current centroids and assignment (one pass). */
static double inertia_exact(const job_t *j) {
    double v = 0.0;
    for (int64_t i = 0; i < j->n; ++i)
        v += (double)wt(j, i) * dist2(j->x + i * j->d, j->cf + (int64_t)j->lab[i] * j->d, j->d);
    return v;
}

static void moments(job_t *j) {
    int64_t d = j->d;
    double tw = 0.0;
    for (int64_t t = 0; t < d; ++t) j->mu[t] = 0.0;
    for (int64_t i = 0; i < j->n; ++i) {
        double wi = wt(j, i);
        tw += wi;
        for (int64_t t = 0; t < d; ++t) j->mu[t] += wi * j->x[i * d + t];
    }
    for (int64_t t = 0; t < d; ++t) j->mu[t] = tw > 0.0 ? j->mu[t] / tw : 0.0;
    double e = 0.0;
    for (int64_t i = 0; i < j->n; ++i) {
        double wi = wt(j, i), s = 0.0;
        for (int64_t t = 0; t < d; ++t) {
            double v = j->x[i * d + t] - j->mu[t];
            s += v * v;
        }
        e += wi * s;
    }
    j->energy = e;
}

/* Index of the vector where the running sum of p = w * dsq (w alone when dsq is NULL) first
 * exceeds u * total, total being the sum of p; uniform over the vectors when it is zero. */
static int64_t draw(const job_t *j, const float *dsq, double total, double u) {
    if (!(total > 0.0)) {
        int64_t i = (int64_t)(u * (double)j->n);
        return i < j->n ? i : j->n - 1;
    }
    double target = u * total, run = 0.0;
    int64_t last = 0;
    for (int64_t i = 0; i < j->n; ++i) {
        double p = (double)(wt(j, i) * (dsq ? dsq[i] : 1.0f));
        if (p > 0.0) last = i;
        run += p;
        if (run > target) return i;
    }
    return last; /* rounding left target at the total */
}

/* D^2-weighted k-means++ seeding into cf. */
static void seed(job_t *j, const double *u) {
    int64_t d = j->d;
    float *dsq = j->ub;
    double total = 0.0;
    for (int64_t i = 0; i < j->n; ++i) total += (double)wt(j, i);
    int64_t i0 = draw(j, NULL, total, u[0]);
    memcpy(j->cf, j->x + i0 * d, sizeof(float) * d);
    total = 0.0;
    for (int64_t i = 0; i < j->n; ++i) {
        dsq[i] = dist2(j->x + i * d, j->cf, d);
        total += (double)(wt(j, i) * dsq[i]);
    }
    for (int64_t c = 1; c < j->k; ++c) {
        int64_t pick = draw(j, dsq, total, u[c]);
        float *cc = j->cf + c * d;
        memcpy(cc, j->x + pick * d, sizeof(float) * d);
        if (c == j->k - 1) break;
        total = 0.0;
        for (int64_t i = 0; i < j->n; ++i) {
            float v = dist2(j->x + i * d, cc, d);
            if (v < dsq[i]) dsq[i] = v;
            total += (double)(wt(j, i) * dsq[i]);
        }
    }
}

/* Empty-cluster repair (step 2). Returns 1 when some empty cluster took a vector at a positive
 * distance. cf still holds the centroids before the update, cnew the updated ones. */
static int repair(job_t *j) {
    int64_t k = j->k, d = j->d, m = 0;
    for (int64_t c = 0; c < k; ++c) m += j->sw[c] <= 0.0;
    if (m == 0) return 0;
    /* the m largest w * D^2 by a min-heap of (value, index), kept in descending order at the end */
    float hv[MAXK];
    int64_t hi[MAXK], size = 0;
    for (int64_t i = 0; i < j->n; ++i) {
        float v = wt(j, i) * dist2(j->x + i * d, j->cf + (int64_t)j->lab[i] * d, d);
        if (size == m && !(v > hv[0])) continue;
        int64_t p;
        if (size < m) {
            p = size++;
            while (p > 0 && hv[(p - 1) / 2] > v) {
                hv[p] = hv[(p - 1) / 2];
                hi[p] = hi[(p - 1) / 2];
                p = (p - 1) / 2;
            }
        } else {
            p = 0;
            for (;;) {
                int64_t c = 2 * p + 1;
                if (c >= size) break;
                if (c + 1 < size && hv[c + 1] < hv[c]) ++c;
                if (!(hv[c] < v)) break;
                hv[p] = hv[c];
                hi[p] = hi[c];
                p = c;
            }
        }
        hv[p] = v;
        hi[p] = i;
    }
    /* sort the heap descending (m <= 256: insertion sort) */
    for (int64_t a = 1; a < size; ++a)
        for (int64_t b = a; b > 0 && hv[b] > hv[b - 1]; --b) {
            float tv = hv[b];
            hv[b] = hv[b - 1];
            hv[b - 1] = tv;
            int64_t ti = hi[b];
            hi[b] = hi[b - 1];
            hi[b - 1] = ti;
        }
    int moved = 0;
    int64_t r = 0;
    for (int64_t c = 0; c < k && r < size; ++c) {
        if (j->sw[c] > 0.0) continue;
        if (hv[r] > 0.0f) { /* a vector served exactly gains nothing from a move */
            memcpy(j->cnew + c * d, j->x + hi[r] * d, sizeof(float) * d);
            moved = 1;
        }
        ++r;
    }
    return moved;
}

/* One restart: seeding, then Lloyd until convergence or max_iter. Returns the inertia. */
static double cluster(job_t *j, const double *u, int64_t max_iter, double tol) {
    int64_t k = j->k, d = j->d;
    seed(j, u);
    transpose(j);
    assign_all(j);
    sums(j);
    double inertia = inertia_of(j);
    for (int64_t it = 0; it < max_iter; ++it) {
        for (int64_t c = 0; c < k; ++c)
            for (int64_t t = 0; t < d; ++t)
                j->cnew[c * d + t] = j->sw[c] > 0.0 ? (float)(j->sx[c * d + t] / j->sw[c])
                                                     : j->cf[c * d + t];
        int repaired = repair(j);
        for (int64_t c = 0; c < k; ++c)
            j->delta[c] = sqrtf(dist2(j->cf + c * d, j->cnew + c * d, d));
        memcpy(j->cf, j->cnew, sizeof(float) * k * d);
        transpose(j);
        int64_t changed = 1;
        if (repaired) {
            assign_all(j);
            sums(j);
        } else {
            changed = assign_bounded(j);
        }
        double next = inertia_of(j);
        /* no vector moved: the next update would give these very centroids */
        if (!repaired && (changed == 0 || inertia - next <= tol * inertia)) break;
        inertia = next;
    }
    return inertia_exact(j);
}

static PyObject *py_run(PyObject *self, PyObject *args) {
    Py_buffer bx, bu, bc, bl, bi, bw;
    PyObject *wobj;
    long long d, k, n_init, max_iter, j0, j1;
    double tol;
    if (!PyArg_ParseTuple(args, "y*Oy*LLLLdw*w*w*LL", &bx, &wobj, &bu, &d, &k, &n_init,
                          &max_iter, &tol, &bc, &bl, &bi, &j0, &j1))
        return NULL;
    PyObject *ret = NULL;
    int have_w = wobj != Py_None;
    if (have_w && PyObject_GetBuffer(wobj, &bw, PyBUF_SIMPLE) < 0) goto done_nobw;
    {
        int64_t g = bi.len / (Py_ssize_t)sizeof(double);
        int64_t n = g > 0 ? bl.len / g : 0;
        if (d < 1 || k < 1 || k > MAXK || n_init < 1 || max_iter < 0 || g < 1 || n < 1 ||
            bl.len != g * n || bx.len != g * n * d * 4 || bc.len != g * k * d * 4 ||
            bu.len != g * n_init * k * 8 || j0 < 0 || j1 > g * n_init || j0 > j1 ||
            (have_w && bw.len != g * n * 4)) {
            PyErr_SetString(PyExc_ValueError, "_kmeansvec.run: inconsistent arguments");
            goto done;
        }
        int failed = 0;
        Py_BEGIN_ALLOW_THREADS job_t j;
        j.n = n;
        j.d = d;
        j.k = k;
        float *fbuf = malloc(sizeof(float) * (3 * k * d + 2 * k + 2 * n));
        double *dbuf = malloc(sizeof(double) * (k * d + k + d));
        uint8_t *lab = malloc(n);
        if (!fbuf || !dbuf || !lab) {
            failed = 1;
        } else {
            j.cf = fbuf;
            j.cnew = j.cf + k * d;
            j.ct = j.cnew + k * d;
            j.delta = j.ct + k * d;
            j.half = j.delta + k;
            j.ub = j.half + k;
            j.lb = j.ub + n;
            j.sx = dbuf;
            j.sw = dbuf + k * d;
            j.mu = j.sw + k;
            j.lab = lab;
            for (int64_t q = j0; q < j1; ++q) {
                int64_t grp = q / n_init;
                j.x = (const float *)bx.buf + grp * n * d;
                j.w = have_w ? (const float *)bw.buf + grp * n : NULL;
                if (q == j0 || q % n_init == 0) moments(&j);
                double in = cluster(&j, (const double *)bu.buf + q * k, max_iter, tol);
                double *best = (double *)bi.buf + grp;
                /* a group's first job in this call always writes (an inf or NaN inertia, from
                 * float32 overflow, must still leave data-derived results) */
                if (q == j0 || q % n_init == 0 || in < *best) {
                    *best = in;
                    memcpy((float *)bc.buf + grp * k * d, j.cf, sizeof(float) * k * d);
                    memcpy((uint8_t *)bl.buf + grp * n, j.lab, n);
                }
            }
        }
        free(fbuf);
        free(dbuf);
        free(lab);
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
    PyBuffer_Release(&bu);
    PyBuffer_Release(&bc);
    PyBuffer_Release(&bl);
    PyBuffer_Release(&bi);
    return ret;
}

static PyMethodDef methods[] = {
    {"run", py_run, METH_VARARGS, "Weighted vector k-means: k-means++ and Hamerly-Lloyd (see source)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_kmeansvec", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kmeansvec(void) { return PyModule_Create(&moddef); }
