// Block staging: blocks of a single-head cache copied into another cache whose K region has the
// other order (no torch). vLLM's CPU kernel reads K transposed only; a compressed pool keeps K
// token-major (vllm_heterocache/vllm_adapter/block_layout.py), and its prefilling rows are
// staged into a scratch cache in vLLM's order before vLLM's kernel reads them.
//
// Reference: vllm_heterocache/ops/paged.py::copy_blocks. For i < num_blocks:
//   block i of dst  <-  block blocks[i] of src
// Layouts: caches as in gather_attention.h ([num_blocks, bs, 2, D]: per block a K region of bs*D
// elements, [D, bs] when transposed, else [bs, D], then a V region [bs, D]); blocks are
// src_block_stride / dst_block_stride elements apart. Elements are copied as they are.
#pragma once

#include <cstdint>

namespace heterocache {

struct StageBlocksArgs {
  int64_t elem_size;  // bytes per element: 2 or 4
  const void* src;
  int64_t src_block_stride;
  bool src_k_transposed;
  void* dst;
  int64_t dst_block_stride;
  bool dst_k_transposed;
  const int64_t* blocks;  // [num_blocks] blocks of src
  int64_t num_blocks;
  int64_t block_size;
  int64_t head_size;
};

// CPU (csrc/cpu/stage_blocks.cpp; OpenMP over blocks).
void stage_blocks_cpu(const StageBlocksArgs& args);

}  // namespace heterocache
