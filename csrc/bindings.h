// Argument checks and packing shared by the CPU and CUDA torch bindings: each pack_* validates
// the tensors of one op and fills its plain-pointer args struct (kernel headers), keeping the
// pointer arrays it points to alive. Torch-facing; the kernel bodies never include it.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "drift_check.h"
#include "gather_attention.h"
#include "refill_copy.h"

namespace heterocache::binding {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "heterocache: unsupported dtype ", t.scalar_type());
  }
}

// The packed args of one call, with the pointer arrays they point to in one int64 buffer
// (caches | block strides | tables | table strides, gather only), so that a CUDA binding copies
// them to the device in one transfer and re-points the args at the copy.
template <typename Args>
struct Packed {
  Args args;
  std::vector<int64_t> words;
  int64_t count = 0;  // caches

  void point_at(const int64_t* base) {
    args.caches = reinterpret_cast<decltype(args.caches)>(base);
    args.block_strides = base + count;
    args.tables = reinterpret_cast<decltype(args.tables)>(base + 2 * count);
    if constexpr (std::is_same_v<Args, GatherAttentionArgs>) args.table_strides = base + 3 * count;
  }
};
using GatherPacked = Packed<GatherAttentionArgs>;
using DriftPacked = Packed<DriftCheckArgs>;
using RefillPacked = Packed<RefillCopyArgs>;

// Cache i: a single-head paged cache [num_blocks, 1, block_size, 2 * D], contiguous inside a
// block (blocks may be padded apart), of the call's dtype and device.
inline void check_cache(const at::Tensor& c, int64_t i, int64_t block_size, int64_t head_size, at::ScalarType dtype,
                        const at::Device& device) {
  TORCH_CHECK(c.dim() == 4 && c.size(1) == 1 && c.size(2) == block_size && c.size(3) == 2 * head_size,
              "cache ", i, " must be [num_blocks, 1, block_size, 2 * head_size]");
  TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == 2 * head_size, "cache ", i, " must be contiguous inside a block");
  TORCH_CHECK(c.scalar_type() == dtype, "cache ", i, " has dtype ", c.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(c.device() == device, "cache ", i, " is on ", c.device(), ", expected ", device);
}

// packed.words <- the caches' base pointers and block strides, then their table rows.
template <typename Args>
void add_caches(Packed<Args>& packed, at::TensorList caches, const std::vector<const int32_t*>& table_rows) {
  packed.count = static_cast<int64_t>(caches.size());
  for (const at::Tensor& c : caches) packed.words.push_back(reinterpret_cast<int64_t>(c.data_ptr()));
  for (const at::Tensor& c : caches) packed.words.push_back(c.stride(0));
  for (const int32_t* t : table_rows) packed.words.push_back(reinterpret_cast<int64_t>(t));
}

inline GatherPacked pack_gather(const at::Tensor& query, at::Tensor& output, at::TensorList caches,
                                at::TensorList tables, const at::Tensor& work, const at::Tensor& fronts,
                                bool k_transposed, double scale) {
  TORCH_CHECK(query.dim() == 3 && output.sizes() == query.sizes(), "query and output must be [T, Hq, D] alike");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query must be contiguous in [Hq, D]");
  TORCH_CHECK(output.stride(2) == 1 && output.stride(1) == output.size(2), "output must be contiguous in [Hq, D]");
  TORCH_CHECK(output.scalar_type() == query.scalar_type(), "output dtype must equal query dtype");
  TORCH_CHECK(work.scalar_type() == at::kLong && work.dim() == 2 && work.size(1) == kWorkColumns &&
                  work.is_contiguous(),
              "work must be contiguous int64 [n, 8]");
  TORCH_CHECK(work.device() == query.device(), "work must be on the query's device");
  TORCH_CHECK(fronts.scalar_type() == at::kInt && fronts.dim() == 1 && fronts.is_contiguous() &&
              fronts.device() == query.device(), "fronts must be contiguous int32 [n] on the query's device");
  const int64_t hkv = static_cast<int64_t>(caches.size());
  TORCH_CHECK(hkv > 0 && static_cast<int64_t>(tables.size()) == hkv, "one cache and one table per KV head");
  TORCH_CHECK(query.size(1) % hkv == 0, "query heads must be a multiple of the KV heads");
  const int64_t group = query.size(1) / hkv, head_size = query.size(2);
  TORCH_CHECK(group <= 16 && head_size <= 256 && head_size % 8 == 0,
              "group <= 16 and head_size <= 256, a multiple of 8, supported");
  const int64_t block_size = caches[0].size(2);
  std::vector<const int32_t*> table_rows;
  for (int64_t h = 0; h < hkv; ++h) {
    check_cache(caches[h], h, block_size, head_size, query.scalar_type(), query.device());
    const at::Tensor& t = tables[h];
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.stride(1) == 1, "table ", h, " must be int32 [rows, n]");
    TORCH_CHECK(t.device() == query.device(), "tables must be on the query's device");
    table_rows.push_back(t.data_ptr<int32_t>());
  }
  GatherPacked out;
  add_caches(out, caches, table_rows);
  for (int64_t h = 0; h < hkv; ++h) out.words.push_back(tables[h].stride(0));
  out.args = GatherAttentionArgs{
      dtype_of(query), query.data_ptr(), output.data_ptr(), query.stride(0), output.stride(0), nullptr, nullptr,
      nullptr, nullptr, work.data_ptr<int64_t>(), fronts.numel() ? fronts.data_ptr<int32_t>() : nullptr,
      work.size(0), group, head_size, block_size, k_transposed,
      static_cast<float>(scale)};
  out.point_at(out.words.data());
  return out;
}

inline DriftPacked pack_drift(const at::Tensor& queries, at::TensorList caches, at::TensorList tables, int64_t row,
                              int64_t key_len, int64_t candidates, const at::Tensor& reference, int64_t topk,
                              double threshold, int64_t pool_kernel, bool k_transposed, at::Tensor& drift,
                              at::Tensor& median, at::Tensor& latest_topk, at::Tensor& latest_scores) {
  TORCH_CHECK(queries.scalar_type() == at::kFloat && queries.dim() == 4 && queries.is_contiguous(),
              "queries must be contiguous float32 [P, N, G, D]");
  const int64_t P = queries.size(0), D = queries.size(3);
  TORCH_CHECK(static_cast<int64_t>(caches.size()) == P && static_cast<int64_t>(tables.size()) == P,
              "one cache and one table per pivot");
  TORCH_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1, "pool_kernel must be odd");
  TORCH_CHECK(reference.scalar_type() == at::kLong && reference.dim() == 2 && reference.size(0) == P &&
              reference.is_contiguous(), "reference must be contiguous int64 [P, K]");
  TORCH_CHECK(drift.scalar_type() == at::kBool && drift.numel() == P && drift.is_contiguous(), "drift: bool [P]");
  TORCH_CHECK(median.scalar_type() == at::kFloat && median.numel() == P && median.is_contiguous(), "median: float [P]");
  TORCH_CHECK(latest_topk.scalar_type() == at::kLong && latest_topk.dim() == 2 && latest_topk.size(0) == P &&
              latest_topk.is_contiguous(), "latest_topk: int64 [P, K]");
  TORCH_CHECK(latest_scores.scalar_type() == at::kFloat && latest_scores.dim() == 2 && latest_scores.size(0) == P &&
              latest_scores.is_contiguous(), "latest_scores: float32 [P, T]");
  const int64_t block_size = P ? caches[0].size(2) : 1;
  std::vector<const int32_t*> table_rows;
  for (int64_t p = 0; p < P; ++p) {
    check_cache(caches[p], p, block_size, D, caches[0].scalar_type(), queries.device());
    const at::Tensor& t = tables[p];
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 2 && t.stride(1) == 1 && row < t.size(0) &&
                (key_len + block_size - 1) / block_size <= t.size(1), "table ", p, " must be int32 [rows, n] covering key_len");
    TORCH_CHECK(t.device() == queries.device(), "tables must be on the queries' device");
    table_rows.push_back(t.data_ptr<int32_t>() + row * t.stride(0));
  }
  DriftPacked out;
  add_caches(out, caches, table_rows);
  out.args = DriftCheckArgs{
      P ? dtype_of(caches[0]) : DType::kFloat32, queries.data_ptr<float>(), nullptr, nullptr, nullptr, P,
      queries.size(1), queries.size(2), D, block_size, k_transposed, key_len, candidates, topk, pool_kernel,
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))), static_cast<float>(threshold),
      reference.data_ptr<int64_t>(), reference.size(1), drift.data_ptr<bool>(), median.data_ptr<float>(),
      latest_topk.data_ptr<int64_t>(), latest_topk.size(1), latest_scores.data_ptr<float>(), latest_scores.size(1)};
  out.point_at(out.words.data());
  return out;
}

// Checks that read values (positions, blocks and rows in range) are left to the caller of a
// CUDA kernel; on CPU they are done here.
inline RefillPacked pack_refill(const at::Tensor& storage, const at::Tensor& host_blocks, const at::Tensor& host_rows,
                                const at::Tensor& positions, at::TensorList caches, at::TensorList tables,
                                bool k_transposed) {
  TORCH_CHECK(storage.dim() == 5 && storage.size(3) == 2 && storage.is_contiguous(),
              "storage must be contiguous [num_blocks, rows, block_size, 2, D]");
  const int64_t D = storage.size(4), hbs = storage.size(2), S = static_cast<int64_t>(caches.size());
  TORCH_CHECK(storage.element_size() == 2 || storage.element_size() == 4, "storage: 16- or 32-bit elements");
  TORCH_CHECK(host_blocks.scalar_type() == at::kLong && host_blocks.dim() == 1 && host_blocks.is_contiguous(),
              "host_blocks must be contiguous int64 [n]");
  TORCH_CHECK(host_rows.scalar_type() == at::kLong && host_rows.numel() == S && host_rows.is_contiguous(),
              "host_rows must be contiguous int64 [S], one per cache");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == S &&
              positions.is_contiguous(), "positions must be contiguous int64 [S, width]");
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == S, "one table per cache");
  const int64_t block_size = S ? caches[0].size(2) : 1;
  std::vector<const int32_t*> table_rows;
  for (int64_t s = 0; s < S; ++s) {
    check_cache(caches[s], s, block_size, D, storage.scalar_type(), caches[0].device());
    const at::Tensor& t = tables[s];
    TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(), "table ", s, " must be int32 [n]");
    TORCH_CHECK(t.device() == caches[0].device(), "table ", s, " must be on the caches' device");
    TORCH_CHECK(positions.size(1) <= t.size(0) * block_size, "table ", s, " must cover the slots written");
    table_rows.push_back(t.data_ptr<int32_t>());
  }
  RefillPacked out;
  add_caches(out, caches, table_rows);
  out.args = RefillCopyArgs{static_cast<int64_t>(storage.element_size()), storage.data_ptr(), storage.size(1), hbs, D,
                            host_blocks.data_ptr<int64_t>(), S, host_rows.data_ptr<int64_t>(),
                            positions.data_ptr<int64_t>(), positions.size(1), nullptr, nullptr, nullptr, block_size,
                            k_transposed};
  out.point_at(out.words.data());
  return out;
}

}  // namespace heterocache::binding
