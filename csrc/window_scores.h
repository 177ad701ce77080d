// Prompt-end scores from the observation window's logits (no torch): the softmax of each window
// query over the keys it sees, averaged over the window, average-pooled over positions and
// maxed over the GQA group.
//
// Reference: vllm_heterocache/ops/reference.py::prefill_scores (which also takes the logits'
// matrix product; ops/kernels.py::prefill_scores takes it with torch and calls this).
//   logits  float32 [num_kv_heads, G * W, L], contiguous, row g * W + w: q_{g,w} . k_j / sqrt(D)
//           (query head g of the KV head's group, window query w at position L - W + w); it
//           sees keys j <= L - W + w (causal), the others are ignored. Overwritten (scratch).
//   out     float32 [num_kv_heads, L], contiguous:
//           out[h, j] = max_g pool_j( (1/W) sum_w softmax_w(logits[h, g*W + w, :])[j] )
//           pool: mean over positions j - kernel/2 .. j + kernel/2 inside 0 .. L-1 (odd kernel).
#pragma once

#include <cstdint>

namespace heterocache {

struct WindowScoresArgs {
  float* logits;  // [num_kv_heads, group * window, length]
  float* out;     // [num_kv_heads, length]
  int64_t num_kv_heads;
  int64_t group;
  int64_t window;  // W <= length
  int64_t length;
  int64_t pool_kernel;  // odd, >= 1
};

// CPU (csrc/cpu/window_scores.cpp; OpenMP over query heads).
void window_scores_cpu(const WindowScoresArgs& args);

}  // namespace heterocache
