// Small AVX2/FMA/F16C helpers shared by the CPU kernels: element conversion, row loads,
// axpy and dot products in float32.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
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

// Element types of the caches, for kernels templated on them: load 8 (AVX2) or 1 as float32.
template <DType DT>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static float load(const float* p) { return *p; }
};
template <>
struct Elem<DType::kBFloat16> {
  using T = uint16_t;
  static __m256 load8(const uint16_t* p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static float load(const uint16_t* p) { return to_float(*p, DType::kBFloat16); }
};
template <>
struct Elem<DType::kFloat16> {
  using T = uint16_t;
  static __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float load(const uint16_t* p) { return to_float(*p, DType::kFloat16); }
};

// n contiguous elements as float32: src itself for float, else converted into scratch (8 lanes).
template <typename T>
inline const float* as_float(const T* src, int64_t n, DType dtype, float* scratch) {
  if constexpr (sizeof(T) == 4) {
    return src;
  } else {
    int64_t i = 0;
    if (dtype == DType::kBFloat16) {
      for (; i + 8 <= n; i += 8) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
        _mm256_storeu_ps(scratch + i, _mm256_castsi256_ps(wide));
      }
    } else {
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
      }
    }
    for (; i < n; ++i) scratch[i] = to_float(src[i], dtype);
    return scratch;
  }
}

// exp of 8 floats (Cephes polynomial, relative error ~1e-7; inputs clamped to +-88.4).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(0x7f)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The first n of the 8 lanes (0 <= n <= 8), as a mask for _mm256_maskload_ps / _mm256_maskstore_ps.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[i] = exp(x[i] - shift) for i < n (y may be x); returns the sum. The last n % 8 in one masked
// step (a gathered segment is often a few positions long: scalar expf calls were a tenth of the
// gather kernel's time).
inline float exp_shifted(const float* x, float* y, int64_t n, float shift) {
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (i < n) {
    const __m256i lanes = first_lanes(n - i);
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(x + i, lanes), vs)),
                                   _mm256_castsi256_ps(lanes));
    _mm256_maskstore_ps(y + i, lanes, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
}
inline float exp_shifted(float* x, int64_t n, float shift) { return exp_shifted(x, x, n, shift); }

// Over the positions i < n with keep[i] != 0 only (keep: 1.0 or 0.0): the max of x, and
// y[i] = exp(x[i] - shift) (0 where not kept, never a denormal), returning the sum.
inline float max_of_kept(const float* x, const float* keep, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  const __m256 none = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 kept = _mm256_cmp_ps(_mm256_loadu_ps(keep + i), zero, _CMP_NEQ_OQ);
    m = _mm256_max_ps(m, _mm256_blendv_ps(none, _mm256_loadu_ps(x + i), kept));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int k = 1; k < 8; ++k) r = std::max(r, lanes[k]);
  for (; i < n; ++i) if (keep[i] != 0.f) r = std::max(r, x[i]);
  return r;
}
inline float exp_shifted_kept(float* x, const float* keep, int64_t n, float shift) {
  const __m256 vs = _mm256_set1_ps(shift), zero = _mm256_setzero_ps();
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 kept = _mm256_cmp_ps(_mm256_loadu_ps(keep + i), zero, _CMP_NEQ_OQ);
    const __m256 arg = _mm256_blendv_ps(zero, _mm256_sub_ps(_mm256_loadu_ps(x + i), vs), kept);
    const __m256 e = _mm256_blendv_ps(zero, exp256(arg), kept);
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
  for (; i < n; ++i) sum += (x[i] = keep[i] != 0.f ? std::exp(x[i] - shift) : 0.f);
  return sum;
}

inline float max_of(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = lanes[0];
  for (int k = 1; k < 8; ++k) r = std::max(r, lanes[k]);
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
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
