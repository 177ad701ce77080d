// CUDA drift detection (contract in csrc/drift_check.h), for sm_80 and sm_90.
//
// Four kernels on one stream, no host round trip:
//   1. logits: one thread per (pivot, key); 8 queries at a time over the head dim;
//   2. softmax + pooling: one block per (pivot, query row), block reductions (max, sum);
//   3. select: one block per (pivot, step): GQA max, the K-th largest score by a binary search
//      on the float bits (scores are >= 0, so the bits order like the values), then one ordered
//      pass with block scans that keeps ties at lower positions and emits the top-K ascending,
//      counting hits against the marked reference;
//   4. finish: one block per pivot: median of the overlaps, decision, latest scores.
// Workspace: drift_check_cuda_workspace() bytes, allocated by the caller. Compiled as a build
// check on machines without a GPU; run by tests marked `gpu`.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../drift_check.h"

namespace heterocache {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }

struct MaxOp {
  __device__ __forceinline__ float operator()(float x, float y) const { return fmaxf(x, y); }
};

struct Workspace {
  float* logits;     // [P, Q, L]  (Q = N * G)
  float* pooled;     // [P, Q, L]  pooled probabilities
  float* scores;     // [P, N, L]  max over the group
  float* overlaps;   // [P, N]
  uint8_t* marks;    // [P, C]
};

__host__ __device__ inline size_t align256(size_t n) { return (n + 255) / 256 * 256; }

Workspace carve(const DriftCheckArgs& a, void* base, size_t* total) {
  const size_t P = a.num_pivots, Q = a.steps * a.group, L = a.key_len, N = a.steps;
  const size_t C = a.candidates < a.key_len ? a.candidates : a.key_len;
  char* p = static_cast<char*>(base);
  size_t off = 0;
  Workspace w{};
  w.logits = reinterpret_cast<float*>(p + off), off += align256(P * Q * L * sizeof(float));
  w.pooled = reinterpret_cast<float*>(p + off), off += align256(P * Q * L * sizeof(float));
  w.scores = reinterpret_cast<float*>(p + off), off += align256(P * N * L * sizeof(float));
  w.overlaps = reinterpret_cast<float*>(p + off), off += align256(P * N * sizeof(float));
  w.marks = reinterpret_cast<uint8_t*>(p + off), off += align256(P * C);
  if (total) *total = off;
  return w;
}

template <typename T>
__global__ void logits_kernel(DriftCheckArgs a, Workspace w) {
  const int64_t p = blockIdx.y, t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t Q = a.steps * a.group, D = a.head_size, L = a.key_len, bs = a.block_size;
  if (t >= L) return;
  const T* kregion = static_cast<const T*>(a.caches[p]) + static_cast<int64_t>(a.tables[p][t / bs]) * a.block_strides[p];
  const int64_t off = t % bs;
  const float* q = a.queries + p * Q * D;
  for (int64_t i0 = 0; i0 < Q; i0 += 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t d = 0; d < D; ++d) {
      const float k = to_f(a.k_transposed ? kregion[d * bs + off] : kregion[off * D + d]);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (i0 + j < Q) acc[j] += q[(i0 + j) * D + d] * k;
      }
    }
    for (int j = 0; j < 8 && i0 + j < Q; ++j) w.logits[(p * Q + i0 + j) * L + t] = acc[j] * a.scale;
  }
}

__global__ void softmax_pool_kernel(DriftCheckArgs a, Workspace w) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float shared_max, shared_inv;
  const int64_t L = a.key_len, r = a.pool_kernel / 2;
  float* x = w.logits + static_cast<int64_t>(blockIdx.x) * L;
  float m = -INFINITY;
  for (int64_t t = threadIdx.x; t < L; t += kThreads) m = fmaxf(m, x[t]);
  m = Reduce(tmp).Reduce(m, MaxOp());
  if (threadIdx.x == 0) shared_max = m;
  __syncthreads();
  m = shared_max;
  float s = 0.f;
  for (int64_t t = threadIdx.x; t < L; t += kThreads) s += __expf(x[t] - m);
  s = Reduce(tmp).Sum(s);
  if (threadIdx.x == 0) shared_inv = 1.f / s;
  __syncthreads();
  float* y = w.pooled + static_cast<int64_t>(blockIdx.x) * L;
  for (int64_t t = threadIdx.x; t < L; t += kThreads) {
    const int64_t lo = t - r < 0 ? 0 : t - r, hi = t + r + 1 > L ? L : t + r + 1;
    float sum = 0.f;
    for (int64_t j = lo; j < hi; ++j) sum += __expf(x[j] - m);
    y[t] = sum * shared_inv / static_cast<float>(hi - lo);
  }
}

__global__ void select_kernel(DriftCheckArgs a, Workspace w) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int shared_count;
  const int64_t N = a.steps, G = a.group, L = a.key_len;
  const int64_t p = blockIdx.x / N, n = blockIdx.x % N;
  const int64_t C = a.candidates < L ? a.candidates : L;
  const int64_t K = a.topk < C ? (a.topk > 0 ? a.topk : 0) : C;
  float* s = w.scores + (p * N + n) * L;
  const float* rows = w.pooled + (p * N + n) * G * L;
  for (int64_t t = threadIdx.x; t < L; t += kThreads) {
    float v = rows[t];
    for (int64_t g = 1; g < G; ++g) v = fmaxf(v, rows[g * L + t]);
    s[t] = v;
  }
  __syncthreads();
  auto count = [&](auto pred) {  // block-wide count of positions t < C with pred(bits of s[t])
    int c = 0;
    for (int64_t t = threadIdx.x; t < C; t += kThreads) c += pred(__float_as_uint(s[t])) ? 1 : 0;
    c = Reduce(tmp.reduce).Sum(c);
    if (threadIdx.x == 0) shared_count = c;
    __syncthreads();
    const int result = shared_count;
    __syncthreads();
    return result;
  };
  int64_t* latest = a.latest_topk + p * a.topk_width;
  if (n == N - 1) {
    for (int64_t i = threadIdx.x; i < a.topk_width; i += kThreads) latest[i] = -1;
  }
  int hits = 0;
  if (K > 0) {
    unsigned lo = 0u, hi = 0x7f800000u;  // the K-th largest bits: the largest v with count(>= v) >= K
    while (lo < hi) {
      const unsigned mid = lo + (hi - lo + 1) / 2;
      if (count([mid](unsigned b) { return b >= mid; }) >= K) lo = mid; else hi = mid - 1;
    }
    const unsigned kth = lo;
    const int ties = static_cast<int>(K) - count([kth](unsigned b) { return b > kth; });
    int taken = 0, tied = 0;
    for (int64_t base = 0; base < C; base += kThreads) {
      const int64_t t = base + threadIdx.x;
      const unsigned b = t < C ? __float_as_uint(s[t]) : 0u;
      const int is_tie = t < C && b == kth;
      int tie_rank, tie_total;
      Scan(tmp.scan).ExclusiveSum(is_tie, tie_rank, tie_total);
      __syncthreads();
      const int sel = t < C && (b > kth || (is_tie && tied + tie_rank < ties));
      int index, sel_total;
      Scan(tmp.scan).ExclusiveSum(sel, index, sel_total);
      __syncthreads();
      if (sel) {
        hits += w.marks[p * C + t];
        if (n == N - 1 && taken + index < a.topk_width) latest[taken + index] = t;
      }
      taken += sel_total;
      tied += tie_total;
    }
  }
  hits = Reduce(tmp.reduce).Sum(hits);
  if (threadIdx.x == 0) {
    const int64_t* ref = a.reference + p * a.reference_width;
    int64_t ref_size = 0;
    for (int64_t i = 0; i < a.reference_width; ++i) ref_size += ref[i] >= 0;
    const int64_t smaller = K < ref_size ? K : ref_size;
    w.overlaps[p * N + n] = smaller > 0 ? static_cast<float>(hits) / static_cast<float>(smaller) : 1.f;
  }
}

__global__ void marks_kernel(DriftCheckArgs a, Workspace w) {
  const int64_t p = blockIdx.x, C = a.candidates < a.key_len ? a.candidates : a.key_len;
  const int64_t* ref = a.reference + p * a.reference_width;
  for (int64_t i = threadIdx.x; i < C; i += kThreads) w.marks[p * C + i] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < a.reference_width; i += kThreads) {
    if (ref[i] >= 0 && ref[i] < C) w.marks[p * C + ref[i]] = 1;
  }
}

__global__ void finish_kernel(DriftCheckArgs a, Workspace w) {
  const int64_t p = blockIdx.x, N = a.steps, L = a.key_len;
  const float* s = w.scores + (p * N + N - 1) * L;
  float* out = a.latest_scores + p * a.scores_width;
  for (int64_t t = threadIdx.x; t < a.scores_width; t += kThreads) out[t] = t < L ? s[t] : 0.f;
  if (threadIdx.x == 0) {
    float* o = w.overlaps + p * N;
    for (int64_t i = 1; i < N; ++i) {  // insertion sort: N is a handful of steps
      const float v = o[i];
      int64_t j = i - 1;
      for (; j >= 0 && o[j] > v; --j) o[j + 1] = o[j];
      o[j + 1] = v;
    }
    const float med = (o[(N - 1) / 2] + o[N / 2]) / 2.f;
    a.median[p] = med;
    a.drift[p] = med < a.threshold;
  }
}

}  // namespace

size_t drift_check_cuda_workspace(const DriftCheckArgs& args) {
  size_t total = 0;
  carve(args, nullptr, &total);
  return total;
}

// All pointers in args (and the arrays they point to) must be device-readable.
void drift_check_cuda(const DriftCheckArgs& a, void* workspace, cudaStream_t stream) {
  const int64_t P = a.num_pivots, N = a.steps, Q = a.steps * a.group, L = a.key_len;
  if (P == 0) return;
  const Workspace w = carve(a, workspace, nullptr);
  marks_kernel<<<static_cast<unsigned>(P), kThreads, 0, stream>>>(a, w);
  if (L > 0) {
    const dim3 grid(static_cast<unsigned>((L + kThreads - 1) / kThreads), static_cast<unsigned>(P));
    switch (a.dtype) {
      case DType::kFloat32: logits_kernel<float><<<grid, kThreads, 0, stream>>>(a, w); break;
      case DType::kBFloat16: logits_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a, w); break;
      case DType::kFloat16: logits_kernel<__half><<<grid, kThreads, 0, stream>>>(a, w); break;
    }
    softmax_pool_kernel<<<static_cast<unsigned>(P * Q), kThreads, 0, stream>>>(a, w);
  }
  select_kernel<<<static_cast<unsigned>(P * N), kThreads, 0, stream>>>(a, w);
  finish_kernel<<<static_cast<unsigned>(P), kThreads, 0, stream>>>(a, w);
}

}  // namespace heterocache
