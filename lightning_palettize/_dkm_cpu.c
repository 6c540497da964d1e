/*
 * Fused CPU kernels of the DKM scalar engine (lightning_palettize.soft_kmeans).
 *
 * Two kinds of work, both written as single passes that the torch code needs several for:
 *
 * Per element (the "table" tensors: every weight is binned by its 16-bit code, the fp16 bit
 * pattern of x * scale with scale a power of two per LUT group, XOR 0x8000):
 *     hist    counts[row][code(x)] += 1                       (forward: the code histogram)
 *     gather  out = table[row][code(x)]                       (forward: the soft weight)
 *     scatter acc[row][code(x)] += g                          (backward: per-code grad sums)
 *     grad    out = g * hr[row][code(x)][0] + hr[..][1]       (backward: the weight's grad)
 * The codes are recomputed from x in every pass (one f32 -> f16 conversion per element, F16C
 * where the CPU has it) instead of being stored: no N-sized int buffer lives across the step.
 *
 * Per code (one segment [G, U] of per-code values v and masses m, centroids c [G, K]; the
 * softmax over K of -D / tau, D = (v - c)^2 adjusted for prune / exact zeros, mode "dkm"):
 *     fwd_stats  centered sums sum_u A m (v - c), masses sum_u A m, inertia sum_u m min D
 *     out_y      y_u = sum_k A_uk c'_k
 *     att_t      sum_u w_u A_uk (the output's gradient to its centroids)
 *     bwd_step   one iteration's analytic backward (see soft_kmeans._scalar_backward_step)
 *     fwd_loop / bwd_loop  all iterations (fwd_stats, the update, the early-stopping test)
 *                and their backward in one call each, without lut_fn
 * in tiles of codes, the attention recomputed rather than stored (an exp2 per entry), except
 * that the AVX2 kernels may keep the last iteration's attention (an optional trailing pointer:
 * fwd_stats writes it, out_y / att_t / bwd_step read it; the portable kernels ignore it and
 * recompute).
 *
 * All pointers are passed as integers (tensor.data_ptr()); the Python side checks dtypes,
 * contiguity and sizes. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define DKM_X86 1
#include <immintrin.h>
#else
#define DKM_X86 0
#endif

#define STRIDE 65537
#define BLOCK 256 /* elements whose codes are converted at once */
#define TILE 64   /* codes per tile of the per-code kernels */

/* ------------------------------------------------------------------------------------------ */
/* float -> fp16 bits, round to nearest even (portable; F16C does the same in hardware) */

static inline uint16_t f2h(float f) {
    uint32_t u, sign;
    memcpy(&u, &f, 4);
    sign = u & 0x80000000u;
    u ^= sign;
    uint16_t o;
    if (u >= (uint32_t)(127 + 16) << 23) {
        o = u > (uint32_t)255 << 23 ? 0x7e00 : 0x7c00;
    } else if (u < (uint32_t)113 << 23) {
        float a, magic = 0.5f;
        memcpy(&a, &u, 4);
        a += magic;
        uint32_t ai, mi;
        memcpy(&ai, &a, 4);
        memcpy(&mi, &magic, 4);
        o = (uint16_t)(ai - mi);
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffu;
        u += odd;
        o = (uint16_t)(u >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* Codes (fp16 bits ^ 0x8000) of x[0..n) * scale; with keep_zeros a non-zero value that rounds
 * to +-0 gets the smallest subnormal of its sign instead. */
static inline void codes_generic(const float *x, int64_t n, float scale, int keep_zeros,
                                 uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        float f = x[i] * scale;
        uint16_t h = f2h(f);
        if (keep_zeros && (h & 0x7fffu) == 0 && f != 0.0f) h = (uint16_t)((h & 0x8000u) | 1u);
        out[i] = (uint16_t)(h ^ 0x8000u);
    }
}

#if DKM_X86
__attribute__((target("avx2,fma,f16c"))) static inline void codes_f16c(const float *x,
                                                                        int64_t n, float scale,
                                                                        int keep_zeros,
                                                                        uint16_t *out) {
    const __m256 s = _mm256_set1_ps(scale);
    const __m128i flip = _mm_set1_epi16((short)0x8000);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_mul_ps(_mm256_loadu_ps(x + i), s);
        __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(h, flip));
    }
    codes_generic(x + i, n - i, scale, 0, out + i);
    if (keep_zeros) { /* rare fix-up: recheck the block with the exact rule */
        for (int64_t j = 0; j < n; j++) {
            uint16_t h = (uint16_t)(out[j] ^ 0x8000u);
            if ((h & 0x7fffu) == 0) {
                float f = x[j] * scale;
                if (f != 0.0f) out[j] = (uint16_t)(((h & 0x8000u) | 1u) ^ 0x8000u);
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------------ */
/* per-element kernels; ``CODES`` converts one block */

#define ELEMENT_KERNELS(SUFFIX, ATTR, CODES)                                                     \
    ATTR static void hist_##SUFFIX(const float *x, int64_t rows, int64_t n, const float *scale, \
                                   int keep_zeros, int32_t *counts) {                            \
        uint16_t buf[BLOCK];                                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                     \
            int32_t *cnt = counts + r * STRIDE;                                                  \
            const float *xr = x + r * n;                                                         \
            for (int64_t a = 0; a < n; a += BLOCK) {                                             \
                int64_t len = n - a < BLOCK ? n - a : BLOCK;                                     \
                CODES(xr + a, len, scale[r], keep_zeros, buf);                                   \
                for (int64_t i = 0; i < len; i++) cnt[buf[i]]++;                                 \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    ATTR static void gather_##SUFFIX(const float *x, int64_t rows, int64_t n,                    \
                                     const float *scale, int keep_zeros, const float *table,     \
                                     float *out) {                                               \
        uint16_t buf[BLOCK];                                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                     \
            const float *tab = table + r * STRIDE;                                               \
            const float *xr = x + r * n;                                                         \
            float *o = out + r * n;                                                              \
            for (int64_t a = 0; a < n; a += BLOCK) {                                             \
                int64_t len = n - a < BLOCK ? n - a : BLOCK;                                     \
                CODES(xr + a, len, scale[r], keep_zeros, buf);                                   \
                for (int64_t i = 0; i < len; i++) o[a + i] = tab[buf[i]];                        \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    ATTR static void scatter_##SUFFIX(const float *x, int64_t rows, int64_t n,                   \
                                      const float *scale, int keep_zeros, const float *g,        \
                                      double *acc) {                                             \
        uint16_t buf[BLOCK];                                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                     \
            double *ac = acc + r * STRIDE;                                                       \
            const float *xr = x + r * n;                                                         \
            const float *gr = g + r * n;                                                         \
            for (int64_t a = 0; a < n; a += BLOCK) {                                             \
                int64_t len = n - a < BLOCK ? n - a : BLOCK;                                     \
                CODES(xr + a, len, scale[r], keep_zeros, buf);                                   \
                for (int64_t i = 0; i < len; i++) ac[buf[i]] += (double)gr[a + i];              \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    ATTR static void grad_##SUFFIX(const float *x, int64_t rows, int64_t n, const float *scale, \
                                   int keep_zeros, const float *g, const float *hr,              \
                                   float *out) {                                                 \
        uint16_t buf[BLOCK];                                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                     \
            const float *tab = hr + 2 * r * STRIDE;                                              \
            const float *xr = x + r * n;                                                         \
            const float *gr = g + r * n;                                                         \
            float *o = out + r * n;                                                              \
            for (int64_t a = 0; a < n; a += BLOCK) {                                             \
                int64_t len = n - a < BLOCK ? n - a : BLOCK;                                     \
                CODES(xr + a, len, scale[r], keep_zeros, buf);                                   \
                for (int64_t i = 0; i < len; i++) {                                              \
                    const float *e = tab + 2 * (int64_t)buf[i];                                  \
                    o[a + i] = gr[a + i] * e[0] + e[1];                                          \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }

ELEMENT_KERNELS(generic, , codes_generic)
#if DKM_X86
ELEMENT_KERNELS(f16c, __attribute__((target("avx2,fma,f16c"))), codes_f16c)
#endif

#if DKM_X86
/* gather / grad without the exact-zero rule: codes, table loads and the output in registers,
 * 8 elements at a time (AVX2 gathers) */
__attribute__((target("avx2,fma,f16c"))) static inline __m256i codes8(const float *x,
                                                                       __m256 s) {
    __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(x), s),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtepu16_epi32(_mm_xor_si128(h, _mm_set1_epi16((short)0x8000)));
}

__attribute__((target("avx2,fma,f16c"))) static void gather_v(const float *x, int64_t rows,
                                                              int64_t n, const float *scale,
                                                              const float *table, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *tab = table + r * STRIDE, *xr = x + r * n;
        float *o = out + r * n;
        const __m256 s = _mm256_set1_ps(scale[r]);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_i32gather_ps(tab, codes8(xr + i, s), 4));
        if (i < n) {
            uint16_t buf[8];
            codes_generic(xr + i, n - i, scale[r], 0, buf);
            for (int64_t j = 0; i + j < n; j++) o[i + j] = tab[buf[j]];
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void grad_v(const float *x, int64_t rows,
                                                            int64_t n, const float *scale,
                                                            const float *g, const float *hr,
                                                            float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *tab = hr + 2 * r * STRIDE, *xr = x + r * n, *gr = g + r * n;
        float *o = out + r * n;
        const __m256 s = _mm256_set1_ps(scale[r]);
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            /* one 64-bit gather per (h, r) pair, then de-interleaved */
            __m256i idx = codes8(xr + i, s);
            __m256 a = _mm256_castsi256_ps(_mm256_i32gather_epi64(
                (const long long *)tab, _mm256_castsi256_si128(idx), 8));
            __m256 b = _mm256_castsi256_ps(_mm256_i32gather_epi64(
                (const long long *)tab, _mm256_extracti128_si256(idx, 1), 8));
            __m256 hh = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
            __m256 rr = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
            hh = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(hh), _MM_SHUFFLE(3, 1, 2, 0)));
            rr = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(rr), _MM_SHUFFLE(3, 1, 2, 0)));
            _mm256_storeu_ps(o + i, _mm256_fmadd_ps(_mm256_loadu_ps(gr + i), hh, rr));
        }
        if (i < n) {
            uint16_t buf[8];
            codes_generic(xr + i, n - i, scale[r], 0, buf);
            for (int64_t j = 0; i + j < n; j++) {
                const float *e = tab + 2 * (int64_t)buf[j];
                o[i + j] = gr[i + j] * e[0] + e[1];
            }
        }
    }
}
#endif


/* ------------------------------------------------------------------------------------------ */
/* grid kernels (soft_kmeans' "grid" tensors): each LUT group (row) is binned on a piecewise
 * uniform grid: C equal cells from lo (inv_w = C / span; 0 for a constant row), cell c holding
 * fc[c] nodes lo + (c + i / fc[c]) span / C, i < fc[c], numbered from off[c] (the last node,
 * at lo + span, is the one after the last cell's). An element at p = (x - lo) inv_w lies in
 * cell c = min(floor(p), C - 1), at f = (p - c) fc[c], between nodes j = off[c] + i and j + 1,
 * i = min(floor(f), fc[c] - 1), with weight t = f - i on node j + 1 and 1 - t on node j
 * (linear interpolation, in the same float32 steps as the torch code). The AVX2 versions
 * locate a block of elements in vectors (the per-cell node count and first node gathered)
 * and then read the node tables with scalar loads (cheaper than gathers there, as measured):
 *     gsplat  out[row][j] = sum of w (1 - t) and of w t (over j - 1)   (w = 1 or g; float64
 *             sums, rounded once)
 *     glerp   out = T[j] + t (T[j + 1] - T[j])                   (T: [rows, ld] float)
 *     ggrad   out = g lerp(h) + lerp(r)   (hr: (h, r) per node, [rows, ld]; out may be g)
 */

typedef struct {
    const float *x;
    int64_t rows, n, H, C;
    const float *lo, *inv_w; /* [rows] */
    const float *fc;         /* [rows, C] nodes per cell (whole numbers >= 1) */
    const int32_t *off;      /* [rows, C] the first node of each cell */
    const int64_t *pk;       /* [rows, C] (fc as int32, off) in one int64 each, or NULL */
} grid_t;

typedef struct { /* one row of a grid_t */
    float lo, iw, top;
    int32_t cmax;
    const float *fc;
    const int32_t *off;
    const int64_t *pk;
} grow_t;

static inline grow_t grid_row(const grid_t *q, int64_t r) {
    grow_t w = {q->lo[r], q->inv_w[r], (float)q->C, (int32_t)q->C - 1, q->fc + r * q->C,
                q->off + r * q->C, q->pk ? q->pk + r * q->C : NULL};
    return w;
}

static inline int32_t gcell(float x, const grow_t *w, float *t) {
    float p = (x - w->lo) * w->iw;
    p = p > 0.0f ? p : 0.0f; /* (NaN -> 0) */
    p = p < w->top ? p : w->top;
    int32_t c = (int32_t)p; /* p >= 0: truncation is floor */
    c = c < w->cmax ? c : w->cmax;
    float F = w->fc[c], f = (p - (float)c) * F;
    int32_t i = (int32_t)f, last = (int32_t)F - 1;
    i = i < last ? i : last;
    float u = f - (float)i;
    *t = u < 1.0f ? u : 1.0f;
    return w->off[c] + i;
}

/* gvalues: the nodes' own values out [rows, H], lo + (c + i / fc[c]) span / C for node i of
 * cell c, and lo + span for the padding nodes after the last (span: [rows]) */
static void gvalues_k(const grid_t *q, const float *span, float *out) {
    for (int64_t r = 0; r < q->rows; r++) {
        const float *fc = q->fc + r * q->C;
        const int32_t *off = q->off + r * q->C;
        float lo = q->lo[r], w = span[r] / (float)q->C, *o = out + r * q->H;
        int64_t end = 0;
        for (int64_t c = 0; c < q->C; c++) {
            int32_t F = (int32_t)fc[c];
            float *oc = o + off[c];
            for (int32_t i = 0; i < F; i++) oc[i] = lo + ((float)c + (float)i / fc[c]) * w;
            end = off[c] + F;
        }
        for (int64_t k = end; k < q->H; k++) o[k] = lo + (float)q->C * w;
    }
}

/* one row of sums (float64, acc) rounded into out (float32) */
static inline void round_row(const double *acc, int64_t H, float *out) {
    for (int64_t j = 0; j < H; j++) out[j] = (float)acc[j];
}

static void gsplat_k(const grid_t *q, const float *w, float *out) {
    double *ac = (double *)malloc(sizeof(double) * (size_t)q->H);
    for (int64_t r = 0; ac && r < q->rows; r++) {
        const float *xr = q->x + r * q->n, *wr = w ? w + r * q->n : NULL;
        grow_t gr = grid_row(q, r);
        memset(ac, 0, sizeof(double) * (size_t)q->H);
        for (int64_t i = 0; i < q->n; i++) {
            float t;
            int32_t j = gcell(xr[i], &gr, &t);
            float a = wr ? wr[i] : 1.0f;
            ac[j] += (double)(a * (1.0f - t));
            ac[j + 1] += (double)(a * t);
        }
        round_row(ac, q->H, out + r * q->H);
    }
    if (!ac) /* (no memory for the row's sums: NaN, never a silently wrong mass) */
        for (int64_t i = 0; i < q->rows * q->H; i++) out[i] = NAN;
    free(ac);
}

static inline float lerp_at(const float *tab, int32_t j, float t) {
    return tab[j] + t * (tab[j + 1] - tab[j]);
}

/* row r's table: T + r ld as it is, or, with R (the gradient pass's r), the (h, r) pairs of the
 * rows T + r ld and R + r ld interleaved into buf [2 H] (one load per element afterwards) */
static inline const float *row_table(const grid_t *q, const float *T, const float *R, int64_t ld,
                                     int64_t r, float *buf) {
    if (!R) return T + r * ld;
    const float *h = T + r * ld, *rr = R + r * ld;
    for (int64_t j = 0; j < q->H; j++) {
        buf[2 * j] = h[j];
        buf[2 * j + 1] = rr[j];
    }
    return buf;
}

/* glerp (g NULL: out = lerp(table)) or ggrad (table: (h, r) pairs per node; out = g lerp(h) +
 * lerp(r)), portable */
static void gread_k(const grid_t *q, const float *g, const float *table, const float *rtab,
                    int64_t ld, float *out, float *buf) {
    for (int64_t r = 0; r < q->rows; r++) {
        const float *xr = q->x + r * q->n, *g_r = g ? g + r * q->n : NULL;
        const float *tab = row_table(q, table, rtab, ld, r, buf);
        float *o = out + r * q->n;
        grow_t gr = grid_row(q, r);
        for (int64_t i = 0; i < q->n; i++) {
            float t;
            int32_t j = gcell(xr[i], &gr, &t);
            if (!g_r) {
                o[i] = lerp_at(tab, j, t);
                continue;
            }
            const float *e = tab + 2 * (int64_t)j;
            o[i] = g_r[i] * (e[0] + t * (e[2] - e[0])) + (e[1] + t * (e[3] - e[1]));
        }
    }
}

/* Nodes per cell that sorted centroids cs [G, K] need (soft_kmeans._grid_counts has the rule):
 * per pair of neighbours, base spacing h = min(cell_logit tau / (2 gap), soft e^max(0, gap^2 /
 * tau - fade)) on the core cells (those meeting mid +- ((grade + margin) tau + prune) /
 * (2 gap)); a cell further out, its nearest point L = (2 gap dist - prune) / tau - margin
 * logits from the midpoint, takes h e^((L - grade) / 2), out to L = saturation. The count W / h
 * (W = span / C; its ceiling when whole) is combined by maximum into out (which comes in
 * initialised); the walk from the core outwards stops at the first cell whose count is at or
 * below floor (the counts only fall from there). */
static void grid_counts_k(const float *lo, const float *span, const float *cs, int64_t G,
                          int64_t K, int64_t C, double tau, double cell_logit, double soft,
                          double fade, double saturation, double margin, double grade,
                          double prune, double cap, int whole, double floor_, float *out) {
    for (int64_t g = 0; g < G; g++) {
        const float *c = cs + g * K;
        float *o = out + g * C;
        double w = (double)span[g] / (double)C, l0 = lo[g];
        if (!(w > 0)) continue; /* a constant group: one node per cell is exact */
        for (int64_t k = 0; k + 1 < K; k++) {
            double gap = (double)c[k + 1] - (double)c[k];
            gap = gap > 1e-30 ? gap : 1e-30;
            double mid = 0.5 * ((double)c[k + 1] + (double)c[k]);
            double h = cell_logit * tau / (2.0 * gap);
            double hs = soft * exp(fmax(gap * gap / tau - fade, 0.0));
            h = h < hs ? h : hs;
            double half = ((saturation + margin) * tau + prune) / (2.0 * gap);
            half = half < (double)span[g] ? half : (double)span[g];
            double core = ((grade + margin) * tau + prune) / (2.0 * gap);
            core = core < half ? core : half;
            double a = floor((mid - half - l0) / w), b = floor((mid + half - l0) / w);
            if (b < 0 || a > (double)(C - 1)) continue;
            int64_t ia = a < 0 ? 0 : (int64_t)a, ib = b > (double)(C - 1) ? C - 1 : (int64_t)b;
            double ca = floor((mid - core - l0) / w), cb = floor((mid + core - l0) / w);
            int64_t ja = ca < (double)ia ? ia : (ca > (double)ib ? ib + 1 : (int64_t)ca);
            int64_t jb = cb > (double)ib ? ib : (cb < (double)ia ? ia - 1 : (int64_t)cb);
            if (ja <= jb) { /* the core: one count */
                double n = whole ? ceil(w / h) : w / h;
                float need = (float)(n < cap ? n : cap);
                for (int64_t i = ja; i <= jb; i++) o[i] = o[i] > need ? o[i] : need;
            }
            for (int side = 0; side < 2; side++) { /* right of the core, then left */
                int64_t i = side == 0 ? (jb + 1 > ia ? jb + 1 : ia) : (ja - 1 < ib ? ja - 1 : ib);
                for (; side == 0 ? i <= ib : i >= ia; i += side == 0 ? 1 : -1) {
                    double cl = l0 + (double)i * w, ch = cl + w;
                    double dist = mid < cl ? cl - mid : (mid > ch ? mid - ch : 0.0);
                    double L = (2.0 * gap * dist - prune) / tau - margin;
                    double hc = L > grade ? h * exp(0.5 * (L - grade)) : h;
                    double n = w / hc;
                    if (!(n > floor_)) break;
                    n = whole ? ceil(n) : n;
                    float need = (float)(n < cap ? n : cap);
                    o[i] = o[i] > need ? o[i] : need;
                }
            }
        }
    }
}

/* grid_counts(lo, span, cs, G, K, C, tau, cell_logit, soft, fade, saturation, margin, grade,
 *             prune, cap, whole, floor, out) */
static PyObject *py_grid_counts(PyObject *self, PyObject *args) {
    unsigned long long lo, span, cs, out;
    Py_ssize_t G, K, C;
    double tau, cl, soft, fade, sat, margin, grade, prune, cap, floor_;
    int whole;
    if (!PyArg_ParseTuple(args, "KKKnnndddddddddpdK", &lo, &span, &cs, &G, &K, &C, &tau, &cl,
                          &soft, &fade, &sat, &margin, &grade, &prune, &cap, &whole, &floor_,
                          &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    grid_counts_k((const float *)(uintptr_t)lo, (const float *)(uintptr_t)span,
                  (const float *)(uintptr_t)cs, G, K, C, tau, cl, soft, fade, sat, margin, grade,
                  prune, cap, whole, floor_, (float *)(uintptr_t)out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

#if DKM_X86
/* AVX2: the cells of a block of elements computed 8 at a time (the same float32 steps as
 * gcell; rows of several cells look their cell's node count and first node up in a scalar
 * loop), then scalar table reads and adds fed from the block (AVX2 gathers measured slower on
 * an AMD EPYC: 1.5x on the interpolation, 2.5x on the gradient pass). */
#define AVX2F __attribute__((target("avx2,fma")))
typedef struct {
    __m256 lo, iw, top, one, F; /* F: the nodes of cell 0 (uniform rows: all but the last) */
    __m256i cmax, last;         /* last: F - 1 */
    int uniform;
} grow8_t;

AVX2F static inline grow8_t grid_row8(const grow_t *w) {
    grow8_t v = {_mm256_set1_ps(w->lo),
                 _mm256_set1_ps(w->iw),
                 _mm256_set1_ps(w->top),
                 _mm256_set1_ps(1.0f),
                 _mm256_set1_ps(w->fc[0]),
                 _mm256_set1_epi32(w->cmax),
                 _mm256_set1_epi32((int32_t)w->fc[0] - 1),
                 w->cmax == 0};
    return v;
}

/* gcell for 8 elements of a one-cell (uniform) row */
AVX2F static inline __m256i gcell8(const float *x, const grow8_t *w, __m256 *t) {
    __m256 p = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x), w->lo), w->iw);
    p = _mm256_max_ps(p, _mm256_setzero_ps()); /* NaN -> 0, as gcell */
    p = _mm256_min_ps(p, w->top);
    __m256 f = _mm256_mul_ps(p, w->F); /* (c = 0) */
    __m256i i = _mm256_min_epi32(_mm256_cvttps_epi32(f), w->last);
    *t = _mm256_min_ps(_mm256_sub_ps(f, _mm256_cvtepi32_ps(i)), w->one);
    return i;
}

/* the cells of a block of elements, vectorised (gcell8), then gcell for the tail */
AVX2F static inline void gcells_block(const float *x, int64_t len, const grow_t *gr,
                                      const grow8_t *g8, int32_t *jb, float *tb) {
    int64_t i = 0;
    if (g8->uniform) {
        for (; i + 8 <= len; i += 8) {
            __m256 t;
            _mm256_storeu_si256((__m256i *)(jb + i), gcell8(x + i, g8, &t));
            _mm256_storeu_ps(tb + i, t);
        }
    } else {
        /* the positions, cells and nodes in vectors, each cell's node count and first node
         * gathered (measured on a Zen 4 against scalar lookups: glerp 2.9 -> 1.9, gsplat
         * 3.1 -> 2.4 ns per element on MiniLM's 128-cell grids); the same float32 steps as
         * gcell */
        const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
        for (; i + 8 <= len; i += 8) {
            __m256 p = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), g8->lo), g8->iw);
            p = _mm256_min_ps(_mm256_max_ps(p, _mm256_setzero_ps()), g8->top);
            __m256i c = _mm256_min_epi32(_mm256_cvttps_epi32(p), g8->cmax);
            __m256 F;
            __m256i o;
            if (gr->pk) {
                const long long *pk = (const long long *)gr->pk;
                __m256i q0 = _mm256_i32gather_epi64(pk, _mm256_castsi256_si128(c), 8);
                __m256i q1 = _mm256_i32gather_epi64(pk, _mm256_extracti128_si256(c, 1), 8);
                __m256i a = _mm256_permutevar8x32_epi32(q0, perm);
                __m256i b = _mm256_permutevar8x32_epi32(q1, perm);
                F = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(a, b, 0x20));
                o = _mm256_permute2x128_si256(a, b, 0x31);
            } else {
                F = _mm256_i32gather_ps(gr->fc, c, 4);
                o = _mm256_i32gather_epi32((const int *)gr->off, c, 4);
            }
            __m256 f = _mm256_mul_ps(_mm256_sub_ps(p, _mm256_cvtepi32_ps(c)), F);
            __m256i u = _mm256_cvttps_epi32(f);
            __m256i last = _mm256_sub_epi32(_mm256_cvttps_epi32(F), _mm256_set1_epi32(1));
            u = _mm256_min_epi32(u, last);
            __m256 w = _mm256_min_ps(_mm256_sub_ps(f, _mm256_cvtepi32_ps(u)), g8->one);
            _mm256_storeu_si256((__m256i *)(jb + i), _mm256_add_epi32(o, u));
            _mm256_storeu_ps(tb + i, w);
        }
    }
    for (; i < len; i++) jb[i] = gcell(x[i], gr, tb + i);
}

/* One 16-byte add per element: (w, w t) into pair j of a scratch row (the sum of w and of w t
 * over cell j), then node j's sum is w-sum[j] - wt-sum[j] + wt-sum[j - 1]. */
AVX2F static void gsplat_v(const grid_t *q, const float *w, float *out) {
    int32_t jb[BLOCK];
    float tb[BLOCK];
    double *pair = (double *)malloc(sizeof(double) * 2 * (size_t)q->H);
    if (!pair) { /* (no memory for the scratch row: the plain loop) */
        gsplat_k(q, w, out);
        return;
    }
    for (int64_t r = 0; r < q->rows; r++) {
        const float *xr = q->x + r * q->n, *wr = w ? w + r * q->n : NULL;
        float *ac = out + r * q->H;
        grow_t gr = grid_row(q, r);
        grow8_t g8 = grid_row8(&gr);
        memset(pair, 0, sizeof(double) * 2 * (size_t)q->H);
        for (int64_t a = 0; a < q->n; a += BLOCK) {
            int64_t len = q->n - a < BLOCK ? q->n - a : BLOCK;
            gcells_block(xr + a, len, &gr, &g8, jb, tb);
            for (int64_t i = 0; i < len; i++) {
                float v = wr ? wr[a + i] : 1.0f;
                __m128d add = _mm_cvtps_pd(_mm_setr_ps(v, v * tb[i], 0.0f, 0.0f));
                double *e = pair + 2 * (int64_t)jb[i];
                _mm_storeu_pd(e, _mm_add_pd(_mm_loadu_pd(e), add));
            }
        }
        double carry = 0.0; /* w t of the cell below */
        for (int64_t j = 0; j < q->H; j++) {
            ac[j] = (float)(pair[2 * j] - pair[2 * j + 1] + carry);
            carry = pair[2 * j + 1];
        }
    }
    free(pair);
}

/* gread_k with the cells of each block computed in vectors; hr pairs: one 16-byte load per
 * element */
AVX2F static void gread_v(const grid_t *q, const float *g, const float *table,
                          const float *rtab, int64_t ld, float *out, float *buf) {
    int32_t jb[BLOCK];
    float tb[BLOCK];
    for (int64_t r = 0; r < q->rows; r++) {
        const float *xr = q->x + r * q->n, *g_r = g ? g + r * q->n : NULL;
        const float *tab = row_table(q, table, rtab, ld, r, buf);
        float *o = out + r * q->n;
        grow_t gr = grid_row(q, r);
        grow8_t g8 = grid_row8(&gr);
        for (int64_t a = 0; a < q->n; a += BLOCK) {
            int64_t len = q->n - a < BLOCK ? q->n - a : BLOCK;
            gcells_block(xr + a, len, &gr, &g8, jb, tb);
            if (!g_r) {
                for (int64_t i = 0; i < len; i++) o[a + i] = lerp_at(tab, jb[i], tb[i]);
                continue;
            }
            for (int64_t i = 0; i < len; i++) {
                __m128 e = _mm_loadu_ps(tab + 2 * (int64_t)jb[i]); /* h0 r0 h1 r1 */
                __m128 v = _mm_fmadd_ps(_mm_set1_ps(tb[i]), _mm_sub_ps(_mm_movehl_ps(e, e), e), e);
                o[a + i] = g_r[a + i] * _mm_cvtss_f32(v) + _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1));
            }
        }
    }
}

#endif

/* ------------------------------------------------------------------------------------------ */
/* per-code kernels */

#define INLINE static inline __attribute__((always_inline))

/* Cephes' exp2f polynomial at f in [-0.5, 0.5] (c0: its leading coefficient, a float or the
 * lanes' v8f of it) */
#define EXP2_STEP(p, f, c) ((p) * (f) + (c))
#define EXP2_POLY(f, c0)                                                                       \
    EXP2_STEP(EXP2_STEP(EXP2_STEP(EXP2_STEP(EXP2_STEP(EXP2_STEP(c0, f, 1.339887440266574e-3f), \
                                                      f, 9.618437357674640e-3f),               \
                                            f, 5.550332471162809e-2f),                         \
                                  f, 2.402264791363012e-1f),                                   \
                        f, 6.931472028550421e-1f),                                             \
              f, 1.0f)

/* 2^x for x <= 0 (0 below -127): EXP2_POLY (relative error ~1.7e-7), branch-free so that the
 * tile loops vectorise. */
INLINE float exp2_neg(float x) {
    x = x < -127.0f ? -127.0f : x;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x + magic;
    int32_t ti;
    memcpy(&ti, &t, 4);
    int32_t e = ti - 0x4B400000; /* round(x) */
    float f = x - (t - magic);   /* in [-0.5, 0.5] */
    float p = EXP2_POLY(f, 1.535336188319500e-4f);
    int32_t bits = (e + 127) << 23; /* 0 (a zero scale) for e == -127 */
    float s;
    memcpy(&s, &bits, 4);
    return p * s;
}

typedef struct {
    int64_t k;
    float factor;   /* -log2(e) / tau */
    float prune;    /* subtracted from D_0 when > 0 */
    int keep_zeros; /* D_0 = 1 / zero_threshold for v != 0 */
    float zinv;     /* 1 / zero_threshold */
    int clamp;      /* attention clamped from below at zero_threshold */
    float zt;
    float win;      /* AVX2 kernels: skip centroids whose D - D_min exceeds win (0: none) */
} cfg_t;

/* One tile of TILE codes, padded (the padding has mass / gradient 0). */
typedef struct {
    float v[TILE], m[TILE], g[TILE];
    float dmin[TILE];
} tile_t;

INLINE int64_t load_tile(tile_t *tl, const float *v, const float *m, const float *g, int64_t a,
                         int64_t U) {
    int64_t len = U - a < TILE ? U - a : TILE;
    for (int64_t t = 0; t < len; t++) {
        tl->v[t] = v[a + t];
        tl->m[t] = m ? m[a + t] : 0.0f;
        tl->g[t] = g ? g[a + t] : 0.0f;
    }
    for (int64_t t = len; t < TILE; t++) {
        tl->v[t] = v[a];
        tl->m[t] = 0.0f;
        tl->g[t] = 0.0f;
    }
    return len;
}

/* P[k][t] (softmax over k) of the tile's codes for centroids c, into p (K x TILE);
 * tl->dmin[t] = min_k D (adjusted). The logit of k is taken relative to the nearest centroid
 * m as -(D_k - D_m) / tau with D_k - D_m = (c_m - c_k) ((v - c_k) + (v - c_m)): the
 * differences v - c are exact for nearby centroids, so where two centroids compete (the only
 * place the softmax is not saturated) the logit gap is accurate to a few ulps of itself rather
 * than of the (up to 1e4 times larger) logits. An entry whose D is replaced outright (the
 * exact-zero rule) uses D_k - D_m as computed. */
INLINE void tile_probs(tile_t *restrict tl, const float *restrict c, const cfg_t *cf,
                       float *restrict p) {
    const int64_t K = cf->k;
    const float prune = cf->prune > 0.0f ? cf->prune : 0.0f;
    const int kz = prune > 0.0f ? 0 : cf->keep_zeros;
    const float zinv = cf->zinv, factor = cf->factor;
    float cm[TILE], sum[TILE];
    const float *restrict v = tl->v;
    float *restrict dmin = tl->dmin;
    for (int64_t t = 0; t < TILE; t++) {
        dmin[t] = 3.4e38f;
        cm[t] = sum[t] = 0.0f;
    }
    if (prune == 0.0f && !kz) { /* the common case: plain squared distances */
        for (int64_t k = 0; k < K; k++) {
            const float ck = c[k];
            float *restrict pk = p + k * TILE;
#pragma omp simd
            for (int64_t t = 0; t < TILE; t++) {
                float a = v[t] - ck;
                float d = a * a;
                pk[t] = d;
                int lt = d < dmin[t];
                dmin[t] = lt ? d : dmin[t];
                cm[t] = lt ? ck : cm[t];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const float ck = c[k];
            float *restrict pk = p + k * TILE;
#pragma omp simd
            for (int64_t t = 0; t < TILE; t++) {
                float gap = (cm[t] - ck) * ((v[t] - ck) + (v[t] - cm[t]));
                float e = exp2_neg(gap * factor);
                pk[t] = e;
                sum[t] += e;
            }
        }
    } else {
        float bm[TILE], am[TILE], rep[TILE], nz[TILE];
        for (int64_t t = 0; t < TILE; t++) {
            bm[t] = am[t] = rep[t] = 0.0f;
            nz[t] = kz && v[t] != 0.0f ? 1.0f : 0.0f;
        }
        for (int64_t k = 0; k < K; k++) {
            const float ck = c[k], adj = k == 0 ? -prune : 0.0f;
            const float zk = k == 0 ? 1.0f : 0.0f;
            float *restrict pk = p + k * TILE;
            for (int64_t t = 0; t < TILE; t++) {
                float a = v[t] - ck;
                float d = a * a + adj;
                float r = zk * nz[t];
                d = r != 0.0f ? zinv : d;
                pk[t] = d;
                int lt = d < dmin[t];
                dmin[t] = lt ? d : dmin[t];
                cm[t] = lt ? ck : cm[t];
                bm[t] = lt ? a : bm[t];
                am[t] = lt ? adj : am[t];
                rep[t] = lt ? r : rep[t];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            const float ck = c[k], adj = k == 0 ? -prune : 0.0f;
            const float zk = k == 0 ? 1.0f : 0.0f;
            float *restrict pk = p + k * TILE;
            for (int64_t t = 0; t < TILE; t++) {
                float a = v[t] - ck;
                float gap = (cm[t] - ck) * (a + bm[t]) + (adj - am[t]);
                float direct = rep[t] + zk * nz[t];
                gap = direct != 0.0f ? pk[t] - dmin[t] : gap;
                float e = exp2_neg(gap * factor);
                pk[t] = e;
                sum[t] += e;
            }
        }
    }
    for (int64_t t = 0; t < TILE; t++) sum[t] = 1.0f / sum[t];
    for (int64_t k = 0; k < K; k++) {
        float *restrict pk = p + k * TILE;
        for (int64_t t = 0; t < TILE; t++) pk[t] *= sum[t];
    }
}

/* The per-code kernels' rows may be ragged: row g has lens[g] codes (its masses and weights
 * are zero past them) and rows are U apart; lens NULL: every row has U. The sums skip the
 * padding (they would add exact zeros), y and h are zero there, r is left as it was. */
static inline int64_t ROW_LEN(const int32_t *lens, int64_t g, int64_t U) {
    if (!lens) return U;
    int64_t n = lens[g];
    return n < 0 ? 0 : (n < U ? n : U);
}

/* the attention from P: clamped from below at zero_threshold when asked */
INLINE float att_of(float p, int clamp, float zt) { return clamp && p < zt ? zt : p; }

INLINE void fwd_stats_body(const float *v, const float *m, const float *c, int64_t G, int64_t U,
                           const cfg_t *cf, float *sm, double *inertia, const int32_t *lens,
                           float *restrict p) {
    const int64_t K = cf->k;
    const int clamp = cf->clamp;
    const float zt = cf->zt;
    tile_t tl;
    for (int64_t g = 0; g < G; g++) {
        const float *cg = c + g * K;
        double in = 0.0;
        double acc[2 * 256];
        for (int64_t k = 0; k < 2 * K; k++) acc[k] = 0.0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        for (int64_t a = 0; a < Ug; a += TILE) {
            load_tile(&tl, v + g * U, m + g * U, NULL, a, Ug);
            tile_probs(&tl, cg, cf, p);
            if (inertia) {
                double s = 0.0;
#pragma omp simd reduction(+ : s)
                for (int64_t t = 0; t < TILE; t++) s += (double)tl.dmin[t] * (double)tl.m[t];
                in += s;
            }
            for (int64_t k = 0; k < K; k++) {
                const float *restrict pk = p + k * TILE;
                const float ck = cg[k];
                double s0 = 0.0, s1 = 0.0;
#pragma omp simd reduction(+ : s0, s1)
                for (int64_t t = 0; t < TILE; t++) {
                    float w = att_of(pk[t], clamp, zt) * tl.m[t];
                    s0 += (double)(w * (tl.v[t] - ck));
                    s1 += (double)w;
                }
                acc[k] += s0;
                acc[K + k] += s1;
            }
        }
        for (int64_t k = 0; k < 2 * K; k++) sm[g * 2 * K + k] += (float)acc[k];
        if (inertia) inertia[g] += in;
    }
}

INLINE void out_y_body(const float *v, const float *cp, const float *cl, int64_t G, int64_t U,
                       const cfg_t *cf, float *y, const int32_t *lens, float *restrict p) {
    const int64_t K = cf->k;
    const int clamp = cf->clamp;
    const float zt = cf->zt;
    tile_t tl;
    float acc[TILE];
    for (int64_t g = 0; g < G; g++) {
        const int64_t Ug = ROW_LEN(lens, g, U);
        for (int64_t j = Ug; j < U; j++) y[g * U + j] = 0.0f;
        for (int64_t a = 0; a < Ug; a += TILE) {
            int64_t len = load_tile(&tl, v + g * U, NULL, NULL, a, Ug);
            tile_probs(&tl, cp + g * K, cf, p);
            for (int64_t t = 0; t < TILE; t++) acc[t] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                const float *restrict pk = p + k * TILE;
                const float ck = cl[g * K + k];
                for (int64_t t = 0; t < TILE; t++) acc[t] += att_of(pk[t], clamp, zt) * ck;
            }
            for (int64_t t = 0; t < len; t++) y[g * U + a + t] = acc[t];
        }
    }
}

INLINE void att_t_body(const float *v, const float *wt, const float *c, int64_t G, int64_t U,
                       const cfg_t *cf, float *out, const int32_t *lens, float *restrict p) {
    const int64_t K = cf->k;
    const int clamp = cf->clamp;
    const float zt = cf->zt;
    tile_t tl;
    double acc[256];
    for (int64_t g = 0; g < G; g++) {
        for (int64_t k = 0; k < K; k++) acc[k] = 0.0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        for (int64_t a = 0; a < Ug; a += TILE) {
            load_tile(&tl, v + g * U, wt + g * U, NULL, a, Ug);
            tile_probs(&tl, c + g * K, cf, p);
            for (int64_t k = 0; k < K; k++) {
                const float *restrict pk = p + k * TILE;
                double s = 0.0;
#pragma omp simd reduction(+ : s)
                for (int64_t t = 0; t < TILE; t++) s += (double)(att_of(pk[t], clamp, zt) * tl.m[t]);
                acc[k] += s;
            }
        }
        for (int64_t k = 0; k < K; k++) out[g * K + k] = (float)acc[k];
    }
}

/* One iteration's backward (see soft_kmeans._scalar_backward_step):
 *   s_hat given: r_u += sum_k s_k A_k - two sum_k e_k (v - c_k), dc_k = two sum_u e_k m_u,
 *                e = softmax backward of s_k (v - raw_k) (masked where the attention is clamped)
 *   out_c given: h_u = -two sum_k e'_k (v - c_k), dco_k = two sum_u e'_k gsum_u,
 *                e' = softmax backward of out_c (masked likewise)
 * with slot 0's softmax gradient zeroed for v != 0 under the exact-zero rule. */
INLINE void bwd_step_body(const float *v, const float *m, const float *gsum, const float *c,
                          int64_t G, int64_t U, const cfg_t *cf, float two, const float *s_hat,
                          const float *raw, const float *out_c, float *r, float *h, float *dc,
                          float *dco, const int32_t *lens, float *restrict p) {
    const int64_t K = cf->k;
    const int clamp = cf->clamp;
    const float zt = cf->zt;
    const int kz = cf->prune > 0.0f ? 0 : cf->keep_zeros;
    tile_t tl;
    double acc[2 * 256];
    float dot[TILE], tot[TILE], dir[TILE], keep0[TILE];
    for (int64_t g = 0; g < G; g++) {
        const float *cg = c + g * K;
        const float *sg = s_hat ? s_hat + g * K : NULL, *rg = raw + g * K;
        const float *og = out_c ? out_c + g * K : NULL;
        for (int64_t k = 0; k < 2 * K; k++) acc[k] = 0.0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        if (og)
            for (int64_t j = Ug; j < U; j++) h[g * U + j] = 0.0f;
        for (int64_t a = 0; a < Ug; a += TILE) {
            int64_t len =
                load_tile(&tl, v + g * U, m + g * U, gsum ? gsum + g * U : NULL, a, Ug);
            tile_probs(&tl, cg, cf, p);
            for (int64_t t = 0; t < TILE; t++)
                keep0[t] = kz && tl.v[t] != 0.0f ? 0.0f : 1.0f;
            if (sg) {
                for (int64_t t = 0; t < TILE; t++) dot[t] = dir[t] = tot[t] = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    const float *restrict pk = p + k * TILE;
                    const float sk = sg[k], srk = sk * rg[k];
                    for (int64_t t = 0; t < TILE; t++) {
                        float gr = -srk + tl.v[t] * sk;
                        gr = clamp && pk[t] < zt ? 0.0f : gr;
                        dir[t] += sk * att_of(pk[t], clamp, zt);
                        dot[t] += gr * pk[t];
                    }
                }
                for (int64_t k = 0; k < K; k++) {
                    const float *restrict pk = p + k * TILE;
                    const float sk = sg[k], srk = sk * rg[k], ck = cg[k];
                    double s = 0.0;
#pragma omp simd reduction(+ : s)
                    for (int64_t t = 0; t < TILE; t++) {
                        float gr = -srk + tl.v[t] * sk;
                        gr = clamp && pk[t] < zt ? 0.0f : gr;
                        float ek = pk[t] * (gr - dot[t]);
                        ek = k == 0 ? ek * keep0[t] : ek;
                        ek *= tl.v[t] - ck;
                        tot[t] += ek;
                        s += (double)(ek * tl.m[t]);
                    }
                    acc[k] += s;
                }
                for (int64_t t = 0; t < len; t++) r[g * U + a + t] += dir[t] - two * tot[t];
            }
            if (og) {
                for (int64_t t = 0; t < TILE; t++) dot[t] = tot[t] = 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    const float *restrict pk = p + k * TILE;
                    const float lk = og[k];
                    for (int64_t t = 0; t < TILE; t++) {
                        float l = clamp && pk[t] < zt ? 0.0f : lk;
                        dot[t] += l * pk[t];
                    }
                }
                for (int64_t k = 0; k < K; k++) {
                    const float *restrict pk = p + k * TILE;
                    const float lk = og[k], ck = cg[k];
                    double s = 0.0;
#pragma omp simd reduction(+ : s)
                    for (int64_t t = 0; t < TILE; t++) {
                        float l = clamp && pk[t] < zt ? 0.0f : lk;
                        float ek = pk[t] * (l - dot[t]);
                        ek = k == 0 ? ek * keep0[t] : ek;
                        ek *= tl.v[t] - ck;
                        tot[t] += ek;
                        s += (double)(ek * tl.g[t]);
                    }
                    acc[K + k] += s;
                }
                for (int64_t t = 0; t < len; t++) h[g * U + a + t] = -two * tot[t];
            }
        }
        for (int64_t k = 0; k < K; k++) {
            if (dc) dc[g * K + k] = (float)(two * acc[k]);
            if (dco) dco[g * K + k] = (float)(two * acc[K + k]);
        }
    }
}

/* One kernel call, as its py_* wrapper parsed it (see "Python bindings" below): the data
 * pointers as integers in the order of the Python call, the sizes and the scalars. The
 * kernel entry points that the bindings dispatch to (the *_call adapters and the per-code
 * kernels below) take it and unpack it into their kernel's arguments. */
typedef struct {
    unsigned long long a[11]; /* data pointers, in the order of the Python call */
    Py_ssize_t rows, n;       /* element kernels: x is [rows, n]; per-code kernels: G, U */
    int kz;                   /* element kernels: the exact-zero rule */
    PyObject *ct;             /* per-code kernels: the cfg tuple, parsed into cf */
    cfg_t cf;
    float two;                /* bwd_step: 2 / tau */
    unsigned long long pio;   /* per-code kernels: the kept attention (0: none) */
    unsigned long long lens;  /* per-code kernels: int32 [G], the codes each row has (0: U) */
} call_t;

/* scratch of the per-code kernels: p (TILE * K floats) for the portable / tiled ones; e, lanes
 * (K and 2K vectors) and acc (2K doubles) for the AVX2 ones; buf is what to free */
typedef struct {
    void *buf;
    float *p;
#if DKM_X86
    __m256 *e, *lanes;
    double *acc;
#endif
} scratch_t;

#define P(T, x) ((T)(uintptr_t)(x))
#define F(i) P(float *, call->a[i]) /* the call's i-th data pointer, as float * */
#define D(i) P(double *, call->a[i])
#define I32(i) P(int32_t *, call->a[i])
#define LENS P(const int32_t *, call->lens)

#define CODE_KERNELS(SUFFIX, ATTR)                                                               \
    ATTR static void fwd_stats_##SUFFIX(const call_t *call, const scratch_t *s) {               \
        fwd_stats_body(F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), D(4), LENS,     \
                       s->p);                                                                   \
    }                                                                                            \
    ATTR static void out_y_##SUFFIX(const call_t *call, const scratch_t *s) {                   \
        out_y_body(F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), LENS, s->p);         \
    }                                                                                            \
    ATTR static void att_t_##SUFFIX(const call_t *call, const scratch_t *s) {                   \
        att_t_body(F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), LENS, s->p);         \
    }                                                                                            \
    ATTR static void bwd_step_##SUFFIX(const call_t *call, const scratch_t *s) {                \
        bwd_step_body(F(0), F(1), F(2), F(3), call->rows, call->n, &call->cf, call->two, F(4),  \
                      F(5), F(6), F(7), F(8), F(9), F(10), LENS, s->p);                          \
    }

CODE_KERNELS(generic, )
#if DKM_X86
CODE_KERNELS(avx2, __attribute__((target("avx2,fma"))))
#endif

/* ------------------------------------------------------------------------------------------ */
/* AVX2 + FMA per-code kernels for the common configuration (no prune pull, no exact-zero rule,
 * no attention clamp): 8 codes per vector, everything per code in registers, the K
 * probabilities of a block in a small stack array, per-centroid sums in float lanes flushed to
 * float64 every 8 blocks. Same math as the portable kernels above. */
#if DKM_X86
#define AVX __attribute__((target("avx2,fma"))) static inline
#define FLUSH 8 /* blocks of 8 codes summed in float lanes before a float64 flush */

AVX __m256 exp2_neg_v(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256 t = _mm256_add_ps(x, magic);
    __m256i e = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
    __m256 f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* softmax over k of 8 codes: e[k] = P_k (normalised); returns min_k D. adj0 (<= 0) is the
 * prune pull added to D_0; the logit gaps are taken as in tile_probs. */
/* 8 codes from a[i..], padded with a[i] (vals) or 0 past the end */
AVX __m256 load8(const float *a, int64_t i, int64_t U, int pad_first) {
    if (i + 8 <= U) return _mm256_loadu_ps(a + i);
    float buf[8];
    for (int j = 0; j < 8; j++) buf[j] = i + j < U ? a[i + j] : (pad_first ? a[i] : 0.0f);
    return _mm256_loadu_ps(buf);
}

AVX void store8(float *a, int64_t i, int64_t U, __m256 x) {
    if (i + 8 <= U) {
        _mm256_storeu_ps(a + i, x);
        return;
    }
    float buf[8];
    _mm256_storeu_ps(buf, x);
    for (int j = 0; i + j < U; j++) a[i + j] = buf[j];
}

/* Skipping centroids (cfg win = T tau > 0), one window per span of WSPAN blocks of 8 codes.
 * Over a span the distance to the nearest centroid is at most R (1-Lipschitz from the span's
 * ends), so slot k at distance d from [min v, max v] has D_k - D_min >= lb_k = d^2 + adj_k -
 * R^2 there. Per group, best_k is the smallest lb_k over the spans (a live centroid's is
 * <= 0), and a span skips slot k when lb_k > max(best_k, 0) + win: its attention there is
 * below e^-T against the span's nearest centroid and (up to the bound's slack R^2) against
 * its own largest anywhere, so neither the sums nor a far centroid's weighted mean notice.
 * All in vectors of 8 slots. */
static int32_t ALL_SLOTS[256];
/* the j-th slot a span keeps; the kernels are compiled once with and once without windows */
#define KS(j) (win_on ? (int64_t)ks[j] : (int64_t)(j))

typedef struct {
    int on;
    int64_t nv;                    /* vectors of 8 slots */
    __m256 c[32], lim[32], adj[32]; /* centroids (+inf padding), limits, adj_k */
} win_t;

AVX float hmin8(__m256 x) {
    __m128 a = _mm_min_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_min_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_min_ss(a, _mm_shuffle_ps(a, a, 1)));
}

AVX float hmax8(__m256 x) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
}

/* the smallest and largest of the codes [i, i + 8 WSPAN) of a row (the window's span) */
#define WSPAN 4
/* a flush falls on a window span's boundary: the touched slots are re-marked per span */
_Static_assert(FLUSH % WSPAN == 0, "FLUSH must be a multiple of WSPAN");
AVX void span_range(const float *vg, int64_t i, int64_t Ug, float *a, float *b) {
    __m256 lo = load8(vg, i, Ug, 1), hi = lo;
    for (int64_t t = 1; t < WSPAN && i + 8 * t < Ug; t++) {
        __m256 x = load8(vg, i + 8 * t, Ug, 1);
        lo = _mm256_min_ps(lo, x);
        hi = _mm256_max_ps(hi, x);
    }
    *a = hmin8(lo);
    *b = hmax8(hi);
}

/* lb of every slot for the codes in [a, b], into lb[0 .. nv) */
AVX void block_lb(const win_t *w, float a, float b, __m256 *lb) {
    const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    __m256 mlo = _mm256_set1_ps(INFINITY), mhi = mlo;
    for (int64_t j = 0; j < w->nv; j++) {
        mlo = _mm256_min_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(va, w->c[j])), mlo);
        mhi = _mm256_min_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(vb, w->c[j])), mhi);
    }
    float r = fmaxf(hmin8(mlo), hmin8(mhi)) + (b - a);
    __m256 r2 = _mm256_set1_ps(r * r);
    for (int64_t j = 0; j < w->nv; j++) {
        __m256 d = _mm256_max_ps(_mm256_sub_ps(va, w->c[j]), _mm256_sub_ps(w->c[j], vb));
        d = _mm256_max_ps(d, zero);
        lb[j] = _mm256_sub_ps(_mm256_fmadd_ps(d, d, w->adj[j]), r2);
    }
}

/* one group's window (nothing to do when win is 0): its centroids and per-slot limits */
AVX void win_setup(win_t *w, const float *vg, int64_t Ug, const float *c, int64_t K,
                   const cfg_t *cf) {
    w->on = cf->win > 0.0f && K <= 256;
    w->nv = 0;
    if (!w->on) return;
    w->nv = (K + 7) / 8;
    float pad[8];
    for (int64_t j = 0; j < w->nv; j++) {
        for (int t = 0; t < 8; t++) pad[t] = 8 * j + t < K ? c[8 * j + t] : INFINITY;
        w->c[j] = _mm256_loadu_ps(pad);
        w->adj[j] = _mm256_setzero_ps();
        w->lim[j] = _mm256_set1_ps(INFINITY);
    }
    if (cf->prune > 0.0f) w->adj[0] = _mm256_setr_ps(-cf->prune, 0, 0, 0, 0, 0, 0, 0);
    __m256 lb[32];
    float a, b;
    for (int64_t i = 0; i < Ug; i += 8 * WSPAN) {
        span_range(vg, i, Ug, &a, &b);
        block_lb(w, a, b, lb);
        for (int64_t j = 0; j < w->nv; j++) w->lim[j] = _mm256_min_ps(lb[j], w->lim[j]);
    }
    const __m256 win = _mm256_set1_ps(cf->win), zero = _mm256_setzero_ps();
    for (int64_t j = 0; j < w->nv; j++) {
        __m256 l = _mm256_add_ps(_mm256_max_ps(w->lim[j], zero), win);
        for (int t = 0; t < 8; t++) pad[t] = 8 * j + t < K ? INFINITY : -INFINITY;
        w->lim[j] = _mm256_min_ps(l, _mm256_loadu_ps(pad)); /* padding: never kept */
    }
}

/* The slots the span of codes from i keeps (one window per WSPAN blocks of 8): their count;
 * *ks points at them, ascending (ALL_SLOTS or buf) */
AVX int window_at(const win_t *w, const float *vg, int64_t i, int64_t Ug, int64_t K,
                  int32_t *buf, const int32_t **ks, uint8_t *touched) {
    *ks = ALL_SLOTS;
    if (!w->on) {
        for (int64_t j = 0; j < (K + 7) / 8; j++) touched[j] = 0xFF;
        return (int)K;
    }
    __m256 lb[32];
    float a, b;
    span_range(vg, i, Ug, &a, &b);
    block_lb(w, a, b, lb);
    int n = 0;
    for (int64_t j = 0; j < w->nv; j++) {
        /* kept unless lb > lim (NaN: kept; the padding's lim is -inf) */
        unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(lb[j], w->lim[j], _CMP_NGT_UQ));
        touched[j] |= (uint8_t)bits;
        while (bits) {
            buf[n++] = (int32_t)(8 * j + __builtin_ctz(bits));
            bits &= bits - 1;
        }
    }
    *ks = buf;
    return n;
}

#define AVXI __attribute__((target("avx2,fma"), always_inline)) static inline

/* P of two blocks of 8 codes a and b over the slots ks (the softmax of -D / tau, relative to
 * each code's nearest centroid), in lockstep: ea[k] / eb[k] for k in ks, and D_min of each.
 * One block's chain of minimum, exponentials and sum is mostly latency: two in flight cost
 * little more than one (a lone block passes itself as b). */
AVXI void probs8x2(__m256 va, __m256 vb, const float *c, const int32_t *ks, int nk,
                   __m256 factor, __m256 adj0, __m256 *ea, __m256 *eb, __m256 *dmina,
                   __m256 *dminb, const int win_on) {
    int64_t k0 = KS(0);
    __m256 c0 = _mm256_set1_ps(c[k0]), am0 = k0 == 0 ? adj0 : _mm256_setzero_ps();
    __m256 a0 = _mm256_sub_ps(va, c0), b0 = _mm256_sub_ps(vb, c0);
    __m256 da = _mm256_fmadd_ps(a0, a0, am0), db = _mm256_fmadd_ps(b0, b0, am0);
    __m256 cma = c0, cmb = c0, ama = am0, amb = am0;
    for (int j = 1; j < nk; j++) {
        __m256 ck = _mm256_set1_ps(c[KS(j)]);
        __m256 xa = _mm256_sub_ps(va, ck), xb = _mm256_sub_ps(vb, ck);
        __m256 qa = _mm256_mul_ps(xa, xa), qb = _mm256_mul_ps(xb, xb);
        __m256 lta = _mm256_cmp_ps(qa, da, _CMP_LT_OQ), ltb = _mm256_cmp_ps(qb, db, _CMP_LT_OQ);
        da = _mm256_blendv_ps(da, qa, lta);
        db = _mm256_blendv_ps(db, qb, ltb);
        cma = _mm256_blendv_ps(cma, ck, lta);
        cmb = _mm256_blendv_ps(cmb, ck, ltb);
        ama = _mm256_andnot_ps(lta, ama);
        amb = _mm256_andnot_ps(ltb, amb);
    }
    __m256 bma = _mm256_sub_ps(va, cma), bmb = _mm256_sub_ps(vb, cmb);
    __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
    for (int j = 0; j < nk; j++) {
        int64_t k = KS(j);
        __m256 ck = _mm256_set1_ps(c[k]);
        __m256 ga = _mm256_mul_ps(_mm256_sub_ps(cma, ck), _mm256_add_ps(_mm256_sub_ps(va, ck), bma));
        __m256 gb = _mm256_mul_ps(_mm256_sub_ps(cmb, ck), _mm256_add_ps(_mm256_sub_ps(vb, ck), bmb));
        ga = _mm256_sub_ps(ga, ama);
        gb = _mm256_sub_ps(gb, amb);
        if (k == 0) {
            ga = _mm256_add_ps(ga, adj0);
            gb = _mm256_add_ps(gb, adj0);
        }
        __m256 eka = exp2_neg_v(_mm256_mul_ps(ga, factor));
        __m256 ekb = exp2_neg_v(_mm256_mul_ps(gb, factor));
        ea[k] = eka;
        eb[k] = ekb;
        sa = _mm256_add_ps(sa, eka);
        sb = _mm256_add_ps(sb, ekb);
    }
    __m256 ia = _mm256_div_ps(_mm256_set1_ps(1.0f), sa);
    __m256 ib = _mm256_div_ps(_mm256_set1_ps(1.0f), sb);
    for (int j = 0; j < nk; j++) {
        ea[KS(j)] = _mm256_mul_ps(ea[KS(j)], ia);
        eb[KS(j)] = _mm256_mul_ps(eb[KS(j)], ib);
    }
    *dmina = da;
    *dminb = db;
}

/* The P of block i (into the returned array) and its codes vv: blocks are computed in pairs
 * (i, i + 8) in lockstep (probs8x2) when i is a pair's first, into e and e2; the pair's second
 * block then takes what is left in e2, vnext and dnext. (Pairs never straddle a window span.) */
AVXI __m256 *pair_block(const float *vg, int64_t i, int64_t Ug, const float *cg,
                        const int32_t *ks, int nk, __m256 factor, __m256 adj0, __m256 *e,
                        __m256 *e2, __m256 *vv, __m256 *vnext, __m256 *dmin, __m256 *dnext,
                        const int win_on) {
    if (i % 16) {
        *vv = *vnext;
        *dmin = *dnext;
        return e2;
    }
    *vv = load8(vg, i, Ug, 1);
    if (i + 8 < Ug) {
        *vnext = load8(vg, i + 8, Ug, 1);
        probs8x2(*vv, *vnext, cg, ks, nk, factor, adj0, e, e2, dmin, dnext, win_on);
    } else {
        probs8x2(*vv, *vv, cg, ks, nk, factor, adj0, e, e2, dmin, dnext, win_on);
    }
    return e;
}

/* the block's P into the returned array: from the stored attention (pin, written by
 * fwd_stats) into e, or computed (pair_block) */
AVXI __m256 *block_probs(const float *pin, int64_t g, int64_t i, int64_t U, int64_t Ug,
                         const float *vg, const float *cg, int64_t K, const int32_t *ks, int nk,
                         __m256 factor, __m256 adj0, __m256 *e, __m256 *e2, __m256 *vv,
                         __m256 *vnext, __m256 *dnext, const int win_on) {
    __m256 dmin;
    if (!pin) return pair_block(vg, i, Ug, cg, ks, nk, factor, adj0, e, e2, vv, vnext, &dmin,
                                dnext, win_on);
    *vv = load8(vg, i, Ug, 1);
    const float *src = pin + (g * ((U + 7) / 8) + i / 8) * K * 8;
    for (int j = 0; j < nk; j++) e[KS(j)] = _mm256_loadu_ps(src + 8 * KS(j));
    return e;
}

AVX double hsum_pd(__m256 x) {
    __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                              _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}

/* Adds the float lanes of the slots touched since the last flush (all of them without a
 * window) into the float64 sums, lanes [0, K) into acc [0, K) and, with two, lanes [K, 2K)
 * into acc [K, 2K); untouched lanes hold exactly +0, so skipping them changes no sum. */
AVXI void flush_lanes(__m256 *lanes, double *acc, int64_t K, int two, uint8_t *touched,
                      const int win_on) {
    if (!win_on) {
        for (int64_t k = 0; k < (two ? 2 * K : K); k++) {
            acc[k] += hsum_pd(lanes[k]);
            lanes[k] = _mm256_setzero_ps();
        }
        return;
    }
    for (int64_t j = 0; j < (K + 7) / 8; j++) {
        unsigned bits = touched[j];
        touched[j] = 0;
        while (bits) {
            int64_t k = 8 * j + __builtin_ctz(bits);
            bits &= bits - 1;
            acc[k] += hsum_pd(lanes[k]);
            lanes[k] = _mm256_setzero_ps();
            if (two) {
                acc[K + k] += hsum_pd(lanes[K + k]);
                lanes[K + k] = _mm256_setzero_ps();
            }
        }
    }
}

AVXI void fwd_stats_simd(const float *v, const float *m, const float *c, int64_t G, int64_t U,
    const cfg_t *cf, float *sm, double *inertia, __m256 *e, __m256 *lanes, double *acc, float *pout,
    const int32_t *lens, const int win_on) {
    const int64_t K = cf->k;
    const __m256 factor = _mm256_set1_ps(cf->factor);
    const __m256 adj0 = _mm256_set1_ps(cf->prune > 0.0f ? -cf->prune : 0.0f);
    int32_t buf[256];
    uint8_t touched[32] = {0}; /* the slots whose lanes may be non-zero since the last flush */
    const int32_t *ks = ALL_SLOTS;
    win_t w;
    for (int64_t g = 0; g < G; g++) {
        const float *vg = v + g * U, *mg = m + g * U, *cg = c + g * K;
        __m256d in_lo = _mm256_setzero_pd(), in_hi = _mm256_setzero_pd();
        for (int64_t k = 0; k < 2 * K; k++) {
            acc[k] = 0.0;
            lanes[k] = _mm256_setzero_ps();
        }
        int64_t blocks = 0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        if (win_on) win_setup(&w, vg, Ug, cg, K, cf);
        int nk = (int)K;
        __m256 vv, vnext = _mm256_setzero_ps(), dmin, dnext = vnext, *e2 = e + 3 * K;
        for (int64_t i = 0; i < Ug; i += 8) {
            __m256 mm = load8(mg, i, Ug, 0);
            if (win_on && i % (8 * WSPAN) == 0) nk = window_at(&w, vg, i, Ug, K, buf, &ks, touched);
            __m256 *eb = pair_block(vg, i, Ug, cg, ks, nk, factor, adj0, e, e2, &vv, &vnext,
                                    &dmin, &dnext, win_on);
            if (pout) { /* (zeros for the skipped slots) */
                float *dst = pout + (g * ((U + 7) / 8) + i / 8) * K * 8;
                for (int64_t k = 0, j = 0; k < K; k++) {
                    int in = j < nk && KS(j) == k;
                    _mm256_storeu_ps(dst + 8 * k, in ? eb[k] : _mm256_setzero_ps());
                    j += in;
                }
            }
            if (inertia) {
                __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(dmin));
                __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(dmin, 1));
                __m256d m0 = _mm256_cvtps_pd(_mm256_castps256_ps128(mm));
                __m256d m1 = _mm256_cvtps_pd(_mm256_extractf128_ps(mm, 1));
                in_lo = _mm256_fmadd_pd(d0, m0, in_lo);
                in_hi = _mm256_fmadd_pd(d1, m1, in_hi);
            }
            for (int j = 0; j < nk; j++) {
                int64_t k = KS(j);
                __m256 w = _mm256_mul_ps(eb[k], mm);
                __m256 diff = _mm256_sub_ps(vv, _mm256_set1_ps(cg[k]));
                lanes[k] = _mm256_fmadd_ps(w, diff, lanes[k]);
                lanes[K + k] = _mm256_add_ps(lanes[K + k], w);
            }
            if (++blocks == FLUSH) {
                blocks = 0;
                flush_lanes(lanes, acc, K, 1, touched, win_on);
            }
        }
        for (int64_t k = 0; k < 2 * K; k++) sm[g * 2 * K + k] += (float)(acc[k] + hsum_pd(lanes[k]));
        if (inertia) {
            __m256d s = _mm256_add_pd(in_lo, in_hi);
            __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
            inertia[g] += _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
        }
    }
}

AVXI void out_y_simd(const float *v, const float *cp, const float *cl, int64_t G, int64_t U,
    const cfg_t *cf, float *y, __m256 *e, const float *pin, const int32_t *lens, const int win_on) {
    const int64_t K = cf->k;
    const __m256 factor = _mm256_set1_ps(cf->factor);
    const __m256 adj0 = _mm256_set1_ps(cf->prune > 0.0f ? -cf->prune : 0.0f);
    int32_t buf[256];
    uint8_t touched[32] = {0}; /* the slots whose lanes may be non-zero since the last flush */
    const int32_t *ks = ALL_SLOTS;
    win_t w;
    for (int64_t g = 0; g < G; g++) {
        const int64_t Ug = ROW_LEN(lens, g, U);
        for (int64_t j = Ug; j < U; j++) y[g * U + j] = 0.0f;
        if (win_on) win_setup(&w, v + g * U, Ug, cp + g * K, K, cf);
        int nk = (int)K;
        __m256 vv, vnext = _mm256_setzero_ps(), dnext = vnext, *e2 = e + 3 * K;
        for (int64_t i = 0; i < Ug; i += 8) {
            if (win_on && i % (8 * WSPAN) == 0)
                nk = window_at(&w, v + g * U, i, Ug, K, buf, &ks, touched);
            __m256 *eb = block_probs(pin, g, i, U, Ug, v + g * U, cp + g * K, K, ks, nk, factor,
                                     adj0, e, e2, &vv, &vnext, &dnext, win_on);
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < nk; j++)
                acc = _mm256_fmadd_ps(eb[KS(j)], _mm256_set1_ps(cl[g * K + KS(j)]), acc);
            store8(y + g * U, i, Ug, acc);
        }
    }
}

AVXI void att_t_simd(const float *v, const float *wt, const float *c, int64_t G, int64_t U,
    const cfg_t *cf, float *out, __m256 *e, __m256 *lanes, double *acc, const float *pin,
    const int32_t *lens, const int win_on) {
    const int64_t K = cf->k;
    const __m256 factor = _mm256_set1_ps(cf->factor);
    const __m256 adj0 = _mm256_set1_ps(cf->prune > 0.0f ? -cf->prune : 0.0f);
    int32_t buf[256];
    uint8_t touched[32] = {0}; /* the slots whose lanes may be non-zero since the last flush */
    const int32_t *ks = ALL_SLOTS;
    win_t w;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t k = 0; k < K; k++) {
            acc[k] = 0.0;
            lanes[k] = _mm256_setzero_ps();
        }
        int64_t blocks = 0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        if (win_on) win_setup(&w, v + g * U, Ug, c + g * K, K, cf);
        int nk = (int)K;
        __m256 vv, vnext = _mm256_setzero_ps(), dnext = vnext, *e2 = e + 3 * K;
        for (int64_t i = 0; i < Ug; i += 8) {
            __m256 ww = load8(wt + g * U, i, Ug, 0);
            if (win_on && i % (8 * WSPAN) == 0)
                nk = window_at(&w, v + g * U, i, Ug, K, buf, &ks, touched);
            __m256 *eb = block_probs(pin, g, i, U, Ug, v + g * U, c + g * K, K, ks, nk, factor,
                                     adj0, e, e2, &vv, &vnext, &dnext, win_on);
            for (int j = 0; j < nk; j++)
                lanes[KS(j)] = _mm256_fmadd_ps(eb[KS(j)], ww, lanes[KS(j)]);
            if (++blocks == FLUSH) {
                blocks = 0;
                flush_lanes(lanes, acc, K, 0, touched, win_on);
            }
        }
        for (int64_t k = 0; k < K; k++) out[g * K + k] = (float)(acc[k] + hsum_pd(lanes[k]));
    }
}

AVXI void bwd_step_simd(const float *v, const float *m, const float *gsum, const float *c,
    int64_t G, int64_t U, const cfg_t *cf, float two, const float *s_hat, const float *raw,
    const float *out_c, float *r, float *h, float *dc, float *dco, __m256 *e, __m256 *lanes,
    double *acc, const float *pin, const int32_t *lens, const int win_on) {
    const int64_t K = cf->k;
    const __m256 factor = _mm256_set1_ps(cf->factor), twov = _mm256_set1_ps(two);
    const __m256 adj0 = _mm256_set1_ps(cf->prune > 0.0f ? -cf->prune : 0.0f);
    int32_t buf[256];
    uint8_t touched[32] = {0}; /* the slots whose lanes may be non-zero since the last flush */
    const int32_t *ks = ALL_SLOTS;
    win_t w;
    for (int64_t g = 0; g < G; g++) {
        const float *cg = c + g * K;
        const float *sg = s_hat ? s_hat + g * K : NULL, *rg = raw + g * K;
        const float *og = out_c ? out_c + g * K : NULL;
        for (int64_t k = 0; k < 2 * K; k++) {
            acc[k] = 0.0;
            lanes[k] = _mm256_setzero_ps();
        }
        int64_t blocks = 0;
        const int64_t Ug = ROW_LEN(lens, g, U);
        if (win_on) win_setup(&w, v + g * U, Ug, cg, K, cf);
        if (og)
            for (int64_t j = Ug; j < U; j++) h[g * U + j] = 0.0f;
        int nk = (int)K;
        __m256 vv, vnext = _mm256_setzero_ps(), dnext = vnext, *e2 = e + 3 * K;
        for (int64_t i = 0; i < Ug; i += 8) {
            if (win_on && i % (8 * WSPAN) == 0)
                nk = window_at(&w, v + g * U, i, Ug, K, buf, &ks, touched);
            __m256 *eb = block_probs(pin, g, i, U, Ug, v + g * U, cg, K, ks, nk, factor, adj0, e,
                                     e2, &vv, &vnext, &dnext, win_on);
            if (sg) {
                __m256 mm = load8(m + g * U, i, Ug, 0);
                __m256 dir = _mm256_setzero_ps(), dot = _mm256_setzero_ps();
                for (int j = 0; j < nk; j++) {
                    int64_t k = KS(j);
                    __m256 sk = _mm256_set1_ps(sg[k]);
                    __m256 gr = _mm256_fmsub_ps(vv, sk, _mm256_set1_ps(sg[k] * rg[k]));
                    dir = _mm256_fmadd_ps(sk, eb[k], dir);
                    dot = _mm256_fmadd_ps(gr, eb[k], dot);
                }
                __m256 tot = _mm256_setzero_ps();
                for (int j = 0; j < nk; j++) {
                    int64_t k = KS(j);
                    __m256 sk = _mm256_set1_ps(sg[k]);
                    __m256 gr = _mm256_fmsub_ps(vv, sk, _mm256_set1_ps(sg[k] * rg[k]));
                    __m256 ek = _mm256_mul_ps(eb[k], _mm256_sub_ps(gr, dot));
                    ek = _mm256_mul_ps(ek, _mm256_sub_ps(vv, _mm256_set1_ps(cg[k])));
                    tot = _mm256_add_ps(tot, ek);
                    lanes[k] = _mm256_fmadd_ps(ek, mm, lanes[k]);
                }
                __m256 rr = load8(r + g * U, i, Ug, 0);
                rr = _mm256_add_ps(rr, _mm256_fnmadd_ps(twov, tot, dir));
                store8(r + g * U, i, Ug, rr);
            }
            if (og) {
                __m256 gg = load8(gsum + g * U, i, Ug, 0);
                __m256 dot = _mm256_setzero_ps();
                for (int j = 0; j < nk; j++)
                    dot = _mm256_fmadd_ps(_mm256_set1_ps(og[KS(j)]), eb[KS(j)], dot);
                __m256 tot = _mm256_setzero_ps();
                for (int j = 0; j < nk; j++) {
                    int64_t k = KS(j);
                    __m256 ek = _mm256_mul_ps(eb[k], _mm256_sub_ps(_mm256_set1_ps(og[k]), dot));
                    ek = _mm256_mul_ps(ek, _mm256_sub_ps(vv, _mm256_set1_ps(cg[k])));
                    tot = _mm256_add_ps(tot, ek);
                    lanes[K + k] = _mm256_fmadd_ps(ek, gg, lanes[K + k]);
                }
                store8(h + g * U, i, Ug, _mm256_mul_ps(_mm256_set1_ps(-two), tot));
            }
            if (++blocks == FLUSH) {
                blocks = 0;
                flush_lanes(lanes, acc, K, 1, touched, win_on);
            }
        }
        for (int64_t k = 0; k < K; k++) {
            if (dc) dc[g * K + k] = (float)(two * (acc[k] + hsum_pd(lanes[k])));
            if (dco) dco[g * K + k] = (float)(two * (acc[K + k] + hsum_pd(lanes[K + k])));
        }
    }
}
#endif

static int force_generic = 0; /* tests: run the portable kernels */

static int fast_cpu(void) {
#if DKM_X86
    static int cached = -1;
    if (force_generic) return 0;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                 __builtin_cpu_supports("f16c");
    }
    return cached;
#else
    return 0;
#endif
}

static int use_simd(const cfg_t *cf) {
    /* the exact-zero rule only applies without a prune pull */
    int kz = cf->keep_zeros && !(cf->prune > 0.0f);
    return fast_cpu() && !kz && !cf->clamp && cf->k <= 256;
}

/* the per-code kernels' scratch: the AVX2 kernels' (simd) or the tiled ones'; 0 without memory */
static int scratch_alloc(scratch_t *s, int64_t k, int simd) {
#if DKM_X86
    if (simd) {
        size_t n = (size_t)(4 * k) * sizeof(__m256); /* e, lanes (2 k), the second block's e */
        char *buf = (char *)aligned_alloc(32, n + (size_t)(2 * k) * sizeof(double) + 32);
        if (!buf) return 0;
        s->buf = buf;
        s->e = (__m256 *)buf;
        s->lanes = s->e + k;
        s->acc = (double *)(buf + n);
        return 1;
    }
#endif
    (void)simd;
    s->buf = s->p = (float *)malloc((size_t)k * TILE * sizeof(float));
    return s->p != NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Python bindings */

/* Subnormal floats cost ~100 cycles per operation on x86 and the saturated softmax produces
 * them in bulk (exp2 of -126..-149): the kernels run with flush-to-zero / denormals-are-zero
 * (a difference below 2^-126, far under float32 resolution of anything they sum), restoring
 * the caller's MXCSR afterwards. */
#if DKM_X86
#define FTZ_ON unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040u);
#define FTZ_OFF _mm_setcsr(saved_csr_);
#define X86(f) f /* a kernel that only x86 builds have */
#else
#define FTZ_ON
#define FTZ_OFF
#define X86(f) NULL
#endif

/* Each py_* wrapper parses its arguments into a call_t and hands it, with its kernel's
 * variants, to run_elem / run_code, which pick the variant for this CPU (and configuration)
 * and run it without the GIL, with flush-to-zero. */
typedef void (*elem_fn)(const call_t *call);
typedef void (*code_fn)(const call_t *call, const scratch_t *s);

/* element kernels: f16c (AVX2 + F16C) where the CPU has it, and vec (AVX2 gathers, NULL for
 * none) in its place without the exact-zero rule; generic otherwise */
static PyObject *run_elem(const call_t *call, elem_fn generic, elem_fn f16c, elem_fn vec) {
    int fast = fast_cpu();
    Py_BEGIN_ALLOW_THREADS
    FTZ_ON
    if (fast && vec && !call->kz) vec(call);
    else if (fast) f16c(call);
    else generic(call);
    FTZ_OFF
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* cfg tuple: (k, factor, prune, keep_zeros, zinv, clamp, zt) */
static int parse_cfg(PyObject *t, cfg_t *cf) {
    long long k;
    cf->win = 0.0f;
    if (!PyArg_ParseTuple(t, "Lffifif|f", &k, &cf->factor, &cf->prune, &cf->keep_zeros,
                          &cf->zinv, &cf->clamp, &cf->zt, &cf->win))
        return 0;
    cf->k = k;
    return 1;
}

/* per-code kernels: simd (the AVX2 register kernels) where use_simd allows, else the tiled
 * kernels compiled for AVX2 + FMA (avx2) or portable (generic) */
static code_fn pick_code(const cfg_t *cf, code_fn generic, code_fn avx2, code_fn simd) {
    if (use_simd(cf)) return simd;
    if (fast_cpu()) return avx2;
    return generic;
}

/* one per-code kernel call, with flush-to-zero (the GIL released by the caller) */
static void run_kernel(code_fn fn, const call_t *call, const scratch_t *s) {
    FTZ_ON
    fn(call, s);
    FTZ_OFF
}

static PyObject *run_code(call_t *call, code_fn generic, code_fn avx2, code_fn simd) {
    if (!parse_cfg(call->ct, &call->cf)) return NULL;
    code_fn fn = pick_code(&call->cf, generic, avx2, simd);
    scratch_t s = {0};
    if (!scratch_alloc(&s, call->cf.k, use_simd(&call->cf))) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    run_kernel(fn, call, &s);
    Py_END_ALLOW_THREADS
    free(s.buf);
    Py_RETURN_NONE;
}

/* the element kernels' entry points */
#define ELEMENT_CALLS(SUFFIX)                                                                    \
    static void hist_##SUFFIX##_call(const call_t *call) {                                       \
        hist_##SUFFIX(F(0), call->rows, call->n, F(1), call->kz, I32(2));                        \
    }                                                                                            \
    static void gather_##SUFFIX##_call(const call_t *call) {                                     \
        gather_##SUFFIX(F(0), call->rows, call->n, F(1), call->kz, F(2), F(3));                  \
    }                                                                                            \
    static void scatter_##SUFFIX##_call(const call_t *call) {                                    \
        scatter_##SUFFIX(F(0), call->rows, call->n, F(1), call->kz, F(2), D(3));                 \
    }                                                                                            \
    static void grad_##SUFFIX##_call(const call_t *call) {                                       \
        grad_##SUFFIX(F(0), call->rows, call->n, F(1), call->kz, F(2), F(3), F(4));              \
    }

ELEMENT_CALLS(generic)
#if DKM_X86
ELEMENT_CALLS(f16c)

static void gather_v_call(const call_t *call) {
    gather_v(F(0), call->rows, call->n, F(1), F(2), F(3));
}

static void grad_v_call(const call_t *call) {
    grad_v(F(0), call->rows, call->n, F(1), F(2), F(3), F(4));
}

/* the AVX2 per-code kernels' entry points (the tiled ones are CODE_KERNELS above), each
 * kernel compiled twice: with the centroid window (cfg win > 0) and without (see KS) */
#define WIN_TWICE(call_expr_on, call_expr_off)                                                 \
    if (call->cf.win > 0.0f) call_expr_on;                                                       \
    else call_expr_off;

AVX2F static void fwd_stats_simd_call(const call_t *call, const scratch_t *s) {
#define ARGS F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), D(4), s->e, s->lanes, \
             s->acc, P(float *, call->pio), LENS
    WIN_TWICE(fwd_stats_simd(ARGS, 1), fwd_stats_simd(ARGS, 0))
#undef ARGS
}

AVX2F static void out_y_simd_call(const call_t *call, const scratch_t *s) {
#define ARGS F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), s->e, \
             P(const float *, call->pio), LENS
    WIN_TWICE(out_y_simd(ARGS, 1), out_y_simd(ARGS, 0))
#undef ARGS
}

AVX2F static void att_t_simd_call(const call_t *call, const scratch_t *s) {
#define ARGS F(0), F(1), F(2), call->rows, call->n, &call->cf, F(3), s->e, s->lanes, s->acc, \
             P(const float *, call->pio), LENS
    WIN_TWICE(att_t_simd(ARGS, 1), att_t_simd(ARGS, 0))
#undef ARGS
}

AVX2F static void bwd_step_simd_call(const call_t *call, const scratch_t *s) {
#define ARGS F(0), F(1), F(2), F(3), call->rows, call->n, &call->cf, call->two, F(4), F(5), F(6), \
             F(7), F(8), F(9), F(10), s->e, s->lanes, s->acc, P(const float *, call->pio), LENS
    WIN_TWICE(bwd_step_simd(ARGS, 1), bwd_step_simd(ARGS, 0))
#undef ARGS
}
#endif

/* hist(x, rows, n, scale, keep_zeros, counts) */
static PyObject *py_hist(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KnnKiK", &a[0], &c.rows, &c.n, &a[1], &c.kz, &a[2])) return NULL;
    return run_elem(&c, hist_generic_call, X86(hist_f16c_call), NULL);
}

/* gather(x, rows, n, scale, keep_zeros, table, out), scatter(x, rows, n, scale, keep_zeros, g,
 * acc): the same arguments */
static PyObject *gather_like(PyObject *args, elem_fn generic, elem_fn f16c, elem_fn vec) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KnnKiKK", &a[0], &c.rows, &c.n, &a[1], &c.kz, &a[2], &a[3]))
        return NULL;
    return run_elem(&c, generic, f16c, vec);
}

static PyObject *py_gather(PyObject *self, PyObject *args) {
    return gather_like(args, gather_generic_call, X86(gather_f16c_call), X86(gather_v_call));
}

static PyObject *py_scatter(PyObject *self, PyObject *args) {
    return gather_like(args, scatter_generic_call, X86(scatter_f16c_call), NULL);
}

/* grad(x, rows, n, scale, keep_zeros, g, hr, out) */
static PyObject *py_grad(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KnnKiKKK", &a[0], &c.rows, &c.n, &a[1], &c.kz, &a[2], &a[3],
                          &a[4]))
        return NULL;
    return run_elem(&c, grad_generic_call, X86(grad_f16c_call), X86(grad_v_call));
}

/* fwd_stats(v, m, c, G, U, cfg, sm, inertia[, p_keep[, lens]]) */
static PyObject *py_fwd_stats(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KKKnnOKK|KK", &a[0], &a[1], &a[2], &c.rows, &c.n, &c.ct, &a[3],
                          &a[4], &c.pio, &c.lens))
        return NULL;
    return run_code(&c, fwd_stats_generic, X86(fwd_stats_avx2), X86(fwd_stats_simd_call));
}

/* out_y(v, c_probs, c_out, G, U, cfg, y[, p_keep[, lens]]), att_t(v, w, c, G, U, cfg, out[,
 * p_keep[, lens]]): the same arguments (lens: see ROW_LEN) */
static PyObject *out_y_like(PyObject *args, code_fn generic, code_fn avx2, code_fn simd) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KKKnnOK|KK", &a[0], &a[1], &a[2], &c.rows, &c.n, &c.ct, &a[3],
                          &c.pio, &c.lens))
        return NULL;
    return run_code(&c, generic, avx2, simd);
}

static PyObject *py_out_y(PyObject *self, PyObject *args) {
    return out_y_like(args, out_y_generic, X86(out_y_avx2), X86(out_y_simd_call));
}

static PyObject *py_att_t(PyObject *self, PyObject *args) {
    return out_y_like(args, att_t_generic, X86(att_t_avx2), X86(att_t_simd_call));
}

/* bwd_step(v, m, gsum, c, G, U, cfg, two, s_hat, raw, out_c, r, h, dc, dco[, p_keep[, lens]]) */
static PyObject *py_bwd_step(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long *a = c.a;
    if (!PyArg_ParseTuple(args, "KKKKnnOfKKKKKKK|KK", &a[0], &a[1], &a[2], &a[3], &c.rows,
                          &c.n, &c.ct, &c.two, &a[4], &a[5], &a[6], &a[7], &a[8], &a[9],
                          &a[10], &c.pio, &c.lens))
        return NULL;
    return run_code(&c, bwd_step_generic, X86(bwd_step_avx2), X86(bwd_step_simd_call));
}

/* ------------------------------------------------------------------------------------------ */
/* The scalar engine's iteration loops (soft_kmeans._scalar_iterations / _scalar_backward_c,
 * mode "dkm" without lut_fn), the kernels called from C: the same float32 steps as the torch
 * code between them (the update, the early-stopping test, the per-group bookkeeping), so that
 * both give equal results; flush-to-zero only around the kernels, as for a call from Python. */

/* fwd_loop(v, m, c_hist, G, U, cfg, T, eps, enforce_zero, sm_hist, raw_hist, act_hist, last_it,
 *          prev_c, last_c, p_keep, lens) -> (iterations run, first partial iteration or -1)
 * c_hist [T, G, K] (c_hist[0]: the starting centroids; iteration t starts from c_hist[t]),
 * sm_hist [T, G, 2, K] (each iteration's centred sums and masses), raw_hist [T, G, K] (its
 * c + sums / mass), act_hist [T, G] uint8 (the groups it ran on), last_it int64 [G] (each
 * group's last iteration; set once some iteration ran on part of the groups), prev_c / last_c
 * [G, K] (each group's centroids before and after its last iteration); p_keep: the kept
 * attention, written by iteration T - 1 (0: none) */
static PyObject *py_fwd_loop(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long v, m, ch, smh, rawh, acth, lit, pc, lc;
    Py_ssize_t G, U, T;
    double eps;
    int ez;
    if (!PyArg_ParseTuple(args, "KKKnnOndpKKKKKKKK", &v, &m, &ch, &G, &U, &c.ct, &T, &eps, &ez,
                          &smh, &rawh, &acth, &lit, &pc, &lc, &c.pio, &c.lens))
        return NULL;
    if (!parse_cfg(c.ct, &c.cf)) return NULL;
    if (G < 1 || U < 1 || T < 1) {
        PyErr_SetString(PyExc_ValueError, "fwd_loop: needs G, U, T >= 1");
        return NULL;
    }
    int64_t K = c.cf.k, GK = G * K;
    code_fn fn = pick_code(&c.cf, fwd_stats_generic, X86(fwd_stats_avx2),
                           X86(fwd_stats_simd_call));
    scratch_t s = {0};
    double *inertia = (double *)malloc(sizeof(double) * (size_t)G);
    float *prev_in = (float *)malloc(sizeof(float) * (size_t)G);
    float *nw = (float *)malloc(sizeof(float) * (size_t)GK);
    if (!inertia || !prev_in || !nw || !scratch_alloc(&s, K, use_simd(&c.cf))) {
        free(inertia), free(prev_in), free(nw), free(s.buf);
        return PyErr_NoMemory();
    }
    float *c_hist = P(float *, ch), *sm_hist = P(float *, smh), *raw_hist = P(float *, rawh);
    float *prev_c = P(float *, pc), *last_c = P(float *, lc);
    uint8_t *act_hist = P(uint8_t *, acth);
    int64_t *last_it = P(int64_t *, lit);
    int64_t n_run = T, partial = -1; /* partial: the first iteration on part of the groups */
    int have_prev = 0;
    float eps_f = (float)eps;
    Py_BEGIN_ALLOW_THREADS
    c.rows = G, c.n = U, c.a[0] = v, c.a[1] = m;
    memcpy(prev_c, c_hist, sizeof(float) * (size_t)GK);
    memcpy(last_c, c_hist, sizeof(float) * (size_t)GK);
    memset(act_hist, 1, (size_t)(T * G));
    for (int64_t t = 0; t < T; t++) {
        float *cc = c_hist + t * GK, *sm = sm_hist + t * 2 * GK, *raw = raw_hist + t * GK;
        uint8_t *act = act_hist + t * G;
        int test = eps >= 0 && t + 1 < T;
        memset(sm, 0, sizeof(float) * 2 * (size_t)GK);
        if (test) memset(inertia, 0, sizeof(double) * (size_t)G);
        c.a[2] = (uintptr_t)cc, c.a[3] = (uintptr_t)sm, c.a[4] = test ? (uintptr_t)inertia : 0;
        call_t ct = c;
        ct.pio = t == T - 1 ? c.pio : 0;
        run_kernel(fn, &ct, &s);
        for (int64_t g = 0; g < G; g++) { /* raw = c + sums / mass (mass 0: c); new: slot 0 */
            for (int64_t k = 0; k < K; k++) {
                float sum = sm[g * 2 * K + k], mass = sm[g * 2 * K + K + k], cv = cc[g * K + k];
                float r = mass >= FLT_MIN ? cv + sum / mass : cv; /* subnormal mass: empty */
                raw[g * K + k] = r;
                nw[g * K + k] = ez && k == 0 ? 0.0f : r;
            }
            if (partial < 0 || act[g]) { /* the groups that ran: their last iteration */
                memcpy(prev_c + g * K, cc + g * K, sizeof(float) * (size_t)K);
                memcpy(last_c + g * K, nw + g * K, sizeof(float) * (size_t)K);
                if (partial >= 0) last_it[g] = t;
            }
        }
        if (t + 1 < T) memcpy(c_hist + (t + 1) * GK, last_c, sizeof(float) * (size_t)GK);
        if (!test) continue;
        if (!have_prev) { /* (the next iteration runs on the same groups) */
            for (int64_t g = 0; g < G; g++) prev_in[g] = (float)inertia[g];
            memcpy(act_hist + (t + 1) * G, act, (size_t)G);
            have_prev = 1;
            continue;
        }
        int64_t n_active = 0;
        uint8_t *next = act_hist + (t + 1) * G; /* (t + 1 < T: test) */
        for (int64_t g = 0; g < G; g++) {
            float in = (float)inertia[g];
            next[g] = act[g] && fabsf(in - prev_in[g]) > eps_f;
            n_active += next[g];
            prev_in[g] = in;
        }
        if (n_active == 0) { /* every group stopped */
            n_run = t + 1;
            break;
        }
        if (n_active < G && partial < 0) {
            partial = t + 1;
            for (int64_t g = 0; g < G; g++) last_it[g] = t; /* (all ran until now) */
        }
    }
    Py_END_ALLOW_THREADS
    free(inertia), free(prev_in), free(nw), free(s.buf);
    return Py_BuildValue("nn", (Py_ssize_t)n_run, (Py_ssize_t)partial);
}

/* bwd_loop(v, m, gsum, G, U, cfg, two, n_run, partial, enforce_zero, c_hist, raw_hist, sm_hist,
 *          act_hist, last_it, prev_c, last_c, p_keep, lens, h, r): backward through the
 * iterations fwd_loop ran (its arrays; partial and last_it as it returned them): h and r
 * (zeroed [G, U]) receive each code's sums (soft_kmeans._scalar_backward_c) */
static PyObject *py_bwd_loop(PyObject *self, PyObject *args) {
    call_t c = {0};
    unsigned long long v, m, gs, ch, rawh, smh, acth, lit, pc, lc, ph, pr;
    Py_ssize_t G, U, n_run, partial;
    int ez;
    if (!PyArg_ParseTuple(args, "KKKnnOfnnpKKKKKKKKKKK", &v, &m, &gs, &G, &U, &c.ct, &c.two,
                          &n_run, &partial, &ez, &ch, &rawh, &smh, &acth, &lit, &pc, &lc, &c.pio,
                          &c.lens, &ph, &pr))
        return NULL;
    if (!parse_cfg(c.ct, &c.cf)) return NULL;
    if (G < 1 || U < 1 || n_run < 1) {
        PyErr_SetString(PyExc_ValueError, "bwd_loop: needs G, U, n_run >= 1");
        return NULL;
    }
    int64_t K = c.cf.k, GK = G * K;
    int simd = use_simd(&c.cf);
    code_fn f_att = pick_code(&c.cf, att_t_generic, X86(att_t_avx2), X86(att_t_simd_call));
    code_fn f_bwd = pick_code(&c.cf, bwd_step_generic, X86(bwd_step_avx2),
                              X86(bwd_step_simd_call));
    scratch_t s = {0};
    /* grad_c, d_last, d_prev, s_hat, grad_in, dc: [G, K] each */
    float *buf = (float *)malloc(sizeof(float) * 6 * (size_t)GK);
    if (!buf || !scratch_alloc(&s, K, simd)) {
        free(buf), free(s.buf);
        return PyErr_NoMemory();
    }
    float *grad_c = buf, *d_last = buf + GK, *d_prev = buf + 2 * GK;
    float *s_hat = buf + 3 * GK, *g_in = buf + 4 * GK, *dc = buf + 5 * GK;
    const float *c_hist = P(const float *, ch), *raw_hist = P(const float *, rawh);
    const float *sm_hist = P(const float *, smh);
    const uint8_t *act_hist = P(const uint8_t *, acth);
    const int64_t *last_it = partial >= 0 ? P(const int64_t *, lit) : NULL;
    Py_BEGIN_ALLOW_THREADS
    memset(grad_c, 0, sizeof(float) * (size_t)GK);
    for (int64_t t = n_run - 1; t >= 0; t--) {
        const uint8_t *act = partial >= 0 && t >= partial ? act_hist + t * G : NULL;
        const float *raw = raw_hist + t * GK, *cc = c_hist + t * GK;
        int with_out = t == n_run - 1;
        if (with_out) { /* d loss / d (the output's centroids), from prev_c's attention */
            call_t ca = c;
            ca.a[0] = v, ca.a[1] = gs, ca.a[2] = pc, ca.a[3] = (uintptr_t)d_last;
            ca.rows = G, ca.n = U;
            run_kernel(f_att, &ca, &s);
            cc = P(const float *, pc);
        }
        for (int64_t g = 0; g < G; g++) {
            /* ends: the groups whose output comes from iteration t (all / none / by last_it) */
            int ends = last_it ? last_it[g] == t : with_out;
            float am = act ? (float)act[g] : 1.0f;
            const float *mass = sm_hist + t * 2 * GK + g * 2 * K + K;
            for (int64_t k = 0; k < K; k++) {
                int64_t i = g * K + k;
                float gn = act ? grad_c[i] * am : grad_c[i];
                if (last_it) gn = gn + d_last[i] * (float)ends;
                else if (ends) gn = gn + d_last[i];
                if (ez && k == 0) gn = 0.0f;
                int filled = mass[k] >= FLT_MIN; /* as the forward update */
                float sh = filled ? gn / mass[k] : 0.0f;
                s_hat[i] = act ? sh * am : sh;
                g_in[i] = filled ? 0.0f : gn;
            }
        }
        call_t cb = c;
        cb.a[0] = v, cb.a[1] = m, cb.a[2] = with_out ? gs : 0, cb.a[3] = (uintptr_t)cc;
        cb.a[4] = (uintptr_t)s_hat, cb.a[5] = (uintptr_t)raw, cb.a[6] = with_out ? lc : 0;
        cb.a[7] = pr, cb.a[8] = ph, cb.a[9] = (uintptr_t)dc;
        cb.a[10] = with_out ? (uintptr_t)d_prev : 0;
        cb.rows = G, cb.n = U;
        cb.pio = with_out ? c.pio : 0;
        run_kernel(f_bwd, &cb, &s);
        for (int64_t g = 0; g < G; g++) {
            int ends = last_it ? last_it[g] == t : with_out;
            for (int64_t k = 0; k < K; k++) {
                int64_t i = g * K + k;
                float gi = g_in[i] + dc[i];
                if (last_it) gi = gi + d_prev[i] * (float)ends;
                else if (ends) gi = gi + d_prev[i];
                if (!act || act[g]) grad_c[i] = gi;
            }
        }
    }
    Py_END_ALLOW_THREADS
    free(buf), free(s.buf);
    Py_RETURN_NONE;
}

static PyObject *py_portable(PyObject *self, PyObject *args) {
    /* portable(flag): run the portable kernels (1) or the CPU's best (0); returns whether the
     * AVX2/F16C kernels run now */
    int want;
    if (!PyArg_ParseTuple(args, "p", &want)) return NULL;
    force_generic = want;
    return PyBool_FromLong(fast_cpu());
}

/* present(counts, G) -> [number of codes with a non-zero count, per group]
 * compact(counts, G, u, codes, mass): per group, the codes with a non-zero count in ascending
 * order into codes [G, u] (int64, padded with 65536) and their counts into mass [G, u] (float) */
static PyObject *py_present(PyObject *self, PyObject *args) {
    unsigned long long counts;
    Py_ssize_t G;
    if (!PyArg_ParseTuple(args, "Kn", &counts, &G)) return NULL;
    PyObject *out = PyList_New(G);
    if (!out) return NULL;
    for (Py_ssize_t g = 0; g < G; g++) {
        const int32_t *cnt = P(const int32_t *, counts) + g * STRIDE;
        long n = 0;
        for (int64_t i = 0; i < 65536; i++) n += cnt[i] != 0;
        PyList_SET_ITEM(out, g, PyLong_FromLong(n));
    }
    return out;
}

static PyObject *py_compact(PyObject *self, PyObject *args) {
    unsigned long long counts, codes, mass;
    Py_ssize_t G, u;
    if (!PyArg_ParseTuple(args, "KnnKK", &counts, &G, &u, &codes, &mass)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < G; g++) {
        const int32_t *cnt = P(const int32_t *, counts) + g * STRIDE;
        int64_t *cd = P(int64_t *, codes) + g * u;
        float *ms = P(float *, mass) + g * u;
        int64_t j = 0;
        for (int64_t i = 0; i < 65536 && j < u; i++) {
            if (cnt[i]) {
                cd[j] = i;
                ms[j++] = (float)cnt[i];
            }
        }
        for (; j < u; j++) {
            cd[j] = 65536;
            ms[j] = 0.0f;
        }
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    /* simd(cfg) -> whether the per-code kernels take the AVX2 path for this configuration */
    PyObject *ct;
    cfg_t cf;
    if (!PyArg_ParseTuple(args, "O", &ct)) return NULL;
    if (!parse_cfg(ct, &cf)) return NULL;
    return PyBool_FromLong(use_simd(&cf));
}

/* grid(op, x, rows, n, lo, inv_w, C, fc, off, H, a, b, ld, out): the grid kernels, by op
 *     0  gsplat  a = w (0: unit weights), out = the node sums [rows, H] (float32, all written)
 *     1  glerp   a = table (row stride ld)
 *     2  ggrad   a = g, b = hr ((h, r) of node j at 2 j, 2 j + 1; row stride ld), or b = h and
 *                the trailing c = r (rows of stride ld each, interleaved per row); out may be a
 *     3  gvalues a = span, out = the node values [rows, H] (x unused) */
static PyObject *py_grid(PyObject *self, PyObject *args) {
    int op;
    unsigned long long x, lo, iw, fc, off, a, b, out, c = 0;
    Py_ssize_t rows, n, C, H, ld;
    if (!PyArg_ParseTuple(args, "iKnnKKnKKnKKnK|K", &op, &x, &rows, &n, &lo, &iw, &C, &fc, &off,
                          &H, &a, &b, &ld, &out, &c))
        return NULL;
    if (H < 2 || H > (1 << 30) || C < 1 || C > (1 << 20) || op < 0 || op > 3) {
        PyErr_SetString(PyExc_ValueError,
                        "grid: needs 0 <= op <= 3, 1 <= C <= 2^20 and 2 <= H <= 2^30");
        return NULL;
    }
    grid_t q = {P(const float *, x),  rows, n, H, C, P(const float *, lo), P(const float *, iw),
                P(const float *, fc), P(const int32_t *, off), NULL};
    int fast = fast_cpu();
    /* the AVX2 passes over rows of several cells gather each cell's node count and first node
     * as one 64-bit pair (half the gathered elements of two 32-bit gathers: 10-14% faster
     * passes on 128- and 512-cell rows); without memory for it, two gathers */
    int64_t *pk = NULL;
    if (fast && C > 1 && op < 3 && (pk = (int64_t *)malloc(8 * (size_t)(rows * C)))) {
        for (int64_t i = 0; i < rows * C; i++) {
            uint64_t count = (uint32_t)(int32_t)q.fc[i], first = (uint32_t)q.off[i];
            pk[i] = (int64_t)(count | first << 32);
        }
        q.pk = pk;
    }
    const float *fa = P(const float *, a), *fb = P(const float *, b);
    const float *fr = op == 2 ? P(const float *, c) : NULL; /* r apart from h: interleaved here */
    float *fo = P(float *, out), *buf = NULL;
    if (fr && !(buf = (float *)malloc(sizeof(float) * 2 * (size_t)H))) {
        free(pk);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (op == 3) gvalues_k(&q, fa, fo);
    else
#if DKM_X86
    if (fast && op == 0) gsplat_v(&q, fa, fo);
    else if (fast) gread_v(&q, op == 2 ? fa : NULL, op == 2 ? fb : fa, fr, ld, fo, buf);
    else
#endif
    if (op == 0) gsplat_k(&q, fa, fo);
    else gread_k(&q, op == 2 ? fa : NULL, op == 2 ? fb : fa, fr, ld, fo, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    free(pk);
    Py_RETURN_NONE;
}

/* row_range(x, rows, n, lo, hi): each row's min and max of the float32 [rows, n] x into lo /
 * hi (float32 [rows]); returns whether every element is finite (else lo / hi are unspecified).
 * One pass instead of torch's amin, amax and isfinite. */
static int row_range_generic(const float *x, int64_t rows, int64_t n, float *lo, float *hi) {
    float bad = 0.0f; /* x - x: 0 for a finite x, NaN for an infinite or NaN one */
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float a = xr[0], b = xr[0];
        for (int64_t i = 0; i < n; i++) {
            a = xr[i] < a ? xr[i] : a;
            b = xr[i] > b ? xr[i] : b;
            bad += xr[i] - xr[i];
        }
        lo[r] = a;
        hi[r] = b;
    }
    return bad == 0.0f;
}

#if DKM_X86
AVX2F static int row_range_v(const float *x, int64_t rows, int64_t n, float *lo, float *hi) {
    __m256 bad = _mm256_setzero_ps();
    float tail_bad = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        __m256 a = _mm256_set1_ps(xr[0]), b = a;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            a = _mm256_min_ps(a, v);
            b = _mm256_max_ps(b, v);
            bad = _mm256_add_ps(bad, _mm256_sub_ps(v, v));
        }
        float la[8], lb[8];
        _mm256_storeu_ps(la, a);
        _mm256_storeu_ps(lb, b);
        float mn = la[0], mx = lb[0];
        for (int t = 1; t < 8; t++) {
            mn = la[t] < mn ? la[t] : mn;
            mx = lb[t] > mx ? lb[t] : mx;
        }
        for (; i < n; i++) {
            mn = xr[i] < mn ? xr[i] : mn;
            mx = xr[i] > mx ? xr[i] : mx;
            tail_bad += xr[i] - xr[i];
        }
        lo[r] = mn;
        hi[r] = mx;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, bad);
    for (int t = 0; t < 8; t++) tail_bad += lanes[t];
    return tail_bad == 0.0f;
}
#endif

static int row_range_any(const float *x, int64_t rows, int64_t n, float *lo, float *hi) {
#if DKM_X86
    if (fast_cpu()) return row_range_v(x, rows, n, lo, hi);
#endif
    return row_range_generic(x, rows, n, lo, hi);
}

/* rows of c [G, K] sorted ascending into s (insertion sort for the usual K <= 32, else qsort) */
static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void sort_rows(const float *c, int64_t G, int64_t K, float *s) {
    for (int64_t g = 0; g < G; g++) {
        const float *cr = c + g * K;
        float *sr = s + g * K;
        if (K > 32) {
            memcpy(sr, cr, sizeof(float) * (size_t)K);
            qsort(sr, (size_t)K, sizeof(float), cmp_float);
            continue;
        }
        for (int64_t i = 0; i < K; i++) {
            float v = cr[i];
            int64_t j = i;
            for (; j > 0 && sr[j - 1] > v; j--) sr[j] = sr[j - 1];
            sr[j] = v;
        }
    }
}

typedef struct { /* grid_counts_k's rule constants */
    double tau, cell_logit, soft, fade, sat, margin, grade, prune, cap;
} gcount_t;

static void counts_of(const float *lo, const float *span, const float *sorted, int64_t G,
                      int64_t K, int64_t C, const gcount_t *r, int whole, double floor_,
                      float *out) {
    grid_counts_k(lo, span, sorted, G, K, C, r->tau, r->cell_logit, r->soft, r->fade, r->sat,
                  r->margin, r->grade, r->prune, r->cap, whole, floor_, out);
}

static int parse_gcount(PyObject *t, gcount_t *r) {
    return PyArg_ParseTuple(t, "ddddddddd", &r->tau, &r->cell_logit, &r->soft, &r->fade,
                            &r->sat, &r->margin, &r->grade, &r->prune, &r->cap);
}

static inline float clamp_count(float v, float cap) { /* ceil, then into [1, cap] (whole) */
    if (!(v > 1.0f)) return 1.0f;
    if (!(v < cap)) return cap;
    float f = (float)(int32_t)v; /* (no libm call: ceilf is one without SSE4.1) */
    return f < v ? f + 1.0f : f;
}

/* cell a's nodes in a layout of C cells over a row of `fine` fractional fine-cell counts (C
 * divides fine): the cell's finest part, (fine / C) times its largest fine count, rounded up
 * into [1, cap] (C = fine: the count itself; C = 1: one uniform cell) */
static inline float layout_count(const float *rg, int64_t fine, int64_t C, int64_t a, float cap) {
    int64_t w = fine / C;
    float m = 0.0f;
    for (int64_t b = 0; b < w; b++) m = rg[a * w + b] > m ? rg[a * w + b] : m;
    return clamp_count(m * (float)w, cap);
}

/* A tensor's grid (soft_kmeans._grid_spec has the rule, in torch): each row's range, the
 * fractional counts on cells * split fine cells, then the layout (cells, fine cells or one
 * uniform cell) and its tables. Returns the layout's cells, 0 for a row holding a non-finite
 * value or a span that overflows, -1 beyond the caps (max_total < 0: none). */
static int64_t grid_spec_k(const float *x, int64_t G, int64_t N, const float *c, int64_t K,
                           const gcount_t *r, int64_t cells, int64_t split, double coarse_slack,
                           double node_cost, int64_t max_nodes, int64_t max_total, float *lo,
                           float *span, float *inv_w, float *fc, int32_t *off, int32_t *lens,
                           float *raw, float *sorted, int64_t *nodes) {
    if (!row_range_any(x, G, N, lo, span)) return 0;
    for (int64_t g = 0; g < G; g++) {
        span[g] = span[g] - lo[g];
        if (!isfinite(span[g])) return 0;
    }
    int64_t fine = cells * split;
    float cap = (float)r->cap;
    sort_rows(c, G, K, sorted);
    memset(raw, 0, sizeof(float) * (size_t)(G * fine));
    counts_of(lo, span, sorted, G, K, fine, r, 0, 1.0 / (double)split, raw);
    /* each layout's nodes in all (layout_count summed over the fine cells, the coarse cells
     * and one uniform cell, in one pass over raw) */
    double s_raw = 0, s_coarse = 0, s_uni = 0;
    for (int64_t g = 0; g < G; g++) {
        const float *rg = raw + g * fine;
        float top = 0.0f;
        for (int64_t a = 0; a < cells; a++) {
            float m = 0.0f;
            for (int64_t b = 0; b < split; b++) {
                float v = rg[a * split + b];
                m = v > m ? v : m;
                s_raw += clamp_count(v, cap);
            }
            s_coarse += clamp_count(m * (float)split, cap);
            top = m > top ? m : top;
        }
        s_uni += clamp_count(top * (float)fine, cap);
    }
    int64_t C = cells; /* coarse unless the fine cells save more than coarse_slack */
    double s_pick = s_coarse;
    if (s_raw * coarse_slack < s_coarse) C = fine, s_pick = s_raw;
    if ((s_uni - s_pick) * (double)K * node_cost <= (double)(G * N)) C = 1;
    int64_t need = 0, whole = 0;
    for (int64_t g = 0; g < G; g++) {
        float *f = fc + g * C;
        int32_t *o = off + g * C;
        int64_t at = 0;
        for (int64_t a = 0; a < C; a++) {
            f[a] = layout_count(raw + g * fine, fine, C, a, cap);
            o[a] = (int32_t)at;
            at += (int64_t)f[a];
        }
        at += 1; /* the node at the max */
        lens[g] = (int32_t)at;
        need = at > need ? at : need;
        whole += at;
        inv_w[g] = span[g] > 0.0f ? (float)C / (span[g] > 1e-38f ? span[g] : 1e-38f) : 0.0f;
    }
    if (need > max_nodes || (max_total >= 0 && whole > max_total)) return -1;
    int64_t h = (need + 7) / 8 * 8;
    h = h > 8 ? h : 8;
    *nodes = h > max_nodes ? need : h;
    return C;
}

/* grid_spec(x, G, N, c, K, rule, cells, split, coarse_slack, node_cost, max_nodes, max_total,
 *           lo, span, inv_w, fc, off, lens, raw, sorted) -> (cells, nodes) or None (see
 * grid_spec_k: 0 -> None; -1 -> False); fc / off [G, cells * split] room, raw the same, sorted
 * [G, K] */
static PyObject *py_grid_spec(PyObject *self, PyObject *args) {
    unsigned long long x, c, lo, span, iw, fc, off, lens, raw, sorted;
    Py_ssize_t G, N, K, cells, split, max_nodes, max_total;
    double slack, cost;
    PyObject *rule;
    gcount_t r;
    if (!PyArg_ParseTuple(args, "KnnKnO!nnddnnKKKKKKKK", &x, &G, &N, &c, &K, &PyTuple_Type,
                          &rule, &cells, &split, &slack, &cost, &max_nodes, &max_total, &lo,
                          &span, &iw, &fc, &off, &lens, &raw, &sorted))
        return NULL;
    if (!parse_gcount(rule, &r)) return NULL;
    if (G < 1 || N < 1 || K < 1 || cells < 1 || split < 1) {
        PyErr_SetString(PyExc_ValueError, "grid_spec: needs G, N, K, cells, split >= 1");
        return NULL;
    }
    int64_t C, nodes = 0;
    Py_BEGIN_ALLOW_THREADS
    C = grid_spec_k(P(const float *, x), G, N, P(const float *, c), K, &r, cells, split, slack,
                    cost, max_nodes, max_total, P(float *, lo), P(float *, span), P(float *, iw),
                    P(float *, fc), P(int32_t *, off), P(int32_t *, lens), P(float *, raw),
                    P(float *, sorted), &nodes);
    Py_END_ALLOW_THREADS
    if (C == 0) Py_RETURN_NONE;
    if (C < 0) Py_RETURN_FALSE;
    return Py_BuildValue("nn", (Py_ssize_t)C, (Py_ssize_t)nodes);
}

/* grid_check(lo, span, fc, G, C, cents, K, rule, slack, need, sorted) -> whether some cell's
 * count for the centroids of any iteration (cents: a tuple of [G, K] float32 pointers; counts
 * fractional, floor 1, combined by maximum into need, which starts at ones) is above slack
 * times its nodes; need is then rounded up (soft_kmeans._grid_check) */
static PyObject *py_grid_check(PyObject *self, PyObject *args) {
    unsigned long long lo, span, fc, need, sorted;
    Py_ssize_t G, C, K;
    double slack;
    PyObject *cents, *rule;
    gcount_t r;
    if (!PyArg_ParseTuple(args, "KKKnnO!nO!dKK", &lo, &span, &fc, &G, &C, &PyTuple_Type, &cents,
                          &K, &PyTuple_Type, &rule, &slack, &need, &sorted))
        return NULL;
    if (!parse_gcount(rule, &r)) return NULL;
    Py_ssize_t n_c = PyTuple_GET_SIZE(cents);
    unsigned long long ptrs[64];
    if (n_c > 64) {
        PyErr_SetString(PyExc_ValueError, "grid_check: at most 64 centroid tensors");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n_c; i++) {
        ptrs[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(cents, i));
        if (PyErr_Occurred()) return NULL;
    }
    float *nd = P(float *, need);
    const float *f = P(const float *, fc);
    int over = 0;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < G * C; i++) nd[i] = 1.0f;
    for (Py_ssize_t i = 0; i < n_c; i++) {
        sort_rows(P(const float *, ptrs[i]), G, K, P(float *, sorted));
        counts_of(P(const float *, lo), P(const float *, span), P(const float *, sorted), G, K, C,
                  &r, 0, 1.0, nd);
    }
    float s = (float)slack;
    for (int64_t i = 0; i < G * C; i++) over |= nd[i] > f[i] * s;
    if (over)
        for (int64_t i = 0; i < G * C; i++) nd[i] = clamp_count(nd[i], (float)r.cap);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(over);
}

static PyObject *py_row_range(PyObject *self, PyObject *args) {
    unsigned long long x, lo, hi;
    Py_ssize_t rows, n;
    if (!PyArg_ParseTuple(args, "KnnKK", &x, &rows, &n, &lo, &hi)) return NULL;
    if (rows < 0 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "row_range: needs rows >= 0 and n >= 1");
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = row_range_any(P(const float *, x), rows, n, P(float *, lo), P(float *, hi));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

/* max_spread(x, rows, n): the largest max - min over the rows of the float32 [rows, n] x, NaN
 * when an element is not finite (torch's (x.amax(1) - x.amin(1)).amax() in one call) */
static PyObject *py_max_spread(PyObject *self, PyObject *args) {
    unsigned long long x;
    Py_ssize_t rows, n;
    if (!PyArg_ParseTuple(args, "Knn", &x, &rows, &n)) return NULL;
    if (rows < 1 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "max_spread: needs rows >= 1 and n >= 1");
        return NULL;
    }
    float *lh = (float *)malloc(sizeof(float) * 2 * (size_t)rows);
    if (!lh) return PyErr_NoMemory();
    double out = 0.0;
    int ok = row_range_any(P(const float *, x), rows, n, lh, lh + rows);
    for (Py_ssize_t r = 0; ok && r < rows; r++) {
        double d = (double)(lh[rows + r] - lh[r]); /* (float32, as torch) */
        out = d > out ? d : out;
    }
    free(lh);
    return PyFloat_FromDouble(ok ? out : NAN);
}

/* put(dst, step, lane, codes, ldc, src, lds, G, u): per-code values into the [G, 65537]
 * tables, dst[(g 65537 + codes[g][i]) step + lane] = src[g][i] for i < u (float32; src 0:
 * zeros into float64 tables instead) */
static PyObject *py_put(PyObject *self, PyObject *args) {
    unsigned long long dst, codes, src;
    Py_ssize_t step, lane, ldc, lds, G, u;
    if (!PyArg_ParseTuple(args, "KnnKnKnnn", &dst, &step, &lane, &codes, &ldc, &src, &lds, &G,
                          &u))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t g = 0; g < G; g++) {
        const int64_t *cd = P(const int64_t *, codes) + g * ldc;
        if (!src) {
            double *d = P(double *, dst) + g * STRIDE;
            for (Py_ssize_t i = 0; i < u; i++) d[cd[i]] = 0.0;
            continue;
        }
        const float *sv = P(const float *, src) + g * lds;
        float *d = P(float *, dst) + g * STRIDE * step + lane;
        for (Py_ssize_t i = 0; i < u; i++) d[cd[i] * step] = sv[i];
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* Vector rows (cluster_dim > 1): soft_kmeans' dense engine, one row x_i [d] at a time.
 *
 * For each row: D_j = ||x_i - c_j||^2 (adjusted: prune pull, or D_0 = 1 / zero_threshold for a
 * non-zero row when exact zeros are kept), P = softmax(-D / tau) (an exp2 per entry), A = P or
 * max(P, zero_threshold) (mode "dkm" with the clamp). Nothing [n, K] is stored: each pass
 * recomputes the row's attention. Modes "hard" and "gsm" stay in torch.
 *
 *   vec_fwd(0, ...): sums[g, j] += A_j x_i, mass[g, j] += A_j, inertia[g] += min_j D_j (float64)
 *   vec_fwd(1, ...): y_i = sum_j A_j F_j
 *   vec_bwd(0, ...): the backward of vec_fwd(0) given d sums (gs) and d mass (gm)
 *   vec_bwd(1, ...): the backward of vec_fwd(1) given d y (go): also dF += A_j go
 * and through the attention: d logits = softmax' of dA (masked where clamped), then
 * d x_i = -2/tau (x_i sum_j e_j - sum_j e_j c_j), d c_j += 2/tau e_j (x_i - c_j).
 *
 * Python signatures (pointers as integers: float32 unless noted, C-contiguous; the GIL is
 * released):
 *   vec_fwd(mode, x, c, G, n, d, K, tau, prune, zt, keep_zeros, clamp, F, out0, out1, out2)
 *     mode 0: out0 sums float64[G, K, d], out1 mass float64[G, K], out2 inertia float64[G] or 0
 *     mode 1: F [G, K, d], out0 y [G, n, d]
 *   vec_bwd(mode, x, c, G, n, d, K, tau, prune, zt, keep_zeros, clamp, F, gin0, gin1, gx, gc, gf)
 *     mode 0: gin0 gs [G, K, d], gin1 gm [G, K]; mode 1: gin0 go [G, n, d], F, gf float64[G, K, d]
 *     gx [G, n, d] (written, or 0), gc float64[G, K, d] (accumulated)
 */

#define VEC_MAXK 256
#define VEC_MAXD 64 /* cluster_dim handled by the kernels (larger: torch) */

typedef struct {
    int64_t d, k;
    float factor; /* log2(e) / tau */
    float prune, zinv, zt;
    int keep_zeros, clamp;
} vrow_t;

#define VR 8        /* rows per block: the lanes of the vector loops */
#define VEC_FLUSH 32 /* blocks between flushes of the float lane accumulators into float64 */

/* VR lanes as one value (GCC/Clang vector extensions: one AVX register where the CPU has it,
 * two SSE ones otherwise), so that running values stay in registers across the loops */
#pragma GCC diagnostic ignored "-Wpsabi" /* v8f is only passed between inlined functions */
typedef float v8f __attribute__((vector_size(4 * VR)));
typedef int32_t v8i __attribute__((vector_size(4 * VR)));

INLINE v8f vld(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
INLINE void vst(float *p, v8f v) { memcpy(p, &v, sizeof v); }
INLINE v8f vsplat(float s) { return (v8f){0} + s; }
INLINE v8f vsel(v8i mask, v8f yes, v8f no) { /* mask lanes: -1 or 0 (a comparison's result) */
    return (v8f)(((v8i)yes & mask) | ((v8i)no & ~mask));
}
INLINE v8f vmin(v8f a, v8f b) { return vsel(a < b, a, b); }
/* Keeps v a rounded product where FMA is enabled (the AVX2/FMA build, "fast"): the distances
 * then round as the torch code's do (x*x + y fused rounds once; over the iterations the
 * difference doubled the gap to the torch code at cluster_dim 16). The other FMAs stay. */
#if DKM_X86
#define VEC_ROUNDED(v) __asm__("" : "+x"(v))
#else
#define VEC_ROUNDED(v) ((void)0)
#endif

/* exp2_neg over the lanes */
INLINE v8f vexp2_neg(v8f x) {
    x = vsel(x < -127.0f, vsplat(-127.0f), x);
    const float magic = 12582912.0f;
    v8f t = x + magic;
    v8i e = (v8i)t - 0x4B400000;
    v8f f = x - (t - magic);
    v8f q = EXP2_POLY(f, vsplat(1.535336188319500e-4f));
    return q * (v8f)((e + 127) << 23);
}

/* the attention from the softmax q: max(q, zero_threshold) with the clamp, else q */
INLINE v8f vblk_clamp(const vrow_t *v, v8f q) {
    return v->clamp ? vsel(q < v->zt, vsplat(v->zt), q) : q;
}

/* The attention of a block of VR rows. xb [d][VR]: the rows transposed (lanes past the block's
 * rows repeat its first row); c [K][d]. Writes dd [K][VR] (the adjusted distances) and p
 * [K][VR]: with a, the softmax into p and the clamped attention into a ([K][VR]); without
 * (a == NULL), the softmax's unnormalised terms (scaled by *inv in vblk_a). Returns in *mn
 * min_j D_j, in *nz the lanes whose row has a non-zero entry (-1) and in *inv 1 / the
 * softmax's sum. */
INLINE void vblk_att(const vrow_t *v, int64_t d, const float *xb, const float *c, float *dd,
                     float *p, float *a, v8f *mn, v8i *nz, v8f *inv, const int fast) {
    int64_t k = v->k;
    v8i nzm = {0};
    for (int64_t t = 0; t < d; ++t) nzm |= vld(xb + t * VR) != 0.0f;
    v8f m = {0};
    for (int64_t j = 0; j < k; ++j) {
        const float *cj = c + j * d;
        v8f e = vld(xb) - cj[0], dl = e * e;
        if (fast) VEC_ROUNDED(dl);
        for (int64_t t = 1; t < d; ++t) {
            e = vld(xb + t * VR) - cj[t];
            v8f sq = e * e;
            if (fast) VEC_ROUNDED(sq);
            dl += sq;
        }
        if (j == 0) {
            if (v->prune > 0.0f)
                dl -= v->prune;
            else if (v->keep_zeros)
                dl = vsel(nzm, vsplat(v->zinv), dl);
            m = dl;
        } else {
            m = vmin(dl, m);
        }
        vst(dd + j * VR, dl);
    }
    v8f sum = {0};
    for (int64_t j = 0; j < k; ++j) {
        v8f e = vexp2_neg((m - vld(dd + j * VR)) * v->factor);
        vst(p + j * VR, e);
        sum += e;
    }
    v8f iv = 1.0f / sum;
    *mn = m;
    *nz = nzm;
    *inv = iv;
    if (!a) return;
    for (int64_t j = 0; j < k; ++j) {
        v8f q = vld(p + j * VR) * iv;
        vst(p + j * VR, q);
        vst(a + j * VR, vblk_clamp(v, q));
    }
}

/* the attention of centroid j: vblk_att's unnormalised pj times inv, clamped */
INLINE v8f vblk_a(const vrow_t *v, const float *pj, v8f inv) { return vblk_clamp(v, vld(pj) * inv); }

/* Rows i0 .. i0+cnt-1 of x [n][d] into xb [d][VR] (missing lanes repeat row i0); returns the
 * lanes holding rows (1) and the others (0). */
INLINE v8f vblk_load(const float *x, int64_t d, int64_t i0, int cnt, float *xb) {
    const float *xr = x + i0 * d;
    float valid[VR];
    for (int64_t t = 0; t < d; ++t) {
        float lane[VR];
        for (int r = 0; r < VR; ++r) lane[r] = xr[(r < cnt ? r : 0) * d + t];
        memcpy(xb + t * VR, lane, sizeof lane);
    }
    for (int r = 0; r < VR; ++r) valid[r] = r < cnt ? 1.0f : 0.0f;
    return vld(valid);
}

/* block b's lanes (xb [d][VR]) back into rows i0 .. i0+cnt-1 of out [n][d] */
INLINE void vblk_store(const float *xb, int64_t d, int64_t i0, int cnt, float *out) {
    for (int r = 0; r < cnt; ++r)
        for (int64_t t = 0; t < d; ++t) out[(i0 + r) * d + t] = xb[t * VR + r];
}

/* lane accumulators acc [m][VR] summed into out [m] (float64, times scale), then zeroed */
static void vblk_flush(float *acc, double *out, int64_t m, double scale) {
    for (int64_t e = 0; e < m; ++e) {
        double s = 0.0;
        for (int r = 0; r < VR; ++r) s += acc[e * VR + r];
        out[e] += scale * s;
    }
    memset(acc, 0, sizeof(float) * m * VR);
}

INLINE int vec_fwd_body(int mode, const vrow_t *v, const float *x, const float *c, int64_t g,
                        int64_t n, const float *f, double *out0, double *out1, double *out2,
                        float *y, const int fast, const int64_t dc) {
    int64_t k = v->k, d = dc ? dc : v->d;
    /* lane accumulators: sums [K][d][VR], mass [K][VR]; dd, p [K][VR] */
    float *buf = malloc(sizeof(float) * VR * (k * d + 3 * k));
    if (!buf) return -1;
    float *accx = buf, *accm = accx + k * d * VR, *dd = accm + k * VR, *p = dd + k * VR;
    float xb[VEC_MAXD * VR], yb[VEC_MAXD * VR];
    for (int64_t q = 0; q < g; ++q) {
        const float *xq = x + q * n * d, *cq = c + q * k * d, *fq = f ? f + q * k * d : NULL;
        memset(buf, 0, sizeof(float) * VR * (k * d + k));
        double inertia = 0.0;
        int64_t blocks = 0;
        for (int64_t i0 = 0; i0 < n; i0 += VR) {
            int cnt = n - i0 < VR ? (int)(n - i0) : VR;
            v8f valid = vblk_load(xq, d, i0, cnt, xb), mn, inv;
            v8i nz;
            vblk_att(v, d, xb, cq, dd, p, NULL, &mn, &nz, &inv, fast);
            if (mode == 0) {
                for (int r = 0; r < cnt; ++r) inertia += mn[r];
                for (int64_t j = 0; j < k; ++j) {
                    v8f aq = vblk_a(v, p + j * VR, inv) * valid;
                    vst(accm + j * VR, vld(accm + j * VR) + aq);
                    float *sx = accx + j * d * VR;
                    for (int64_t t = 0; t < d; ++t)
                        vst(sx + t * VR, vld(sx + t * VR) + aq * vld(xb + t * VR));
                }
                if (++blocks % VEC_FLUSH == 0 || i0 + VR >= n) {
                    vblk_flush(accx, out0 + q * k * d, k * d, 1.0);
                    vblk_flush(accm, out1 + q * k, k, 1.0);
                }
            } else {
                memset(yb, 0, sizeof(float) * d * VR);
                for (int64_t j = 0; j < k; ++j) {
                    v8f aq = vblk_a(v, p + j * VR, inv);
                    const float *fj = fq + j * d;
                    for (int64_t t = 0; t < d; ++t)
                        vst(yb + t * VR, vld(yb + t * VR) + aq * fj[t]);
                }
                vblk_store(yb, d, i0, cnt, y + q * n * d);
            }
        }
        if (mode == 0 && out2) out2[q] += inertia;
    }
    free(buf);
    return 0;
}

INLINE int vec_bwd_body(int mode, const vrow_t *v, float tau, const float *x, const float *c,
                        int64_t g, int64_t n, const float *f, const float *gin0,
                        const float *gin1, float *gx, double *gc, double *gf, const int fast,
                        const int64_t dc) {
    int64_t k = v->k, d = dc ? dc : v->d;
    /* lane accumulators: dC, dF [K][d][VR]; dd, p, a, ga [K][VR] */
    float *buf = malloc(sizeof(float) * VR * (2 * k * d + 4 * k));
    if (!buf) return -1;
    float *accc = buf, *accf = accc + k * d * VR, *dd = accf + k * d * VR, *p = dd + k * VR;
    float *a = p + k * VR, *ga = a + k * VR;
    float xb[VEC_MAXD * VR], gb[VEC_MAXD * VR] = {0}, gxb[VEC_MAXD * VR];
    float two = -2.0f / tau;
    for (int64_t q = 0; q < g; ++q) {
        const float *xq = x + q * n * d, *cq = c + q * k * d;
        /* mode 0: the sums' gradient gs [K][d] and gm [K]; mode 1: the output centroids F */
        const float *wq = mode == 0 ? gin0 + q * k * d : f + q * k * d;
        const float *gm = mode == 0 ? gin1 + q * k : NULL;
        memset(buf, 0, sizeof(float) * VR * 2 * k * d);
        int64_t blocks = 0;
        for (int64_t i0 = 0; i0 < n; i0 += VR) {
            int cnt = n - i0 < VR ? (int)(n - i0) : VR;
            v8f valid = vblk_load(xq, d, i0, cnt, xb), mn, inv;
            v8i nz;
            vblk_att(v, d, xb, cq, dd, p, a, &mn, &nz, &inv, fast);
            memset(gxb, 0, sizeof(float) * d * VR);
            /* dA_j, then the softmax backward's first half: masked (the clamp; padded lanes)
             * dA_j into ga, dot = sum_j dA_j P_j */
            v8f dot = {0}, rs = {0}, zero = {0};
            if (mode == 1) { /* padded lanes have go = 0 */
                vblk_load(gin0 + q * n * d, d, i0, cnt, gb);
                for (int64_t t = 0; t < d; ++t) vst(gb + t * VR, vld(gb + t * VR) * valid);
            }
            for (int64_t j = 0; j < k; ++j) {
                v8f aj = vld(a + j * VR), pj = vld(p + j * VR), acc;
                const float *wj = wq + j * d;
                if (mode == 0) { /* the sums' own path: d x += A_j gs_j; dA_j = x . gs_j + gm_j */
                    acc = vsplat(gm[j]);
                    for (int64_t t = 0; t < d; ++t) {
                        vst(gxb + t * VR, vld(gxb + t * VR) + aj * wj[t]);
                        acc += vld(xb + t * VR) * wj[t];
                    }
                    acc *= valid;
                } else { /* dA_j = go . F_j; dF_j += A_j go */
                    float *fa = accf + j * d * VR;
                    acc = zero;
                    for (int64_t t = 0; t < d; ++t) {
                        v8f gt = vld(gb + t * VR);
                        acc += gt * wj[t];
                        vst(fa + t * VR, vld(fa + t * VR) + aj * gt);
                    }
                }
                if (v->clamp) acc = vsel(pj < v->zt, zero, acc);
                vst(ga + j * VR, acc);
                dot += acc * pj;
            }
            /* its second half: d logits_j = (dA_j - dot) P_j (0 for an exact zero's D_0) */
            for (int64_t j = 0; j < k; ++j) {
                v8f gaj = (vld(ga + j * VR) - dot) * vld(p + j * VR);
                if (j == 0 && v->keep_zeros) gaj = vsel(nz, zero, gaj);
                vst(ga + j * VR, gaj);
                rs += gaj;
            }
            /* the distances': d x = -2/tau (x sum_j e_j - sum_j e_j c_j); d c_j += e_j (x - c_j) */
            for (int64_t t = 0; t < d; ++t) {
                v8f xt = vld(xb + t * VR), s = {0};
                for (int64_t j = 0; j < k; ++j) {
                    float cjt = cq[j * d + t];
                    v8f gaj = vld(ga + j * VR);
                    float *ca = accc + (j * d + t) * VR;
                    s += gaj * cjt;
                    vst(ca, vld(ca) + gaj * (xt - cjt));
                }
                vst(gxb + t * VR, vld(gxb + t * VR) + two * (xt * rs - s));
            }
            if (gx) vblk_store(gxb, d, i0, cnt, gx + q * n * d);
            if (++blocks % VEC_FLUSH == 0 || i0 + VR >= n) {
                vblk_flush(accc, gc + q * k * d, k * d, -(double)two);
                if (mode == 1) vblk_flush(accf, gf + q * k * d, k * d, 1.0);
            }
        }
    }
    free(buf);
    return 0;
}

#define VEC_FWD_ARGS                                                                           \
    int mode, const vrow_t *v, const float *x, const float *c, int64_t g, int64_t n,             \
        const float *f, double *out0, double *out1, double *out2, float *y
#define VEC_BWD_ARGS                                                                           \
    int mode, const vrow_t *v, float tau, const float *x, const float *c, int64_t g, int64_t n,  \
        const float *f, const float *gin0, const float *gin1, float *gx, double *gc, double *gf
#if DKM_X86
#define VEC_FAST __attribute__((target("avx2,fma")))
#else
#define VEC_FAST
#endif
/* the kernels compiled twice: for the CPU the module was built for, and with AVX2 and FMA (chosen
 * at run time by fast_cpu(), as the per-code kernels are) */
static int vec_fwd_plain(VEC_FWD_ARGS) {
    return vec_fwd_body(mode, v, x, c, g, n, f, out0, out1, out2, y, 0, 0);
}
static int vec_bwd_plain(VEC_BWD_ARGS) {
    return vec_bwd_body(mode, v, tau, x, c, g, n, f, gin0, gin1, gx, gc, gf, 0, 0);
}
/* the fast ones also with cluster_dim 2 and 4 fixed: the loops over d unroll, and a block's
 * per-coordinate values (its rows, their gradient) stay in registers */
#define VEC_FAST_D(DC)                                                                         \
    VEC_FAST static int vec_fwd_fast##DC(VEC_FWD_ARGS) {                                       \
        return vec_fwd_body(mode, v, x, c, g, n, f, out0, out1, out2, y, 1, DC);               \
    }                                                                                          \
    VEC_FAST static int vec_bwd_fast##DC(VEC_BWD_ARGS) {                                       \
        return vec_bwd_body(mode, v, tau, x, c, g, n, f, gin0, gin1, gx, gc, gf, 1, DC);       \
    }
VEC_FAST_D(0)
VEC_FAST_D(2)
VEC_FAST_D(4)

static int vec_fwd_run(VEC_FWD_ARGS) {
    int (*fn)(VEC_FWD_ARGS) = !fast_cpu() ? vec_fwd_plain
                              : v->d == 2 ? vec_fwd_fast2
                              : v->d == 4 ? vec_fwd_fast4
                                          : vec_fwd_fast0;
    return fn(mode, v, x, c, g, n, f, out0, out1, out2, y);
}

static int vec_bwd_run(VEC_BWD_ARGS) {
    int (*fn)(VEC_BWD_ARGS) = !fast_cpu() ? vec_bwd_plain
                              : v->d == 2 ? vec_bwd_fast2
                              : v->d == 4 ? vec_bwd_fast4
                                          : vec_bwd_fast0;
    return fn(mode, v, tau, x, c, g, n, f, gin0, gin1, gx, gc, gf);
}

static int vrow_parse(vrow_t *v, long long d, long long k, float tau, float prune, float zt,
                      int keep_zeros, int clamp) {
    if (d < 1 || d > VEC_MAXD || k < 1 || k > VEC_MAXK || !(tau > 0.0f)) {
        PyErr_SetString(PyExc_ValueError, "_dkm_cpu.vec: inconsistent arguments");
        return -1;
    }
    v->d = d;
    v->k = k;
    v->factor = 1.4426950408889634f / tau;
    v->prune = prune;
    v->zt = zt;
    v->zinv = 1.0f / zt;
    v->keep_zeros = keep_zeros;
    v->clamp = clamp;
    return 0;
}

static PyObject *py_vec_fwd(PyObject *self, PyObject *args) {
    int mode, keep_zeros, clamp;
    unsigned long long x, c, f, o0, o1, o2;
    long long g, n, d, k;
    float tau, prune, zt;
    if (!PyArg_ParseTuple(args, "iKKLLLLfffiiKKKK", &mode, &x, &c, &g, &n, &d, &k, &tau, &prune,
                          &zt, &keep_zeros, &clamp, &f, &o0, &o1, &o2))
        return NULL;
    vrow_t v;
    if (vrow_parse(&v, d, k, tau, prune, zt, keep_zeros, clamp)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = vec_fwd_run(
        mode, &v, (const float *)(uintptr_t)x, (const float *)(uintptr_t)c, g, n,
        (const float *)(uintptr_t)f, mode == 0 ? (double *)(uintptr_t)o0 : NULL,
        (double *)(uintptr_t)o1, (double *)(uintptr_t)o2, mode == 1 ? (float *)(uintptr_t)o0 : NULL);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_vec_bwd(PyObject *self, PyObject *args) {
    int mode, keep_zeros, clamp;
    unsigned long long x, c, f, g0, g1, gx, gc, gf;
    long long g, n, d, k;
    float tau, prune, zt;
    if (!PyArg_ParseTuple(args, "iKKLLLLfffiiKKKKKK", &mode, &x, &c, &g, &n, &d, &k, &tau, &prune,
                          &zt, &keep_zeros, &clamp, &f, &g0, &g1, &gx, &gc, &gf))
        return NULL;
    vrow_t v;
    if (vrow_parse(&v, d, k, tau, prune, zt, keep_zeros, clamp)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS rc = vec_bwd_run(
        mode, &v, tau, (const float *)(uintptr_t)x, (const float *)(uintptr_t)c, g, n,
        (const float *)(uintptr_t)f, (const float *)(uintptr_t)g0, (const float *)(uintptr_t)g1,
        (float *)(uintptr_t)gx, (double *)(uintptr_t)gc, (double *)(uintptr_t)gf);
    Py_END_ALLOW_THREADS if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"grid", py_grid, METH_VARARGS, "the grid kernels: splat, interpolate, gradient"},
    {"put", py_put, METH_VARARGS, "per-code values into the 65537-bin tables"},
    {"grid_counts", py_grid_counts, METH_VARARGS, "nodes per grid cell that centroids need"},
    {"grid_spec", py_grid_spec, METH_VARARGS, "a tensor's grid: ranges, counts and layout"},
    {"grid_check", py_grid_check, METH_VARARGS, "whether iterations' centroids need more nodes"},
    {"max_spread", py_max_spread, METH_VARARGS, "the largest max - min over the rows"},
    {"row_range", py_row_range, METH_VARARGS, "each row's min and max, and whether all finite"},
    {"present", py_present, METH_VARARGS, "codes present per group of a histogram"},
    {"compact", py_compact, METH_VARARGS, "the present codes and their counts"},
    {"simd", py_simd, METH_VARARGS, "simd(cfg) -> whether the AVX2 per-code kernels run"},
    {"hist", py_hist, METH_VARARGS, "per-code counts of a [rows, n] float32 tensor"},
    {"gather", py_gather, METH_VARARGS, "out = table[code(x)]"},
    {"scatter", py_scatter, METH_VARARGS, "acc[code(x)] += g (float64 accumulators)"},
    {"grad", py_grad, METH_VARARGS, "out = g * hr[code(x)][0] + hr[code(x)][1]"},
    {"fwd_stats", py_fwd_stats, METH_VARARGS, "one soft k-means iteration's sums"},
    {"out_y", py_out_y, METH_VARARGS, "per-code soft output"},
    {"att_t", py_att_t, METH_VARARGS, "out[g, k] = sum_u w_u A_uk"},
    {"fwd_loop", py_fwd_loop, METH_VARARGS, "the forward iterations, kernels and updates"},
    {"bwd_loop", py_bwd_loop, METH_VARARGS, "backward through the iterations fwd_loop ran"},
    {"bwd_step", py_bwd_step, METH_VARARGS, "one iteration's backward"},
    {"portable", py_portable, METH_VARARGS, "portable(flag) -> whether AVX2/F16C kernels run"},
    {"vec_fwd", py_vec_fwd, METH_VARARGS, "vector rows: soft k-means sums or output (see source)"},
    {"vec_bwd", py_vec_bwd, METH_VARARGS, "vector rows: their backward (see source)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_dkm_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dkm_cpu(void) {
#if DKM_X86
    for (int k = 0; k < 256; k++) ALL_SLOTS[k] = k;
#endif
    return PyModule_Create(&moddef);
}
