// CPU drift detection (contract in csrc/drift_check.h), in three OpenMP phases so that a single
// pivot with a long context still uses every core:
//   1. logits of all N*G buffered queries, one task per (pivot, key block), register-blocked;
//   2. softmax and pooling in place, one task per (pivot, step, query head);
//   3. GQA max, top-K and overlap, one task per (pivot, step). The top-K is found by selecting
//      the K-th largest score (nth_element on a copy) and one ascending pass over positions, so
//      it comes out sorted; the overlap counts marked reference positions.
// Buffers are thread-local and reused across calls (no page faults per call).
#include "../drift_check.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "scores.h"
#include "vec.h"

namespace heterocache {
namespace {

template <typename V>
V& grown(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v;
}

// logits[(p*N*G + i) * L + t] for the token range of block b of pivot p.
template <DType DT>
void block_logits(const DriftCheckArgs& a, const float* qs, int64_t p, int64_t b, float* logits) {
  using T = typename Elem<DT>::T;
  thread_local std::vector<float> kbuf;
  const int64_t Q = a.steps * a.group, D = a.head_size, bs = a.block_size, L = a.key_len;
  const int64_t start = b * bs, n = std::min(bs, L - start);
  const T* kregion = static_cast<const T*>(a.caches[p]) + static_cast<int64_t>(a.tables[p][b]) * a.block_strides[p];
  float* out = logits + p * Q * L + start;
  const float* q = qs + p * Q * D;
  if (a.k_transposed) {  // [D, bs]
    scores_transposed<Elem<DT>>(q, D, Q, D, kregion, bs, n, out, L);
  } else {  // [bs, D]
    const float* k = as_float(kregion, n * D, a.dtype, grown(kbuf, D * bs).data());
    scores_token_major(q, D, Q, D, k, n, out, L);
  }
}

// x <- avg_pool(softmax(x)) over L (odd kernel, zero padding not counted). Interior positions
// sum their window 8 at a time; the r = kernel / 2 positions at each end divide by their count.
void softmax_pool(float* x, int64_t L, int64_t kernel) {
  thread_local std::vector<float> buf;
  float* y = grown(buf, L).data();
  const float inv = 1.f / exp_shifted(x, L, max_of(x, L));
  const int64_t r = kernel / 2, lo_end = std::min(r, L), hi_start = std::max(lo_end, L - r);
  const __m256 w = _mm256_set1_ps(inv / static_cast<float>(kernel));
  int64_t t = lo_end;
  for (; t + 8 <= hi_start; t += 8) {
    __m256 acc = _mm256_loadu_ps(x + t - r);
    for (int64_t j = 1 - r; j <= r; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + t + j));
    _mm256_storeu_ps(y + t, _mm256_mul_ps(acc, w));
  }
  auto edge = [&](int64_t u) {
    const int64_t lo = std::max<int64_t>(0, u - r), hi = std::min<int64_t>(L, u + r + 1);
    float sum = 0.f;
    for (int64_t j = lo; j < hi; ++j) sum += x[j];
    y[u] = sum * inv / static_cast<float>(hi - lo);
  };
  for (; t < hi_start; ++t) edge(t);
  for (int64_t u = 0; u < lo_end; ++u) edge(u);
  for (int64_t u = hi_start; u < L; ++u) edge(u);
  std::copy(y, y + L, x);
}

// top[0..K) = ascending positions of the K highest s[t], t < C (ties: lower t first); K <= C.
void topk_ascending(const float* s, int64_t C, int64_t K, int64_t* top) {
  if (K == 0) return;
  thread_local std::vector<float> tmp;
  float* v = grown(tmp, C).data();
  std::copy(s, s + C, v);
  std::nth_element(v, v + K - 1, v + C, std::greater<float>());
  const float kth = v[K - 1];
  int64_t ties = K;
  for (int64_t t = 0; t < C; ++t) ties -= s[t] > kth;
  for (int64_t t = 0, k = 0; t < C && k < K; ++t) {
    if (s[t] > kth || (s[t] == kth && ties-- > 0)) top[k++] = t;
  }
}

template <DType DT>
void run(const DriftCheckArgs& a) {
  const int64_t P = a.num_pivots, N = a.steps, G = a.group, Q = N * G, D = a.head_size, L = a.key_len;
  const int64_t C = std::min(a.candidates, L), K = std::max<int64_t>(0, std::min(a.topk, C));
  const int64_t blocks = (L + a.block_size - 1) / a.block_size;
  thread_local std::vector<float> qbuf, lbuf, obuf;
  thread_local std::vector<uint8_t> mbuf;
  float* qs = grown(qbuf, P * Q * D).data();
  float* logits = grown(lbuf, P * Q * L).data();
  float* overlaps = grown(obuf, P * N).data();
  uint8_t* marks = grown(mbuf, P * C).data();  // reference positions < C
  for (int64_t i = 0; i < P * Q * D; ++i) qs[i] = a.queries[i] * a.scale;
  std::fill(marks, marks + P * C, 0);
  std::vector<int64_t> ref_sizes(P, 0);  // valid (>= 0) reference entries per pivot
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* ref = a.reference + p * a.reference_width;
    for (int64_t i = 0; i < a.reference_width; ++i) {
      ref_sizes[p] += ref[i] >= 0;
      if (ref[i] >= 0 && ref[i] < C) marks[p * C + ref[i]] = 1;
    }
  }
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P * blocks; ++i) block_logits<DT>(a, qs, i / blocks, i % blocks, logits);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P * Q; ++i) {
      if (L > 0) softmax_pool(logits + i * L, L, a.pool_kernel);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < P * N; ++i) {
      const int64_t p = i / N, n = i % N;
      float* s = logits + (p * Q + n * G) * L;  // the step's scores: max over g, into its g = 0 row
      for (int64_t g = 1; g < G; ++g) {
        const float* x = s + g * L;
        for (int64_t t = 0; t < L; ++t) s[t] = std::max(s[t], x[t]);
      }
      thread_local std::vector<int64_t> topbuf;
      int64_t* top = grown(topbuf, K).data();
      topk_ascending(s, C, K, top);
      int64_t hits = 0;
      for (int64_t k = 0; k < K; ++k) hits += marks[p * C + top[k]];
      const int64_t smaller = std::min(K, ref_sizes[p]);
      overlaps[i] = smaller > 0 ? static_cast<float>(hits) / static_cast<float>(smaller) : 1.f;
      if (n == N - 1) {
        int64_t* latest = a.latest_topk + p * a.topk_width;
        std::fill(latest, latest + a.topk_width, -1);
        std::copy(top, top + std::min(K, a.topk_width), latest);
      }
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    float* out_scores = a.latest_scores + p * a.scores_width;
    std::fill(out_scores, out_scores + a.scores_width, 0.f);
    const float* s = logits + (p * Q + (N - 1) * G) * L;
    if (L > 0) std::copy(s, s + std::min(L, a.scores_width), out_scores);
    float* o = overlaps + p * N;
    std::sort(o, o + N);
    const float med = (o[(N - 1) / 2] + o[N / 2]) / 2.f;
    a.median[p] = med;
    a.drift[p] = med < a.threshold;
  }
}

}  // namespace

void drift_check_cpu(const DriftCheckArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return run<DType::kFloat32>(a);
    case DType::kBFloat16: return run<DType::kBFloat16>(a);
    case DType::kFloat16: return run<DType::kFloat16>(a);
  }
}

}  // namespace heterocache
