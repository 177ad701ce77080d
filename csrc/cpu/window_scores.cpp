// CPU prompt-end scores (contract in csrc/window_scores.h). One query head per OpenMP iteration:
// each window query's row is maxed, exponentiated in place (its sum taken in the same pass) and
// added, weighted by 1 / (sum * W), to the head's mean; a row of 3.3K keys (13 KiB) stays in L1
// for its three passes. The mean is pooled into a per-head buffer; the GQA max runs after.
#include "../window_scores.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "vec.h"

namespace heterocache {

void window_scores_cpu(const WindowScoresArgs& a) {
  const int64_t L = a.length, W = a.window, G = a.group, heads = a.num_kv_heads * G;
  const int64_t half = a.pool_kernel / 2;
  std::vector<float> pooled(static_cast<size_t>(heads * L));
#pragma omp parallel
  {
    std::vector<float> mean(static_cast<size_t>(L));
#pragma omp for schedule(static)
    for (int64_t qh = 0; qh < heads; ++qh) {
      std::fill(mean.begin(), mean.end(), 0.f);
      for (int64_t w = 0; w < W; ++w) {
        float* row = a.logits + (qh * W + w) * L;
        const int64_t n = L - W + w + 1;  // the keys query w sees
        const float m = max_of(row, n);
        const float sum = exp_shifted(row, n, m);
        axpy(1.f / (sum * static_cast<float>(W)), row, mean.data(), n);
      }
      float* p = pooled.data() + qh * L;
      for (int64_t j = 0; j < L; ++j) {
        const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min<int64_t>(L - 1, j + half);
        float s = 0.f;
        for (int64_t i = lo; i <= hi; ++i) s += mean[i];
        p[j] = s / static_cast<float>(hi - lo + 1);
      }
    }
  }
  for (int64_t h = 0; h < a.num_kv_heads; ++h) {
    float* o = a.out + h * L;
    const float* first = pooled.data() + h * G * L;
    std::copy(first, first + L, o);
    for (int64_t g = 1; g < G; ++g) {
      const float* p = first + g * L;
      for (int64_t j = 0; j < L; ++j) o[j] = std::max(o[j], p[j]);
    }
  }
}

}  // namespace heterocache
