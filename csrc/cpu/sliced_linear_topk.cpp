// sliced_linear_topk on the CPU: the k best items of each row over the item
// table without the [rows, items] score tensor (see scoring.h for the chunk
// walk). Each chunk's thread keeps, per row, a sorted list of the chunk's k
// best (score descending, index ascending); the lists are merged into the
// running top-k in chunk order. Most scores lose against the running k-th
// best: they are skipped 16 at a time after one vectorized max.
#include <torch/library.h>

#include <cmath>

#include "cpu/scoring.h"

namespace canet {
namespace {

using scoring::Block;
using scoring::Rows;

constexpr const char* kOp = "sliced_linear_topk";
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // empty slot

// (v, i) before (v2, i2) in the result's order.
template <typename T>
inline bool before(T v, int64_t i, T v2, int64_t i2) {
  return v > v2 || (v == v2 && i < i2);
}

// The k best of x[0, cw) (item ids c0 + c, scanned in order) into v/id,
// best first; empty slots (cw < k) get (-inf, kNone).
template <typename T>
void chunk_topk(const T* x, int64_t cw, int64_t c0, int64_t k, T* v,
                int64_t* id) {
  const T ninf = -std::numeric_limits<T>::infinity();
  int64_t cnt = 0;
  auto push = [&](T val, int64_t item) {
    // a later item never goes before an equal score: strict comparison
    int64_t pos = cnt < k ? cnt++ : k - 1;
    while (pos > 0 && val > v[pos - 1]) {
      v[pos] = v[pos - 1];
      id[pos] = id[pos - 1];
      --pos;
    }
    v[pos] = val;
    id[pos] = item;
  };
  constexpr int64_t kStep = 16;
  int64_t c = 0;
  for (; c < cw && cnt < k; ++c) push(x[c], c0 + c);
  for (; c + kStep <= cw; c += kStep) {
    T m = ninf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < kStep; ++j) m = std::max(m, x[c + j]);
    if (!(m > v[k - 1])) continue;
    for (int64_t j = 0; j < kStep; ++j)
      if (x[c + j] > v[k - 1]) push(x[c + j], c0 + c + j);
  }
  for (; c < cw; ++c)
    if (x[c] > v[k - 1]) push(x[c], c0 + c);
  for (int64_t j = cnt; j < k; ++j) {
    v[j] = ninf;
    id[j] = kNone;
  }
}

// run = the k best of run and part (both in the result's order).
template <typename T>
void merge_lists(T* rv, int64_t* ri, const T* pv, const int64_t* pi, int64_t k,
                 T* tv, int64_t* ti) {
  int64_t a = 0, b = 0;
  for (int64_t o = 0; o < k; ++o) {
    if (before(rv[a], ri[a], pv[b], pi[b])) {
      tv[o] = rv[a];
      ti[o] = ri[a++];
    } else {
      tv[o] = pv[b];
      ti[o] = pi[b++];
    }
  }
  std::copy(tv, tv + k, rv);
  std::copy(ti, ti + k, ri);
}

template <typename T>
void topk_rows(const Rows& rows, const at::Tensor& weight, const T* bias,
               int64_t V, int64_t C, int64_t k,
               const std::vector<int64_t>& excl, int64_t excl_rows,
               int64_t excl_cols, T* out_v, int64_t* out_i) {
  const int64_t n = rows.n();
  const int64_t chunks = (V + C - 1) / C;  // C from scoring::chunk_items
  const int64_t group =
      scoring::group_size(chunks, n * k * (sizeof(T) + sizeof(int64_t)));
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<T> rv(n * k, ninf), pv(group * n * k);
  std::vector<int64_t> ri(n * k, kNone), pi(group * n * k);
  auto work = [&](int64_t chunk, int64_t slot, at::Tensor& tile) {
    const int64_t c0 = chunk * C, cw = std::min(C, V - c0);
    const T* bc = bias ? bias + c0 : nullptr;
    for (const Block& b : rows.blocks) {
      auto lg = scoring::block_logits(tile, rows, b, weight, c0, cw);
      T* x = lg.data_ptr<T>();
      for (int64_t r = b.r0; r < b.r1; ++r, x += cw) {
        if (bc) {
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) x[c] += bc[c];
        }
        if (excl_cols) {
          const int64_t* e =
              excl.data() + (excl_rows == 1 ? 0 : rows.orig(r)) * excl_cols;
          for (int64_t j = 0; j < excl_cols; ++j)
            if (e[j] >= c0 && e[j] < c0 + cw) x[e[j] - c0] = ninf;
        }
        const int64_t o = (slot * n + r) * k;
        chunk_topk(x, cw, c0, k, pv.data() + o, pi.data() + o);
      }
    }
  };
  auto merge = [&](int64_t, int64_t count) {
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      std::vector<T> tv(k);
      std::vector<int64_t> ti(k);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < count; ++j)
          merge_lists(rv.data() + r * k, ri.data() + r * k,
                      pv.data() + (j * n + r) * k, pi.data() + (j * n + r) * k,
                      k, tv.data(), ti.data());
    });
  };
  scoring::over_chunks(chunks, group, scoring::scoring_work(rows, V),
                       scoring::kBlockRows * std::min(C, V), weight.options(),
                       work, merge);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t o = rows.orig(r) * k;
    std::copy(rv.begin() + r * k, rv.begin() + (r + 1) * k, out_v + o);
    std::copy(ri.begin() + r * k, ri.begin() + (r + 1) * k, out_i + o);
  }
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(
    const at::Tensor& h, const at::Tensor& widths, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, int64_t k, int64_t chunk_size,
    const std::optional<at::Tensor>& exclude) {
  auto w = scoring::check_inputs(kOp, h, widths, weight, bias, chunk_size);
  const int64_t N = h.size(0), V = weight.size(0);
  TORCH_CHECK_VALUE(k >= 0 && k <= V, "canet.", kOp, ": k = ", k,
                    " is outside [0, ", V, "] (the items of weight)");
  std::vector<int64_t> excl;
  int64_t excl_rows = 0, excl_cols = 0;
  if (exclude) {
    TORCH_CHECK_VALUE(exclude->dim() == 2 &&
                          (exclude->size(0) == N || exclude->size(0) == 1),
                      "canet.", kOp, ": exclude must be item ids [N, M] = [",
                      N, ", M] or [1, M] (one list for every row), got shape ",
                      exclude->sizes());
    excl = scoring::host_longs(*exclude, h, kOp, "exclude");
    excl_rows = exclude->size(0);
    excl_cols = exclude->size(1);
    for (size_t j = 0; j < excl.size(); ++j) {
      TORCH_CHECK_VALUE(excl[j] < V, "canet.", kOp, ": exclude[",
                        j / std::max<int64_t>(excl_cols, 1), ", ",
                        j % std::max<int64_t>(excl_cols, 1), "] = ", excl[j],
                        " is not an item id (weight has ", V,
                        " items; pad with negative ids)");
    }
  }
  const auto ct = scoring::compute_type(h.scalar_type());
  auto values = at::empty({N, k}, h.options().dtype(ct));
  auto indices = at::empty({N, k}, h.options().dtype(at::kLong));
  if (N > 0 && k > 0) {
    const Rows rows = scoring::group_rows(h.to(ct).contiguous(), w, {});
    const auto wc = weight.to(ct).contiguous();
    std::optional<at::Tensor> bc;
    if (bias) bc = bias->to(ct).contiguous();
    AT_DISPATCH_FLOATING_TYPES(ct, "sliced_linear_topk", [&] {
      topk_rows<scalar_t>(rows, wc, bc ? bc->data_ptr<scalar_t>() : nullptr, V,
                          scoring::chunk_items(V, chunk_size), k, excl,
                          excl_rows, excl_cols,
                          values.data_ptr<scalar_t>(),
                          indices.data_ptr<int64_t>());
    });
  }
  return {values.to(h.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_linear_topk", &topk_cpu);
}

}  // namespace canet
