// CPU gather-attention (contract in csrc/gather_attention.h). One OpenMP task per work item.
// Per block: scores of 8 tokens x G queries are held in registers over the head dim (transposed
// K); values are added token by token (AVX2 FMA over the head dim).
#include "../gather_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace heterocache {
namespace {

constexpr int kMaxGroup = 16;
constexpr int kMaxHeadSize = 256;

template <typename T>
void run_item(const GatherAttentionArgs& a, const int64_t* w) {
  const int64_t t = w[0], h = w[1], row = w[2], n_front = w[3], gen_start = w[4], seq_len = w[5];
  const int64_t G = a.group, D = a.head_size, bs = a.block_size;
  const T* cache = static_cast<const T*>(a.caches[h]);
  const int32_t* table = a.tables[h] + row * a.table_strides[h];
  const T* qbase = static_cast<const T*>(a.query) + t * a.query_token_stride + h * G * D;
  T* obase = static_cast<T*>(a.output) + t * a.output_token_stride + h * G * D;

  float q[kMaxGroup][kMaxHeadSize];
  float acc[kMaxGroup][kMaxHeadSize];
  float m[kMaxGroup], l[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = as_float(qbase + g * D, D, a.dtype, q[g]);
    for (int64_t d = 0; d < D; ++d) q[g][d] = qg[d] * a.scale;
    std::fill(acc[g], acc[g] + D, 0.f);
    m[g] = -std::numeric_limits<float>::infinity();
    l[g] = 0.f;
  }
  std::vector<float> scores(G * bs), kbuf(D), kscratch(sizeof(T) == 4 ? 0 : D * bs);

  const int64_t ranges[2][2] = {{0, n_front}, {gen_start, seq_len}};
  for (const auto& range : ranges) {
    for (int64_t p = range[0]; p < range[1];) {
      const int64_t off = p % bs, n = std::min(bs - off, range[1] - p);
      const T* kregion = cache + static_cast<int64_t>(table[p / bs]) * a.block_strides[h];
      const T* vregion = kregion + bs * D;
      // scores[g, i] = q_g . k_(off+i)
      if (a.k_transposed) {  // K is [D, bs]: 8 tokens at a time, G accumulators in registers
        const float* kf;  // row d of the block's K (tokens off ..) at kf + d * bs
        if constexpr (sizeof(T) == 4) {
          kf = kregion + off;
        } else {
          for (int64_t d = 0; d < D; ++d) as_float(kregion + d * bs + off, n, a.dtype, &kscratch[d * bs]);
          kf = kscratch.data();
        }
        int64_t i0 = 0;
        for (; i0 + 8 <= n; i0 += 8) {
          __m256 sv[kMaxGroup];
          for (int64_t g = 0; g < G; ++g) sv[g] = _mm256_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            const __m256 k = _mm256_loadu_ps(kf + d * bs + i0);
            for (int64_t g = 0; g < G; ++g) sv[g] = _mm256_fmadd_ps(_mm256_set1_ps(q[g][d]), k, sv[g]);
          }
          for (int64_t g = 0; g < G; ++g) _mm256_storeu_ps(&scores[g * bs + i0], sv[g]);
        }
        for (; i0 < n; ++i0) {
          for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t d = 0; d < D; ++d) s += q[g][d] * kf[d * bs + i0];
            scores[g * bs + i0] = s;
          }
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const float* k = as_float(kregion + (off + i) * D, D, a.dtype, kbuf.data());
          for (int64_t g = 0; g < G; ++g) scores[g * bs + i] = dot(q[g], k, D);
        }
      }
      // online softmax: rescale what was accumulated, add this block's values
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * bs];
        const float m_new = std::max(m[g], max_of(s, n));
        const float correction = std::exp(m[g] - m_new);
        if (correction != 1.f) {
          l[g] *= correction;
          for (int64_t d = 0; d < D; ++d) acc[g][d] *= correction;
        }
        l[g] += exp_shifted(s, n, m_new);
        m[g] = m_new;
      }
      for (int64_t i = 0; i < n; ++i) {  // V is [bs, D]
        const float* v = as_float(vregion + (off + i) * D, D, a.dtype, kbuf.data());
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * bs + i], v, acc[g], D);
      }
      p += n;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = acc[g][d] * inv;
      if constexpr (sizeof(T) == 4) {
        obase[g * D + d] = v;
      } else {
        obase[g * D + d] = from_float(v, a.dtype);
      }
    }
  }
}

}  // namespace

void gather_attention_cpu(const GatherAttentionArgs& a) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < a.num_items; ++i) {
    if (a.dtype == DType::kFloat32) {
      run_item<float>(a, a.work + 6 * i);
    } else {
      run_item<uint16_t>(a, a.work + 6 * i);
    }
  }
}

}  // namespace heterocache
