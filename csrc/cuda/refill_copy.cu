// CUDA refill copies (contract in csrc/refill_copy.h), for sm_80 and sm_90.
//
// One thread block per (satellite, slot); its threads copy the head dimension of K and of V as
// raw elements (2 or 4 bytes). The argument arrays must be device-readable; a slot whose
// position is -1 is skipped. Compiled as a build check on machines without a GPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "../refill_copy.h"

namespace heterocache {
namespace {

template <typename T>
__global__ void refill_copy_kernel(RefillCopyArgs a) {
  const int64_t s = blockIdx.x / a.width, i = blockIdx.x % a.width;
  const int64_t p = a.positions[s * a.width + i];
  if (p < 0) return;
  const int64_t D = a.head_size, bs = a.block_size, hbs = a.host_block_size;
  const T* src = static_cast<const T*>(a.storage) +
                 ((a.host_blocks[p / hbs] * a.rows + a.host_rows[s]) * hbs + p % hbs) * 2 * D;
  T* kregion = static_cast<T*>(a.caches[s]) + static_cast<int64_t>(a.tables[s][i / bs]) * a.block_strides[s];
  T* vregion = kregion + bs * D;
  const int64_t off = i % bs;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    kregion[a.k_transposed ? d * bs + off : off * D + d] = src[d];
    vregion[off * D + d] = src[D + d];
  }
}

}  // namespace

void refill_copy_cuda(const RefillCopyArgs& a, cudaStream_t stream) {
  const int64_t blocks = a.num_sats * a.width;
  if (blocks == 0) return;
  if (a.elem_size == 4) {
    refill_copy_kernel<uint32_t><<<static_cast<unsigned>(blocks), 64, 0, stream>>>(a);
  } else {
    refill_copy_kernel<uint16_t><<<static_cast<unsigned>(blocks), 64, 0, stream>>>(a);
  }
}

}  // namespace heterocache
