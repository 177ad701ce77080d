// CPU gather-attention (contract in csrc/gather_attention.h).
//
// Work is split into tasks of at most `chunk` positions (a long item, e.g. a full head at 32K,
// becomes several, so that one request still uses every core); each task leaves a partial
// softmax state (running max m, sum l, unnormalized output acc per query head) and a second
// pass merges each item's partials into its output (as flash-decoding's split-K).
// Per block: scores of 16 (or more) tokens x up to 6 queries are held in registers over the head
// dim, reading whole rows of a transposed K region (scores.h); the values are accumulated with
// G x R registers per 8*R-wide slice of the head dim. bf16 / fp16 K and V are converted to
// float32 as they are loaded into registers. Blocks are in scrambled order, so each task lists
// its blocks first and prefetches the next block's K and V lines while the current one is
// computed, one line per step of the inner loops (Prefetcher): with one thread the kernel then
// streams at about the machine's single-core read bandwidth instead of stalling at each block.
// With token-major K, a position list's rows are read where they are (scores.h Rows), only the
// listed ones, and the next segment's listed rows are prefetched the same way, one line of K and
// one of V per step, into L2 (ListPrefetcher): issued all at once, as they were, they outran the
// core's outstanding misses (bench_kernels.py's shared document at 32K: 30-33 instead of 39-45 ns
// per listed position, one thread), and into L1 they evicted the current segment's rows. Tasks
// run by KV head (run()), so requests reading the same shared blocks follow one another while
// those blocks are in cache.
#include "../gather_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "scores.h"
#include "vec.h"

namespace heterocache {
namespace {

constexpr int kMaxGroup = 16;
constexpr int kMaxHeadSize = 256;

// acc[g * kMaxHeadSize + d] += sum_i p[g * bs + i] * v(i)[d] for d in [d0, d0 + 8R) (V token-major,
// elements E::T converted as loaded).
template <class E, int G, int R, class Hook>
inline void accumulate_slice(const float* p, int64_t bs, const Rows<typename E::T>& v, int64_t n, int64_t D,
                             int64_t d0, float* acc, Hook& hook) {
  Hook h = hook;  // a local copy: its state stays in registers over the loop
  __m256 a[G][R];
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) a[g][r] = _mm256_loadu_ps(acc + g * kMaxHeadSize + d0 + 8 * r);
  for (int64_t i = 0; i < n; ++i) {
    h();
    __m256 vv[R];
    const typename E::T* row = v(i);
    for (int r = 0; r < R; ++r) vv[r] = E::load8(row + d0 + 8 * r);
    for (int g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(p[g * bs + i]);
      for (int r = 0; r < R; ++r) a[g][r] = _mm256_fmadd_ps(s, vv[r], a[g][r]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + g * kMaxHeadSize + d0 + 8 * r, a[g][r]);
  hook = h;
}

template <class E, int G, class Hook>
inline void accumulate(const float* p, int64_t bs, const Rows<typename E::T>& v, int64_t n, int64_t D, float* acc,
                       Hook& hook) {
  constexpr int R = G <= 2 ? 4 : (G <= 4 ? 2 : 1);  // at most 8 accumulator registers
  int64_t d0 = 0;
  for (; d0 + 8 * R <= D; d0 += 8 * R) accumulate_slice<E, G, R>(p, bs, v, n, D, d0, acc, hook);
  for (; d0 < D; d0 += 8) accumulate_slice<E, G, 1>(p, bs, v, n, D, d0, acc, hook);  // D % 8 == 0
}

template <class E, class Hook>
void accumulate_any(const float* p, int64_t bs, const Rows<typename E::T>& v, int64_t n, int64_t G, int64_t D,
                    float* acc, Hook& hook) {
  switch (G) {
    case 1: return accumulate<E, 1>(p, bs, v, n, D, acc, hook);
    case 2: return accumulate<E, 2>(p, bs, v, n, D, acc, hook);
    case 3: return accumulate<E, 3>(p, bs, v, n, D, acc, hook);
    case 4: return accumulate<E, 4>(p, bs, v, n, D, acc, hook);
    case 5: return accumulate<E, 5>(p, bs, v, n, D, acc, hook);
    case 6: return accumulate<E, 6>(p, bs, v, n, D, acc, hook);
    case 7: return accumulate<E, 7>(p, bs, v, n, D, acc, hook);
    case 8: return accumulate<E, 8>(p, bs, v, n, D, acc, hook);
    default:
      for (int64_t g0 = 0; g0 < G; g0 += 8) {
        accumulate_any<E>(p + g0 * bs, bs, v, n, std::min<int64_t>(8, G - g0), D, acc + g0 * kMaxHeadSize, hook);
      }
  }
}

// Whether position p is in the block of positions [start, start + bs) (without a division per
// listed position: a list's entries are scanned block by block).
inline bool in_block(int64_t p, int64_t start, int64_t bs) {
  return static_cast<uint64_t>(p - start) < static_cast<uint64_t>(bs);
}

// A task: positions [v0, v1) of item `item`, counted over its two ranges (front, then generated).
struct Task {
  int64_t item, v0, v1;
};

// Partial softmax state of a task, float32: m[G], l[G], acc[G, kMaxHeadSize].
struct Partial {
  float m[kMaxGroup], l[kMaxGroup];
  float acc[kMaxGroup * kMaxHeadSize];
};

template <DType DT>
void run_task(const GatherAttentionArgs& a, const Task& task, Partial& out) {
  using E = Elem<DT>;
  using T = typename E::T;
  const int64_t* w = a.work + kWorkColumns * task.item;
  const int64_t t = w[0], h = w[1], row = w[2], n_front = w[3], gen_start = w[4], front_start = w[6],
                front_list = w[7];
  const int64_t G = a.group, D = a.head_size, bs = a.block_size;
  const T* cache = static_cast<const T*>(a.caches[h]);
  const int32_t* table = a.tables[h] + row * a.table_strides[h];
  const T* qbase = static_cast<const T*>(a.query) + t * a.query_token_stride + h * G * D;

  alignas(32) float q[kMaxGroup][kMaxHeadSize];
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = as_float(qbase + g * D, D, a.dtype, q[g]);
    for (int64_t d = 0; d < D; ++d) q[g][d] = qg[d] * a.scale;
    std::fill(out.acc + g * kMaxHeadSize, out.acc + g * kMaxHeadSize + D, 0.f);
    out.m[g] = -std::numeric_limits<float>::infinity();
    out.l[g] = 0.f;
  }
  thread_local std::vector<float> scores_buf, kbuf;
  if (scores_buf.size() < static_cast<size_t>(G * bs)) scores_buf.resize(G * bs);
  if (kbuf.size() < static_cast<size_t>(D * bs)) kbuf.resize(D * bs);
  float* scores = scores_buf.data();

  // the task's positions as segments of consecutive positions inside one block: its front (a
  // range, or the positions of a list) and its generated range. With K transposed, a list's
  // positions are read in tiles of kTile aligned positions (a K row's cache line): a segment is a
  // run of touched tiles of one block, whose positions not in the list are masked (keep 0). With
  // K token-major, a segment of a list holds exactly its positions in one block (`rows`: their
  // offsets in the block), whose K and V rows are gathered: only the listed tokens are read.
  struct Segment {
    const T* kregion;
    int64_t off, n;
    int64_t keep;  // offset of the segment's keep flags in `keeps` (per position, 1 or 0), -1: all kept
    int64_t rows;  // offset of the segment's n in-block offsets in `listed`, -1: off .. off + n - 1
  };
  constexpr int64_t kTile = 16;
  thread_local std::vector<Segment> segments;
  thread_local std::vector<float> keeps;
  thread_local std::vector<int32_t> listed;
  segments.clear();
  keeps.clear();
  listed.clear();
  const auto add_range = [&](int64_t p, int64_t end) {
    while (p < end) {
      const int64_t off = p % bs, n = std::min(bs - off, end - p);
      segments.push_back({cache + static_cast<int64_t>(table[p / bs]) * a.block_strides[h], off, n, -1, -1});
      p += n;
    }
  };
  const int64_t f0 = std::min(task.v0, n_front), f1 = std::min(task.v1, n_front);
  if (front_list < 0) {
    add_range(front_start + f0, front_start + f1);
  } else if (!a.k_transposed) {
    const int32_t* list = a.fronts + front_list;
    for (int64_t i = f0; i < f1;) {
      const int64_t block = list[i] / bs, start = block * bs;  // the entries in a row of the same block
      int64_t j = i;
      bool consecutive = true;  // (a list need not be sorted: refills rewrite its entries in place)
      for (; j < f1 && in_block(list[j], start, bs); ++j) {
        listed.push_back(static_cast<int32_t>(list[j] - start));
        consecutive = consecutive && (j == i || list[j] == list[j - 1] + 1);
      }
      segments.push_back({cache + static_cast<int64_t>(table[block]) * a.block_strides[h], list[i] - start, j - i, -1,
                          consecutive ? -1 : static_cast<int64_t>(listed.size()) - (j - i)});
      i = j;
    }
  } else {
    const int32_t* list = a.fronts + front_list;
    const int64_t tile = bs % kTile == 0 ? kTile : 1;
    thread_local std::vector<float> flags;
    flags.assign(bs, 0.f);
    for (int64_t i = f0; i < f1;) {
      const int64_t block = list[i] / bs, start = block * bs;  // the entries in a row of the same block
      int64_t j = i;
      for (; j < f1 && in_block(list[j], start, bs); ++j) flags[list[j] - start] = 1.f;
      for (int64_t t0 = 0; t0 < bs; t0 += tile) {  // runs of touched tiles
        const auto touched = [&](int64_t t) {
          return std::any_of(flags.begin() + t, flags.begin() + t + tile, [](float f) { return f != 0.f; });
        };
        if (!touched(t0)) continue;
        int64_t t1 = t0 + tile;
        while (t1 < bs && touched(t1)) t1 += tile;
        segments.push_back({cache + static_cast<int64_t>(table[block]) * a.block_strides[h], t0, t1 - t0,
                            static_cast<int64_t>(keeps.size()), -1});
        keeps.insert(keeps.end(), flags.begin() + t0, flags.begin() + t1);
        t0 = t1 - tile;
      }
      for (int64_t k = i; k < j; ++k) flags[list[k] - start] = 0.f;
      i = j;
    }
  }
  add_range(gen_start + std::max<int64_t>(0, task.v0 - n_front), gen_start + std::max<int64_t>(0, task.v1 - n_front));
  const int64_t num_segments = static_cast<int64_t>(segments.size());
  for (int64_t si = 0; si < num_segments; ++si) {
    const Segment& seg = segments[si];
    const int64_t off = seg.off, n = seg.n;
    const T* kregion = seg.kregion;
    const T* vregion = kregion + bs * D;
    // this segment's scores, softmax update and values, with `pf` prefetching the next segment's
    // K and V meanwhile
    const auto compute = [&](auto& pf) __attribute__((always_inline)) {
      Rows<T> values{vregion + off * D, D};  // V is [bs, D]: the segment's n rows
      if (a.k_transposed) {  // K is [D, bs]
        scores_transposed<E>(&q[0][0], kMaxHeadSize, G, D, kregion + off, bs, n, scores, bs, pf);
      } else {
        // token-major K: the segment's rows, consecutive or gathered; a gathered segment's K
        // (float32) and V rows are read where they are, other K dtypes converted to float32 first
        const int32_t* rows = seg.rows >= 0 ? listed.data() + seg.rows : nullptr;
        Rows<float> keys{nullptr, D};
        if (rows) {
          values = Rows<T>{vregion, D, rows};
          if constexpr (sizeof(T) == 4) {
            keys = Rows<float>{reinterpret_cast<const float*>(kregion), D, rows};
          } else {
            for (int64_t i = 0; i < n; ++i) as_float(kregion + rows[i] * D, D, a.dtype, kbuf.data() + i * D);
            keys.base = kbuf.data();
          }
        } else {
          keys.base = as_float(kregion + off * D, n * D, a.dtype, kbuf.data());
        }
        scores_token_major(&q[0][0], kMaxHeadSize, G, D, keys, n, scores, bs, pf);
      }
      // online softmax: rescale what was accumulated, then add this block's values
      const float* keep = seg.keep < 0 ? nullptr : keeps.data() + seg.keep;
      for (int64_t g = 0; g < G; ++g) {
        float* s = &scores[g * bs];
        const float block_max = keep ? max_of_kept(s, keep, n) : max_of(s, n);
        if (block_max > out.m[g]) {  // a new running max (else the correction would be exp(0) = 1)
          const float correction = std::exp(out.m[g] - block_max);
          if (out.l[g] > 0.f && correction != 1.f) {
            out.l[g] *= correction;
            float* acc = out.acc + g * kMaxHeadSize;
            for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
          }
          out.m[g] = block_max;
        }
        out.l[g] += keep ? exp_shifted_kept(s, keep, n, out.m[g]) : exp_shifted(s, n, out.m[g]);
      }
      accumulate_any<E>(scores, bs, values, n, G, D, out.acc, pf);
      pf.finish();
    };
    const Segment* nx = si + 1 < num_segments ? &segments[si + 1] : nullptr;
    if (nx && nx->rows >= 0) {  // gathered rows next: each listed token's K and V lines
      ListPrefetcher pf{nx->kregion, nx->kregion + bs * D, listed.data() + nx->rows, nx->n,
                        static_cast<int64_t>(D * sizeof(T))};
      compute(pf);
    } else {
      Prefetcher<> pf;  // K: the whole region when transposed (rows of bs), else the segment's tokens
      if (nx) {
        pf.ranges[0] = a.k_transposed ? Range{nx->kregion, nx->kregion + D * bs}
                                      : Range{nx->kregion + nx->off * D, nx->kregion + (nx->off + nx->n) * D};
        pf.ranges[1] = Range{nx->kregion + bs * D + nx->off * D, nx->kregion + bs * D + (nx->off + nx->n) * D};
        pf.start();
      }
      compute(pf);
    }
  }
}

template <typename T>
void merge_item(const GatherAttentionArgs& a, int64_t item, const Partial* parts, int64_t count) {
  const int64_t* w = a.work + kWorkColumns * item;
  const int64_t G = a.group, D = a.head_size;
  T* obase = static_cast<T*>(a.output) + w[0] * a.output_token_stride + w[1] * G * D;
  for (int64_t g = 0; g < G; ++g) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < count; ++c) m = std::max(m, parts[c].m[g]);
    float l = 0.f;
    alignas(32) float acc[kMaxHeadSize] = {};
    for (int64_t c = 0; c < count; ++c) {
      if (parts[c].l[g] == 0.f) continue;
      const float f = std::exp(parts[c].m[g] - m);
      l += parts[c].l[g] * f;
      axpy(f, parts[c].acc + g * kMaxHeadSize, acc, D);
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int64_t d = 0; d < D; ++d) {
      if constexpr (sizeof(T) == 4) {
        obase[g * D + d] = acc[d] * inv;
      } else {
        obase[g * D + d] = from_float(acc[d] * inv, a.dtype);
      }
    }
  }
}

template <DType DT>
void run(const GatherAttentionArgs& a) {
  using T = typename Elem<DT>::T;
  // Tasks: each item cut into chunks of `chunk` positions (a multiple of the block size), sized
  // so that there are about 4 tasks per thread when the work allows it.
  std::vector<int64_t> first(a.num_items + 1, 0);
  int64_t total = 0;
  for (int64_t i = 0; i < a.num_items; ++i) {
    const int64_t* w = a.work + kWorkColumns * i;
    total += w[3] + std::max<int64_t>(0, w[5] - w[4]);
  }
  const int64_t threads = omp_get_max_threads(), bs = a.block_size;
  int64_t chunk = std::max<int64_t>(8 * bs, (total + 4 * threads - 1) / (4 * threads));
  chunk = (chunk + bs - 1) / bs * bs;
  std::vector<Task> tasks;
  for (int64_t i = 0; i < a.num_items; ++i) {
    const int64_t* w = a.work + kWorkColumns * i;
    const int64_t count = w[3] + std::max<int64_t>(0, w[5] - w[4]);
    first[i] = static_cast<int64_t>(tasks.size());
    int64_t v = 0;
    do {
      tasks.push_back({i, v, std::min(count, v + chunk)});
      v += chunk;
    } while (v < count);
  }
  first[a.num_items] = static_cast<int64_t>(tasks.size());
  thread_local std::vector<Partial> partials;
  if (partials.size() < tasks.size()) partials.resize(tasks.size());
  Partial* parts = partials.data();
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  // Run order: by KV head, then by position in the item (the tasks of one item stay in order). The
  // items of one head that read the same blocks (requests reading a shared prefix in place) then
  // run one after another, while those blocks are still in the last-level cache; in item order
  // (each request's heads in turn) the next request would find them evicted by the other heads'.
  thread_local std::vector<int64_t> order;
  order.resize(num_tasks);
  for (int64_t k = 0; k < num_tasks; ++k) order[k] = k;
  const auto head = [&](int64_t k) { return a.work[kWorkColumns * tasks[k].item + 1]; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return head(x) != head(y) ? head(x) < head(y) : tasks[x].v0 < tasks[y].v0;
  });
  const int64_t* ord = order.data();
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < num_tasks; ++k) run_task<DT>(a, tasks[ord[k]], parts[ord[k]]);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < a.num_items; ++i) merge_item<T>(a, i, parts + first[i], first[i + 1] - first[i]);
  }
}

}  // namespace

void gather_attention_cpu(const GatherAttentionArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return run<DType::kFloat32>(a);
    case DType::kBFloat16: return run<DType::kBFloat16>(a);
    case DType::kFloat16: return run<DType::kFloat16>(a);
  }
}

}  // namespace heterocache
