// Gather-attention: decode attention of (token, KV head) work items, each over its own token
// ranges of a paged single-head KV cache. Kernel bodies see plain pointers only (no torch).
//
// Reference: vllm_heterocache/ops/reference.py::subset_attention (and runtime/layer.py, which
// builds the work items). Layouts:
//
//   query, output   [T, Hq, D]          row-major, Hq = Hkv * G; item (t, h) reads/writes query
//                                       heads h*G .. h*G+G-1 of token t
//   cache of head h [num_blocks, bs, 2, D] in vLLM's CPU_ATTN order: per block a K region of
//                                       bs*D elements, then a V region of bs*D elements; V is
//                                       token-major [bs, D]; K is [D, bs] when k_transposed
//                                       (the AVX2 "vec" kernels), else [bs, D]. Blocks are
//                                       block_stride elements apart (vLLM may pad pages).
//   table of head h [rows, table_stride] int32 block ids of each batch row
//   work item       {t, h, row, n_front, gen_start, gen_end, front_start, front_list} (int64):
//                   attend over n_front front positions and gen_start .. gen_end-1 of (head h,
//                   row), positions in the row's block table (vllm_heterocache/placement.py). The
//                   front is front_start .. front_start+n_front-1, or when front_list >= 0 the
//                   positions fronts[front_list .. front_list+n_front-1] (runs of consecutive
//                   positions are read as one range)
//
// Softmax in float32 (online, one pass over K and V), inputs and outputs in T
// (float, bf16 or fp16). An item with no positions writes zeros.
#pragma once

#include <cstdint>

namespace heterocache {

enum class DType { kFloat32, kBFloat16, kFloat16 };

constexpr int64_t kWorkColumns = 8;  // t, h, row, n_front, gen_start, gen_end, front_start, front_list

struct GatherAttentionArgs {
  DType dtype;
  const void* query;
  void* output;
  int64_t query_token_stride;   // elements between tokens of query
  int64_t output_token_stride;  // elements between tokens of output
  const void* const* caches;    // [Hkv] base pointers
  const int64_t* block_strides; // [Hkv] elements between blocks
  const int32_t* const* tables; // [Hkv] block tables
  const int64_t* table_strides; // [Hkv] entries between rows
  const int64_t* work;          // [num_items, kWorkColumns]
  const int32_t* fronts;        // front positions the items' front_list columns index (may be null)
  int64_t num_items;
  int64_t group;                // G, query heads per KV head
  int64_t head_size;            // D
  int64_t block_size;           // bs
  bool k_transposed;
  float scale;
};

// CPU (AVX2 + OpenMP; csrc/cpu/gather_attention.cpp).
void gather_attention_cpu(const GatherAttentionArgs& args);

#ifdef __CUDACC__
// CUDA (sm_80, sm_90; csrc/cuda/gather_attention.cu). The pointer arrays of args must be
// device-readable. Bound in csrc/cuda/torch_bindings_cuda.cu.
void gather_attention_cuda(const GatherAttentionArgs& args, cudaStream_t stream);
#endif

}  // namespace heterocache
