// CUDA gather-attention (contract in csrc/gather_attention.h), for sm_80 and sm_90.
//
// One thread block per (work item, query head of its group); each warp walks a strided share of
// the item's positions with an online softmax, lanes splitting the head dimension (a warp
// shuffle reduces each q.k); the warps' partial (max, sum, acc) are merged in shared memory.
// Compiled as a build check on machines without a GPU; run by tests marked `gpu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../gather_attention.h"

namespace heterocache {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxDimPerLane = 8;  // head_size <= 256

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <typename T>
__global__ void gather_attention_kernel(GatherAttentionArgs a) {
  const int64_t item = blockIdx.x / a.group, g = blockIdx.x % a.group;
  const int64_t* w = a.work + kWorkColumns * item;
  const int64_t t = w[0], h = w[1], row = w[2], n_front = w[3], gen_start = w[4], gen_end = w[5],
                front_start = w[6], front_list = w[7];
  const int64_t D = a.head_size, bs = a.block_size;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* cache = static_cast<const T*>(a.caches[h]);
  const int32_t* table = a.tables[h] + row * a.table_strides[h];
  const T* q = static_cast<const T*>(a.query) + t * a.query_token_stride + (h * a.group + g) * D;

  float qv[kMaxDimPerLane], acc[kMaxDimPerLane];
  int dims = 0;
  for (int64_t d = lane; d < D; d += 32, ++dims) {
    qv[dims] = to_f(q[d]) * a.scale;
    acc[dims] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const int64_t total = n_front + (gen_end - gen_start);
  for (int64_t i = warp; i < total; i += kWarps) {
    const int64_t p = i >= n_front ? gen_start + (i - n_front)
                      : front_list >= 0 ? static_cast<int64_t>(a.fronts[front_list + i]) : front_start + i;
    const T* kregion = cache + static_cast<int64_t>(table[p / bs]) * a.block_strides[h];
    const int64_t off = p % bs;
    float s = 0.f;
    int k = 0;
    for (int64_t d = lane; d < D; d += 32, ++k) {
      s += qv[k] * to_f(a.k_transposed ? kregion[d * bs + off] : kregion[off * D + d]);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const float m_new = fmaxf(m, s), c = __expf(m - m_new), e = __expf(s - m_new);
    l = l * c + e;
    k = 0;
    for (int64_t d = lane; d < D; d += 32, ++k) acc[k] = acc[k] * c + e * to_f(kregion[bs * D + off * D + d]);
    m = m_new;
  }
  __shared__ float sm[kWarps], sl[kWarps];
  __shared__ float sacc[kWarps][32 * kMaxDimPerLane];
  if (lane == 0) sm[warp] = m, sl[warp] = l;
  int k = 0;
  for (int64_t d = lane; d < D; d += 32, ++k) sacc[warp][d] = acc[k];
  __syncthreads();
  if (warp == 0) {
    float mm = -INFINITY;
    for (int i = 0; i < kWarps; ++i) mm = fmaxf(mm, sm[i]);
    float ll = 0.f;
    for (int i = 0; i < kWarps; ++i) ll += sm[i] == -INFINITY ? 0.f : sl[i] * __expf(sm[i] - mm);
    T* out = static_cast<T*>(a.output) + t * a.output_token_stride + (h * a.group + g) * D;
    for (int64_t d = lane; d < D; d += 32) {
      float v = 0.f;
      for (int i = 0; i < kWarps; ++i) v += sm[i] == -INFINITY ? 0.f : sacc[i][d] * __expf(sm[i] - mm);
      out[d] = from_f<T>(ll > 0.f ? v / ll : 0.f);
    }
  }
}

}  // namespace

// Pointer arrays in `args` (caches, strides, tables) must be device-readable.
void gather_attention_cuda(const GatherAttentionArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.num_items * args.group)), block(32 * kWarps);
  if (args.num_items == 0) return;
  switch (args.dtype) {
    case DType::kFloat32: gather_attention_kernel<float><<<grid, block, 0, stream>>>(args); break;
    case DType::kBFloat16: gather_attention_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(args); break;
    case DType::kFloat16: gather_attention_kernel<__half><<<grid, block, 0, stream>>>(args); break;
  }
}

}  // namespace heterocache
