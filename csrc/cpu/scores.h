// Attention logits of a few queries against a run of keys, register-blocked (AVX2 FMA): shared
// by gather-attention and drift detection.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace heterocache {

// A callable run once per step of the kernels' inner loops (the kernels issue their prefetches
// of the next block through it); NoHook does nothing.
struct NoHook {
  void operator()() const {}
};

// Software prefetch of up to two byte ranges (a later block's K and V regions: blocks are in
// scrambled order, so the hardware prefetchers cannot run ahead across them), one cache line per
// call: passed as the Hook of the current block's inner loops, it spreads the prefetches over
// their steps; finish() issues what is left. Into L1 by default (Hint); drift detection's into
// L2 (drift_check.cpp).
struct Range {
  const void* begin;
  const void* end;
};
template <int Hint = _MM_HINT_T0>
struct Prefetcher {
  Range ranges[2] = {{nullptr, nullptr}, {nullptr, nullptr}};
  const char* p = nullptr;
  const char* e = nullptr;
  int r = 2;
  void start() {
    r = 0;
    next();
  }
  void next() {
    for (; r < 2; ++r) {
      p = static_cast<const char*>(ranges[r].begin);
      e = static_cast<const char*>(ranges[r].end);
      if (p < e) return;
    }
  }
  void operator()() {
    if (p < e) {
      _mm_prefetch(p, static_cast<decltype(_MM_HINT_T0)>(Hint));
      p += 64;
      if (p >= e) {
        ++r;
        next();
      }
    }
  }
  void finish() {
    while (p < e) (*this)();
  }
};

// Software prefetch of the K and V rows of a list (a later segment's gathered rows: row i at
// k + index[i] * row_bytes and at v + index[i] * row_bytes), one line of each per call: as the
// Hook of the current segment's inner loops, it spreads them over their steps (issued all at
// once, they outran the core's outstanding misses); finish() issues what is left. Into L2, not
// L1: a segment's rows (up to a block's, 64 KiB of K and V at 128 x 64 floats) would evict the
// current segment's from a 32 KiB L1 before they are read. 16 requests x 2 heads over 4 layers'
// scattered rows of 4 documents (the tiny model's shared-prefix load, from memory): 41-44
// instead of 57-65 ns per listed position; rows already in the last-level cache: 28.6-29.1
// against 29.8-30.4 ns (bench_kernels.py's shared-document line).
struct ListPrefetcher {
  const char* k;
  const char* v;
  const int32_t* index;
  int64_t n, row_bytes;
  int64_t i = 0, line = 0;
  ListPrefetcher(const void* k, const void* v, const int32_t* index, int64_t n, int64_t row_bytes)
      : k(static_cast<const char*>(k)), v(static_cast<const char*>(v)), index(index), n(n), row_bytes(row_bytes) {}
  void operator()() {
    if (i < n) {
      const int64_t off = static_cast<int64_t>(index[i]) * row_bytes + line;
      _mm_prefetch(k + off, _MM_HINT_T1);
      _mm_prefetch(v + off, _MM_HINT_T1);
      line += 64;
      if (line >= row_bytes) {
        line = 0;
        ++i;
      }
    }
  }
  void finish() {
    while (i < n) (*this)();
  }
};

// out[i * out_stride + 8 * v + j] = q[i * q_stride .. +D] . k[.. 8 * v + j], i < NQ, v < NV,
// j < 8, for K transposed ([D, k_stride] elements E::T: element d of token t at
// k[d * k_stride + t]), q float32. The NQ x NV accumulators stay in registers over d; each d
// reads NV * 8 contiguous elements of K's row d (whole cache lines for NV = 2 in float32),
// converted to float32 as they are loaded.
template <class E, int NQ, int NV, class Hook>
inline void scores_tile_transposed(const float* q, int64_t q_stride, int64_t D, const typename E::T* k,
                                   int64_t k_stride, float* out, int64_t out_stride, Hook& hook) {
  Hook h = hook;  // a local copy: its state stays in registers over the loop
  __m256 s[NQ][NV];
  for (int i = 0; i < NQ; ++i)
    for (int v = 0; v < NV; ++v) s[i][v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    h();
    __m256 kv[NV];
    for (int v = 0; v < NV; ++v) kv[v] = E::load8(k + d * k_stride + 8 * v);
    for (int i = 0; i < NQ; ++i) {
      const __m256 qb = _mm256_set1_ps(q[i * q_stride + d]);
      for (int v = 0; v < NV; ++v) s[i][v] = _mm256_fmadd_ps(qb, kv[v], s[i][v]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + i * out_stride + 8 * v, s[i][v]);
  hook = h;
}

// Tokens per register tile for NQ queries: 6 to 12 accumulators (8 independent FMA chains hide
// the FMA latency; accumulators + K vectors + one broadcast <= 16 registers).
constexpr int tile_vectors(int nq) { return nq == 1 ? 8 : nq == 2 ? 4 : 2; }

// Queries [i0, i0 + NQ) against tokens [j0, n): full tiles of 8 * tile_vectors(NQ) tokens, then
// 8 tokens at a time; returns the first token not done (n rounded down to a multiple of 8 from j0).
template <class E, int NQ, class Hook>
inline int64_t scores_queries_transposed(const float* q, int64_t q_stride, int64_t D, const typename E::T* k,
                                         int64_t k_stride, int64_t j0, int64_t j1, float* out, int64_t out_stride,
                                         Hook& hook) {
  constexpr int NV = tile_vectors(NQ);
  int64_t j = j0;
  for (; j + 8 * NV <= j1; j += 8 * NV) {
    scores_tile_transposed<E, NQ, NV>(q, q_stride, D, k + j, k_stride, out + j, out_stride, hook);
  }
  for (; j + 8 <= j1; j += 8) {
    scores_tile_transposed<E, NQ, 1>(q, q_stride, D, k + j, k_stride, out + j, out_stride, hook);
  }
  return j;
}

template <class E, class Hook>
inline int64_t scores_queries_transposed_any(int64_t nq, const float* q, int64_t q_stride, int64_t D,
                                             const typename E::T* k, int64_t k_stride, int64_t j0, int64_t j1,
                                             float* out, int64_t out_stride, Hook& hook) {
  switch (nq) {
    case 1: return scores_queries_transposed<E, 1>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
    case 2: return scores_queries_transposed<E, 2>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
    case 3: return scores_queries_transposed<E, 3>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
    case 4: return scores_queries_transposed<E, 4>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
    case 5: return scores_queries_transposed<E, 5>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
    default: return scores_queries_transposed<E, 6>(q, q_stride, D, k, k_stride, j0, j1, out, out_stride, hook);
  }
}

// out[i * out_stride + j] = q_i . k_j for i < nq, j < n; K transposed as above. The queries go in
// balanced groups of at most 6; with several groups, the tokens go in spans of 64, each span's K
// (64 x D elements) read from memory once and reused from L1 by every group.
template <class E, class Hook = NoHook>
inline void scores_transposed(const float* q, int64_t q_stride, int64_t nq, int64_t D, const typename E::T* k,
                              int64_t k_stride, int64_t n, float* out, int64_t out_stride, Hook&& hook = {}) {
  const int64_t groups = (nq + 5) / 6;
  const int64_t span = groups == 1 ? std::max<int64_t>(n, 1) : 64;  // several groups: 16-token tiles
  int64_t done = 0;  // tokens [0, done) have all their logits (a multiple of 8)
  for (int64_t j0 = 0; j0 < n; j0 += span) {
    const int64_t j1 = std::min(n, j0 + span);
    for (int64_t c = 0, i0 = 0; c < groups; ++c) {
      const int64_t i1 = nq * (c + 1) / groups;
      done = scores_queries_transposed_any<E>(i1 - i0, q + i0 * q_stride, q_stride, D, k, k_stride, j0, j1,
                                              out + i0 * out_stride, out_stride, hook);
      i0 = i1;
    }
  }
  for (int64_t j = done; j < n; ++j) {  // the last n % 8 tokens
    for (int64_t i = 0; i < nq; ++i) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += q[i * q_stride + d] * E::load(k + d * k_stride + j);
      out[i * out_stride + j] = s;
    }
  }
}

// Lane c of the result = the sum of the 8 lanes of a[c].
inline __m256 sum_lanes8(const __m256* a) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// Where the rows (one token's D elements) of a token-major K or V region are: row i at base + i * D,
// or, for a segment gathered from a list, at base + index[i] * D (read where they are: no copy).
template <typename T>
struct Rows {
  const T* base;
  int64_t D;
  const int32_t* index = nullptr;
  const T* operator()(int64_t i) const { return base + (index ? index[i] : i) * D; }
};

// out[i * out_stride + t] = q_i . k_(j0 + t), i < NQ, t < NT (NQ * NT = 8), token-major float K:
// eight accumulators over 8-wide chunks of d, reduced together at the end.
template <int NQ, int NT, class Hook>
inline void scores_tile_token_major(const float* q, int64_t q_stride, int64_t D, const Rows<float>& k, int64_t j0,
                                    float* out, int64_t out_stride, Hook& hook) {
  static_assert(NQ * NT == 8, "eight accumulators");
  Hook h = hook;
  const float* kr[NT];
  for (int t = 0; t < NT; ++t) kr[t] = k(j0 + t);
  __m256 acc[8];
  for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    h();
    __m256 kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = _mm256_loadu_ps(kr[t] + d);
    for (int i = 0; i < NQ; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * q_stride + d);
      for (int t = 0; t < NT; ++t) acc[i * NT + t] = _mm256_fmadd_ps(qv, kv[t], acc[i * NT + t]);
    }
  }
  hook = h;
  alignas(32) float sums[8];
  _mm256_store_ps(sums, sum_lanes8(acc));
  for (int i = 0; i < NQ; ++i) {
    for (int t = 0; t < NT; ++t) {
      float x = sums[i * NT + t];
      for (int64_t e = d; e < D; ++e) x += q[i * q_stride + e] * kr[t][e];  // D % 8 elements
      out[i * out_stride + t] = x;
    }
  }
}

// The same for token-major K (token j's D elements at k(j), float): tiles of 2 queries x 4 tokens
// (then 1 x 8), the last tokens one at a time.
template <class Hook = NoHook>
inline void scores_token_major(const float* q, int64_t q_stride, int64_t nq, int64_t D, const Rows<float>& k,
                               int64_t n, float* out, int64_t out_stride, Hook&& hook = {}) {
  int64_t i = 0;
  for (; i + 2 <= nq; i += 2) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      scores_tile_token_major<2, 4>(q + i * q_stride, q_stride, D, k, j, out + i * out_stride + j, out_stride, hook);
    }
    for (; j < n; ++j) {
      for (int64_t ii = i; ii < i + 2; ++ii) out[ii * out_stride + j] = dot(q + ii * q_stride, k(j), D);
    }
  }
  for (; i < nq; ++i) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      scores_tile_token_major<1, 8>(q + i * q_stride, q_stride, D, k, j, out + i * out_stride + j, out_stride, hook);
    }
    for (; j < n; ++j) out[i * out_stride + j] = dot(q + i * q_stride, k(j), D);
  }
}

// K's rows consecutive from k.
template <class Hook = NoHook>
inline void scores_token_major(const float* q, int64_t q_stride, int64_t nq, int64_t D, const float* k, int64_t n,
                               float* out, int64_t out_stride, Hook&& hook = {}) {
  scores_token_major(q, q_stride, nq, D, Rows<float>{k, D}, n, out, out_stride, hook);
}

}  // namespace heterocache
