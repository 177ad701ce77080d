// Drift detection for a batch of pivots of one request (plain pointers; no torch).
//
// Reference: vllm_heterocache/ops/reference.py::drift_check, with every pivot's keys the first
// key_len positions of its paged single-head cache (layout as in gather_attention.h). Per pivot p:
//   probs[n, g, t]  = softmax_t(queries[p, n, g] . k_t * scale), t < key_len     (float32)
//   scores[n, t]    = max_g avg_pool_t(probs[n, g], pool_kernel)  (zero padding not counted)
//   top[n]          = the topk highest scores[n, t] with t < candidates (ties: lower t first)
//   overlap[n]      = |top[n] n reference[p]| / min(|top[n]|, |reference[p]|)   (1 if empty)
//   median          = (sorted overlap[(N-1)/2] + sorted overlap[N/2]) / 2
//   drift[p]        = median < threshold; latest_topk[p] = top[N-1] ascending, -1 padded;
//   latest_scores[p, t] = scores[N-1, t] for t < key_len, 0 after
#pragma once

#include <cstdint>

#include "gather_attention.h"

namespace heterocache {

struct DriftCheckArgs {
  DType dtype;                  // of the caches
  const float* queries;         // [P, N, G, D]
  const void* const* caches;    // [P] single-head caches
  const int64_t* block_strides; // [P]
  const int32_t* const* tables; // [P] block-table rows of the request
  int64_t num_pivots, steps, group, head_size, block_size;
  bool k_transposed;
  int64_t key_len, candidates, topk, pool_kernel;
  float scale, threshold;
  const int64_t* reference;     // [P, reference_width], ascending, -1 padded
  int64_t reference_width;
  bool* drift;                  // [P]
  float* median;                // [P]
  int64_t* latest_topk;         // [P, topk_width]
  int64_t topk_width;
  float* latest_scores;         // [P, scores_width]
  int64_t scores_width;
};

// CPU (csrc/cpu/drift_check.cpp).
void drift_check_cpu(const DriftCheckArgs& args);

#ifdef __CUDACC__
// CUDA (csrc/cuda/drift_check.cu): every pointer in args must be device-readable; workspace is
// drift_check_cuda_workspace(args) bytes of device memory.
size_t drift_check_cuda_workspace(const DriftCheckArgs& args);
void drift_check_cuda(const DriftCheckArgs& args, void* workspace, cudaStream_t stream);
#endif

}  // namespace heterocache
