/* saehook's CPU kernels: the parts of a TopK training step that touch k latents per token.
 *
 * Built on first use by saehook/cpu_kernels.py (the system C compiler, -O3 -march=native, cached per
 * machine) and called through ctypes, which releases the GIL; each entry point splits its rows over
 * `threads` pthreads. Plain C with no torch headers: it builds in about a second and does not depend on
 * the torch version.
 *
 *   topk_rows_{bf16,f32}   top-k of each row of a pre-activation chunk (optionally over a column subset)
 *   sampled_dots_f32       out[i, j] = <a_i, b[idx_ij]>
 *   scatter_rows_f32       out[r] = sum over idx[i, j] == r of w[i, j] * dense[i]   (the weight gradients)
 *
 * Top-k compares order-preserving integer keys: for an IEEE value with bits b, key = b ^ (sign ? all ones :
 * top bit), so larger floats have larger unsigned keys (+NaN above +inf, -NaN below -inf; torch.topk puts
 * every NaN first, but the trainer never lets non-finite activations reach a step). Whole rows go through
 * two levels of strided group maxima that bound the k-th value, then a radix select over the few
 * candidates; column subsets (AuxK) through a radix select over the gathered keys.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64
#define MAX_THREADS 256

static inline uint16_t key16(uint16_t b) { return b ^ ((uint16_t)((int16_t)b >> 15) | 0x8000u); }
static inline uint32_t key32(uint32_t b) { return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u); }
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------- a min-heap of (key, index) */
typedef struct { uint32_t key; int64_t idx; } entry;

static inline int worse(entry a, entry b) {  /* a ranks below b: smaller key, or equal key and later index */
    return a.key < b.key || (a.key == b.key && a.idx > b.idx);
}

static void sift_down(entry *h, int k, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && worse(h[l], h[m])) m = l;
        if (r < k && worse(h[r], h[m])) m = r;
        if (m == i) return;
        entry t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

static inline void offer(entry *h, int k, uint32_t key, int64_t idx) {
    entry e = {key, idx};
    if (worse(h[0], e)) { h[0] = e; sift_down(h, k, 0); }
}

static void heapify(entry *h, int k) { for (int i = k / 2 - 1; i >= 0; i--) sift_down(h, k, i); }

static void sort_desc(entry *h, int k) {  /* insertion sort, best first (k is small) */
    for (int i = 1; i < k; i++) {
        entry e = h[i];
        int j = i - 1;
        while (j >= 0 && worse(h[j], e)) { h[j + 1] = h[j]; j--; }
        h[j + 1] = e;
    }
}

/* ---------------------------------------------------------------- per-row top-k */
/* Column subsets (AuxK: k_aux ~ d/2 of the dead latents, often a large fraction of them): gather the keys,
 * then radix select, 8 bits at a time from the top. Each level histograms the remaining candidates' digit,
 * emits those whose digit is above the one holding the k-th key and keeps those equal to it; after the last
 * level the remaining candidates all equal the k-th key and fill the rest. O(n) per level, with no
 * data-dependent branches in the loops. `out` needs k + 1 entries. */
static void radix_select(uint32_t *key, int64_t *id, int64_t m, int k, int bits, entry *out) {
    int64_t filled = 0, need = k;
    for (int shift = bits - 8; shift >= 0; shift -= 8) {
        int32_t hist[4][256];  /* four interleaved histograms: runs of one digit do not serialise */
        memset(hist, 0, sizeof hist);
        int64_t i = 0;
        for (; i + 4 <= m; i += 4)
            for (int c = 0; c < 4; c++) hist[c][(key[i + c] >> shift) & 255]++;
        for (; i < m; i++) hist[0][(key[i] >> shift) & 255]++;
        int b = 255;
        int64_t above = 0;
        for (;; b--) {
            const int64_t hb = hist[0][b] + hist[1][b] + hist[2][b] + hist[3][b];
            if (above + hb >= need) break;
            above += hb;
        }
        int64_t w = 0;
        for (i = 0; i < m; i++) {  /* branch-free: write both ways, advance the one that applies */
            const uint32_t kk = key[i], dg = (kk >> shift) & 255;
            const int64_t ii = id[i];
            out[filled].key = kk; out[filled].idx = ii;
            filled += dg > (uint32_t)b;
            key[w] = kk; id[w] = ii;
            w += dg == (uint32_t)b;
        }
        need -= above;
        m = w;
        if (m == need) break;  /* every remaining candidate is needed */
    }
    for (int64_t i = 0; i < need; i++) { out[filled].key = key[i]; out[filled++].idx = id[i]; }
}

static void topk_cols(const void *x, int bf16, const int64_t *cols, int64_t n, int k, entry *h, uint32_t *key,
                      int64_t *id) {
    if (bf16) for (int64_t j = 0; j < n; j++) key[j] = key16(((const uint16_t *)x)[cols[j]]);
    else for (int64_t j = 0; j < n; j++) key[j] = key32(((const uint32_t *)x)[cols[j]]);
    memcpy(id, cols, sizeof(int64_t) * n);
    radix_select(key, id, n, k, bf16 ? 16 : 32, h);
}

/* Rows of any length (the strided path below needs n % 64 == 0 and n / 64 >= k): (1) the max key of every
 * block of BLOCK columns, one vectorised pass; (2) t = the k-th largest block max: every top-k element is
 * >= t, since k blocks hold an element >= t; (3) the elements >= t of the blocks whose max is >= t go
 * through a min-heap of k. */
#define TOPK_ROW(NAME, T, KEY)                                                                          \
    static void NAME(const T *x, int64_t n, int k, entry *h, uint32_t *bmax) {                            \
        int64_t nb = (n + BLOCK - 1) / BLOCK;                                                           \
        for (int64_t b = 0; b < nb; b++) {                                                              \
            int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;                               \
            T m = 0;                                                                                    \
            if (hi - lo == BLOCK) {                                                                     \
                for (int t = 0; t < BLOCK; t++) { T kk = KEY(x[lo + t]); m = kk > m ? kk : m; }         \
            } else {                                                                                    \
                for (int64_t t = lo; t < hi; t++) { T kk = KEY(x[t]); m = kk > m ? kk : m; }            \
            }                                                                                           \
            bmax[b] = m;                                                                                \
        }                                                                                               \
        uint32_t t = 0;                                                                                 \
        if (nb >= k) {  /* the k-th largest block max, with a heap of k over the nb maxima */           \
            for (int j = 0; j < k; j++) { h[j].key = bmax[j]; h[j].idx = j; }                           \
            heapify(h, k);                                                                              \
            for (int64_t b = k; b < nb; b++)                                                            \
                if (bmax[b] > h[0].key) { h[0].key = bmax[b]; h[0].idx = b; sift_down(h, k, 0); }       \
            t = h[0].key;                                                                               \
        }                                                                                               \
        int filled = 0;                                                                                 \
        for (int64_t b = 0; b < nb; b++) {                                                              \
            if (bmax[b] < t) continue;                                                                  \
            int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;                               \
            for (int64_t j = lo; j < hi; j++) {                                                         \
                uint32_t kk = KEY(x[j]);                                                                \
                if (kk < t) continue;                                                                   \
                if (filled < k) {                                                                       \
                    h[filled].key = kk; h[filled].idx = j;                                              \
                    if (++filled == k) heapify(h, k);                                                   \
                } else if (kk >= h[0].key) offer(h, k, kk, j);                                          \
            }                                                                                           \
        }                                                                                               \
    }

TOPK_ROW(topk_row_bf16, uint16_t, key16)
TOPK_ROW(topk_row_f32, uint32_t, key32)

/* The k-th largest of the m keys (scratch, reordered): radix select without ids. */
static uint32_t kth_key(uint32_t *key, int64_t m, int64_t need, int bits) {
    uint32_t prefix = 0;
    for (int shift = bits - 8; shift >= 0; shift -= 8) {
        int32_t hist[256] = {0};
        for (int64_t i = 0; i < m; i++) hist[(key[i] >> shift) & 255]++;
        int b = 255;
        while (hist[b] < need) need -= hist[b--];
        prefix |= (uint32_t)b << shift;
        int64_t w = 0;
        for (int64_t i = 0; i < m; i++) { key[w] = key[i]; w += ((key[i] >> shift) & 255) == (uint32_t)b; }
        m = w;
    }
    return prefix;
}

/* Rows with n % 64 == 0 and n / 64 >= k: the same bound through two levels of strided groups, all vertical
 * (lane-wise) maxima without horizontal reductions. m1[j] = max over a < 8 of key[a G1 + j] (G1 = n / 8),
 * m2[j] = max over a < 8 of m1[a G2 + j] (G2 = n / 64); t = the k-th largest m2 (radix select); the
 * elements >= t, found only under the level-1 groups of the m2 >= t, are the candidates (about k to 2k of
 * them), and a radix select over those gives the top k. Scratch: m1 (G1 Ts), G2 keys, and n candidate
 * keys and ids (enough even when every element ties). */
#define TOPK_STRIDED(NAME, T, KEY, BITS)                                                                \
    static void NAME(const T *x, int64_t n, int k, entry *h, T *m1, uint32_t *tmp, uint32_t *ckey,      \
                     int64_t *cid) {                                                                    \
        const int64_t G1 = n / 8, G2 = n / 64;                                                          \
        for (int64_t j = 0; j < G1; j++) m1[j] = KEY(x[j]);                                             \
        for (int a = 1; a < 8; a++) {                                                                   \
            const T *xa = x + a * G1;                                                                   \
            for (int64_t j = 0; j < G1; j++) { T kk = KEY(xa[j]); m1[j] = kk > m1[j] ? kk : m1[j]; }   \
        }                                                                                               \
        for (int64_t j = 0; j < G2; j++) {                                                              \
            T m = m1[j];                                                                                \
            for (int a = 1; a < 8; a++) m = m1[a * G2 + j] > m ? m1[a * G2 + j] : m;                    \
            tmp[j] = m;                                                                                 \
        }                                                                                               \
        for (int64_t j = 0; j < G2; j++) tmp[G2 + j] = tmp[j];  /* kth_key reorders its copy */        \
        const uint32_t t = kth_key(tmp + G2, G2, k, BITS);                                              \
        int64_t c = 0;                                                                                  \
        for (int64_t j2 = 0; j2 < G2; j2++) {                                                           \
            if (tmp[j2] < t) continue;                                                                  \
            for (int a2 = 0; a2 < 8; a2++) {                                                            \
                const int64_t j1 = a2 * G2 + j2;                                                        \
                if (m1[j1] < t) continue;                                                               \
                for (int a1 = 0; a1 < 8; a1++) {                                                        \
                    const int64_t e = a1 * G1 + j1;                                                     \
                    const uint32_t kk = KEY(x[e]);                                                      \
                    ckey[c] = kk; cid[c] = e;                                                           \
                    c += kk >= t;                                                                       \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        radix_select(ckey, cid, c, k, BITS, h);                                                         \
    }

TOPK_STRIDED(topk_strided_bf16, uint16_t, key16, 16)
TOPK_STRIDED(topk_strided_f32, uint32_t, key32, 32)

/* ---------------------------------------------------------------- threading */
typedef void (*range_fn)(void *args, int64_t lo, int64_t hi);
typedef struct { range_fn fn; void *args; int64_t lo, hi; } task;

static void *run_task(void *p) {
    task *t = (task *)p;
    t->fn(t->args, t->lo, t->hi);
    return NULL;
}

/* fn over [0, rows) split into `threads` contiguous ranges, the calling thread taking the first. With a
 * prefix sum `cost` (cost[r] = work before row r, rows + 1 entries) the ranges hold equal work; else equal
 * row counts. */
static void parallel_rows_by(range_fn fn, void *args, int64_t rows, int threads, const int64_t *cost) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;
    if (threads <= 1) { fn(args, 0, rows); return; }
    pthread_t th[MAX_THREADS];
    task ts[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t bound[MAX_THREADS + 1];
    bound[0] = 0; bound[threads] = rows;
    for (int t = 1; t < threads; t++) {
        if (!cost) { bound[t] = rows * t / threads; continue; }
        const int64_t target = cost[0] + (cost[rows] - cost[0]) * t / threads;
        int64_t lo = bound[t - 1], hi = rows;  /* first row r with cost[r] >= target */
        while (lo < hi) { int64_t mid = (lo + hi) / 2; if (cost[mid] < target) lo = mid + 1; else hi = mid; }
        bound[t] = lo;
    }
    for (int t = 0; t < threads; t++) { ts[t].fn = fn; ts[t].args = args; ts[t].lo = bound[t]; ts[t].hi = bound[t + 1]; }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&th[t], NULL, run_task, &ts[t]) == 0;
    fn(args, ts[0].lo, ts[0].hi);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else fn(args, ts[t].lo, ts[t].hi);  /* could not start a thread: do its share here */
    }
}

static void parallel_rows(range_fn fn, void *args, int64_t rows, int threads) {
    parallel_rows_by(fn, args, rows, threads, NULL);
}

/* ---------------------------------------------------------------- top-k entry points */
typedef struct {
    const void *x; int64_t ld, n; const int64_t *cols; int k, sorted, bf16;
    float *out_v; int64_t ld_v; int64_t *out_i; int64_t ld_i; volatile int failed;
} topk_args;

#define HEAP_STACK 1024

static void topk_range(void *p, int64_t lo, int64_t hi) {
    topk_args *a = (topk_args *)p;
    entry h[HEAP_STACK + 1];  /* + 1: radix_select writes one entry past the last it keeps */
    const int strided = !a->cols && a->n % 64 == 0 && a->n / 64 >= a->k;
    /* scratch, in 32-bit words: the gathered keys and 64-bit ids (column subset); m1, two copies of m2 and
     * n candidate keys and ids (strided); the block maxima (contiguous) */
    size_t words = a->cols ? 3 * a->n + 2 : strided ? a->n / 8 + a->n / 32 + 3 * a->n + 2 : (a->n + BLOCK - 1) / BLOCK;
    uint32_t *buf = malloc(sizeof(uint32_t) * words);
    if (!buf) { a->failed = 1; return; }
    uint32_t *tmp = buf + a->n / 8, *ckey = tmp + a->n / 32;
    int64_t *cid = (int64_t *)(((uintptr_t)(ckey + a->n) + 7) & ~(uintptr_t)7);
    for (int64_t r = lo; r < hi; r++) {
        if (a->cols) {
            const char *x = (const char *)a->x + r * a->ld * (a->bf16 ? 2 : 4);
            topk_cols(x, a->bf16, a->cols, a->n, a->k, h, buf, (int64_t *)(((uintptr_t)(buf + a->n) + 7) & ~(uintptr_t)7));
        } else if (a->bf16) {
            const uint16_t *x = (const uint16_t *)a->x + r * a->ld;
            if (strided) topk_strided_bf16(x, a->n, a->k, h, (uint16_t *)buf, tmp, ckey, cid);
            else topk_row_bf16(x, a->n, a->k, h, buf);
        } else {
            const uint32_t *x = (const uint32_t *)a->x + r * a->ld;
            if (strided) topk_strided_f32(x, a->n, a->k, h, buf, tmp, ckey, cid);
            else topk_row_f32(x, a->n, a->k, h, buf);
        }
        if (a->sorted) sort_desc(h, a->k);
        for (int j = 0; j < a->k; j++) {
            int64_t c = h[j].idx;
            float v;
            if (a->bf16) v = bf16_to_f32(((const uint16_t *)a->x)[r * a->ld + c]);
            else memcpy(&v, (const uint32_t *)a->x + r * a->ld + c, 4);
            a->out_v[r * a->ld_v + j] = v;
            a->out_i[r * a->ld_i + j] = c;
        }
    }
    free(buf);
}

/* Top-k of each of `rows` rows (row stride `ld` elements) of bf16 (bf16=1) or float32 data, over the first
 * `n` columns, or over the `n` columns listed in `cols` when it is not NULL. Values go to out_v as float32,
 * column indices to out_i; sorted best first when `sorted`. Returns 0, -1 when k is out of range, -2 when out of memory. */
int topk_rows(const void *x, int64_t rows, int64_t n, int64_t ld, const int64_t *cols, int k, int sorted, int bf16,
              float *out_v, int64_t ld_v, int64_t *out_i, int64_t ld_i, int threads) {
    if (k < 1 || k > HEAP_STACK || k > n) return -1;
    topk_args a = {x, ld, n, cols, k, sorted, bf16, out_v, ld_v, out_i, ld_i, 0};
    parallel_rows(topk_range, &a, rows, threads);
    return a.failed ? -2 : 0;
}

/* ---------------------------------------------------------------- sampled dot products */
#define LANES 16

static inline float dot(const float *a, const float *b, int64_t d) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

typedef struct { const float *a; int64_t lda; const float *b; int64_t ldb; const int64_t *idx; int64_t K, d; float *out; } dots_args;

static void dots_range(void *p, int64_t lo, int64_t hi) {
    dots_args *a = (dots_args *)p;
    for (int64_t i = lo; i < hi; i++)
        for (int64_t j = 0; j < a->K; j++)
            a->out[i * a->K + j] = dot(a->a + i * a->lda, a->b + a->idx[i * a->K + j] * a->ldb, a->d);
}

/* out[i, j] = <a_i, b[idx[i, j]]> for i < N, j < K (float32; idx row-major [N, K]; out contiguous). */
void sampled_dots_f32(const float *a, int64_t lda, const float *b, int64_t ldb, const int64_t *idx, int64_t N,
                      int64_t K, int64_t d, float *out, int threads) {
    dots_args args = {a, lda, b, ldb, idx, K, d, out};
    parallel_rows(dots_range, &args, N, threads);
}

/* ---------------------------------------------------------------- scatter of weighted rows */
typedef struct { const int64_t *crow; const int32_t *row; const float *w; const float *dense; int64_t ldd, d; float *out; } scatter_args;

static void scatter_range(void *p, int64_t lo, int64_t hi) {
    scatter_args *a = (scatter_args *)p;
    for (int64_t r = lo; r < hi; r++) {
        float *o = a->out + r * a->d;
        for (int64_t c = 0; c < a->d; c++) o[c] = 0.f;
        for (int64_t e = a->crow[r]; e < a->crow[r + 1]; e++) {
            const float *src = a->dense + (int64_t)a->row[e] * a->ldd;
            const float w = a->w[e];
            for (int64_t c = 0; c < a->d; c++) o[c] += w * src[c];
        }
    }
}

/* out[r] = sum over (i, j) with idx[i, j] == r of w[i, j] * dense[i], for r < n: the product G^T dense with
 * G [N, n] holding w at (i, idx[i, j]) (the weight gradients of the encoder and the decoder). A counting
 * sort groups the N K entries by latent, leaving out zero weights (one pass, no comparison sort); each thread then owns a range of
 * latents with equal entry counts and sums whole rows in cache. Returns 0, -2 when out of memory, -3 when
 * an index is outside [0, n). */
int scatter_rows_f32(const int64_t *idx, const float *w, int64_t N, int64_t K, int64_t n, const float *dense,
                     int64_t ldd, int64_t d, float *out, int threads) {
    const int64_t nnz = N * K;
    if (N > INT32_MAX) return -2;
    int64_t *crow = calloc(n + 1, sizeof(int64_t)), *pos = malloc(sizeof(int64_t) * (n + 1));
    int32_t *row = malloc(sizeof(int32_t) * (nnz + 1));
    float *wv = malloc(sizeof(float) * (nnz + 1));
    int rc = 0;
    if (!crow || !pos || !row || !wv) { rc = -2; goto done; }
    for (int64_t e = 0; e < nnz; e++) {  /* zero weights add nothing (ReLU'd AuxK entries): skipped */
        const int64_t r = idx[e];
        if (r < 0 || r >= n) { rc = -3; goto done; }
        crow[r + 1] += w[e] != 0.f;
    }
    for (int64_t r = 0; r < n; r++) crow[r + 1] += crow[r];
    memcpy(pos, crow, sizeof(int64_t) * n);
    for (int64_t i = 0; i < N; i++)
        for (int64_t j = 0; j < K; j++) {
            const float wij = w[i * K + j];
            if (wij == 0.f) continue;
            const int64_t p = pos[idx[i * K + j]]++;
            row[p] = (int32_t)i;
            wv[p] = wij;
        }
    scatter_args args = {crow, row, wv, dense, ldd, d, out};
    parallel_rows_by(scatter_range, &args, n, threads, crow);
done:
    free(crow); free(pos); free(row); free(wv);
    return rc;
}
