// CPU block staging (contract in csrc/stage_blocks.h). One block per OpenMP iteration: a block's
// K region (bs x D elements, 32 KiB at bs 128, D 64, float32) is transposed in 16 x 16 tiles so
// that both sides stay in L1; V, and K when both orders agree, is one memcpy.
#include "../stage_blocks.h"

#include <omp.h>

#include <algorithm>
#include <cstring>

namespace heterocache {
namespace {

constexpr int64_t kTile = 16;

// out[c * rows + r] = in[r * cols + c] for r < rows, c < cols.
template <typename T>
void transpose(const T* in, int64_t rows, int64_t cols, T* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) out[c * rows + r] = in[r * cols + c];
    }
  }
}

template <typename T>
void stage(const StageBlocksArgs& a) {
  const int64_t bs = a.block_size, D = a.head_size, region = bs * D;
  const T* src = static_cast<const T*>(a.src);
  T* dst = static_cast<T*>(a.dst);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < a.num_blocks; ++i) {
    const T* s = src + a.blocks[i] * a.src_block_stride;
    T* d = dst + i * a.dst_block_stride;
    if (a.src_k_transposed == a.dst_k_transposed) {
      std::memcpy(d, s, region * sizeof(T));
    } else if (a.dst_k_transposed) {  // [bs, D] -> [D, bs]
      transpose(s, bs, D, d);
    } else {  // [D, bs] -> [bs, D]
      transpose(s, D, bs, d);
    }
    std::memcpy(d + region, s + region, region * sizeof(T));
  }
}

}  // namespace

void stage_blocks_cpu(const StageBlocksArgs& a) {
  if (a.elem_size == 4) {
    stage<uint32_t>(a);
  } else {
    stage<uint16_t>(a);
  }
}

}  // namespace heterocache
