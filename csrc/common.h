// Argument checks and the route bookkeeping shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

namespace canet {

// Host copy of a batch's routes: cu[b], cu[b+1] bound sample b's rows.
struct Routes {
  std::vector<int64_t> cu;
  std::vector<int64_t> width;
  int64_t samples() const { return static_cast<int64_t>(width.size()); }
};

// Consecutive samples that share a width: one GEMM each. Sorting a batch by
// route makes these long; an unsorted batch is still correct, only slower.
struct Run {
  int64_t row0, row1, in_w, out_w;
};

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "canet.", op, ": ", name,
                   " must be a floating tensor, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op,
                       const char* name, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "canet.", op, ": ", name,
                   " has dtype ", t.scalar_type(), " but x has ",
                   x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "canet.", op, ": ", name, " is on ",
              t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "canet.", op, ": ", name,
                    " must have shape ", shape, ", got ", t.sizes());
}

inline std::vector<int64_t> host_ints(const at::Tensor& t, const at::Tensor& x,
                                      const char* op, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   "canet.", op, ": ", name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "canet.", op, ": ", name, " is on ",
              t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.dim() == 1, "canet.", op, ": ", name,
                    " must be 1-D, got shape ", t.sizes());
  auto c = t.to(at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// One per-sample width vector: `samples` entries, 1 <= w <= max_width and
// w % multiple == 0.
inline std::vector<int64_t> check_widths(const at::Tensor& widths,
                                         const at::Tensor& x, size_t samples,
                                         int64_t max_width, const char* op,
                                         const char* name, int64_t multiple = 1,
                                         const char* multiple_name = nullptr) {
  auto w = host_ints(widths, x, op, name);
  TORCH_CHECK_VALUE(w.size() == samples, "canet.", op, ": ", name, " has ",
                    w.size(), " entries but cu_seqlens describes ", samples,
                    " samples");
  for (size_t b = 0; b < w.size(); ++b) {
    TORCH_CHECK_VALUE(w[b] >= 1 && w[b] <= max_width, "canet.", op, ": ", name,
                      "[", b, "] = ", w[b], " is outside [1, ", max_width,
                      "] (the weight's width)");
    TORCH_CHECK_VALUE(w[b] % multiple == 0, "canet.", op, ": ", name, "[", b,
                      "] = ", w[b], " is not divisible by ",
                      multiple_name ? multiple_name : "", " = ", multiple);
  }
  return w;
}

// Validates x[T, *], cu_seqlens and one per-sample width vector.
inline Routes check_routes(const at::Tensor& x, const at::Tensor& cu_seqlens,
                           const at::Tensor& widths, int64_t max_width,
                           const char* op, const char* widths_name = "widths",
                           int64_t multiple = 1,
                           const char* multiple_name = nullptr) {
  check_float(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "canet.", op,
                    ": x must be packed tokens [T, features], got shape ",
                    x.sizes());
  Routes r;
  r.cu = host_ints(cu_seqlens, x, op, "cu_seqlens");
  TORCH_CHECK_VALUE(!r.cu.empty() && r.cu[0] == 0, "canet.", op,
                    ": cu_seqlens must start with 0 and have B + 1 entries");
  for (size_t b = 0; b + 1 < r.cu.size(); ++b) {
    TORCH_CHECK_VALUE(r.cu[b + 1] >= r.cu[b], "canet.", op,
                      ": cu_seqlens must be non-decreasing, but cu_seqlens[",
                      b + 1, "] = ", r.cu[b + 1], " < cu_seqlens[", b,
                      "] = ", r.cu[b]);
  }
  TORCH_CHECK_VALUE(r.cu.back() == x.size(0), "canet.", op,
                    ": cu_seqlens ends at ", r.cu.back(), " but x has ",
                    x.size(0), " rows");
  r.width = check_widths(widths, x, r.cu.size() - 1, max_width, op,
                         widths_name, multiple, multiple_name);
  return r;
}

// Runs of consecutive non-empty samples with equal (in, out) widths.
inline std::vector<Run> make_runs(const Routes& r,
                                  const std::vector<int64_t>& out_w) {
  std::vector<Run> runs;
  for (int64_t b = 0; b < r.samples(); ++b) {
    const int64_t s = r.cu[b], e = r.cu[b + 1];
    if (s == e) continue;
    if (!runs.empty() && runs.back().row1 == s && runs.back().in_w == r.width[b] &&
        runs.back().out_w == out_w[b]) {
      runs.back().row1 = e;
    } else {
      runs.push_back({s, e, r.width[b], out_w[b]});
    }
  }
  return runs;
}

inline std::vector<Run> make_runs(const Routes& r) { return make_runs(r, r.width); }

// Rows [run.row0, run.row1) and columns [c0, c1) of a 2-D tensor.
inline at::Tensor block(const at::Tensor& t, const Run& run, int64_t c0,
                        int64_t c1) {
  return t.slice(0, run.row0, run.row1).slice(1, c0, c1);
}

// Gradient accumulators for the shared weights: fp32 for 16-bit inputs.
inline at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace canet

namespace canet {

// out = a @ b (+ bias), written into a view of a larger buffer.
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
}
inline void addmm_into(at::Tensor out, const at::Tensor& bias,
                       const at::Tensor& a, const at::Tensor& b) {
  at::addmm_out(out, bias, a, b);
}

// Whether parallel_items(n, ...) spreads its items over several threads.
inline bool items_in_parallel(int64_t n) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && n >= 2 * threads && !at::in_parallel_region();
}

// Runs `worker(take)` on every thread; `take()` hands out the item indices
// 0 .. n-1 one at a time and then -1, so items of uneven cost balance. The
// ATen calls a worker makes run on the calling thread, with the caller's
// thread-local state (grad mode, inference mode, dispatch keys). With fewer
// than two items per thread, or inside a parallel region already, one worker
// takes every item and each item's own calls use every thread. A worker
// allocates its scratch once, before its first take().
template <typename Worker>
void parallel_items(int64_t n, const Worker& worker) {
  std::atomic<int64_t> next{0};
  auto take = [&]() {
    const int64_t i = next++;
    return i < n ? i : int64_t(-1);
  };
  if (!items_in_parallel(n)) {
    worker(take);
    return;
  }
  const int64_t threads = at::get_num_threads();
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(state);
    worker(take);
  });
}

// Indices 0 .. n-1 by decreasing cost(i): with parallel_items, the largest
// items start first.
template <typename Cost>
std::vector<int64_t> largest_first(int64_t n, const Cost& cost) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  return order;
}

}  // namespace canet
