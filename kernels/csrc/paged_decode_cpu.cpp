// Paged decode attention for the CPU: one new token per sequence, K/V read in place from the paged
// cache through the block table (no gather). The contract is kernels/attention_ref.py's for rows
// with one new token; kernels/paged_decode_cpu.py builds, loads and calls this file.
//
// Layout (strides in elements; the last dimension of every tensor is contiguous):
//   q, out        [N, Hq, D]                     rows q_rows[i] are sequence seq_ids[i]'s token
//   k/v_cache     [num_blocks, block_size, Hkv, D]  token t of sequence b is at block
//                                                   block_tables[b, t / block_size], offset t % block_size
//   block_tables  [B, max_blocks] int32, context_lens [B] int32 (this step's token included)
//
// Work item: one (decode row, KV head). Its `group` query heads (GQA: head h reads KV head
// h / group) are processed together, so every key and value row is loaded once for all of them.
// Keys are visited in tiles of up to kTile tokens, a tile crossing block boundaries as needed; per
// tile the scores of all queries are computed, then the running maximum and sum are rescaled once
// (online softmax) and the tile's values accumulated. Everything is accumulated in float32; a
// bfloat16 or float16 cache is widened row by row as it is read.
//
// Vectors are GCC vector extensions of 16 floats, which the compiler maps to the widest registers
// of the -march level it builds for (the build picks AVX-512, AVX2 or baseline x86-64): plain loops
// with `omp simd` were left mostly scalar and ran 2x slower. Scores are kept in the base-2 domain
// (q pre-multiplied by scale * log2(e)), so the tile's exponentials are a vectorised exp2
// polynomial; libm's expf does not vectorise.
//
// Memory: the rows a sequence reads are scattered over blocks the hardware prefetcher cannot
// predict, and a 32-sequence step reads far more than the caches hold, so the key row
// kPrefetchAhead tokens ahead and the current token's value row are prefetched explicitly (1.7x
// in a single-thread measurement).
//
// Threads: work items sorted by context length, longest first, are taken from an atomic counter by
// the threads of at::parallel_for (torch's own OpenMP pool and thread count), which balances
// sequences of mixed lengths better than static chunks.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kTile = 64;  // tokens per softmax update: the tile's scores stay in L1
constexpr int64_t kLanes = 16;  // floats per vector: one AVX-512 register, two AVX2 ones
constexpr float kLog2e = 1.4426950408889634f;

// GCC vector extensions: the compiler maps them to the widest registers the -march level has, so
// one source serves AVX-512, AVX2 and baseline builds. (Plain loops were left mostly scalar.)
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum(vf v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// 2^x for x <= 0 (a score minus the running maximum), relative error ~1e-7; exactly 0 below -126.
inline vf exp2_nonpositive(vf x) {
  const vf clamped = x < -126.0f ? splat(-126.0f) : x;
  vi xi = __builtin_convertvector(clamped, vi);  // truncates toward 0: floor is one less where x < trunc(x)
  xi += (__builtin_convertvector(xi, vf) > clamped);  // a true comparison is -1
  const vf f = clamped - __builtin_convertvector(xi, vf);  // [0, 1)
  // Least-squares fit of 2^f on [0, 1) at Chebyshev nodes, degree 6.
  vf p = splat(2.1690609e-4f);
  p = p * f + 1.2443082e-3f;
  p = p * f + 9.6784728e-3f;
  p = p * f + 5.5483524e-2f;
  p = p * f + 2.4022980e-1f;
  p = p * f + 6.9314700e-1f;
  p = p * f + 1.0f;
  const vi bits = (xi + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf zero{};
  return x < -126.0f ? zero : p * scale;
}

// Row of head_dim elements -> float32 vectors, in place for a float32 row of whole vectors, else
// widened (bfloat16: the top 16 bits of a float32) or zero-padded into `dst`.
template <typename T>
inline const float* widen_row(const T* src, float* dst, int64_t head_dim, int64_t num_chunks) {
  if constexpr (std::is_same_v<T, float>) {
    if (head_dim == num_chunks * kLanes) return src;
    std::memcpy(dst, src, head_dim * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const int64_t whole = head_dim / kLanes;
    for (int64_t c = 0; c < whole; ++c) {
      vh half;
      std::memcpy(&half, reinterpret_cast<const uint16_t*>(src) + c * kLanes, sizeof(half));
      const vu wide = __builtin_convertvector(half, vu) << 16;
      std::memcpy(dst + c * kLanes, &wide, sizeof(wide));
    }
    for (int64_t d = whole * kLanes; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]);
  }
  return dst;  // its tail past head_dim stays zero (never written; zeroed when the scratch is made)
}

constexpr int64_t kPrefetchAhead = 16; // tokens: enough rows in flight to hide DRAM latency

template <typename T>
inline void prefetch_row(const T* row, int64_t head_dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < head_dim * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 0, 3);
}

struct Shapes {
  int64_t num_heads, num_kv_heads, group, head_dim, num_chunks, block_size, max_blocks;
  int64_t q_row_stride, q_head_stride, out_row_stride, out_head_stride;
  int64_t cache_block_stride, cache_token_stride, cache_head_stride;
  int64_t table_row_stride;
  float scale_log2;
  int64_t sliding_window;  // <= 0: none
};

// Scratch for one work item, reused across the items a thread takes; rows padded to whole vectors.
struct Scratch {
  std::vector<float> q, acc, scores, k_tile, v_tile, max, sum;
  std::vector<const float*> k_rows, v_rows;  // the tile's rows as float32 (in the cache or in *_tile)
  std::vector<int64_t> token_offsets;
  explicit Scratch(const Shapes& s)
      : q(s.group * s.num_chunks * kLanes), acc(s.group * s.num_chunks * kLanes), scores(s.group * kTile),
        k_tile(kTile * s.num_chunks * kLanes), v_tile(kTile * s.num_chunks * kLanes), max(s.group), sum(s.group),
        k_rows(kTile), v_rows(kTile) {}
};

// NC: vectors per head (4 for head_dim 64, 8 for 128) known at compile time, or 0: s.num_chunks.
template <typename QT, typename CT, int NC>
void attend_one(const Shapes& s, Scratch& w, const QT* q_row, QT* out_row, const CT* k_cache,
                const CT* v_cache, const int32_t* table, int64_t context_len, int64_t kv_head) {
  const int64_t group = s.group, head_dim = s.head_dim;
  const int64_t nc = NC > 0 ? NC : s.num_chunks;
  const int64_t padded = nc * kLanes;
  const int64_t first_head = kv_head * group;
  float* q = w.q.data();
  float* acc = w.acc.data();
  float* scores = w.scores.data();
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  for (int64_t i = 0; i < group; ++i) {
    const QT* src = q_row + (first_head + i) * s.q_head_stride;
    for (int64_t d = 0; d < head_dim; ++d) q[i * padded + d] = static_cast<float>(src[d]) * s.scale_log2;
  }
  std::fill(w.max.begin(), w.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.sum.begin(), w.sum.end(), 0.0f);

  const int64_t start = s.sliding_window > 0 ? std::max<int64_t>(0, context_len - s.sliding_window) : 0;
  const int64_t head_offset = kv_head * s.cache_head_stride;
  // Where each visible token's row lives, walking the block table once.
  const int64_t num_visible = context_len - start;
  if (static_cast<int64_t>(w.token_offsets.size()) < num_visible + kPrefetchAhead) {
    w.token_offsets.resize(num_visible + kPrefetchAhead);
  }
  int64_t* offsets = w.token_offsets.data();
  int64_t block_index = start / s.block_size, block_offset = start % s.block_size;
  for (int64_t t = 0; t < num_visible; ++t) {
    offsets[t] = table[block_index] * s.cache_block_stride + block_offset * s.cache_token_stride + head_offset;
    if (++block_offset == s.block_size) {
      block_offset = 0;
      ++block_index;
    }
  }
  for (int64_t t = 0; t < std::min(kPrefetchAhead, num_visible); ++t) prefetch_row(k_cache + offsets[t], head_dim);
  for (int64_t tile_start = 0; tile_start < num_visible; tile_start += kTile) {
    const int64_t n = std::min(kTile, num_visible - tile_start);
    const int64_t* tile_offsets = offsets + tile_start;
    // The tile's rows as float32: in place for a float32 cache of whole vectors, else widened once
    // into scratch (not once per query head).
    for (int64_t t = 0; t < n; ++t) {
      // Rows are scattered over blocks the hardware prefetcher cannot guess: ask for the key
      // kPrefetchAhead tokens on, and this token's value, which the value loop reads.
      if (tile_start + t + kPrefetchAhead < num_visible) prefetch_row(k_cache + tile_offsets[t + kPrefetchAhead], head_dim);
      prefetch_row(v_cache + tile_offsets[t], head_dim);
      w.k_rows[t] = widen_row(k_cache + tile_offsets[t], w.k_tile.data() + t * padded, head_dim, nc);
    }
    // Scores of the tile, [group, kTile] (base 2); lanes past n are -inf and come out of exp2 as 0.
    // Query-outer: q stays in registers and the tile's keys (<= 32 KB) come from L1 after the first head.
    for (int64_t i = 0; i < group; ++i) {
      const float* qi = q + i * padded;
      float* si = scores + i * kTile;
      for (int64_t t = 0; t < n; ++t) {
        const float* k = w.k_rows[t];
        vf dot = load(qi) * load(k);
        for (int64_t c = 1; c < nc; ++c) dot += load(qi + c * kLanes) * load(k + c * kLanes);
        si[t] = hsum(dot);
      }
    }
    // Online softmax: fold the tile into each query's running maximum and sum.
    const int64_t num_vectors = (n + kLanes - 1) / kLanes;
    for (int64_t i = 0; i < group; ++i) {
      float* si = scores + i * kTile;
      for (int64_t t = n; t < num_vectors * kLanes; ++t) si[t] = -std::numeric_limits<float>::infinity();
      vf tile_max = load(si);
      for (int64_t c = 1; c < num_vectors; ++c) {
        const vf v = load(si + c * kLanes);
        tile_max = tile_max > v ? tile_max : v;
      }
      const float new_max = std::max(w.max[i], hmax(tile_max));
      const float correction = std::exp2(w.max[i] - new_max);  // 0 on the first tile (-inf)
      vf tile_sum{};
      for (int64_t c = 0; c < num_vectors; ++c) {
        const vf p = exp2_nonpositive(load(si + c * kLanes) - new_max);
        store(si + c * kLanes, p);
        tile_sum += p;
      }
      w.sum[i] = w.sum[i] * correction + hsum(tile_sum);
      w.max[i] = new_max;
      if (correction != 1.0f) {
        float* ai = acc + i * padded;
        for (int64_t c = 0; c < nc; ++c) store(ai + c * kLanes, load(ai + c * kLanes) * correction);
      }
    }
    // Values: acc[i] += sum_t p[i, t] * v[t]; query-outer again, so acc[i] stays in registers.
    for (int64_t t = 0; t < n; ++t) {
      w.v_rows[t] = widen_row(v_cache + tile_offsets[t], w.v_tile.data() + t * padded, head_dim, nc);
    }
    for (int64_t i = 0; i < group; ++i) {
      const float* si = scores + i * kTile;
      float* ai = acc + i * padded;
      if constexpr (NC > 0) {
        vf a[NC];
        for (int c = 0; c < NC; ++c) a[c] = load(ai + c * kLanes);
        for (int64_t t = 0; t < n; ++t) {
          const vf p = splat(si[t]);
          const float* v = w.v_rows[t];
          for (int c = 0; c < NC; ++c) a[c] += p * load(v + c * kLanes);
        }
        for (int c = 0; c < NC; ++c) store(ai + c * kLanes, a[c]);
      } else {
        for (int64_t t = 0; t < n; ++t) {
          const vf p = splat(si[t]);
          const float* v = w.v_rows[t];
          for (int64_t c = 0; c < nc; ++c) store(ai + c * kLanes, load(ai + c * kLanes) + p * load(v + c * kLanes));
        }
      }
    }
  }
  for (int64_t i = 0; i < group; ++i) {
    const float inv = w.sum[i] > 0.0f ? 1.0f / w.sum[i] : 0.0f;  // an empty context attends to nothing
    QT* dst = out_row + (first_head + i) * s.out_head_stride;
    for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<QT>(acc[i * padded + d] * inv);
  }
}

template <typename QT, typename CT>
void run(const Shapes& s, at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& seq_ids,
         const at::Tensor& q_rows) {
  const int64_t num_rows = seq_ids.size(0);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* seqs = seq_ids.data_ptr<int32_t>();
  const int64_t* rows = q_rows.data_ptr<int64_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const QT* q_data = q.data_ptr<QT>();
  QT* out_data = out.data_ptr<QT>();
  const CT* k_data = k_cache.data_ptr<CT>();
  const CT* v_data = v_cache.data_ptr<CT>();

  // Indices are checked here, once per call (a few hundred reads), not trusted: a bad one would
  // read outside the cache.
  const int64_t num_seqs = context_lens.size(0), num_q_rows = q.size(0), num_cache_blocks = k_cache.size(0);
  TORCH_CHECK(block_tables.size(0) >= num_seqs, "paged_decode: fewer block table rows than context_lens");
  for (int64_t i = 0; i < num_rows; ++i) {
    TORCH_CHECK(seqs[i] >= 0 && seqs[i] < num_seqs, "paged_decode: seq_ids[", i, "] out of range");
    TORCH_CHECK(rows[i] >= 0 && rows[i] < num_q_rows && rows[i] < out.size(0), "paged_decode: q_rows[", i,
                "] out of range");
    const int64_t len = lens[seqs[i]];
    TORCH_CHECK(len >= 0 && len <= s.max_blocks * s.block_size, "paged_decode: context length ", len,
                " exceeds the block table");
    const int32_t* table = tables + seqs[i] * s.table_row_stride;
    const int64_t first_block = s.sliding_window > 0 ? std::max<int64_t>(0, len - s.sliding_window) / s.block_size : 0;
    for (int64_t b = first_block; b < (len + s.block_size - 1) / s.block_size; ++b) {
      TORCH_CHECK(table[b] >= 0 && table[b] < num_cache_blocks, "paged_decode: block id ", table[b],
                  " out of range for sequence ", seqs[i]);
    }
  }

  // Items (row, kv head), longest sequences first.
  std::vector<int64_t> order(num_rows);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lens[seqs[a]] > lens[seqs[b]]; });
  const int64_t num_items = num_rows * s.num_kv_heads;
  std::atomic<int64_t> next{0};
  const int64_t num_workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, num_workers, 1, [&](int64_t, int64_t) {
    Scratch scratch(s);
    for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) {
      const int64_t i = order[item / s.num_kv_heads];
      const int64_t kv_head = item % s.num_kv_heads;
      const int64_t seq = seqs[i];
      const QT* q_row = q_data + rows[i] * s.q_row_stride;
      QT* out_row = out_data + rows[i] * s.out_row_stride;
      const int32_t* table = tables + seq * s.table_row_stride;
      if (s.head_dim == 64) {
        attend_one<QT, CT, 4>(s, scratch, q_row, out_row, k_data, v_data, table, lens[seq], kv_head);
      } else if (s.head_dim == 128) {
        attend_one<QT, CT, 8>(s, scratch, q_row, out_row, k_data, v_data, table, lens[seq], kv_head);
      } else {
        attend_one<QT, CT, 0>(s, scratch, q_row, out_row, k_data, v_data, table, lens[seq], kv_head);
      }
    }
  });
}

void paged_decode(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& seq_ids,
                  const at::Tensor& q_rows, double scale, int64_t sliding_window) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_decode: q/out [N, Hq, D], caches [num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "paged_decode: out and q differ in dtype");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "paged_decode: k_cache and v_cache differ in dtype");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "paged_decode: k_cache and v_cache differ in shape or layout");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1,
              "paged_decode: the head dimension must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  seq_ids.scalar_type() == at::kInt && q_rows.scalar_type() == at::kLong,
              "paged_decode: block_tables, context_lens, seq_ids int32; q_rows int64");
  TORCH_CHECK(block_tables.stride(1) == 1 && context_lens.is_contiguous() && seq_ids.is_contiguous() &&
                  q_rows.is_contiguous(),
              "paged_decode: index tensors must be contiguous");
  TORCH_CHECK(seq_ids.size(0) == q_rows.size(0), "paged_decode: seq_ids and q_rows differ in length");
  Shapes s{};
  s.num_heads = q.size(1);
  s.num_kv_heads = k_cache.size(2);
  s.head_dim = q.size(2);
  TORCH_CHECK(s.num_heads % s.num_kv_heads == 0, "paged_decode: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k_cache.size(3) == s.head_dim && out.size(1) == s.num_heads && out.size(2) == s.head_dim,
              "paged_decode: head counts or head_dim differ between q, out and the cache");
  s.group = s.num_heads / s.num_kv_heads;
  s.num_chunks = (s.head_dim + kLanes - 1) / kLanes;
  s.block_size = k_cache.size(1);
  s.max_blocks = block_tables.size(1);
  s.q_row_stride = q.stride(0);
  s.q_head_stride = q.stride(1);
  s.out_row_stride = out.stride(0);
  s.out_head_stride = out.stride(1);
  s.cache_block_stride = k_cache.stride(0);
  s.cache_token_stride = k_cache.stride(1);
  s.cache_head_stride = k_cache.stride(2);
  s.table_row_stride = block_tables.stride(0);
  s.scale_log2 = static_cast<float>(scale) * kLog2e;
  s.sliding_window = sliding_window;
  if (seq_ids.size(0) == 0) return;

#define TY_DISPATCH_CACHE(QT)                                                                          \
  switch (k_cache.scalar_type()) {                                                                     \
    case at::kFloat: run<QT, float>(s, out, q, k_cache, v_cache, block_tables, context_lens, seq_ids, q_rows); break; \
    case at::kBFloat16: run<QT, c10::BFloat16>(s, out, q, k_cache, v_cache, block_tables, context_lens, seq_ids, q_rows); break; \
    case at::kHalf: run<QT, c10::Half>(s, out, q, k_cache, v_cache, block_tables, context_lens, seq_ids, q_rows); break; \
    default: TORCH_CHECK(false, "paged_decode: cache dtype must be float32, bfloat16 or float16");             \
  }
  switch (q.scalar_type()) {
    case at::kFloat: TY_DISPATCH_CACHE(float); break;
    case at::kBFloat16: TY_DISPATCH_CACHE(c10::BFloat16); break;
    case at::kHalf: TY_DISPATCH_CACHE(c10::Half); break;
    default: TORCH_CHECK(false, "paged_decode: q dtype must be float32, bfloat16 or float16");
  }
#undef TY_DISPATCH_CACHE
}

}  // namespace

// A namespace of its own: TORCH_LIBRARY allows one definition per namespace and process.
TORCH_LIBRARY(tensoryard_decode, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, Tensor seq_ids, Tensor q_rows, float scale, int sliding_window) -> ()");
}

TORCH_LIBRARY_IMPL(tensoryard_decode, CPU, m) { m.impl("paged_decode", &paged_decode); }
