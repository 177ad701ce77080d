// torch.library registration of the kernels (namespace "heterocache"); the only file that sees
// torch. Fake (meta) implementations are registered from Python (vllm_heterocache/ops/kernels.py).
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "gather_attention.h"

namespace {

heterocache::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return heterocache::DType::kFloat32;
    case at::kBFloat16: return heterocache::DType::kBFloat16;
    case at::kHalf: return heterocache::DType::kFloat16;
    default: TORCH_CHECK(false, "heterocache::gather_attention: unsupported dtype ", t.scalar_type());
  }
}

void gather_attention(const at::Tensor& query, at::Tensor& output, at::TensorList caches, at::TensorList tables,
                      const at::Tensor& work, bool k_transposed, double scale) {
  TORCH_CHECK(query.dim() == 3 && output.sizes() == query.sizes(), "query and output must be [T, Hq, D] alike");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query must be contiguous in [Hq, D]");
  TORCH_CHECK(output.stride(2) == 1 && output.stride(1) == output.size(2), "output must be contiguous in [Hq, D]");
  TORCH_CHECK(output.scalar_type() == query.scalar_type(), "output dtype must equal query dtype");
  TORCH_CHECK(work.scalar_type() == at::kLong && work.dim() == 2 && work.size(1) == 6 && work.is_contiguous(),
              "work must be contiguous int64 [n, 6]");
  const int64_t hkv = static_cast<int64_t>(caches.size());
  TORCH_CHECK(hkv > 0 && static_cast<int64_t>(tables.size()) == hkv, "one cache and one table per KV head");
  TORCH_CHECK(query.size(1) % hkv == 0, "query heads must be a multiple of the KV heads");
  const int64_t group = query.size(1) / hkv, head_size = query.size(2);
  TORCH_CHECK(group <= 16 && head_size <= 256, "group <= 16 and head_size <= 256 supported");
  const int64_t block_size = caches[0].size(2);
  std::vector<const void*> cache_ptrs(hkv);
  std::vector<int64_t> block_strides(hkv), table_strides(hkv);
  std::vector<const int32_t*> table_ptrs(hkv);
  for (int64_t h = 0; h < hkv; ++h) {
    const at::Tensor& c = caches[h];
    TORCH_CHECK(c.dim() == 4 && c.size(1) == 1 && c.size(2) == block_size && c.size(3) == 2 * head_size,
                "cache ", h, " must be [num_blocks, 1, block_size, 2 * head_size]");
    TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == 2 * head_size, "cache ", h, " must be contiguous inside a block");
    TORCH_CHECK(c.scalar_type() == query.scalar_type(), "cache dtype must equal query dtype");
    const at::Tensor& t = tables[h];
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.stride(1) == 1, "table ", h, " must be int32 [rows, n]");
    cache_ptrs[h] = c.data_ptr();
    block_strides[h] = c.stride(0);
    table_ptrs[h] = t.data_ptr<int32_t>();
    table_strides[h] = t.stride(0);
  }
  heterocache::GatherAttentionArgs args{
      dtype_of(query), query.data_ptr(), output.data_ptr(), query.stride(0), output.stride(0), cache_ptrs.data(),
      block_strides.data(), table_ptrs.data(), table_strides.data(), work.data_ptr<int64_t>(), work.size(0),
      group, head_size, block_size, k_transposed, static_cast<float>(scale)};
  heterocache::gather_attention_cpu(args);
}

}  // namespace

TORCH_LIBRARY(heterocache, m) {
  m.def(
      "gather_attention(Tensor query, Tensor(a!) output, Tensor[] caches, Tensor[] tables, Tensor work, "
      "bool k_transposed, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(heterocache, CPU, m) { m.impl("gather_attention", &gather_attention); }

// `import vllm_heterocache._C` loads this library (and so the registrations above).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "HeteroCache kernels: torch.ops.heterocache.*", -1, nullptr};
  return PyModule_Create(&module);
}
