// CPU refill copies (contract in csrc/refill_copy.h). Single-threaded on purpose: refills run on
// the runtime's refill thread, overlapped with the decode steps that use every core (an OpenMP
// team here would be a second one competing for them). A V row is one memcpy, a K row too unless
// K is transposed (then D strided stores).
#include "../refill_copy.h"

#include <cstring>

namespace heterocache {
namespace {

template <typename T>
void copy_slots(const RefillCopyArgs& a, int64_t s) {
  const int64_t D = a.head_size, bs = a.block_size, hbs = a.host_block_size;
  const T* storage = static_cast<const T*>(a.storage);
  T* cache = static_cast<T*>(a.caches[s]);
  const int64_t* pos = a.positions + s * a.width;
  for (int64_t i = 0; i < a.width; ++i) {
    const int64_t p = pos[i], off = i % bs;
    if (p < 0) continue;  // the slot keeps what it holds
    const T* src = storage + ((a.host_blocks[p / hbs] * a.rows + a.host_rows[s]) * hbs + p % hbs) * 2 * D;
    T* kregion = cache + static_cast<int64_t>(a.tables[s][i / bs]) * a.block_strides[s];
    T* vregion = kregion + bs * D;
    if (a.k_transposed) {
      for (int64_t d = 0; d < D; ++d) kregion[d * bs + off] = src[d];
    } else {
      std::memcpy(kregion + off * D, src, D * sizeof(T));
    }
    std::memcpy(vregion + off * D, src + D, D * sizeof(T));
  }
}

}  // namespace

void refill_copy_cpu(const RefillCopyArgs& a) {
  for (int64_t s = 0; s < a.num_sats; ++s) {
    if (a.elem_size == 4) {
      copy_slots<uint32_t>(a, s);
    } else {
      copy_slots<uint16_t>(a, s);
    }
  }
}

}  // namespace heterocache
