// CUDA implementations of the heterocache ops (schemas in ../torch_bindings.cpp). Argument checks
// and packing are shared with the CPU binding (../bindings.h); here the pointer arrays, and any
// index tensors given on the host, are copied to the device, and the kernels run on the current
// stream. Built only when torch has CUDA and a CUDA toolchain is present (setup.py).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../bindings.h"

namespace {

using namespace heterocache::binding;

// The call's pointer arrays on `device` (one copy); the returned tensor keeps them alive until the
// kernels that read them have run (the caching allocator reuses memory in stream order).
template <typename Args>
at::Tensor arrays_on(const Packed<Args>& packed, const at::Device& device) {
  return at::tensor(at::ArrayRef<int64_t>(packed.words), at::kLong).to(device);
}

void gather_attention(const at::Tensor& query, at::Tensor& output, at::TensorList caches, at::TensorList tables,
                      const at::Tensor& work, const at::Tensor& fronts, bool k_transposed, double scale) {
  TORCH_CHECK(query.is_cuda() && work.device() == query.device(), "query and work must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(query.device());
  GatherPacked packed = pack_gather(query, output, caches, tables, work, fronts, k_transposed, scale);
  const at::Tensor arrays = arrays_on(packed, query.device());
  packed.point_at(arrays.data_ptr<int64_t>());
  heterocache::gather_attention_cuda(packed.args, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void drift_check(const at::Tensor& queries, at::TensorList caches, at::TensorList tables, int64_t row, int64_t key_len,
                 int64_t candidates, const at::Tensor& reference, int64_t topk, double threshold, int64_t pool_kernel,
                 bool k_transposed, at::Tensor& drift, at::Tensor& median, at::Tensor& latest_topk,
                 at::Tensor& latest_scores) {
  const at::Device device = queries.device();
  TORCH_CHECK(queries.is_cuda(), "queries must be on a CUDA device");
  const at::Tensor* on_device[] = {&reference, &drift, &median, &latest_topk, &latest_scores};
  for (const at::Tensor* t : on_device) {
    TORCH_CHECK(t->device() == device, "reference and outputs must be on the queries' device");
  }
  const c10::cuda::CUDAGuard guard(device);
  DriftPacked packed = pack_drift(queries, caches, tables, row, key_len, candidates, reference, topk, threshold,
                                  pool_kernel, k_transposed, drift, median, latest_topk, latest_scores);
  const at::Tensor arrays = arrays_on(packed, device);
  packed.point_at(arrays.data_ptr<int64_t>());
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(heterocache::drift_check_cuda_workspace(packed.args))},
                at::TensorOptions().dtype(at::kByte).device(device));
  heterocache::drift_check_cuda(packed.args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void refill_copy(const at::Tensor& storage, const at::Tensor& host_blocks, const at::Tensor& host_rows,
                 const at::Tensor& positions, at::TensorList caches, at::TensorList tables, bool k_transposed) {
  TORCH_CHECK(!caches.empty() && caches[0].is_cuda(), "caches must be on a CUDA device");
  const at::Device device = caches[0].device();
  TORCH_CHECK(storage.device() == device || storage.is_pinned(),
              "host-tier storage must be on the caches' device or in pinned host memory (read through UVA)");
  const c10::cuda::CUDAGuard guard(device);
  // index tensors are small: bring them to the device (the kernel reads them there)
  const at::Tensor blocks = host_blocks.to(device), rows = host_rows.to(device), pos = positions.to(device);
  RefillPacked packed = pack_refill(storage, blocks, rows, pos, caches, tables, k_transposed);
  if (packed.args.num_sats == 0 || pos.numel() == 0) return;
  const at::Tensor arrays = arrays_on(packed, device);
  packed.point_at(arrays.data_ptr<int64_t>());
  heterocache::refill_copy_cuda(packed.args, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(heterocache, CUDA, m) {
  m.impl("gather_attention", &gather_attention);
  m.impl("drift_check", &drift_check);
  m.impl("refill_copy", &refill_copy);
}
