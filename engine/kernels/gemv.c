/* Matrix-vector products of packed weights for the few rows of a decode step on x86-64 CPUs with AVX2 and
 * FMA (engine/kernels/__init__.py builds and loads this file).
 *
 * PyTorch's int4 CPU kernel is compute-bound on AVX2: it reads weights at ~5 GB/s where the machine
 * streams ~20. These kernels widen 16 weights per load straight into float lanes, keep one accumulator
 * per input group and apply its scale once, and run each output row's dot products for up to four input
 * rows per weight load. Numerics are those of the packed forms in engine.models.linear: inputs rounded
 * to bf16, float32 sums, outputs rounded to bf16 (stored as float32).
 *
 * Weight layouts: each output row is a run of blocks, one per group of inputs, so that the kernel reads
 * one sequential stream (as GGUF's blocks), with bf16 scales and zeros (values the packed forms round to):
 * - int4: bf16 scale, bf16 zero, then group_size / 2 bytes; byte 8 * c + i of them holds input 16 * c + i
 *   of the group in its low nibble and 16 * c + i + 8 in its high one. w = (q - 8) * scale + zero.
 * - int8: bf16 scale, then group_size signed bytes. w = q * scale.
 * gemv_bf16 is the exception: float32 weights that are exactly bf16 values (a bf16 checkpoint served in
 * float32), stored as their bf16 halves and read back exactly, against float32 inputs with no rounding, so
 * that it equals the float32 product up to summation order while reading half the bytes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4 /* input rows per pass over the weights */

static inline float round_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return v; /* NaN stays NaN */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u; /* to nearest, ties to even */
    memcpy(&v, &u, 4);
    return v;
}

static inline float bits_to_float(uint32_t u) {
    float v;
    memcpy(&v, &u, 4);
    return v;
}

static inline float from_bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return bits_to_float((uint32_t)h << 16);
}

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* `cols` output rows of int4 blocks (rows `row_bytes` apart) against `rows` input rows; both are constants
 * after inlining. The low and high nibbles feed separate accumulators and one input row runs against two
 * weight rows at a time, so that neither a chain of dependent FMAs nor the input loads limit the loop. */
static inline __attribute__((always_inline)) void int4_tile(
    int cols, int rows, int64_t K, int64_t groups, int64_t group_size, int64_t row_bytes, const float *x,
    const float *xsum, const uint8_t *w, float *y, int64_t N) {
    const __m256i low = _mm256_set1_epi32(15);
    const int64_t block = 4 + group_size / 2;
    __m256 total[2][MAX_ROWS];
    float offsets[2][MAX_ROWS]; /* sum over groups of (zero - 8 scale) * (sum of the group's inputs) */
    for (int j = 0; j < cols; ++j)
        for (int m = 0; m < rows; ++m) total[j][m] = _mm256_setzero_ps(), offsets[j][m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
        const float *xg = x + g * group_size;
        __m256 acc_lo[2][MAX_ROWS], acc_hi[2][MAX_ROWS];
        for (int j = 0; j < cols; ++j)
            for (int m = 0; m < rows; ++m) acc_lo[j][m] = acc_hi[j][m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < group_size; k += 16)
            for (int j = 0; j < cols; ++j) {
                const uint8_t *q = w + j * row_bytes + g * block + 4 + k / 2;
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                for (int m = 0; m < rows; ++m) {
                    acc_lo[j][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg + m * K + k), acc_lo[j][m]);
                    acc_hi[j][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + m * K + k + 8), acc_hi[j][m]);
                }
            }
        for (int j = 0; j < cols; ++j) {
            uint32_t scale_zero; /* both bf16: the scale in the low half, the zero in the high one */
            memcpy(&scale_zero, w + j * row_bytes + g * block, 4);
            const float scale = bits_to_float(scale_zero << 16);
            const float offset = bits_to_float(scale_zero & 0xffff0000u) - 8.f * scale;
            for (int m = 0; m < rows; ++m) {
                total[j][m] = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_add_ps(acc_lo[j][m], acc_hi[j][m]), total[j][m]);
                offsets[j][m] += offset * xsum[m * groups + g];
            }
        }
    }
    for (int j = 0; j < cols; ++j)
        for (int m = 0; m < rows; ++m) y[m * N + j] = round_bf16(hsum(total[j][m]) + offsets[j][m]);
}

/* One output row of int8 blocks. */
static inline __attribute__((always_inline)) void int8_row(
    int rows, int64_t K, int64_t groups, int64_t group_size, const float *x, const uint8_t *row, float *y, int64_t N) {
    const int64_t block = 2 + group_size;
    __m256 total[MAX_ROWS];
    for (int m = 0; m < rows; ++m) total[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        const uint8_t *q = row + g * block + 2;
        const float *xg = x + g * group_size;
        __m256 acc_a[MAX_ROWS], acc_b[MAX_ROWS];
        for (int m = 0; m < rows; ++m) acc_a[m] = acc_b[m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < group_size; k += 16) { /* group sizes are multiples of 16 */
            __m256 wa = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
            __m256 wb = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 8))));
            for (int m = 0; m < rows; ++m) {
                acc_a[m] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xg + m * K + k), acc_a[m]);
                acc_b[m] = _mm256_fmadd_ps(wb, _mm256_loadu_ps(xg + m * K + k + 8), acc_b[m]);
            }
        }
        __m256 s = _mm256_set1_ps(from_bf16(row + g * block));
        for (int m = 0; m < rows; ++m) total[m] = _mm256_fmadd_ps(s, _mm256_add_ps(acc_a[m], acc_b[m]), total[m]);
    }
    for (int m = 0; m < rows; ++m) y[m * N] = round_bf16(hsum(total[m]));
}

/* x rounded to bf16 into xr, and (for int4's offsets) the sum of each group of it. */
static void round_inputs(int64_t M, int64_t K, int64_t group_size, const float *x, float *xr, float *xsum) {
    const int64_t groups = K / group_size;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < groups; ++g) {
            float sum = 0.f;
            for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) sum += (xr[m * K + k] = round_bf16(x[m * K + k]));
            xsum[m * groups + g] = sum;
        }
}

/* Output rows split between the threads, in steps of `step`; then the input rows in passes of up to four. */
#define FOR_TILES(step, CALL)                                                                  \
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {                                             \
        const int64_t rows = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;                            \
        _Pragma("omp parallel for schedule(static)")                                           \
        for (int64_t n = 0; n < N; n += step) {                                                \
            switch (rows) { case 1: CALL(1); break; case 2: CALL(2); break;                    \
                            case 3: CALL(3); break; default: CALL(4); }                        \
        }                                                                                      \
    }

/* y[M, N] = x[M, K] @ w.T for int4 blocks q [N, K / group_size, 4 + group_size / 2]. */
void gemv_int4(int64_t M, int64_t K, int64_t N, int64_t group_size, const float *x, const uint8_t *q, float *y) {
    const int64_t groups = K / group_size, row_bytes = groups * (4 + group_size / 2);
    float *xr = malloc(sizeof(float) * M * (K + groups)), *xsum = xr + M * K;
    round_inputs(M, K, group_size, x, xr, xsum);
    /* one input row: two weight rows per tile (an odd last one alone) */
#define INT4_TILE(C, R) int4_tile(C, R, K, groups, group_size, row_bytes, xr + m0 * K, xsum + m0 * groups, \
                                  q + n * row_bytes, y + m0 * N + n, N)
#define INT4_CALL(R) if (R == 1 && n + 1 < N) INT4_TILE(2, 1); else INT4_TILE(1, R)
    FOR_TILES((rows == 1 ? 2 : 1), INT4_CALL)
    free(xr);
}

/* y[M, N] = x[M, K] @ w.T for int8 blocks q [N, K / group_size, 2 + group_size]. */
void gemv_int8(int64_t M, int64_t K, int64_t N, int64_t group_size, const float *x, const uint8_t *q, float *y) {
    const int64_t groups = K / group_size, row_bytes = groups * (2 + group_size);
    float *xr = malloc(sizeof(float) * M * (K + groups)), *xsum = xr + M * K;
    round_inputs(M, K, group_size, x, xr, xsum);
#define INT8_CALL(R) int8_row(R, K, groups, group_size, xr + m0 * K, q + n * row_bytes, y + m0 * N + n, N)
    FOR_TILES(1, INT8_CALL)
    free(xr);
}

/* `cols` output rows of bf16 weights against `rows` float32 input rows (no rounding either side). */
static inline __attribute__((always_inline)) void bf16_tile(int cols, int rows, int64_t K, const float *x,
                                                            const uint16_t *w, float *y, int64_t N) {
    __m256 acc[2][MAX_ROWS][2];
    for (int j = 0; j < cols; ++j)
        for (int m = 0; m < rows; ++m) acc[j][m][0] = acc[j][m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
        for (int j = 0; j < cols; ++j) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + j * K + k));
            const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
            const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
            for (int m = 0; m < rows; ++m) {
                acc[j][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * K + k), acc[j][m][0]);
                acc[j][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * K + k + 8), acc[j][m][1]);
            }
        }
    for (int j = 0; j < cols; ++j)
        for (int m = 0; m < rows; ++m) y[m * N + j] = hsum(_mm256_add_ps(acc[j][m][0], acc[j][m][1]));
}

/* y[M, N] = x[M, K] @ w.T for bf16 weights w [N, K], K a multiple of 16. */
void gemv_bf16(int64_t M, int64_t K, int64_t N, const float *x, const uint16_t *w, float *y) {
#define BF16_TILE(C, R) bf16_tile(C, R, K, x + m0 * K, w + n * K, y + m0 * N + n, N)
#define BF16_CALL(R) if (R == 1 && n + 1 < N) BF16_TILE(2, 1); else BF16_TILE(1, R)
    FOR_TILES((rows == 1 ? 2 : 1), BF16_CALL)
}
