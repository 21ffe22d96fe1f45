/* The small per-layer operations of a decode step fused into one call each, float32 (engine/kernels/
 * __init__.py builds and loads this file). For one token each is a few microseconds of arithmetic that
 * PyTorch's eager mode spends as 5-10 separate ops (RMSNorm: add, pow, mean, add, rsqrt, mul, mul;
 * rotary embedding: chunk, neg, cat, mul, mul, add), each with its dispatch and a fresh tensor.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* residual[m] += x[m] (when residual is not NULL; else residual = x), then
 * out[m] = residual[m] / sqrt(mean(residual[m]^2) + eps) * weight, for rows of `size` floats. */
void add_rms_norm(int64_t rows, int64_t size, const float *x, float *residual, const float *weight, float eps,
                  float *out) {
    for (int64_t m = 0; m < rows; ++m) {
        const float *xm = x + m * size;
        float *rm = residual ? residual + m * size : (float *)xm, *om = out + m * size;
        __m256 sq = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= size; i += 8) {
            __m256 v = _mm256_loadu_ps(xm + i);
            if (residual) v = _mm256_add_ps(v, _mm256_loadu_ps(rm + i)), _mm256_storeu_ps(rm + i, v);
            sq = _mm256_fmadd_ps(v, v, sq);
        }
        float tail = 0.f;
        for (; i < size; ++i) {
            const float v = residual ? (rm[i] += xm[i]) : xm[i];
            tail += v * v;
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(sq), _mm256_extractf128_ps(sq, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        const float total = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) + tail;
        const float inv = 1.f / sqrtf(total / (float)size + eps);
        const __m256 s = _mm256_set1_ps(inv);
        for (i = 0; i + 8 <= size; i += 8)
            _mm256_storeu_ps(om + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(rm + i), s), _mm256_loadu_ps(weight + i)));
        for (; i < size; ++i) om[i] = rm[i] * inv * weight[i];
    }
}

/* Rotary embedding, rotate-half layout, in place on `heads` heads of head_dim at the start of each of
 * `rows` rows `row_stride` floats apart (q and k side by side in the fused qkv output):
 * x1, x2 = halves; x = (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), with cos, sin [rows, head_dim]. */
void rope_rotate_half(int64_t rows, int64_t heads, int64_t head_dim, int64_t row_stride, float *x, const float *cos,
                      const float *sin) {
    const int64_t half = head_dim / 2;
    for (int64_t m = 0; m < rows; ++m) {
        const float *c = cos + m * head_dim, *s = sin + m * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = x + m * row_stride + h * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/* exp(x) for 8 floats, to ~2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p Cephes' degree-6
 * polynomial; inputs clamped to where float32 neither overflows nor goes subnormal. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* out[m] = silu(gate) * up for rows of gate_up = [gate | up], `size` floats each half. */
void silu_mul(int64_t rows, int64_t size, const float *gate_up, float *out) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t m = 0; m < rows; ++m) {
        const float *gate = gate_up + 2 * m * size, *up = gate + size;
        float *om = out + m * size;
        int64_t i = 0;
        for (; i + 8 <= size; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(om + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
        }
        for (; i < size; ++i) om[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
}
