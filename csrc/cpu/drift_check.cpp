// CPU drift detection (contract in csrc/drift_check.h), in two OpenMP phases so that a single
// pivot with a long context still uses every core:
//   1. logits of all N*G buffered queries, one task per (pivot, key block), register-blocked
//      (scores.h), with the next block's keys prefetched meanwhile (the blocks are in scrambled
//      order); each task also leaves its per-query maxima, so the softmax needs no pass for them;
//   2. one task per (pivot, step): exp(x - max) of the step's G rows and their sums, into a
//      thread-local scratch that stays in cache from step to step; pooling, normalization and
//      the GQA max in one pass over those rows; then the top-K and the overlap. The top-K finds
//      the K-th largest score from a histogram of order-preserving keys of the float bits (the
//      bucket holding the K-th, then a selection among that bucket's scores only) and takes the
//      positions in one ascending vectorized pass, so they come out sorted; the overlap counts
//      marked reference positions.
// No score's arithmetic depends on the thread count (each logit sums over d in order, each
// softmax denominator is one row's sum), so neither do the results.
// Buffers are thread-local and reused across calls (no page faults per call).
#include "../drift_check.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "scores.h"
#include "vec.h"

namespace heterocache {
namespace {

template <typename V>
V& grown(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v;
}

template <typename T>
const T* block_keys(const DriftCheckArgs& a, int64_t p, int64_t b) {
  return static_cast<const T*>(a.caches[p]) + static_cast<int64_t>(a.tables[p][b]) * a.block_strides[p];
}

// logits[(p*Q + i) * L + t] for the token range of block b of pivot p, and bmax[(p*B + b)*Q + i]
// their maximum over the block (B blocks per pivot, Q = N*G queries); prefetches the keys of
// block b + 1 of the pivot meanwhile.
template <DType DT>
void block_logits(const DriftCheckArgs& a, const float* qs, int64_t p, int64_t b, float* logits, float* bmax) {
  using T = typename Elem<DT>::T;
  thread_local std::vector<float> kbuf;
  const int64_t Q = a.steps * a.group, D = a.head_size, bs = a.block_size, L = a.key_len;
  const int64_t B = (L + bs - 1) / bs;
  const int64_t start = b * bs, n = std::min(bs, L - start);
  const T* kregion = block_keys<T>(a, p, b);
  float* out = logits + p * Q * L + start;
  const float* q = qs + p * Q * D;
  // into L2: a block's keys (32 KiB at 128 x 64 floats) would evict from a 32 KiB L1 the current
  // block's, which every group of queries reads in turn (scores.h); 16 checks of 32K keys, each
  // from memory, one thread: 2.0-2.6 instead of 2.3-2.7 ms a check (medians 2.08 and 2.49)
  Prefetcher<_MM_HINT_T1> pf;
  if (b + 1 < B) {
    const T* next = block_keys<T>(a, p, b + 1);
    const int64_t next_n = std::min(bs, L - (b + 1) * bs);
    pf.ranges[0] = Range{next, next + (a.k_transposed ? D * bs : next_n * D)};
    pf.start();
  }
  if (a.k_transposed) {  // [D, bs]
    scores_transposed<Elem<DT>>(q, D, Q, D, kregion, bs, n, out, L, pf);
  } else {  // [bs, D]
    const float* k = as_float(kregion, n * D, a.dtype, grown(kbuf, D * bs).data());
    scores_token_major(q, D, Q, D, k, n, out, L, pf);
  }
  pf.finish();
  for (int64_t i = 0; i < Q; ++i) bmax[(p * B + b) * Q + i] = max_of(out + i * L, n);
}

// Order-preserving uint32 keys of float32 values: a < b as floats <=> key(a) < key(b), and
// -0 and +0 both get +0's key (so equal floats have equal keys); NaN, which no score is, sorts
// outside [-inf, +inf].
inline uint32_t order_key(float f) {
  f += 0.f;  // -0 -> +0
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
}
inline __m256i order_key8(__m256 f) {
  const __m256i b = _mm256_castps_si256(_mm256_add_ps(f, _mm256_setzero_ps()));
  return _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32(INT32_MIN)));
}

// top[0..K) = ascending positions of the K highest s[t], t < C (ties: lower t first); K <= C.
void topk_ascending(const float* s, int64_t C, int64_t K, int64_t* top) {
  if (K <= 0) return;
  // 1. the range of the keys
  __m256i vlo = _mm256_set1_epi32(-1), vhi = _mm256_setzero_si256();
  int64_t t = 0;
  for (; t + 8 <= C; t += 8) {
    const __m256i k = order_key8(_mm256_loadu_ps(s + t));
    vlo = _mm256_min_epu32(vlo, k);
    vhi = _mm256_max_epu32(vhi, k);
  }
  alignas(32) uint32_t lo_l[8], hi_l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lo_l), vlo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(hi_l), vhi);
  uint32_t lo = *std::min_element(lo_l, lo_l + 8), hi = *std::max_element(hi_l, hi_l + 8);
  for (; t < C; ++t) {
    lo = std::min(lo, order_key(s[t]));
    hi = std::max(hi, order_key(s[t]));
  }
  // 2. a histogram of (key - lo) >> shift over kBuckets buckets (bucket numbers computed 8 at a
  // time; four sub-histograms, so that runs of equal buckets do not serialize on one counter);
  // the bucket of the K-th largest
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  int shift = 0;
  while (((hi - lo) >> shift) >= static_cast<uint32_t>(kBuckets)) ++shift;
  const __m128i vshift = _mm_cvtsi32_si128(shift);
  const __m256i vlo_key = _mm256_set1_epi32(static_cast<int32_t>(lo));
  auto bucket8 = [&](int64_t at) {
    return _mm256_srl_epi32(_mm256_sub_epi32(order_key8(_mm256_loadu_ps(s + at)), vlo_key), vshift);
  };
  thread_local std::vector<int32_t> hist_buf;
  int32_t* hist = grown(hist_buf, 4 * kBuckets).data();
  std::fill(hist, hist + 4 * kBuckets, 0);
  alignas(32) uint32_t idx[8];
  t = 0;
  for (; t + 8 <= C; t += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), bucket8(t));
    for (int j = 0; j < 8; ++j) ++hist[(j & 3) * kBuckets + idx[j]];
  }
  for (; t < C; ++t) ++hist[(order_key(s[t]) - lo) >> shift];
  int64_t above = 0;  // scores in buckets above `bucket`
  uint32_t bucket = kBuckets - 1;
  int64_t in_bucket = 0;
  for (;; --bucket) {
    in_bucket = hist[bucket] + hist[kBuckets + bucket] + hist[2 * kBuckets + bucket] + hist[3 * kBuckets + bucket];
    if (above + in_bucket >= K || bucket == 0) break;
    above += in_bucket;
  }
  // 3. the K-th largest: the (K - above)-th largest key of that bucket
  thread_local std::vector<uint32_t> cand_buf;
  uint32_t* cand = grown(cand_buf, in_bucket).data();
  int64_t m = 0;
  const __m256i vbucket = _mm256_set1_epi32(static_cast<int32_t>(bucket));
  for (t = 0; t + 8 <= C; t += 8) {
    uint32_t hit = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(bucket8(t), vbucket)));
    while (hit) {
      cand[m++] = order_key(s[t + __builtin_ctz(hit)]);
      hit &= hit - 1;
    }
  }
  for (; t < C; ++t) {
    const uint32_t k = order_key(s[t]);
    if (((k - lo) >> shift) == bucket) cand[m++] = k;
  }
  const int64_t need = K - above;  // 1 <= need <= m
  std::nth_element(cand, cand + need - 1, cand + m, std::greater<uint32_t>());
  const uint32_t kth = cand[need - 1];
  int64_t greater = above;
  for (int64_t i = 0; i < m; ++i) greater += cand[i] > kth;
  // 4. ascending positions: keys above the K-th, and the first K - greater equal to it
  int64_t ties = K - greater, k = 0;
  const __m256i vkth = _mm256_set1_epi32(static_cast<int32_t>(kth ^ 0x80000000u));  // signed compare
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);
  for (t = 0; t + 8 <= C && k < K; t += 8) {
    const __m256i key = _mm256_xor_si256(order_key8(_mm256_loadu_ps(s + t)), flip);
    const __m256i gt = _mm256_cmpgt_epi32(key, vkth), eq = _mm256_cmpeq_epi32(key, vkth);
    const uint32_t mgt = _mm256_movemask_ps(_mm256_castsi256_ps(gt));
    uint32_t sel = mgt | static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(eq)));
    while (sel) {
      const int j = __builtin_ctz(sel);
      sel &= sel - 1;
      if ((mgt >> j) & 1) {
        top[k++] = t + j;
      } else if (ties > 0) {
        --ties;
        top[k++] = t + j;
      }
    }
  }
  for (; t < C && k < K; ++t) {
    const uint32_t key = order_key(s[t]);
    if (key > kth || (key == kth && ties-- > 0)) top[k++] = t;
  }
}

// y[t] = max_g avg_pool(x_g)[t] * inv[g] over the G rows x_g = x + g * x_stride (odd kernel
// 2r + 1, zero padding not counted). Interior positions sum their windows 8 at a time (G and r
// fixed at compile time where they are small, else kG = kR = 0: read at run time); the r
// positions at each end divide by their count.
template <int kG, int kR>
void pool_max(const float* x, int64_t x_stride, int64_t G_, int64_t L, int64_t r_, const float* inv, float* y) {
  const int64_t G = kG > 0 ? kG : G_, r = kG > 0 ? kR : r_, kernel = 2 * r + 1;
  const int64_t lo_end = std::min(r, L), hi_start = std::max(lo_end, L - r);
  auto edge = [&](int64_t u) {
    const int64_t lo = std::max<int64_t>(0, u - r), hi = std::min<int64_t>(L, u + r + 1);
    float best = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * x_stride;
      float sum = 0.f;
      for (int64_t j = lo; j < hi; ++j) sum += xg[j];
      const float v = sum * inv[g] / static_cast<float>(hi - lo);
      best = g == 0 ? v : std::max(best, v);
    }
    y[u] = best;
  };
  for (int64_t u = 0; u < lo_end; ++u) edge(u);
  int64_t t = lo_end;
  std::vector<float> w(G);  // interior weights inv[g] / kernel
  for (int64_t g = 0; g < G; ++g) w[g] = inv[g] / static_cast<float>(kernel);
  for (; t + 8 <= hi_start; t += 8) {
    __m256 best = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * x_stride + t;
      __m256 acc = _mm256_loadu_ps(xg - r);
      for (int64_t j = 1 - r; j <= r; ++j) acc = _mm256_add_ps(acc, _mm256_loadu_ps(xg + j));
      acc = _mm256_mul_ps(acc, _mm256_broadcast_ss(&w[g]));
      best = g == 0 ? acc : _mm256_max_ps(best, acc);
    }
    _mm256_storeu_ps(y + t, best);
  }
  for (; t < hi_start; ++t) edge(t);
  for (int64_t u = hi_start; u < L; ++u) edge(u);
}

void pool_max_any(const float* x, int64_t x_stride, int64_t G, int64_t L, int64_t kernel, const float* inv,
                  float* y) {
  const int64_t r = kernel / 2;
#define HC_POOL_CASE(g, rr) \
  if (G == g && r == rr) return pool_max<g, rr>(x, x_stride, G, L, r, inv, y);
  HC_POOL_CASE(1, 2) HC_POOL_CASE(2, 2) HC_POOL_CASE(4, 2) HC_POOL_CASE(8, 2)
  HC_POOL_CASE(1, 1) HC_POOL_CASE(2, 1) HC_POOL_CASE(4, 1) HC_POOL_CASE(8, 1)
#undef HC_POOL_CASE
  pool_max<0, 0>(x, x_stride, G, L, r, inv, y);
}

template <DType DT>
void run(const DriftCheckArgs& a) {
  const int64_t P = a.num_pivots, N = a.steps, G = a.group, Q = N * G, D = a.head_size, L = a.key_len;
  const int64_t C = std::min(a.candidates, L), K = std::max<int64_t>(0, std::min(a.topk, C));
  const int64_t blocks = (L + a.block_size - 1) / a.block_size;
  thread_local std::vector<float> qbuf, lbuf, obuf, mbuf_max;
  thread_local std::vector<uint8_t> mbuf;
  float* qs = grown(qbuf, P * Q * D).data();
  float* logits = grown(lbuf, P * Q * L).data();
  float* bmax = grown(mbuf_max, P * blocks * Q).data();
  float* overlaps = grown(obuf, P * N).data();
  uint8_t* marks = grown(mbuf, P * C).data();  // reference positions < C
  for (int64_t i = 0; i < P * Q * D; ++i) qs[i] = a.queries[i] * a.scale;
  std::fill(marks, marks + P * C, 0);
  std::vector<int64_t> ref_sizes(P, 0);  // valid (>= 0) reference entries per pivot
  for (int64_t p = 0; p < P; ++p) {
    const int64_t* ref = a.reference + p * a.reference_width;
    for (int64_t i = 0; i < a.reference_width; ++i) {
      ref_sizes[p] += ref[i] >= 0;
      if (ref[i] >= 0 && ref[i] < C) marks[p * C + ref[i]] = 1;
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    float* out_scores = a.latest_scores + p * a.scores_width;
    std::fill(out_scores + std::min(L, a.scores_width), out_scores + a.scores_width, 0.f);
  }
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < P * blocks; ++i) block_logits<DT>(a, qs, i / blocks, i % blocks, logits, bmax);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < P * N; ++i) {
      const int64_t p = i / N, n = i % N;
      thread_local std::vector<float> ebuf, sbuf;
      thread_local std::vector<int64_t> topbuf;
      // softmax numerators of the step's G query heads (into a scratch that stays in cache across
      // steps), then the scores: pooled, normalized, max over the G heads
      float* e = grown(ebuf, G * L).data();
      std::vector<float> invs(G);  // 1 / softmax denominators
      for (int64_t g = 0; g < G; ++g) {
        const int64_t qi = n * G + g;
        float m = -INFINITY;
        for (int64_t b = 0; b < blocks; ++b) m = std::max(m, bmax[(p * blocks + b) * Q + qi]);
        invs[g] = L > 0 ? 1.f / exp_shifted(logits + (p * Q + qi) * L, e + g * L, L, m) : 0.f;
      }
      float* latest_scores = a.latest_scores + p * a.scores_width;
      float* s = n == N - 1 && a.scores_width >= L ? latest_scores : grown(sbuf, L).data();
      if (L > 0) pool_max_any(e, L, G, L, a.pool_kernel, invs.data(), s);
      if (n == N - 1 && s != latest_scores) std::copy(s, s + std::min(L, a.scores_width), latest_scores);
      int64_t* top = grown(topbuf, K).data();
      topk_ascending(s, C, K, top);
      int64_t hits = 0;
      for (int64_t k = 0; k < K; ++k) hits += marks[p * C + top[k]];
      const int64_t smaller = std::min(K, ref_sizes[p]);
      overlaps[i] = smaller > 0 ? static_cast<float>(hits) / static_cast<float>(smaller) : 1.f;
      if (n == N - 1) {
        int64_t* latest = a.latest_topk + p * a.topk_width;
        std::fill(latest, latest + a.topk_width, -1);
        std::copy(top, top + std::min(K, a.topk_width), latest);
      }
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    float* o = overlaps + p * N;
    std::sort(o, o + N);
    const float med = (o[(N - 1) / 2] + o[N / 2]) / 2.f;
    a.median[p] = med;
    a.drift[p] = med < a.threshold;
  }
}

}  // namespace

void drift_check_cpu(const DriftCheckArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return run<DType::kFloat32>(a);
    case DType::kBFloat16: return run<DType::kBFloat16>(a);
    case DType::kFloat16: return run<DType::kFloat16>(a);
  }
}

}  // namespace heterocache
