/* The §2.5 class potentials of a batch against a class-ordered bank in one pass over the bank, with nothing of size
   rows × columns in memory (robustbench_knn/native.py compiles and calls this file).

   Per row u and class c: Σ_{v∈c} E_v and Σ_{v∈c} relu(c0 − E_v), E_v = exp(−λ Σ_j r^j_v), r^j_v = ‖a^j − b^j_v‖ from
   (‖a^j‖² + ‖b^j_v‖²) − 2 a^j·b^j_v as the matmul path computes it (clamped at 0). Given the per-row coefficients of
   ∂L/∂D_v / E_v (``near`` where E_v < c0, ``far`` elsewhere), also Q^j_v = ∂L/∂D_v / r^j_v (0 where r^j_v = 0),
   reduced to Σ_v Q^j_v and Σ_v Q^j_v b^j_v: the caller forms ∂L/∂a^j = (Σ_v Q^j_v)·a^j − Σ_v Q^j_v b^j_v.

   Why by hand: written as tensor operations, the chain walks rows × columns matrices many times (the bank has
   50,000 points, a 30-wide embedding makes the matmuls short), and that walk, not the arithmetic, was the cost.
   Here ROWS rows share each load of a bank block that stays in cache, and every sum is kept lane by lane until the
   end of a class. Compiled with reassociation allowed (sums may be added in any order, as a BLAS does) but with
   IEEE square roots and divisions. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4          /* rows that share each load of the bank */
#define DIMS 5          /* dimensions accumulated at once in the gradient's Σ Q b */
#define VEC 16          /* lanes of one vector (the compiler splits it to the machine's width) */
#define BLOCK 256       /* bank columns per pass, a multiple of VEC */
#define MAX_SPACES 16
#define MAX_WIDTH 128

typedef float vec __attribute__((vector_size(VEC * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

static float hsum(vec v) {
    float t[VEC];
    store(t, v);
    for (int h = VEC / 2; h > 0; h /= 2)
        for (int l = 0; l < h; l++) t[l] += t[l + h];
    return t[0];
}

/* e^x for x ≤ 0: Cephes' expf (Cody–Waite reduction, degree-6 polynomial, about 1 ulp), written so that a compiler
   vectorises the loop around it (a libm call would stay scalar); 0 where e^x is below the smallest normal float. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

typedef struct {
    float *sq;    /* ROWS × n_spaces × BLOCK: squared distances, then r, then Q */
    float *g;     /* BLOCK: Σ_j r^j, then ∂L/∂D */
    float *tb;    /* (width + n_spaces) × BLOCK: the bank's last block, zero-padded to whole vectors */
    vec *qacc;    /* ROWS × width: Σ_v Q b lane by lane */
} Work;

/* Columns s0..s0+m (m ≤ BLOCK) of one class for rows u0..u0+nr (nr ≤ ROWS). */
static void block(int64_t n_spaces, int64_t d, const float *const ar[ROWS], const float *nar[ROWS], int nr,
                  const float *restrict b, const float *restrict nbb, int64_t stride, int64_t m, float lam, float c0,
                  const float *cn, const float *cf, float *es_out, float *bs_out, float *qrows_out, const Work *wk) {
    const int64_t mv = (m + VEC - 1) / VEC * VEC;
    float *restrict sq = wk->sq, *restrict g = wk->g;
    vec *restrict qacc = wk->qacc;
    /* squared distances: ROWS rows per load of the bank */
    for (int64_t j = 0; j < n_spaces; j++)
        for (int64_t v = 0; v < mv; v += VEC) {
            vec acc[ROWS] = {0};
            for (int64_t i = 0; i < d; i++) {
                const vec bv = load(b + (j * d + i) * stride + v);
                for (int r = 0; r < ROWS; r++) acc[r] += ar[r][j * d + i] * bv;
            }
            const vec nbv = load(nbb + j * stride + v);
            for (int r = 0; r < ROWS; r++) store(sq + (r * n_spaces + j) * BLOCK + v, (nar[r][j] + nbv) - 2.0f * acc[r]);
        }
    /* distances, exponentials, the two sums, Q */
    for (int r = 0; r < nr; r++) {
        float es = 0.0f, bs = 0.0f;
        const float near_r = cn ? cn[r] : 0.0f, far_r = cn ? cf[r] : 0.0f;  /* no branch in the loops: vectorised */
        for (int64_t v = 0; v < m; v++) g[v] = 0.0f;
        for (int64_t j = 0; j < n_spaces; j++) {
            float *restrict rj = sq + (r * n_spaces + j) * BLOCK;
            for (int64_t v = 0; v < m; v++) {
                rj[v] = sqrtf(rj[v] > 0.0f ? rj[v] : 0.0f);
                g[v] += rj[v];
            }
        }
        for (int64_t v = 0; v < m; v++) {
            const float e = exp_nonpositive(-lam * g[v]), below = c0 - e;
            es += e;
            bs += below > 0.0f ? below : 0.0f;
            g[v] = (e < c0 ? near_r : far_r) * e;
        }
        es_out[r] += es;
        bs_out[r] += bs;
        if (!cn) continue;
        for (int64_t j = 0; j < n_spaces; j++) {
            float *restrict q = sq + (r * n_spaces + j) * BLOCK, qs = 0.0f;
            for (int64_t v = 0; v < m; v++) {
                q[v] = q[v] > 0.0f ? g[v] / q[v] : 0.0f;
                qs += q[v];
            }
            for (int64_t v = m; v < mv; v++) q[v] = 0.0f;
            qrows_out[r * n_spaces + j] += qs;
        }
    }
    if (!cn) return;
    /* Σ_v Q^j_v b_v: ROWS × DIMS accumulators, each load of Q used DIMS times and each of the bank ROWS times (rows
       past nr accumulate what is left in their buffer and are never read) */
    for (int64_t j = 0; j < n_spaces; j++) {
        const float *qj = sq + j * BLOCK;
        int64_t i0 = 0;
        for (; i0 + DIMS <= d; i0 += DIMS) {
            vec acc[ROWS][DIMS];
            for (int r = 0; r < ROWS; r++)
                for (int ii = 0; ii < DIMS; ii++) acc[r][ii] = qacc[r * n_spaces * d + j * d + i0 + ii];
            for (int64_t v = 0; v < mv; v += VEC) {
                vec qv[ROWS];
                for (int r = 0; r < ROWS; r++) qv[r] = load(qj + r * n_spaces * BLOCK + v);
                for (int ii = 0; ii < DIMS; ii++) {
                    const vec bv = load(b + (j * d + i0 + ii) * stride + v);
                    for (int r = 0; r < ROWS; r++) acc[r][ii] += qv[r] * bv;
                }
            }
            for (int r = 0; r < ROWS; r++)
                for (int ii = 0; ii < DIMS; ii++) qacc[r * n_spaces * d + j * d + i0 + ii] = acc[r][ii];
        }
        for (; i0 < d; i0++) {
            vec acc[ROWS];
            for (int r = 0; r < ROWS; r++) acc[r] = qacc[r * n_spaces * d + j * d + i0];
            for (int64_t v = 0; v < mv; v += VEC) {
                const vec bv = load(b + (j * d + i0) * stride + v);
                for (int r = 0; r < ROWS; r++) acc[r] += load(qj + r * n_spaces * BLOCK + v) * bv;
            }
            for (int r = 0; r < ROWS; r++) qacc[r * n_spaces * d + j * d + i0] = acc[r];
        }
    }
}

/* a: n_rows × width (row stride lda), na: n_rows × n_spaces squared norms; bt: width × ldb (the class-ordered bank,
   transposed), nb: n_spaces × ldb squared norms; seg: n_classes + 1 column offsets of the classes. Added to (row
   major): e_sum and below_sum n_rows × n_classes; with near and far (n_rows × n_classes; both or neither) q_rows
   n_rows × n_spaces and qb n_rows × width. Returns 0; −1 for shapes beyond the fixed maxima, −2 without memory. */
int potential_sums(int64_t n_rows, int64_t n_spaces, int64_t d, const float *a, int64_t lda, const float *na,
                   const float *bt, const float *nb, int64_t ldb, int64_t n_classes, const int64_t *seg, float lam,
                   float c0, const float *near, const float *far, float *e_sum, float *below_sum, float *q_rows,
                   float *qb) {
    const int64_t w = n_spaces * d;
    if (n_spaces < 1 || n_spaces > MAX_SPACES || d < 1 || w > MAX_WIDTH) return -1;
    Work wk;
    wk.sq = malloc(sizeof(float) * ROWS * n_spaces * BLOCK);
    wk.g = malloc(sizeof(float) * BLOCK);
    wk.tb = calloc((size_t)(w + n_spaces) * BLOCK, sizeof(float));
    wk.qacc = aligned_alloc(sizeof(vec), sizeof(vec) * ROWS * w);
    int status = wk.sq && wk.g && wk.tb && wk.qacc ? 0 : -2;
    for (int64_t c = 0; c < n_classes && !status; c++)
        for (int64_t u0 = 0; u0 < n_rows; u0 += ROWS) {
            const int nr = n_rows - u0 < ROWS ? (int)(n_rows - u0) : ROWS;
            const float *ar[ROWS], *nar[ROWS];
            float es[ROWS] = {0}, bs[ROWS] = {0}, cn[ROWS], cf[ROWS], qr[ROWS * MAX_SPACES] = {0};
            for (int r = 0; r < ROWS; r++) {  /* rows past the batch's end repeat its last row */
                const int64_t u = u0 + (r < nr ? r : nr - 1);
                ar[r] = a + u * lda;
                nar[r] = na + u * n_spaces;
                cn[r] = near ? near[u * n_classes + c] : 0.0f;
                cf[r] = near ? far[u * n_classes + c] : 0.0f;
            }
            memset(wk.qacc, 0, sizeof(vec) * ROWS * w);
            for (int64_t s0 = seg[c]; s0 < seg[c + 1]; s0 += BLOCK) {
                const int64_t m = (s0 + BLOCK < seg[c + 1] ? s0 + BLOCK : seg[c + 1]) - s0;
                const float *b = bt + s0, *nbb = nb + s0;
                int64_t stride = ldb;
                if (s0 + (m + VEC - 1) / VEC * VEC > ldb) {  /* whole vectors would read past the bank: a copy */
                    for (int64_t k = 0; k < w + n_spaces; k++) {
                        const float *src = k < w ? bt + k * ldb + s0 : nb + (k - w) * ldb + s0;
                        memset(wk.tb + k * BLOCK, 0, sizeof(float) * BLOCK);
                        memcpy(wk.tb + k * BLOCK, src, sizeof(float) * m);
                    }
                    b = wk.tb;
                    nbb = wk.tb + w * BLOCK;
                    stride = BLOCK;
                }
                block(n_spaces, d, ar, nar, nr, b, nbb, stride, m, lam, c0, near ? cn : NULL, cf, es, bs, qr, &wk);
            }
            for (int r = 0; r < nr; r++) {
                e_sum[(u0 + r) * n_classes + c] += es[r];
                below_sum[(u0 + r) * n_classes + c] += bs[r];
                if (!near) continue;
                for (int64_t j = 0; j < n_spaces; j++) q_rows[(u0 + r) * n_spaces + j] += qr[r * n_spaces + j];
                for (int64_t k = 0; k < w; k++) qb[(u0 + r) * w + k] += hsum(wk.qacc[r * w + k]);
            }
        }
    free(wk.sq);
    free(wk.g);
    free(wk.tb);
    free(wk.qacc);
    return status;
}
