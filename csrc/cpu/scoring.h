// Shared pieces of the routed scoring kernels (sliced_linear_cross_entropy,
// sliced_linear_topk): argument checks, rows grouped by width, and the walk
// over chunks of the item table.
//
// Work is split by item chunk: a chunk's logits for every scored row are
// computed by one thread, one GEMM per block of at most kBlockRows rows of
// one width, into a per-thread [kBlockRows, chunk] tile. Chunks run in
// groups spread over the threads; what a chunk contributes to a row (its max
// and sum of exponentials, its top-k, its part of grad_h) goes to a
// per-chunk slot, and the slots are merged into the running result in chunk
// order after the group. So results depend on chunk_size but not on the
// thread count or on which thread ran which chunk, and memory is bounded by
// the slots of a group (16 MB, or two chunks per thread) plus
// threads * kBlockRows * chunk for the tiles: flat in the number of items.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <vector>

#include "common.h"
#include "cpu/vec_math.h"

namespace canet {
namespace scoring {

// Rows per GEMM block. The forward's tile GEMMs (12800 rows of widths
// 64/96/128 against 12k items, one thread) took the same time within 4% at
// 128, 256 and 512 rows; a [256, 4096] fp32 tile is 4 MB per thread.
constexpr int64_t kBlockRows = 256;

struct Block {
  int64_t r0, r1, w;
};

// The scored rows of one call: h rows in compute precision, grouped into
// runs of equal width (the caller's order when it already is), cut into
// blocks.
struct Rows {
  at::Tensor h;               // [n, D], contiguous
  bool identity = true;       // scored row i is the caller's row i
  std::vector<int64_t> src;   // else: the caller's row of scored row i
  std::vector<int64_t> width; // per scored row
  std::vector<Block> blocks;
  int64_t n() const { return static_cast<int64_t>(width.size()); }
  int64_t orig(int64_t i) const { return identity ? i : src[i]; }
};

// fp32 math for 16-bit inputs.
inline at::ScalarType compute_type(at::ScalarType t) { return acc_type(t); }

inline void check_on(const at::Tensor& t, const at::Tensor& h, const char* op,
                     const char* name) {
  TORCH_CHECK(t.device() == h.device(), "canet.", op, ": ", name, " is on ",
              t.device(), " but h is on ", h.device());
}

inline void check_same(const at::Tensor& t, const at::Tensor& h, const char* op,
                       const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == h.scalar_type(), "canet.", op, ": ",
                   name, " has dtype ", t.scalar_type(), " but h has ",
                   h.scalar_type());
  check_on(t, h, op, name);
  TORCH_CHECK_VALUE(t.sizes() == shape, "canet.", op, ": ", name,
                    " must have shape ", shape, ", got ", t.sizes());
}

inline std::vector<int64_t> host_longs(const at::Tensor& t, const at::Tensor& h,
                                       const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   "canet.", op, ": ", name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  check_on(t, h, op, name);
  auto c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// h [N, D], widths [N], weight [V, >= max width], bias [V]; returns widths.
inline std::vector<int64_t> check_inputs(const char* op, const at::Tensor& h,
                                         const at::Tensor& widths,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         int64_t chunk_size) {
  check_float(h, op, "h");
  TORCH_CHECK_VALUE(h.dim() == 2, "canet.", op,
                    ": h must be rows [N, features], got shape ", h.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "canet.", op,
                    ": weight must be the item table [items, features], got "
                    "shape ", weight.sizes());
  check_same(weight, h, op, "weight", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "canet.", op,
                    ": weight has no items (shape ", weight.sizes(), ")");
  if (bias) check_same(*bias, h, op, "bias", {weight.size(0)});
  TORCH_CHECK_VALUE(chunk_size >= 1, "canet.", op,
                    ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(widths.dim() == 1, "canet.", op,
                    ": widths must be 1-D (one width per row), got shape ",
                    widths.sizes());
  auto w = host_longs(widths, h, op, "widths");
  TORCH_CHECK_VALUE(static_cast<int64_t>(w.size()) == h.size(0), "canet.", op,
                    ": widths has ", w.size(), " entries but h has ", h.size(0),
                    " rows");
  const int64_t max_w = std::min(h.size(1), weight.size(1));
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK_VALUE(w[i] >= 1 && w[i] <= max_w, "canet.", op, ": widths[", i,
                      "] = ", w[i], " is outside [1, ", max_w,
                      "] (the features of h and of weight)");
  }
  return w;
}

// Groups the rows with keep[i] (all when keep is empty) into runs of equal
// width: kept in the caller's order when their widths already form one run
// per width, else stably sorted by width (h gathered once).
inline Rows group_rows(const at::Tensor& h_compute,
                       const std::vector<int64_t>& widths,
                       const std::vector<char>& keep) {
  const int64_t N = static_cast<int64_t>(widths.size());
  std::vector<int64_t> sel;
  sel.reserve(N);
  for (int64_t i = 0; i < N; ++i)
    if (keep.empty() || keep[i]) sel.push_back(i);
  int64_t runs = 0;
  std::vector<int64_t> distinct;
  for (size_t j = 0; j < sel.size(); ++j) {
    const int64_t w = widths[sel[j]];
    if (j == 0 || w != widths[sel[j - 1]]) ++runs;
    distinct.push_back(w);
  }
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  if (runs > static_cast<int64_t>(distinct.size())) {
    std::stable_sort(sel.begin(), sel.end(), [&](int64_t a, int64_t b) {
      return widths[a] < widths[b];
    });
  }
  Rows r;
  const bool identity = static_cast<int64_t>(sel.size()) == N;  // kept order
  const bool sorted_away = runs > static_cast<int64_t>(distinct.size());
  if (identity && !sorted_away) {
    r.h = h_compute;
  } else {
    r.identity = false;
    r.src = sel;
    auto idx = at::tensor(sel, at::TensorOptions().dtype(at::kLong));
    r.h = h_compute.index_select(0, idx);
  }
  r.width.resize(sel.size());
  for (size_t j = 0; j < sel.size(); ++j) r.width[j] = widths[sel[j]];
  const int64_t n = r.n();
  for (int64_t a = 0; a < n;) {
    int64_t b = a;
    while (b < n && r.width[b] == r.width[a]) ++b;
    const int64_t pieces = (b - a + kBlockRows - 1) / kBlockRows;
    for (int64_t p = 0; p < pieces; ++p) {
      r.blocks.push_back({a + (b - a) * p / pieces,
                          a + (b - a) * (p + 1) / pieces, r.width[a]});
    }
    a = b;
  }
  return r;
}

// Items per chunk: chunk_size, but smaller on short tables so that there are
// at least kMinChunks chunks to share among threads (a multiple of 64 items,
// at least 256). A function of the sizes only, not of the thread count: the
// results depend on the chunking.
constexpr int64_t kMinChunks = 16;
inline int64_t chunk_items(int64_t V, int64_t chunk_size) {
  int64_t c = (V + kMinChunks - 1) / kMinChunks;
  c = std::max<int64_t>(256, (c + 63) / 64 * 64);
  return std::max<int64_t>(1, std::min(chunk_size, c));
}

// Chunks per group: all of them when their per-chunk slots (slot_bytes
// each) fit in kSlotBudget, else as many as fit, at least two per thread
// (uneven threads still balance). Fewer groups, fewer thread wake-ups: on a
// busy machine each parallel region can wait for a scheduler tick.
constexpr int64_t kSlotBudget = int64_t(16) << 20;
inline int64_t group_size(int64_t chunks, int64_t slot_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t fit = kSlotBudget / std::max<int64_t>(slot_bytes, 1);
  return std::max<int64_t>(1, std::min(chunks, std::max(fit, 2 * threads)));
}

// Below this many multiply-adds a call runs on the calling thread.
constexpr double kSerialWork = double(1 << 24);

// Runs work(chunk, slot, tile) for every chunk and, after each group of
// `group` chunks, merge(first_chunk, count) on the calling thread. `tile` is
// scratch of tile_elems elements of `opts`, one per running worker, kept for
// the whole call (not reallocated per group).
template <typename Work, typename Merge>
void over_chunks(int64_t chunks, int64_t group, double work_size,
                 int64_t tile_elems, at::TensorOptions opts, const Work& work,
                 const Merge& merge) {
  std::mutex mu;
  std::vector<at::Tensor> pool;
  for (int64_t g0 = 0; g0 < chunks; g0 += group) {
    const int64_t count = std::min(group, chunks - g0);
    auto worker = [&](auto take) {
      at::Tensor tile;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!pool.empty()) {
          tile = pool.back();
          pool.pop_back();
        }
      }
      if (!tile.defined()) tile = at::empty({tile_elems}, opts);
      for (int64_t i = take(); i >= 0; i = take()) work(g0 + i, i, tile);
      std::lock_guard<std::mutex> lock(mu);
      pool.push_back(tile);
    };
    if (work_size < kSerialWork) {
      int64_t next = 0;
      worker([&]() { return next < count ? next++ : int64_t(-1); });
    } else {
      parallel_items(count, worker);
    }
    merge(g0, count);
  }
}

// Multiply-adds of scoring every row of `rows` against V items.
template <typename RowsT>
double scoring_work(const RowsT& rows, int64_t V) {
  double s = 0;
  for (int64_t w : rows.width) s += double(w);
  return s * double(V);
}

// tile[:rows, :cols] as a contiguous [rows, cols] matrix.
inline at::Tensor tile_view(const at::Tensor& tile, int64_t rows,
                            int64_t cols) {
  return tile.narrow(0, 0, rows * cols).view({rows, cols});
}

// logits of one block against items [c0, c0 + cw), without the bias.
inline at::Tensor block_logits(const at::Tensor& tile, const Rows& rows,
                               const Block& b, const at::Tensor& weight,
                               int64_t c0, int64_t cw) {
  auto out = tile_view(tile, b.r1 - b.r0, cw);
  at::mm_out(out, rows.h.narrow(0, b.r0, b.r1 - b.r0).narrow(1, 0, b.w),
             weight.narrow(0, c0, cw).narrow(1, 0, b.w).t());
  return out;
}

// ------------------------------------------------ row math, vectorized ----
// GCC vector types: under `omp simd` the compiler left exp_nonpos scalar in
// these reductions (its bit cast), and the exponentials cost as much as the
// GEMMs then. 16 floats (one AVX-512 register, two AVX2 ones).
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// exp_nonpos (vec_math.h) on 16 floats: x <= 0, relative error ~1e-7.
inline f32x16 exp_nonpos16(f32x16 x) {
  x = x < -87.0f ? f32x16{} - 87.0f : x;
  const f32x16 k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const f32x16 r = x - k * 0.693359375f + k * 2.12194440e-4f;
  f32x16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x16 pow2 = (__builtin_convertvector(k, i32x16) + 127) << 23;
  return p * (f32x16)pow2;
}

// x[c] += b[c] (b may be null); returns max x.
inline float add_bias_max(float* x, const float* b, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  f32x16 m = f32x16{} + ninf;
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    f32x16 v = load16(x + c);
    if (b) {
      v += load16(b + c);
      store16(x + c, v);
    }
    m = v > m ? v : m;
  }
  float out = ninf;
  for (int j = 0; j < 16; ++j) out = std::max(out, m[j]);
  for (; c < n; ++c) {
    if (b) x[c] += b[c];
    out = std::max(out, x[c]);
  }
  return out;
}
inline double add_bias_max(double* x, const double* b, int64_t n) {
  double out = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    if (b) x[c] += b[c];
    out = std::max(out, x[c]);
  }
  return out;
}

// sum_c exp(x[c] - m) for m >= max x.
inline float sum_exp(const float* x, int64_t n, float m) {
  f32x16 s0{}, s1{};
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    s0 += exp_nonpos16(load16(x + c) - m);
    s1 += exp_nonpos16(load16(x + c + 16) - m);
  }
  for (; c + 16 <= n; c += 16) s0 += exp_nonpos16(load16(x + c) - m);
  s0 += s1;
  float out = 0;
  for (int j = 0; j < 16; ++j) out += s0[j];
  for (; c < n; ++c) out += exp_nonpos(std::min(x[c] - m, 0.0f));
  return out;
}
inline double sum_exp(const double* x, int64_t n, double m) {
  double out = 0;
  for (int64_t c = 0; c < n; ++c) out += std::exp(std::min(x[c] - m, 0.0));
  return out;
}

// x[c] = scale * exp(x[c] + b[c] - lse) (b may be null): the softmax, scaled.
inline void scaled_softmax(float* x, const float* b, int64_t n, float lse,
                           float scale) {
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    f32x16 v = load16(x + c) - lse;
    if (b) v += load16(b + c);
    v = v < 0.0f ? v : f32x16{};
    store16(x + c, scale * exp_nonpos16(v));
  }
  for (; c < n; ++c)
    x[c] = scale * exp_nonpos(std::min(x[c] + (b ? b[c] : 0.0f) - lse, 0.0f));
}
inline void scaled_softmax(double* x, const double* b, int64_t n, double lse,
                           double scale) {
  for (int64_t c = 0; c < n; ++c)
    x[c] = scale * std::exp(std::min(x[c] + (b ? b[c] : 0.0) - lse, 0.0));
}

}  // namespace scoring
}  // namespace canet
