/* lamina's CPU kernel for the group-wise uniform formats (int2/3/4/8), fp32 activations.
 *
 * The weight is held as one uint8 code per weight, its columns ordered so that every
 * group is a run [starts[g], starts[g+1]) (act-order weights are permuted once at load,
 * and the activations by the same permutation per call), with scales s[n, g] and
 * sz[n, g] = s[n, g] * zero[n, g] in fp32. Then
 *     y[m, n] = sum_g s[n, g] * <x[m, g], q[n, g]> - sz[n, g] * sum(x[m, g])
 * so the codes are read once per call and never widened to a full fp32 weight.
 *
 * Plain C called through ctypes (it builds in about a second; the caller runs ranges of
 * output rows on its own threads, ctypes releasing the GIL):
 *   lamina_group_sums  sum(x[m, g]) for every row and group
 *   lamina_fused       output rows n0..n1 for up to a few activation rows (decode): each
 *                      group's 8-wide slices of codes are widened in registers and
 *                      multiplied into four activation rows at once
 *   lamina_dequantize  output rows n0..n1 of the weight as fp32, for a tile that the caller
 *                      multiplies with a BLAS matmul (prefill)
 */
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

void lamina_group_sums(const float* x, int64_t M, int64_t K, const int64_t* starts, int64_t G, float* out) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.f;
      for (int64_t k = starts[g]; k < starts[g + 1]; ++k) t += x[m * K + k];
      out[m * G + g] = t;
    }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
#endif

/* rows (1..4) activation rows x[0..rows) against one output row of codes q. */
static inline void fused_row(const float* x, int64_t K, int rows, const uint8_t* q, const float* s, const float* sz,
                             const int64_t* starts, int64_t G, const float* xsum, float* out) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t a = starts[g], b = starts[g + 1];
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t k = a;
#ifdef __AVX2__
    __m256 v0 = _mm256_setzero_ps(), v1 = _mm256_setzero_ps(), v2 = _mm256_setzero_ps(), v3 = _mm256_setzero_ps();
    for (; k + 8 <= b; k += 8) {
      __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k))));
      v0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), w, v0);
      if (rows > 1) v1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + K + k), w, v1);
      if (rows > 2) v2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 2 * K + k), w, v2);
      if (rows > 3) v3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 3 * K + k), w, v3);
    }
    part[0] = hsum(v0), part[1] = hsum(v1), part[2] = hsum(v2), part[3] = hsum(v3);
#endif
    for (; k < b; ++k)
      for (int r = 0; r < rows; ++r) part[r] += x[r * K + k] * (float)q[k];
    for (int r = 0; r < rows; ++r) acc[r] += s[g] * part[r] - sz[g] * xsum[r * G + g];
  }
  for (int r = 0; r < rows; ++r) out[r] = acc[r];
}

void lamina_fused(const float* x, int64_t M, int64_t K, const uint8_t* codes, const float* scales,
                  const float* scaled_zeros, const int64_t* starts, int64_t G, const float* xsum, float* y, int64_t N,
                  int64_t n0, int64_t n1) {
  float out[4];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int rows = M - m0 < 4 ? (int)(M - m0) : 4;
      fused_row(x + m0 * K, K, rows, codes + n * K, scales + n * G, scaled_zeros + n * G, starts, G, xsum + m0 * G,
                out);
      for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = out[r];
    }
}

void lamina_dequantize(const uint8_t* codes, int64_t K, const float* scales, const float* scaled_zeros,
                       const int64_t* starts, int64_t G, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* q = codes + n * K;
    float* w = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const float s = scales[n * G + g], z = scaled_zeros[n * G + g];
      for (int64_t k = starts[g]; k < starts[g + 1]; ++k) w[k] = s * (float)q[k] - z;
    }
  }
}
