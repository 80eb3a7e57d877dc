/* The vote's candidates (robustbench_knn/native.py compiles this file with native_potentials.c): for each row of
   float32 distances, the indices of its c smallest values, in no particular order, and the largest of them. Every
   value left out is ≥ that largest one, which is all the exact rule needs of its candidates (defenses/knn.py).

   Why by hand: torch.topk over 50,000 columns for 1,000 candidates was a third of the vote. Here a sample of the
   row gives a threshold that about 1.5·c values lie under, one pass collects them (a few percent of the row), and
   a selection among those finds the c smallest; a threshold that falls short is raised and the pass repeated. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SAMPLE_STRIDE 16

static void swap_pair(float *v, int64_t *ix, int64_t a, int64_t b) {
    const float tv = v[a];
    const int64_t ti = ix[a];
    v[a] = v[b];
    ix[a] = ix[b];
    v[b] = tv;
    ix[b] = ti;
}

/* Reorders v[0..n) (with ix alongside) so that its k smallest come first (k ≥ 1): quickselect, median of three. */
static void select_smallest(float *v, int64_t *ix, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (v[mid] < v[lo]) swap_pair(v, ix, mid, lo);
        if (v[hi] < v[lo]) swap_pair(v, ix, hi, lo);
        if (v[hi] < v[mid]) swap_pair(v, ix, hi, mid);
        const float pivot = v[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (pivot < v[j]) j--;
            if (i <= j) swap_pair(v, ix, i++, j--);
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else return;
    }
}

/* The value at ``rank`` (from 0) among every SAMPLE_STRIDE-th value of the row. */
static float sample_threshold(const float *row, int64_t m, int64_t rank, float *sv, int64_t *si) {
    int64_t n = 0;
    for (int64_t v = 0; v < m; v += SAMPLE_STRIDE) {
        sv[n] = row[v];
        si[n] = n;
        n++;
    }
    select_smallest(sv, si, n, rank + 1);
    float t = sv[0];
    for (int64_t i = 1; i <= rank; i++) t = sv[i] > t ? sv[i] : t;
    return t;
}

/* dist: rows × m (row stride ld). Writes idx (rows × c) and kth (rows): the c-th smallest value. Returns 0; −1 if a
   row holds NaN (the caller then uses its own selection); −2 without memory. */
int smallest_candidates(const float *dist, int64_t rows, int64_t m, int64_t ld, int64_t c, int64_t *idx,
                        float *kth) {
    if (c < 1 || c > m) return -1;
    const int64_t n_sample = (m + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE;
    float *vals = malloc(sizeof(float) * m), *sv = malloc(sizeof(float) * n_sample);
    int64_t *ix = malloc(sizeof(int64_t) * m), *si = malloc(sizeof(int64_t) * n_sample);
    int status = vals && sv && ix && si ? 0 : -2;
    for (int64_t r = 0; r < rows && !status; r++) {
        const float *row = dist + r * ld;
        for (int64_t v = 0; v < m; v++)
            if (row[v] != row[v]) { status = -1; break; }
        if (status) break;
        /* about 1.5·c of the row under the threshold, from the sample's matching rank; raised while too few */
        int64_t n = 0;
        for (int64_t rank = (int64_t)((double)c * 1.5 * n_sample / m) + 1; rank < n_sample && n < c; rank *= 2) {
            const float t = sample_threshold(row, m, rank, sv, si);
            n = 0;
            for (int64_t v = 0; v < m; v++)
                if (row[v] <= t) {
                    vals[n] = row[v];
                    ix[n++] = v;
                }
        }
        if (n < c) {  /* the whole row */
            memcpy(vals, row, sizeof(float) * m);
            for (int64_t v = 0; v < m; v++) ix[v] = v;
            n = m;
        }
        select_smallest(vals, ix, n, c);
        float top = vals[0];
        for (int64_t i = 0; i < c; i++) {
            idx[r * c + i] = ix[i];
            top = vals[i] > top ? vals[i] : top;
        }
        kth[r] = top;
    }
    free(vals);
    free(sv);
    free(ix);
    free(si);
    return status;
}
