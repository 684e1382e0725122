/*
 * scsuperweight.instrument._reduce: the per-activation reductions of `Trace` in one pass over the values.
 *
 * The pure-torch path in trace.py makes five passes over each hooked activation (|x| into a buffer, zero the
 * padding rows, the per-cell max over positions, the position of the batch max, the histogram sample); on narrow
 * models (d = 64) those passes cost about as much per value as the layer that produced them. This function reads
 * every value once, while it is still in cache, and writes only small results. It is an optional speed-up: trace.py
 * falls back to torch when it is not built, and the tests require both paths to give the same answers.
 *
 * Semantics are torch's (amax/max/argmax over |x| with the padding rows set to 0):
 *   cellmax[b, c] = max over valid positions l of |x[b, l, c]| (0 when the cell has no valid position),
 *   m[c], bcell[c] = the max of cellmax[:, c] and the first cell holding it,
 *   pos[c]         = the first position in that cell holding it (0 when the max is 0),
 *   NaN propagates as in torch: it counts as larger than every number and the first NaN wins.
 *   top[b]         = each cell's largest channel (the first on ties),
 *   sums[c]        = the sum of |x| over the sampled rows (double accumulators),
 *   hist, n_zero   = the histogram of the sampled |x|: the float32 bit pattern shifted right by `shift` is a
 *                    log-scale code; codes below `bin_lo` go to bin 0, above the last bin to the last; zeros
 *                    (code 0) are counted apart.
 *
 * Arguments are addresses of CPU tensors (checked by the caller), passed as integers. The activation may be strided
 * (a transposed attention output) as long as its channels are contiguous; every output is contiguous.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict /* MSVC's C mode spells it this way */
#endif

/* Built for baseline x86-64 (SSE2) the max pass runs at about half the speed it reaches with AVX2: on x86-64 with
 * GCC or Clang the pass is compiled for AVX-512, AVX2 and the baseline, and the loader picks the best the CPU has. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline int beats(float v, float cur) { return (v > cur) | ((v != v) & (cur == cur)); }

/* Phase 1 of the common case: each cell's max |x| per channel over its valid rows, no positions; *nan is set
 * when a NaN is seen (NaNs are skipped here; `cell_max_nan` then marks them). */
CLONES static void cell_max(const float *restrict x, Py_ssize_t B, Py_ssize_t L, Py_ssize_t d, Py_ssize_t sB,
                            Py_ssize_t sL, const uint8_t *restrict pad, float *restrict cellmax, int *nan) {
    int seen = 0;
    memset(cellmax, 0, (size_t)B * (size_t)d * sizeof(float));
    /* walk the rows in memory order: cells outer for a (B, L, d) layout, positions outer for a transposed one
     * (an attention output viewed batch-first); either way every cell's row of maxima stays in L1 */
    const int cells_outer = sB >= sL;
    const Py_ssize_t n_outer = cells_outer ? B : L, n_inner = cells_outer ? L : B;
    for (Py_ssize_t o = 0; o < n_outer; o++) {
        for (Py_ssize_t i = 0; i < n_inner; i++) {
            const Py_ssize_t b = cells_outer ? o : i, l = cells_outer ? i : o;
            if (pad != NULL && pad[b * L + l]) continue;
            const float *restrict row = x + b * sB + l * sL;
            float *restrict cm = cellmax + b * d;
            int row_nan = 0;
            for (Py_ssize_t c = 0; c < d; c++) {
                const float v = fabsf(row[c]);
                row_nan |= v != v;
                cm[c] = v > cm[c] ? v : cm[c];
            }
            seen |= row_nan;
        }
    }
    *nan = seen;
}

/* After a NaN was seen: a cell's channel holding a NaN gets NaN, as torch's amax gives (NaN is larger than every
 * number); the fast pass above skipped NaNs. */
static void cell_max_nan(const float *restrict x, Py_ssize_t B, Py_ssize_t L, Py_ssize_t d, Py_ssize_t sB,
                         Py_ssize_t sL, const uint8_t *restrict pad, float *restrict cellmax) {
    for (Py_ssize_t b = 0; b < B; b++)
        for (Py_ssize_t l = 0; l < L; l++) {
            if (pad != NULL && pad[b * L + l]) continue;
            for (Py_ssize_t c = 0; c < d; c++)
                if (isnan(x[b * sB + l * sL + c])) cellmax[b * d + c] = NAN;
        }
}

static int same(float a, float b) { return a == b || (a != a && b != b); }

CLONES static int reduce_f32(const float *restrict x, Py_ssize_t B, Py_ssize_t L, Py_ssize_t d, Py_ssize_t sB,
                             Py_ssize_t sL, const uint8_t *restrict pad, const int64_t *restrict sample, Py_ssize_t k,
                             int shift, int32_t bin_lo, Py_ssize_t nbins, float *restrict m, int64_t *restrict bcell,
                             int64_t *restrict pos, int64_t *restrict top, double *restrict sums,
                             int64_t *restrict hist, int64_t *restrict n_zero) {
    float *cellmax = (float *)malloc((size_t)(B > 0 ? B : 1) * (size_t)(d > 0 ? d : 1) * sizeof(float));
    if (cellmax == NULL) return -1;
    int nan = 0;
    cell_max(x, B, L, d, sB, sL, pad, cellmax, &nan);
    if (nan) cell_max_nan(x, B, L, d, sB, sL, pad, cellmax);
    /* each cell's largest channel (the first on ties, NaN largest) */
    for (Py_ssize_t b = 0; b < B; b++) {
        const float *cm = cellmax + b * d;
        float best = d > 0 ? cm[0] : 0.0f;
        int64_t arg = 0;
        for (Py_ssize_t c = 1; c < d; c++) {
            if (beats(cm[c], best)) {
                best = cm[c];
                arg = c;
            }
        }
        top[b] = arg;
    }
    for (Py_ssize_t c = 0; c < d; c++) {
        float best = B > 0 ? cellmax[c] : 0.0f;
        int64_t arg = 0;
        for (Py_ssize_t b = 1; b < B; b++) {
            const float v = cellmax[b * d + c];
            if (beats(v, best)) {
                best = v;
                arg = b;
            }
        }
        m[c] = best;
        bcell[c] = arg;
        /* the first valid position of that cell holding the max (a zero max: position 0, as argmax of zeros) */
        int64_t at = 0;
        if (B > 0 && best != 0.0f) {
            for (Py_ssize_t l = 0; l < L; l++) {
                if (pad != NULL && pad[arg * L + l]) continue;
                if (same(fabsf(x[arg * sB + l * sL + c]), best)) {
                    at = l;
                    break;
                }
            }
        }
        pos[c] = at;
    }
    free(cellmax);
    /* the sampled rows: the sum of |x| per channel, and the histogram of the bit patterns' codes. Neighbouring
     * values often share a bin, and increments of one counter in a row wait on each other: four interleaved
     * sub-histograms (slot nbins of each counts the zeros) keep them apart. */
    const Py_ssize_t width = nbins + 1;
    int32_t *sub = (int32_t *)calloc((size_t)(4 * width + (d > 0 ? d : 1)), sizeof(int32_t));
    if (sub == NULL) return -1;
    int32_t *slot = sub + 4 * width;
    for (Py_ssize_t c = 0; c < d; c++) sums[c] = 0.0;
    for (Py_ssize_t i = 0; i < k; i++) {
        const float *restrict row = x + (sample[i] / L) * sB + (sample[i] % L) * sL;
        for (Py_ssize_t c = 0; c < d; c++) {
            const float v = fabsf(row[c]);
            int32_t u;
            memcpy(&u, &v, sizeof u);
            const int32_t code = u >> shift;
            int32_t h = code - bin_lo + 1;                        /* bin 0 is the underflow bin */
            h = h < 0 ? 0 : (h >= (int32_t)nbins ? (int32_t)nbins - 1 : h); /* the last: overflow (inf, NaN) */
            slot[c] = code == 0 ? (int32_t)nbins : h;               /* 0, and denormals too small for any bin */
            sums[c] += (double)v;
        }
        Py_ssize_t c = 0;
        for (; c + 4 <= d; c += 4) {
            sub[slot[c]]++;
            sub[width + slot[c + 1]]++;
            sub[2 * width + slot[c + 2]]++;
            sub[3 * width + slot[c + 3]]++;
        }
        for (; c < d; c++) sub[slot[c]]++;
    }
    for (Py_ssize_t h = 0; h < nbins; h++) hist[h] = (int64_t)sub[h] + sub[width + h] + sub[2 * width + h] + sub[3 * width + h];
    int64_t zeros = (int64_t)sub[nbins] + sub[width + nbins] + sub[2 * width + nbins] + sub[3 * width + nbins];
    free(sub);
    *n_zero = zeros;
    return 0;
}

static PyObject *py_reduce_f32(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, pad, sample, m, bcell, pos, top, sums, hist, n_zero;
    Py_ssize_t B, L, d, sB, sL, k, nbins;
    int shift, bin_lo;
    if (!PyArg_ParseTuple(args, "KnnnnnKKniinKKKKKKK", &x, &B, &L, &d, &sB, &sL, &pad, &sample, &k, &shift, &bin_lo,
                          &nbins, &m, &bcell, &pos, &top, &sums, &hist, &n_zero))
        return NULL;
    if (B < 0 || L < 0 || d < 0 || k < 0 || nbins < 1 || shift < 0 || shift > 31) {
        PyErr_SetString(PyExc_ValueError, "reduce_f32: bad shape, shift or bin count");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = reduce_f32((const float *)(uintptr_t)x, B, L, d, sB, sL, (const uint8_t *)(uintptr_t)pad,
                    (const int64_t *)(uintptr_t)sample, k, shift, (int32_t)bin_lo, nbins, (float *)(uintptr_t)m,
                    (int64_t *)(uintptr_t)bcell, (int64_t *)(uintptr_t)pos, (int64_t *)(uintptr_t)top,
                    (double *)(uintptr_t)sums, (int64_t *)(uintptr_t)hist, (int64_t *)(uintptr_t)n_zero);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"reduce_f32", py_reduce_f32, METH_VARARGS,
     "reduce_f32(x, B, L, d, sB, sL, pad, sample, k, shift, bin_lo, nbins, m, bcell, pos, top, sums, hist, n_zero): "
     "one pass over a float32 (B, L, d) activation with strides (sB, sL, 1); x, pad, sample and the outputs are "
     "data_ptr() addresses (pad: 0 for none)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_reduce", "One-pass activation reductions for Trace.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__reduce(void) { return PyModule_Create(&module); }
