// CPU drift detection (contract in csrc/drift_check.h). One OpenMP task per pivot: one pass over
// its keys scores all N*G buffered queries (AVX2 over tokens or dims), then softmax, pooling,
// GQA max, top-K (nth_element), overlap with the reference and the median, all in place.
#include "../drift_check.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "vec.h"

namespace heterocache {
namespace {

template <typename T>
void logits_of(const DriftCheckArgs& a, int64_t p, std::vector<float>& logits) {
  const int64_t Q = a.steps * a.group, D = a.head_size, bs = a.block_size, L = a.key_len;
  const float* q = a.queries + p * Q * D;
  std::vector<float> qs(Q * D), kbuf(bs * D);
  for (int64_t i = 0; i < Q * D; ++i) qs[i] = q[i] * a.scale;
  const T* cache = static_cast<const T*>(a.caches[p]);
  for (int64_t start = 0; start < L; start += bs) {
    const int64_t n = std::min(bs, L - start);
    const T* kregion = cache + static_cast<int64_t>(a.tables[p][start / bs]) * a.block_strides[p];
    if (a.k_transposed) {
      for (int64_t i = 0; i < Q; ++i) std::fill(&logits[i * L + start], &logits[i * L + start] + n, 0.f);
      for (int64_t d = 0; d < D; ++d) {
        const float* k = as_float(kregion + d * bs, n, a.dtype, kbuf.data());
        for (int64_t i = 0; i < Q; ++i) axpy(qs[i * D + d], k, &logits[i * L + start], n);
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const float* k = as_float(kregion + t * D, D, a.dtype, kbuf.data());
        for (int64_t i = 0; i < Q; ++i) logits[i * L + start + t] = dot(&qs[i * D], k, D);
      }
    }
  }
}

// softmax over t, average pooling (odd kernel, count_include_pad=False) into out.
void softmax_pool(float* x, int64_t L, int64_t kernel, std::vector<float>& prefix, float* out) {
  const float sum = exp_shifted(x, L, max_of(x, L));
  prefix[0] = 0.f;
  for (int64_t t = 0; t < L; ++t) prefix[t + 1] = prefix[t] + x[t] / sum;
  const int64_t r = kernel / 2;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t lo = std::max<int64_t>(0, t - r), hi = std::min<int64_t>(L, t + r + 1);
    out[t] = (prefix[hi] - prefix[lo]) / static_cast<float>(hi - lo);
  }
}

template <typename T>
void check_pivot(const DriftCheckArgs& a, int64_t p) {
  const int64_t N = a.steps, G = a.group, L = a.key_len;
  const int64_t C = std::min(a.candidates, L), K = std::max<int64_t>(0, std::min(a.topk, C));
  std::vector<float> logits(N * G * L), scores(N * L), pooled(L), prefix(L + 1);
  if (L > 0) logits_of<T>(a, p, logits);
  std::fill(scores.begin(), scores.end(), 0.f);
  for (int64_t n = 0; n < N && L > 0; ++n) {
    float* s = &scores[n * L];
    for (int64_t g = 0; g < G; ++g) {
      softmax_pool(&logits[(n * G + g) * L], L, a.pool_kernel, prefix, pooled.data());
      for (int64_t t = 0; t < L; ++t) s[t] = g == 0 ? pooled[t] : std::max(s[t], pooled[t]);
    }
  }
  const int64_t* ref = a.reference + p * a.reference_width;
  const int64_t ref_size = std::count_if(ref, ref + a.reference_width, [](int64_t x) { return x >= 0; });
  std::vector<int64_t> order(C), top(K);
  std::vector<float> overlaps(N);
  for (int64_t n = 0; n < N; ++n) {
    const float* s = &scores[n * L];
    std::iota(order.begin(), order.end(), 0);
    auto better = [s](int64_t x, int64_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); };
    if (K < C) std::nth_element(order.begin(), order.begin() + K, order.end(), better);
    std::copy(order.begin(), order.begin() + K, top.begin());
    std::sort(top.begin(), top.end());
    int64_t hits = 0;
    for (int64_t i = 0, j = 0; i < K && j < ref_size;) {  // both ascending
      if (top[i] == ref[j]) ++hits, ++i, ++j;
      else if (top[i] < ref[j]) ++i;
      else ++j;
    }
    const int64_t smaller = std::min(K, ref_size);
    overlaps[n] = smaller > 0 ? static_cast<float>(hits) / static_cast<float>(smaller) : 1.f;
  }
  int64_t* latest = a.latest_topk + p * a.topk_width;
  std::fill(latest, latest + a.topk_width, -1);
  std::copy(top.begin(), top.begin() + std::min(K, a.topk_width), latest);
  float* out_scores = a.latest_scores + p * a.scores_width;
  std::fill(out_scores, out_scores + a.scores_width, 0.f);
  if (L > 0) std::copy(&scores[(N - 1) * L], &scores[(N - 1) * L] + std::min(L, a.scores_width), out_scores);
  std::sort(overlaps.begin(), overlaps.end());
  const float med = (overlaps[(N - 1) / 2] + overlaps[N / 2]) / 2.f;
  a.median[p] = med;
  a.drift[p] = med < a.threshold;
}

}  // namespace

void drift_check_cpu(const DriftCheckArgs& a) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t p = 0; p < a.num_pivots; ++p) {
    if (a.dtype == DType::kFloat32) {
      check_pivot<float>(a, p);
    } else {
      check_pivot<uint16_t>(a, p);
    }
  }
}

}  // namespace heterocache
