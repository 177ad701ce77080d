// Small AVX2/FMA/F16C helpers shared by the CPU kernels: element conversion, row loads,
// axpy and dot products in float32.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "../gather_attention.h"

namespace heterocache {

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x, DType t) {
  if (t == DType::kBFloat16) {
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return _cvtsh_ss(x);
}
inline uint16_t from_float(float f, DType t) {
  if (t == DType::kBFloat16) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even
    return static_cast<uint16_t>(bits >> 16);
  }
  return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
}

// n elements of a K or V row (or a K column of a transposed region) as float.
template <typename T>
inline void load_row(const T* src, int64_t n, int64_t stride, DType dtype, float* dst) {
  if constexpr (sizeof(T) == 4) {
    if (stride == 1) {
      std::memcpy(dst, src, n * sizeof(float));
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i * stride], dtype);
  }
}

// dst[i] += a * x[i], i < n (AVX2 FMA, 8 lanes).
inline void axpy(float a, const float* x, float* dst, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(dst + i)));
  }
  for (; i < n; ++i) dst[i] += a * x[i];
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace heterocache
