// Self-attention sublayer at per-sample width, on the CPU.
// Projections: one BLAS call per run of equal-width samples and per Q/K/V/O.
// Attention core: one task per (sample, head), softmax in fp32 (fp64 for
// fp64), inner loops laid out to vectorize over keys or features.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common.h"

namespace canet {
namespace {

constexpr const char* kOp = "sliced_attention";

struct Task {
  int64_t row0, n, head, hd;
};

struct Checked {
  Routes routes;
  std::vector<Run> runs;
  std::vector<Task> tasks;
};

Checked check(const at::Tensor& x, const at::Tensor& cu_seqlens,
              const at::Tensor& widths, const at::Tensor& w_qkv,
              const at::Tensor& w_o, int64_t num_heads) {
  check_float(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "canet.sliced_attention: x must be [T, D], "
                    "got shape ", x.sizes());
  TORCH_CHECK_VALUE(num_heads >= 1, "canet.sliced_attention: num_heads must be "
                    ">= 1, got ", num_heads);
  const int64_t D = x.size(1);
  check_like(w_qkv, x, kOp, "w_qkv", {3, D, D});
  check_like(w_o, x, kOp, "w_o", {D, D});
  Checked c;
  c.routes = check_routes(x, cu_seqlens, widths, D, kOp, "widths", num_heads,
                          "num_heads");
  c.runs = make_runs(c.routes);
  for (int64_t b = 0; b < c.routes.samples(); ++b) {
    const int64_t n = c.routes.cu[b + 1] - c.routes.cu[b];
    if (n == 0) continue;
    for (int64_t h = 0; h < num_heads; ++h)
      c.tasks.push_back({c.routes.cu[b], n, h, c.routes.width[b] / num_heads});
  }
  return c;
}

// Per-thread scratch: one sample-head's K, K^T, V, V^T, Q and dO in acc_t.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> q, k, kt, v, vt, o, dout, dq, dk, dv, p, dp, di;
  void resize(int64_t n, int64_t hd) {
    for (auto* b : {&q, &k, &kt, &v, &vt, &o, &dout, &dq, &dk, &dv})
      b->assign(n * hd, acc_t(0));
    p.assign(n, acc_t(0));
    dp.assign(n, acc_t(0));
    di.assign(n, acc_t(0));
  }
};

// Loads rows [row0, row0+n) of one head's columns into a [n, hd] buffer
// (and its transpose when `t` is given).
template <typename scalar_t, typename acc_t>
void load(const scalar_t* base, int64_t stride, const Task& k,
          std::vector<acc_t>& dst, std::vector<acc_t>* t = nullptr) {
  for (int64_t i = 0; i < k.n; ++i) {
    const scalar_t* row = base + (k.row0 + i) * stride + k.head * k.hd;
    for (int64_t c = 0; c < k.hd; ++c) {
      dst[i * k.hd + c] = acc_t(row[c]);
      if (t) (*t)[c * k.n + i] = acc_t(row[c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void store(scalar_t* base, int64_t stride, const Task& k,
           const std::vector<acc_t>& src) {
  for (int64_t i = 0; i < k.n; ++i) {
    scalar_t* row = base + (k.row0 + i) * stride + k.head * k.hd;
    for (int64_t c = 0; c < k.hd; ++c) row[c] = scalar_t(src[i * k.hd + c]);
  }
}

// s[j] = scale * q_i . k_j for j < lim, vectorized over j via K^T.
template <typename acc_t>
void scores(const acc_t* q, const acc_t* kt, int64_t n, int64_t hd, int64_t lim,
            acc_t scale, acc_t* s) {
  for (int64_t j = 0; j < lim; ++j) s[j] = 0;
  for (int64_t c = 0; c < hd; ++c) {
    const acc_t qc = q[c] * scale;
    const acc_t* kr = kt + c * n;
#pragma omp simd
    for (int64_t j = 0; j < lim; ++j) s[j] += qc * kr[j];
  }
}

template <typename scalar_t>
void attention_fwd(const at::Tensor& qkv, at::Tensor& ctx, at::Tensor& lse,
                   const std::vector<Task>& tasks, int64_t H, bool causal) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = ctx.size(1);
  const scalar_t* pqkv = qkv.data_ptr<scalar_t>();
  scalar_t* pctx = ctx.data_ptr<scalar_t>();
  acc_t* plse = lse.data_ptr<acc_t>();
  at::parallel_for(0, tasks.size(), 1, [&](int64_t a, int64_t z) {
    Scratch<acc_t> sc;
    for (int64_t ti = a; ti < z; ++ti) {
      const Task& k = tasks[ti];
      const int64_t n = k.n, hd = k.hd;
      const acc_t scale = acc_t(1) / std::sqrt(acc_t(hd));
      sc.resize(n, hd);
      load(pqkv, 3 * D, k, sc.q);
      load(pqkv + D, 3 * D, k, sc.k, &sc.kt);
      load(pqkv + 2 * D, 3 * D, k, sc.v);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t lim = causal ? i + 1 : n;
        acc_t* s = sc.p.data();
        scores(&sc.q[i * hd], sc.kt.data(), n, hd, lim, scale, s);
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < lim; ++j) m = std::max(m, s[j]);
        acc_t sum = 0;
        for (int64_t j = 0; j < lim; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        acc_t* o = &sc.o[i * hd];
        for (int64_t c = 0; c < hd; ++c) o[c] = 0;
        for (int64_t j = 0; j < lim; ++j) {
          const acc_t pj = s[j] / sum;
          const acc_t* vr = &sc.v[j * hd];
#pragma omp simd
          for (int64_t c = 0; c < hd; ++c) o[c] += pj * vr[c];
        }
        plse[(k.row0 + i) * H + k.head] = m + std::log(sum);
      }
      store(pctx, D, k, sc.o);
    }
  });
}

template <typename scalar_t>
void attention_bwd(const at::Tensor& qkv, const at::Tensor& ctx,
                   const at::Tensor& dctx, const at::Tensor& lse,
                   at::Tensor& dqkv, const std::vector<Task>& tasks, int64_t H,
                   bool causal) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = ctx.size(1);
  const scalar_t *pqkv = qkv.data_ptr<scalar_t>(), *pctx = ctx.data_ptr<scalar_t>();
  const scalar_t* pd = dctx.data_ptr<scalar_t>();
  const acc_t* plse = lse.data_ptr<acc_t>();
  scalar_t* pg = dqkv.data_ptr<scalar_t>();
  at::parallel_for(0, tasks.size(), 1, [&](int64_t a, int64_t z) {
    Scratch<acc_t> sc;
    for (int64_t ti = a; ti < z; ++ti) {
      const Task& k = tasks[ti];
      const int64_t n = k.n, hd = k.hd;
      const acc_t scale = acc_t(1) / std::sqrt(acc_t(hd));
      sc.resize(n, hd);
      load(pqkv, 3 * D, k, sc.q);
      load(pqkv + D, 3 * D, k, sc.k, &sc.kt);
      load(pqkv + 2 * D, 3 * D, k, sc.v, &sc.vt);
      load(pctx, D, k, sc.o);
      load(pd, D, k, sc.dout);
      for (int64_t i = 0; i < n; ++i) {
        acc_t d = 0;
        for (int64_t c = 0; c < hd; ++c) d += sc.dout[i * hd + c] * sc.o[i * hd + c];
        sc.di[i] = d;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t lim = causal ? i + 1 : n;
        const acc_t l = plse[(k.row0 + i) * H + k.head];
        acc_t *p = sc.p.data(), *dp = sc.dp.data();
        const acc_t *qi = &sc.q[i * hd], *doi = &sc.dout[i * hd];
        scores(qi, sc.kt.data(), n, hd, lim, scale, p);
        for (int64_t j = 0; j < lim; ++j) p[j] = std::exp(p[j] - l);
        scores(doi, sc.vt.data(), n, hd, lim, acc_t(1), dp);
        acc_t* dq = &sc.dq[i * hd];
        for (int64_t j = 0; j < lim; ++j) {
          const acc_t ds = p[j] * (dp[j] - sc.di[i]) * scale;
          const acc_t pj = p[j];
          const acc_t* kr = &sc.k[j * hd];
          acc_t *dk = &sc.dk[j * hd], *dv = &sc.dv[j * hd];
#pragma omp simd
          for (int64_t c = 0; c < hd; ++c) {
            dq[c] += ds * kr[c];
            dk[c] += ds * qi[c];
            dv[c] += pj * doi[c];
          }
        }
      }
      store(pg, 3 * D, k, sc.dq);
      store(pg + D, 3 * D, k, sc.dk);
      store(pg + 2 * D, 3 * D, k, sc.dv);
    }
  });
}

// The per-run projections x -> Q, K, V into qkv[T, 3, D].
void project_qkv(const at::Tensor& x, const at::Tensor& w_qkv,
                 const at::Tensor& b_qkv, at::Tensor& qkv,
                 const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    const int64_t w = r.in_w;
    for (int64_t i = 0; i < 3; ++i) {
      auto out = qkv.select(1, i).slice(0, r.row0, r.row1).slice(1, 0, w);
      addmm_into(out, b_qkv[i].slice(0, 0, w), block(x, r, 0, w),
                 w_qkv[i].slice(0, 0, w).slice(1, 0, w).t());
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w_qkv_, const at::Tensor& b_qkv, const at::Tensor& w_o_,
    const at::Tensor& b_o, int64_t num_heads, bool causal) {
  const auto c = check(x_, cu_seqlens, widths, w_qkv_, w_o_, num_heads);
  const int64_t T = x_.size(0), D = x_.size(1);
  check_like(b_qkv, x_, kOp, "b_qkv", {3, D});
  check_like(b_o, x_, kOp, "b_o", {D});
  const auto x = x_.contiguous(), w_qkv = w_qkv_.contiguous(), w_o = w_o_.contiguous();
  auto qkv = at::zeros({T, 3, D}, x.options());
  auto ctx = at::zeros({T, D}, x.options());
  auto lse = at::zeros({T, num_heads}, x.options().dtype(acc_type(x.scalar_type())));
  auto out = at::zeros({T, D}, x.options());
  project_qkv(x, w_qkv, b_qkv, qkv, c.runs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_attention_fwd", [&] {
    attention_fwd<scalar_t>(qkv, ctx, lse, c.tasks, num_heads, causal);
  });
  for (const Run& r : c.runs) {
    addmm_into(block(out, r, 0, r.in_w), b_o.slice(0, 0, r.in_w),
               block(ctx, r, 0, r.in_w), w_o.slice(0, 0, r.in_w).slice(1, 0, r.in_w).t());
  }
  return {out, qkv, ctx, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_,
    const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w_qkv_, const at::Tensor& w_o_, const at::Tensor& qkv_,
    const at::Tensor& ctx_, const at::Tensor& lse_, int64_t num_heads,
    bool causal) {
  const auto c = check(x_, cu_seqlens, widths, w_qkv_, w_o_, num_heads);
  const int64_t T = x_.size(0), D = x_.size(1);
  constexpr const char* op = "sliced_attention_backward";
  check_like(grad_out_, x_, op, "grad_out", {T, D});
  check_like(qkv_, x_, op, "qkv", {T, 3, D});
  check_like(ctx_, x_, op, "ctx", {T, D});
  const auto stat_t = acc_type(x_.scalar_type());
  TORCH_CHECK_VALUE(lse_.sizes() == at::IntArrayRef({T, num_heads}),
                    "canet.sliced_attention_backward: lse must have shape [", T,
                    ", ", num_heads, "], got ", lse_.sizes());
  const auto x = x_.contiguous(), w_qkv = w_qkv_.contiguous(), w_o = w_o_.contiguous();
  const auto dy = grad_out_.contiguous(), qkv = qkv_.contiguous();
  const auto ctx = ctx_.contiguous(), lse = lse_.to(stat_t).contiguous();
  const auto acc = x.options().dtype(stat_t);
  auto dctx = at::zeros({T, D}, x.options());
  auto gwo = at::zeros({D, D}, acc), gbo = at::zeros({D}, acc);
  // Runs add into the shared leading blocks one after another: deterministic.
  for (const Run& r : c.runs) {
    const int64_t w = r.in_w;
    auto d = block(dy, r, 0, w);
    gwo.slice(0, 0, w).slice(1, 0, w).add_(at::mm(d.t(), block(ctx, r, 0, w)).to(stat_t));
    gbo.slice(0, 0, w).add_(d.sum(0, false, stat_t));
    mm_into(block(dctx, r, 0, w), d, w_o.slice(0, 0, w).slice(1, 0, w));
  }
  auto dqkv = at::zeros({T, 3, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_attention_backward", [&] {
    attention_bwd<scalar_t>(qkv, ctx, dctx, lse, dqkv, c.tasks, num_heads, causal);
  });
  auto gx = at::zeros_like(x);
  auto gwqkv = at::zeros({3, D, D}, acc), gbqkv = at::zeros({3, D}, acc);
  for (const Run& r : c.runs) {
    const int64_t w = r.in_w;
    auto xs = block(x, r, 0, w);
    auto gxs = block(gx, r, 0, w);
    for (int64_t i = 0; i < 3; ++i) {
      auto d = dqkv.select(1, i).slice(0, r.row0, r.row1).slice(1, 0, w);
      gwqkv[i].slice(0, 0, w).slice(1, 0, w).add_(at::mm(d.t(), xs).to(stat_t));
      gbqkv[i].slice(0, 0, w).add_(d.sum(0, false, stat_t));
      gxs.addmm_(d, w_qkv[i].slice(0, 0, w).slice(1, 0, w));
    }
  }
  const auto dt = x.scalar_type();
  return {gx, gwqkv.to(dt), gbqkv.to(dt), gwo.to(dt), gbo.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_attention_fwd", &fwd_cpu);
  m.impl("sliced_attention_backward", &bwd_cpu);
}

}  // namespace canet
