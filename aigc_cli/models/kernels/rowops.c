/* Row kernels for CPU decoding with float32 activations, the exact mode and `--quantize int8`
   (aigc_cli/models/fused.py builds and loads this file).

   Between its matmuls a GPT-2 layer does little arithmetic (two layer norms, a tanh-GELU,
   attention of one new position per row over the cached keys and values), but as separate torch
   calls it takes ~15 of them a layer, each a few microseconds among the streamed weights: about a
   fifth of an int8 token's time. These functions do that work in four calls a layer, and a
   step's int8 token and position embeddings in one.

   Written for the compiler's auto-vectoriser (built with -O3 -march=native -fno-trapping-math):
   reductions keep LANES partial sums so that they vectorise without reassociation flags, and exp
   is a branch-free polynomial. float32 throughout, row-major, no allocation, no threads; index
   arrays are torch's int64. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16

int aigc_rowops_abi(void) { return 4; }

/* e^x to about 2 ulp (Cephes' expf polynomial); NaN stays NaN; below -87 gives ~1e-38. */
static inline float fexp(float x) {
    x = x > 88.0f ? 88.0f : x;
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

static float sum(const float *restrict x, long n) {
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += x[i + j];
    float t = 0;
    for (int j = 0; j < LANES; j++) t += acc[j];
    for (; i < n; i++) t += x[i];
    return t;
}

/* a . b with LANES partial sums (the same order wherever it is used). */
static float dot(const float *restrict a, const float *restrict b, long n) {
    float acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    float t = 0;
    for (int j = 0; j < LANES; j++) t += acc[j];
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

static float max_of(const float *restrict x, long n) {
    float m = x[0];
    for (long i = 1; i < n; i++) m = x[i] > m || x[i] != x[i] ? x[i] : m; /* NaN wins */
    return m;
}

/* Per row: out[r] = table[ids[r]] * scale[ids[r]] + positions[pos[r]] (an int8 token table with its
   row scales, and float32 position embeddings). Returns -1, having written nothing, when an id is
   outside the table's `vocab` rows or a position outside its `n_pos`. */
int aigc_embed_int8(const int8_t *restrict table, const float *restrict scale, const float *restrict positions,
                    const int64_t *restrict ids, const int64_t *restrict pos, float *restrict out, long rows, long dim,
                    long vocab, long n_pos) {
    for (long r = 0; r < rows; r++)
        if (ids[r] < 0 || ids[r] >= vocab || pos[r] < 0 || pos[r] >= n_pos) return -1;
    for (long r = 0; r < rows; r++) {
        const int8_t *restrict q = table + ids[r] * dim;
        const float *restrict pe = positions + pos[r] * dim;
        float s = scale[ids[r]];
        float *restrict o = out + r * dim;
        for (long i = 0; i < dim; i++) o[i] = (float)q[i] * s + pe[i];
    }
    return 0;
}

/* Per row: x += y when y is not NULL; then h = (x - mean) / sqrt(var + eps) * w + b. */
void aigc_add_layer_norm(float *restrict x, const float *restrict y, const float *restrict w, const float *restrict b,
                         float *restrict h, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        float *restrict xr = x + r * dim;
        float *restrict hr = h + r * dim;
        if (y) {
            const float *restrict yr = y + r * dim;
            for (long i = 0; i < dim; i++) xr[i] += yr[i];
        }
        float mean = sum(xr, dim) / (float)dim;
        for (long i = 0; i < dim; i++) hr[i] = xr[i] - mean;
        float var = dot(hr, hr, dim);
        float rstd = 1.0f / sqrtf(var / (float)dim + eps);
        for (long k = 0; k < dim; k++) hr[k] = hr[k] * rstd * w[k] + b[k];
    }
}

/* In place: GPT-2's tanh approximation of GELU, tanh(u) as 1 - 2 / (1 + e^(2u)). */
void aigc_gelu_tanh(float *restrict x, long n) {
    for (long i = 0; i < n; i++) {
        float v = x[i];
        float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float t = 1.0f - 2.0f / (1.0f + fexp(2.0f * u));
        x[i] = 0.5f * v * (1.0f + t);
    }
}

/* One new position per row, for each row r < rows: its query, key and value are
   qkv[r * 3 * heads * hd + (0, 1, 2) * heads * hd ...]; the key and value go to position pos[r] of
   the row's cache, then out[r * heads * hd + head * hd + d] = softmax(q . K[0..pos[r]] * scale) V.
   Keys and values are addressed as K[r][head][position][d] through strides (in floats) with d
   contiguous: layout = rows, heads, hd, then the strides of the keys' row, head and position, and
   of the values' row, head and position. With the cache stored (positions, heads, hd) per row and
   layer (`SlotCache(layout="positions")`), each row's keys and then its values are read as one
   stream, position after position, all heads together: read cold (as every step reads them, the
   streamed weights having evicted them), that is half the time of one short stream per head.
   `scores`: room for heads * (the longest row's pos + 1) floats. */
void aigc_attend(const float *restrict qkv, float *restrict keys, float *restrict values, float *restrict out,
                 const int64_t *restrict pos, const int64_t *restrict layout, float scale, float *restrict scores) {
    long rows = layout[0], heads = layout[1], hd = layout[2];
    long k_row = layout[3], k_head = layout[4], k_pos = layout[5], v_row = layout[6], v_head = layout[7], v_pos = layout[8];
    long qkv_row = 3 * heads * hd, e = heads * hd;
    for (long r = 0; r < rows; r++) {
        long p = pos[r], n = p + 1;
        const float *restrict base = qkv + r * qkv_row;
        float *restrict K = keys + r * k_row;
        float *restrict V = values + r * v_row;
        float *restrict o = out + r * e;
        for (long h = 0; h < heads; h++) {
            memcpy(K + p * k_pos + h * k_head, base + e + h * hd, hd * sizeof(float));
            memcpy(V + p * v_pos + h * v_head, base + 2 * e + h * hd, hd * sizeof(float));
        }
        for (long s = 0; s < n; s++) {
            for (long h = 0; h < heads; h++) {
                scores[h * n + s] = dot(base + h * hd, K + s * k_pos + h * k_head, hd) * scale;
            }
        }
        for (long h = 0; h < heads; h++) {
            float *restrict w = scores + h * n;
            float m = max_of(w, n);
            for (long s = 0; s < n; s++) w[s] = fexp(w[s] - m);
            float inv = 1.0f / sum(w, n);
            for (long s = 0; s < n; s++) w[s] *= inv;
        }
        for (long i = 0; i < e; i++) o[i] = 0.0f;
        for (long s = 0; s < n; s++) {
            for (long h = 0; h < heads; h++) {
                float w = scores[h * n + s];
                const float *restrict v = V + s * v_pos + h * v_head;
                float *restrict oh = o + h * hd;
                for (long d = 0; d < hd; d++) oh[d] += w * v[d];
            }
        }
    }
}
