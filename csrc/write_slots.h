// Cache write at vLLM's slots: a step's new K/V rows of one KV head into its single-head paged
// cache (no torch). The compressed pools keep K token-major, which vLLM's own cache write does
// not (vllm_heterocache/vllm_adapter/block_layout.py), so HeteroCache writes them itself.
//
// Reference: vllm_heterocache/ops/paged.py::write_slots. For i < num_tokens with slots[i] >= 0
// (a negative slot is skipped, as vLLM's write does), block b = slots[i] / bs, offset
// t = slots[i] % bs:
//   K of token t in block b  <-  key row i
//   V of token t in block b  <-  value row i
// Layouts: caches as in gather_attention.h ([num_blocks, bs, 2, D]: per block a K region of bs*D
// elements, [D, bs] when transposed, else [bs, D], then a V region [bs, D]); blocks are
// block_stride elements apart. Rows of key / value are key_stride / value_stride elements apart
// (e.g. one head of the step's [num_tokens, H, D]), each contiguous. Elements are copied as they
// are (the cache's dtype). Slots are distinct (vLLM's slot mapping).
#pragma once

#include <cstdint>

namespace heterocache {

struct WriteSlotsArgs {
  int64_t elem_size;  // bytes per element: 2 or 4
  void* cache;
  int64_t block_stride;
  bool k_transposed;
  const void* key;
  int64_t key_stride;
  const void* value;
  int64_t value_stride;
  const int64_t* slots;  // [num_tokens]
  int64_t num_tokens;
  int64_t block_size;
  int64_t head_size;
};

// CPU (csrc/cpu/write_slots.cpp; OpenMP over tokens when there are many).
void write_slots_cpu(const WriteSlotsArgs& args);

}  // namespace heterocache
