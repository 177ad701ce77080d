// Refill copies: satellites' budget slots <- their full prompt K/V in the host tier (no torch).
//
// Reference: vllm_heterocache/ops/kernels.py::refill_copy_reference. For satellite s and every
// slot i with positions[s, i] >= 0:
//   slot i of (cache s, table s)  <-  K/V of prompt position positions[s, i] in host row host_rows[s]
// A slot whose entry is -1 is left as it is (a refill rewrites only the slots whose position
// changed, runtime/layer.py).
// Layouts:
//   host storage  [num_blocks, rows, host_block_size, 2, D]  (runtime/host.py): position p of the
//                 request is in block host_blocks[p / host_block_size], offset p % host_block_size
//   cache s       one KV head, as in gather_attention.h (K region [D, bs] if k_transposed, else
//                 [bs, D]; V [bs, D]); slot i in block table_s[i / bs], offset i % bs
// Elements are copied as they are (storage and caches share one dtype).
#pragma once

#include <cstdint>

namespace heterocache {

struct RefillCopyArgs {
  int64_t elem_size;             // bytes per element: 2 or 4
  const void* storage;
  int64_t rows, host_block_size, head_size;
  const int64_t* host_blocks;    // the request's host blocks
  int64_t num_sats;
  const int64_t* host_rows;      // [S]
  const int64_t* positions;      // [S, width], -1: leave the slot
  int64_t width;
  void* const* caches;           // [S] single-head caches
  const int64_t* block_strides;  // [S] elements between blocks
  const int32_t* const* tables;  // [S] the request's block-table row
  int64_t block_size;
  bool k_transposed;
};

// CPU (csrc/cpu/refill_copy.cpp).
void refill_copy_cpu(const RefillCopyArgs& args);

#ifdef __CUDACC__
// CUDA (csrc/cuda/refill_copy.cu); the pointer arrays of args must be device-readable, the
// storage may be pinned host memory (read through unified addressing). Bound in
// csrc/cuda/torch_bindings_cuda.cu.
void refill_copy_cuda(const RefillCopyArgs& args, cudaStream_t stream);
#endif

}  // namespace heterocache
