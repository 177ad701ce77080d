// Attention logits of a few queries against a run of keys, register-blocked (AVX2 FMA): shared
// by gather-attention and drift detection.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace heterocache {

// out[i * out_stride + j] = q[i * q_stride .. +D] . k[.. j], i < NQ, j < 8, for K transposed
// ([D, k_stride] elements E::T: element d of token j at k[d * k_stride + j]), q float32. NQ
// accumulators of 8 tokens stay in registers over d; K is converted to float32 as it is loaded.
template <class E, int NQ>
inline void scores8_transposed(const float* q, int64_t q_stride, int64_t D, const typename E::T* k, int64_t k_stride,
                               float* out, int64_t out_stride) {
  __m256 s[NQ];
  for (int i = 0; i < NQ; ++i) s[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 kv = E::load8(k + d * k_stride);
    for (int i = 0; i < NQ; ++i) s[i] = _mm256_fmadd_ps(_mm256_set1_ps(q[i * q_stride + d]), kv, s[i]);
  }
  for (int i = 0; i < NQ; ++i) _mm256_storeu_ps(out + i * out_stride, s[i]);
}

// out[i * out_stride + j] = q_i . k_j for i < nq, j < n; K transposed as above.
template <class E>
inline void scores_transposed(const float* q, int64_t q_stride, int64_t nq, int64_t D, const typename E::T* k,
                              int64_t k_stride, int64_t n, float* out, int64_t out_stride) {
  for (int64_t i0 = 0; i0 < nq; i0 += 8) {
    const int64_t m = std::min<int64_t>(8, nq - i0);
    const float* qi = q + i0 * q_stride;
    float* oi = out + i0 * out_stride;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      switch (m) {
        case 1: scores8_transposed<E, 1>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 2: scores8_transposed<E, 2>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 3: scores8_transposed<E, 3>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 4: scores8_transposed<E, 4>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 5: scores8_transposed<E, 5>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 6: scores8_transposed<E, 6>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        case 7: scores8_transposed<E, 7>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
        default: scores8_transposed<E, 8>(qi, q_stride, D, k + j, k_stride, oi + j, out_stride); break;
      }
    }
    for (; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) {
        float s = 0.f;
        for (int64_t d = 0; d < D; ++d) s += qi[i * q_stride + d] * E::load(k + d * k_stride + j);
        oi[i * out_stride + j] = s;
      }
    }
  }
}

// The same for token-major K (token j's D elements at k + j * D, float).
inline void scores_token_major(const float* q, int64_t q_stride, int64_t nq, int64_t D, const float* k, int64_t n,
                               float* out, int64_t out_stride) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < nq; ++i) out[i * out_stride + j] = dot(q + i * q_stride, k + j * D, D);
  }
}

}  // namespace heterocache
