// sliced_linear_cross_entropy on the CPU: cross-entropy over the item table
// without the [rows, items] logit tensor (see scoring.h for the chunk walk).
//
// Forward: one GEMM per (block, chunk) and an online log-sum-exp; saves
// lse[N]. Backward recomputes each chunk's logits: p = softmax - onehot
// (scaled by grad_loss / kept rows), grad_h += p @ W_chunk,
// grad_W[chunk] += p^T h block by block (the chunk's thread owns those rows
// of grad_W: a fixed order), grad_bias[chunk] += column sums of p. Four
// GEMMs per step in all, the least that keeps memory flat in the item count:
// a backward without recomputation needs the logits (or the softmax) of
// every item kept.
#include <torch/library.h>

#include <cmath>

#include "cpu/scoring.h"

namespace canet {
namespace {

using scoring::Block;
using scoring::Rows;

constexpr const char* kOp = "sliced_linear_cross_entropy";

struct Prepared {
  Rows rows;
  std::vector<int64_t> target;  // per scored row
  int64_t N = 0, V = 0;
  at::Tensor weight;            // contiguous, compute dtype
  std::optional<at::Tensor> bias;
};

Prepared prepare(const char* op, const at::Tensor& h,
                 const at::Tensor& widths, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias,
                 const at::Tensor& targets, int64_t ignore_index,
                 int64_t chunk_size) {
  auto w = scoring::check_inputs(op, h, widths, weight, bias, chunk_size);
  TORCH_CHECK_VALUE(targets.dim() == 1, "canet.", op,
                    ": targets must be 1-D (one item id per row), got shape ",
                    targets.sizes());
  auto t = scoring::host_longs(targets, h, op, "targets");
  TORCH_CHECK_VALUE(static_cast<int64_t>(t.size()) == h.size(0), "canet.", op,
                    ": targets has ", t.size(), " entries but h has ",
                    h.size(0), " rows");
  Prepared p;
  p.N = h.size(0);
  p.V = weight.size(0);
  std::vector<char> keep(p.N);
  for (int64_t i = 0; i < p.N; ++i) {
    keep[i] = t[i] >= 0 && t[i] != ignore_index;
    TORCH_CHECK_VALUE(!keep[i] || t[i] < p.V, "canet.", op, ": targets[", i,
                      "] = ", t[i], " is outside [0, ", p.V,
                      ") (the items of weight); rows with a negative target "
                      "or ignore_index = ", ignore_index, " are skipped");
  }
  const auto ct = scoring::compute_type(h.scalar_type());
  p.rows = scoring::group_rows(h.to(ct).contiguous(), w, keep);
  p.target.resize(p.rows.n());
  for (int64_t i = 0; i < p.rows.n(); ++i) p.target[i] = t[p.rows.orig(i)];
  p.weight = weight.to(ct).contiguous();
  if (bias) p.bias = bias->to(ct).contiguous();
  return p;
}

// lse (per scored row) and the target's logit.
template <typename T>
void forward_rows(const Prepared& p, int64_t C, std::vector<T>& lse,
                  std::vector<T>& tlogit) {
  const Rows& rows = p.rows;
  const int64_t n = rows.n(), V = p.V;
  const int64_t chunks = (V + C - 1) / C;  // C from scoring::chunk_items
  const int64_t group = scoring::group_size(chunks, 2 * n * sizeof(T));
  const T ninf = -std::numeric_limits<T>::infinity();
  std::vector<T> m(n, ninf), s(n, 0), pm(group * n), ps(group * n);
  tlogit.assign(n, 0);
  const T* bias = p.bias ? p.bias->data_ptr<T>() : nullptr;
  auto work = [&](int64_t chunk, int64_t slot, at::Tensor& tile) {
    const int64_t c0 = chunk * C, cw = std::min(C, V - c0);
    for (const Block& b : rows.blocks) {
      auto lg = scoring::block_logits(tile, rows, b, p.weight, c0, cw);
      T* x = lg.data_ptr<T>();
      for (int64_t r = b.r0; r < b.r1; ++r, x += cw) {
        const T mx = scoring::add_bias_max(x, bias ? bias + c0 : nullptr, cw);
        pm[slot * n + r] = mx;
        ps[slot * n + r] = mx == ninf ? T(0) : scoring::sum_exp(x, cw, mx);
        const int64_t t = p.target[r] - c0;
        if (t >= 0 && t < cw) tlogit[r] = x[t];  // one chunk holds it
      }
    }
  };
  auto merge = [&](int64_t, int64_t count) {
    at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t j = 0; j < count; ++j) {
          const T cm = pm[j * n + r], cs = ps[j * n + r];
          if (cm == ninf) continue;
          const T nm = std::max(m[r], cm);
          s[r] = s[r] * std::exp(m[r] - nm) + cs * std::exp(cm - nm);
          m[r] = nm;
        }
      }
    });
  };
  if (n > 0)
    scoring::over_chunks(chunks, group, scoring::scoring_work(rows, V),
                         scoring::kBlockRows * std::min(C, V),
                         p.weight.options(), work, merge);
  lse.resize(n);
  for (int64_t r = 0; r < n; ++r) lse[r] = m[r] + std::log(s[r]);
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& h, const at::Tensor& widths, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets,
    int64_t ignore_index, int64_t chunk_size) {
  auto p = prepare(kOp, h, widths, weight, bias, targets, ignore_index,
                   chunk_size);
  const auto ct = p.weight.scalar_type();
  auto lse_out = at::zeros({p.N}, h.options().dtype(ct));
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(ct, "sliced_linear_cross_entropy_fwd", [&] {
    std::vector<scalar_t> lse, tl;
    forward_rows<scalar_t>(p, scoring::chunk_items(p.V, chunk_size), lse, tl);
    scalar_t* out = lse_out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < p.rows.n(); ++r) out[p.rows.orig(r)] = lse[r];
    std::vector<double> row_loss(p.N, 0.0);
    for (int64_t r = 0; r < p.rows.n(); ++r)
      row_loss[p.rows.orig(r)] = double(lse[r]) - double(tl[r]);
    for (double v : row_loss) total += v;  // the caller's row order
  });
  const int64_t count = p.rows.n();
  auto loss = at::scalar_tensor(count ? total / double(count) : 0.0,
                                h.options().dtype(ct));
  return {loss, lse_out};
}

template <typename T>
void backward_rows(const Prepared& p, int64_t C, T scale, const T* lse_orig,
                   at::Tensor& grad_h_rows, at::Tensor& grad_w,
                   at::Tensor* grad_b) {
  const Rows& rows = p.rows;
  const int64_t n = rows.n(), V = p.V, D = rows.h.size(1);
  const int64_t chunks = (V + C - 1) / C;  // C from scoring::chunk_items
  const int64_t group = scoring::group_size(chunks, n * D * sizeof(T));
  std::vector<T> lse(n);
  for (int64_t r = 0; r < n; ++r) lse[r] = lse_orig[rows.orig(r)];
  // grad_h of each chunk of a group (only the first w columns are written)
  auto part = at::empty({group, n, D}, p.weight.options());
  const T* bias = p.bias ? p.bias->data_ptr<T>() : nullptr;
  T* gb = grad_b ? grad_b->data_ptr<T>() : nullptr;
  auto work = [&](int64_t chunk, int64_t slot, at::Tensor& tile) {
    const int64_t c0 = chunk * C, cw = std::min(C, V - c0);
    auto w_chunk = p.weight.narrow(0, c0, cw);
    auto gw_chunk = grad_w.narrow(0, c0, cw);
    auto dh = part[slot];
    for (const Block& b : rows.blocks) {
      const int64_t nr = b.r1 - b.r0;
      auto lg = scoring::block_logits(tile, rows, b, p.weight, c0, cw);
      T* x = lg.data_ptr<T>();
      for (int64_t r = b.r0; r < b.r1; ++r, x += cw) {
        scoring::scaled_softmax(x, bias ? bias + c0 : nullptr, cw, lse[r],
                                scale);
        const int64_t t = p.target[r] - c0;
        if (t >= 0 && t < cw) x[t] -= scale;
        if (gb) {
          T* g = gb + c0;
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) g[c] += x[c];
        }
      }
      auto hb = rows.h.narrow(0, b.r0, nr).narrow(1, 0, b.w);
      auto dh_rows = dh.narrow(0, b.r0, nr).narrow(1, 0, b.w);
      at::mm_out(dh_rows, lg, w_chunk.narrow(1, 0, b.w));
      auto gw = gw_chunk.narrow(1, 0, b.w);
      at::addmm_out(gw, gw, lg.t(), hb);
    }
  };
  auto merge = [&](int64_t, int64_t count) {
    const T* pp = part.data_ptr<T>();
    T* g = grad_h_rows.data_ptr<T>();
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t w = rows.width[r];
        T* gr = g + r * D;
        for (int64_t j = 0; j < count; ++j) {
          const T* src = pp + (j * n + r) * D;
#pragma omp simd
          for (int64_t c = 0; c < w; ++c) gr[c] += src[c];
        }
      }
    });
  };
  scoring::over_chunks(chunks, group, 3 * scoring::scoring_work(rows, V),
                       scoring::kBlockRows * std::min(C, V), p.weight.options(),
                       work, merge);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& widths,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, int64_t ignore_index,
    int64_t chunk_size) {
  constexpr const char* op = "sliced_linear_cross_entropy_backward";
  auto p = prepare(op, h, widths, weight, bias, targets, ignore_index,
                   chunk_size);
  const auto ct = p.weight.scalar_type();
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "canet.", op,
                    ": grad_loss must be a scalar, got shape ",
                    grad_loss.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == p.N, "canet.", op,
                    ": lse must have shape [", p.N, "], got ", lse.sizes());
  scoring::check_on(lse, h, op, "lse");
  scoring::check_on(grad_loss, h, op, "grad_loss");
  const int64_t n = p.rows.n(), D = h.size(1);
  auto grad_rows = at::zeros({n, D}, p.weight.options());
  auto grad_w = at::zeros(weight.sizes(), p.weight.options());
  at::Tensor grad_b = at::zeros({bias ? p.V : 0}, p.weight.options());
  if (n > 0) {
    const auto lse_c = lse.to(ct).contiguous();
    const double g = grad_loss.to(at::kDouble).item<double>();
    AT_DISPATCH_FLOATING_TYPES(ct, "sliced_linear_cross_entropy_backward", [&] {
      backward_rows<scalar_t>(p, scoring::chunk_items(p.V, chunk_size),
                              scalar_t(g / double(n)),
                              lse_c.data_ptr<scalar_t>(), grad_rows, grad_w,
                              bias ? &grad_b : nullptr);
    });
  }
  at::Tensor grad_h;
  if (p.rows.identity) {
    grad_h = grad_rows;
  } else {
    grad_h = at::zeros({p.N, D}, p.weight.options());
    auto idx = at::tensor(p.rows.src, at::TensorOptions().dtype(at::kLong));
    grad_h.index_copy_(0, idx, grad_rows);
  }
  const auto dt = h.scalar_type();
  return {grad_h.to(dt), grad_w.to(dt), grad_b.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_linear_cross_entropy_fwd", &fwd_cpu);
  m.impl("sliced_linear_cross_entropy_backward", &backward_cpu);
}

}  // namespace canet
