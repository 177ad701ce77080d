// torch.library registration of the kernels (namespace "heterocache") and their CPU
// implementations; argument checks and packing are in bindings.h (shared with the CUDA binding,
// cuda/torch_bindings_cuda.cu). Fake (meta) implementations are registered from Python
// (vllm_heterocache/ops/kernels.py).
#include <Python.h>
#include <torch/library.h>

#include "bindings.h"
#include "stage_blocks.h"
#include "window_scores.h"
#include "write_slots.h"

namespace {

using namespace heterocache::binding;

void gather_attention(const at::Tensor& query, at::Tensor& output, at::TensorList caches, at::TensorList tables,
                      const at::Tensor& work, const at::Tensor& fronts, bool k_transposed, double scale) {
  GatherPacked packed = pack_gather(query, output, caches, tables, work, fronts, k_transposed, scale);
  const int64_t* w = work.data_ptr<int64_t>();
  for (int64_t i = 0; i < work.size(0); ++i, w += heterocache::kWorkColumns) {
    TORCH_CHECK(w[7] < 0 || (w[3] >= 0 && w[7] + w[3] <= fronts.numel()), "work item ", i,
                ": its front list runs past fronts");
  }
  heterocache::gather_attention_cpu(packed.args);
}

void drift_check(const at::Tensor& queries, at::TensorList caches, at::TensorList tables, int64_t row, int64_t key_len,
                 int64_t candidates, const at::Tensor& reference, int64_t topk, double threshold, int64_t pool_kernel,
                 bool k_transposed, at::Tensor& drift, at::Tensor& median, at::Tensor& latest_topk,
                 at::Tensor& latest_scores) {
  DriftPacked packed = pack_drift(queries, caches, tables, row, key_len, candidates, reference, topk, threshold,
                                  pool_kernel, k_transposed, drift, median, latest_topk, latest_scores);
  heterocache::drift_check_cpu(packed.args);
}

void refill_copy(const at::Tensor& storage, const at::Tensor& host_blocks, const at::Tensor& host_rows,
                 const at::Tensor& positions, at::TensorList caches, at::TensorList tables, bool k_transposed) {
  RefillPacked packed = pack_refill(storage, host_blocks, host_rows, positions, caches, tables, k_transposed);
  if (packed.args.num_sats == 0 || positions.numel() == 0) return;
  TORCH_CHECK(positions.max().item<int64_t>() < host_blocks.numel() * storage.size(2),
              "positions beyond the host blocks");
  TORCH_CHECK(host_blocks.numel() == 0 || (host_blocks.min().item<int64_t>() >= 0 &&
              host_blocks.max().item<int64_t>() < storage.size(0)), "host_blocks out of range");
  TORCH_CHECK(host_rows.min().item<int64_t>() >= 0 && host_rows.max().item<int64_t>() < storage.size(1),
              "host_rows out of range");
  heterocache::refill_copy_cpu(packed.args);
}

void stage_blocks(const at::Tensor& src, const at::Tensor& blocks, at::Tensor& dst, bool src_k_transposed,
                  bool dst_k_transposed) {
  TORCH_CHECK(src.dim() == 4 && src.size(1) == 1 && src.stride(3) == 1 && src.stride(2) == src.size(3) &&
              src.size(3) % 2 == 0, "src must be a single-head cache [num_blocks, 1, block_size, 2 * D], "
              "contiguous inside a block");
  TORCH_CHECK(dst.dim() == 4 && dst.sizes().slice(1) == src.sizes().slice(1) && dst.stride(3) == 1 &&
              dst.stride(2) == dst.size(3), "dst must be a cache of src's block shape, contiguous inside a block");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type() && (src.element_size() == 2 || src.element_size() == 4),
              "src and dst: one dtype of 16- or 32-bit elements");
  TORCH_CHECK(src.device().is_cpu() && dst.device().is_cpu() && blocks.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 1 && blocks.is_contiguous(),
              "blocks must be contiguous int64 [n]");
  TORCH_CHECK(blocks.numel() <= dst.size(0), "dst must hold one block per entry of blocks");
  TORCH_CHECK(blocks.numel() == 0 || (blocks.min().item<int64_t>() >= 0 &&
              blocks.max().item<int64_t>() < src.size(0)), "blocks out of range");
  heterocache::stage_blocks_cpu(heterocache::StageBlocksArgs{
      static_cast<int64_t>(src.element_size()), src.data_ptr(), src.stride(0), src_k_transposed, dst.data_ptr(),
      dst.stride(0), dst_k_transposed, blocks.data_ptr<int64_t>(), blocks.numel(), src.size(2), src.size(3) / 2});
}

void window_scores(at::Tensor& logits, int64_t window, int64_t pool_kernel, at::Tensor& out) {
  TORCH_CHECK(logits.device().is_cpu() && out.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 3 && logits.is_contiguous(),
              "logits must be contiguous float32 [num_kv_heads, G * W, L]");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous() &&
              out.size(0) == logits.size(0) && out.size(1) == logits.size(2),
              "out must be contiguous float32 [num_kv_heads, L] (logits' heads and L)");
  TORCH_CHECK(window >= 1 && window <= logits.size(2) && logits.size(1) % window == 0,
              "window must be in 1 .. L and divide the rows of a KV head (G * W)");
  TORCH_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "pool_kernel must be odd and >= 1");
  heterocache::window_scores_cpu(heterocache::WindowScoresArgs{
      logits.data_ptr<float>(), out.data_ptr<float>(), logits.size(0), logits.size(1) / window, window,
      logits.size(2), pool_kernel});
}

void write_slots(at::Tensor& cache, const at::Tensor& slots, const at::Tensor& key, const at::Tensor& value,
                 bool k_transposed) {
  TORCH_CHECK(cache.dim() == 4, "cache must be a single-head cache [num_blocks, 1, block_size, 2 * D]");
  const int64_t n = slots.numel(), d = cache.size(3) / 2;
  check_cache(cache, 0, cache.size(2), d, cache.scalar_type(), at::kCPU);
  TORCH_CHECK(cache.element_size() == 2 || cache.element_size() == 4, "cache: 16- or 32-bit elements");
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == d && (t->stride(1) == 1 || d == 1),
                "key and value must be [n, D] (n = slots, D of the cache) with contiguous rows");
    TORCH_CHECK(t->scalar_type() == cache.scalar_type(), "key and value must have the cache's dtype");
    TORCH_CHECK(t->device().is_cpu(), "CPU tensors only");
  }
  TORCH_CHECK(slots.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "slots must be contiguous int64 [n]");
  TORCH_CHECK(n == 0 || slots.max().item<int64_t>() < cache.size(0) * cache.size(2),
              "slots out of range: at most num_blocks * block_size - 1");
  heterocache::write_slots_cpu(heterocache::WriteSlotsArgs{
      static_cast<int64_t>(cache.element_size()), cache.data_ptr(), cache.stride(0), k_transposed, key.data_ptr(),
      key.stride(0), value.data_ptr(), value.stride(0), slots.data_ptr<int64_t>(), n, cache.size(2), d});
}

}  // namespace

TORCH_LIBRARY(heterocache, m) {
  m.def(
      "gather_attention(Tensor query, Tensor(a!) output, Tensor[] caches, Tensor[] tables, Tensor work, "
      "Tensor fronts, bool k_transposed, float scale) -> ()");
  m.def(
      "drift_check(Tensor queries, Tensor[] caches, Tensor[] tables, int row, int key_len, int candidates, "
      "Tensor reference, int topk, float threshold, int pool_kernel, bool k_transposed, Tensor(a!) drift, "
      "Tensor(b!) median, Tensor(c!) latest_topk, Tensor(d!) latest_scores) -> ()");
  m.def(
      "refill_copy(Tensor storage, Tensor host_blocks, Tensor host_rows, Tensor positions, Tensor(a!)[] caches, "
      "Tensor[] tables, bool k_transposed) -> ()");
  m.def("stage_blocks(Tensor src, Tensor blocks, Tensor(a!) dst, bool src_k_transposed, bool dst_k_transposed) -> ()");
  m.def("window_scores(Tensor(a!) logits, int window, int pool_kernel, Tensor(b!) out) -> ()");
  m.def("write_slots(Tensor(a!) cache, Tensor slots, Tensor key, Tensor value, bool k_transposed) -> ()");
}

TORCH_LIBRARY_IMPL(heterocache, CPU, m) {
  m.impl("gather_attention", &gather_attention);
  m.impl("drift_check", &drift_check);
  m.impl("refill_copy", &refill_copy);
  m.impl("stage_blocks", &stage_blocks);
  m.impl("window_scores", &window_scores);
  m.impl("write_slots", &write_slots);
}

// `import vllm_heterocache._C` loads this library (and so the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "HeteroCache kernels: torch.ops.heterocache.*", -1, nullptr};
  return PyModule_Create(&module);
}
