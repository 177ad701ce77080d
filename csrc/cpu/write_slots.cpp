// CPU cache write at slots (contract in csrc/write_slots.h). A token-major row is one memcpy
// (256 B at D 64, float32); a transposed K row is D strided stores. torch's indexed assignment,
// which this replaces for the compressed pools, took about 250 ns a row for a prefill chunk of
// 2K tokens.
#include "../write_slots.h"

#include <omp.h>

#include <cstring>

namespace heterocache {
namespace {

constexpr int64_t kParallelTokens = 512;  // fewer: one thread (a decode step's few rows)

template <typename T>
void write(const WriteSlotsArgs& a) {
  const int64_t bs = a.block_size, D = a.head_size;
  T* cache = static_cast<T*>(a.cache);
  const T* key = static_cast<const T*>(a.key);
  const T* value = static_cast<const T*>(a.value);
#pragma omp parallel for schedule(static) if (a.num_tokens >= kParallelTokens)
  for (int64_t i = 0; i < a.num_tokens; ++i) {
    const int64_t slot = a.slots[i];
    if (slot < 0) continue;
    const int64_t t = slot % bs;
    T* block = cache + (slot / bs) * a.block_stride;
    const T* k = key + i * a.key_stride;
    if (a.k_transposed) {
      for (int64_t d = 0; d < D; ++d) block[d * bs + t] = k[d];
    } else {
      std::memcpy(block + t * D, k, D * sizeof(T));
    }
    std::memcpy(block + bs * D + t * D, value + i * a.value_stride, D * sizeof(T));
  }
}

}  // namespace

void write_slots_cpu(const WriteSlotsArgs& a) {
  if (a.elem_size == 4) {
    write<uint32_t>(a);
  } else {
    write<uint16_t>(a);
  }
}

}  // namespace heterocache
