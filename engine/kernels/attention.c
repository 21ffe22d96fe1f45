/* Attention of a few queries per sequence (decodes, speculative verifications) straight from the paged KV
 * cache, float32, on x86-64 with AVX2 and FMA (engine/kernels/__init__.py builds and loads this file).
 *
 * PyTorch's path copies each sequence's blocks into a contiguous K and V and masks the padding, twice per
 * layer per step; for one decode token that costs more than the attention itself. This reads the keys and
 * values where they are, through the block table, with the online softmax: per block of keys, the running
 * max m and denominator l are updated and the accumulated output rescaled by exp(m_old - m_new).
 *
 * Each query names its row of q and out, its sequence's row of the block tables, and the range of key
 * positions it sees [start, end) (causal, and the sliding window where there is one).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define KEYS_PER_CHUNK 32
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16 /* query heads per KV head attended at once */

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i < n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 t = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* acc = acc * alpha + p * v over n floats (n a multiple of 8) */
static inline void scale_add(float *acc, float alpha, float p, const float *v, int64_t n) {
    const __m256 a = _mm256_set1_ps(alpha), pv = _mm256_set1_ps(p);
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_mul_ps(a, _mm256_loadu_ps(acc + i))));
}

/* `count` query heads (consecutive in q and out) sharing one KV head, over key positions [start, end). */
static void attend(int64_t count, int64_t head_dim, int64_t block_size, int64_t token_stride, int64_t head_offset,
                   float scale, int64_t first_key, int64_t end_key, const int64_t *table, const float *qh,
                   const float *k_cache, const float *v_cache, float *oh) {
    float acc[MAX_GROUP][MAX_HEAD_DIM], m[MAX_GROUP], l[MAX_GROUP];
    for (int64_t h = 0; h < count; ++h) {
        m[h] = -INFINITY, l[h] = 0.f;
        for (int64_t i = 0; i < head_dim; ++i) acc[h][i] = 0.f;
    }
    for (int64_t start = first_key; start < end_key; start += KEYS_PER_CHUNK) {
        const int64_t n = end_key - start < KEYS_PER_CHUNK ? end_key - start : KEYS_PER_CHUNK;
        const float *keys[KEYS_PER_CHUNK], *values[KEYS_PER_CHUNK];
        for (int64_t j = 0; j < n; ++j) {
            const int64_t pos = start + j;
            const int64_t offset = (table[pos / block_size] * block_size + pos % block_size) * token_stride + head_offset;
            keys[j] = k_cache + offset, values[j] = v_cache + offset;
        }
        for (int64_t h = 0; h < count; ++h) {
            float s[KEYS_PER_CHUNK], chunk_max = -INFINITY;
            for (int64_t j = 0; j < n; ++j) {
                s[j] = dot(qh + h * head_dim, keys[j], head_dim) * scale;
                chunk_max = s[j] > chunk_max ? s[j] : chunk_max;
            }
            const float m_new = chunk_max > m[h] ? chunk_max : m[h];
            float alpha = expf(m[h] - m_new); /* 0 on the first chunk: m = -inf */
            l[h] *= alpha;
            for (int64_t j = 0; j < n; ++j) {
                const float p = expf(s[j] - m_new);
                l[h] += p;
                scale_add(acc[h], alpha, p, values[j], head_dim);
                alpha = 1.f;
            }
            m[h] = m_new;
        }
    }
    for (int64_t h = 0; h < count; ++h)
        for (int64_t i = 0; i < head_dim; ++i) oh[h * head_dim + i] = l[h] > 0.f ? acc[h][i] / l[h] : 0.f;
}

/* queries [num_queries, 4]: row of q/out, row of tables, first and one-past-last visible key position.
 * q, out [rows, heads, head_dim]; caches [blocks, block_size, kv_heads, head_dim]; tables [seqs, max_blocks].
 * head_dim a multiple of 8 up to MAX_HEAD_DIM (the caller checks). */
void paged_decode_attention(int64_t num_queries, int64_t heads, int64_t kv_heads, int64_t head_dim,
                            int64_t block_size, int64_t max_blocks, float scale, const float *q,
                            const float *k_cache, const float *v_cache, const int64_t *tables,
                            const int64_t *queries, float *out) {
    const int64_t group = heads / kv_heads, token_stride = kv_heads * head_dim;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_queries * kv_heads; ++task) {
        const int64_t *query = queries + 4 * (task / kv_heads), kv_head = task % kv_heads;
        const int64_t *table = tables + query[1] * max_blocks;
        for (int64_t first = kv_head * group; first < (kv_head + 1) * group; first += MAX_GROUP) {
            const int64_t count = (kv_head + 1) * group - first < MAX_GROUP ? (kv_head + 1) * group - first : MAX_GROUP;
            attend(count, head_dim, block_size, token_stride, kv_head * head_dim, scale, query[2], query[3], table,
                   q + (query[0] * heads + first) * head_dim, k_cache, v_cache, out + (query[0] * heads + first) * head_dim);
        }
    }
}
