// LayerNorm(x + residual) over each token's first w features, on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace canet {
namespace {

constexpr const char* kOp = "sliced_add_layernorm";

// Fixed chunking of rows for the weight-gradient reduction, so the summation
// order (and the result) does not depend on the number of threads.
constexpr int64_t kChunkRows = 64;

std::vector<int64_t> token_widths(const Routes& r, int64_t T) {
  std::vector<int64_t> w(T, 0);
  for (int64_t b = 0; b < r.samples(); ++b)
    for (int64_t t = r.cu[b]; t < r.cu[b + 1]; ++t) w[t] = r.width[b];
  return w;
}

Routes check(const at::Tensor& x, const at::Tensor& residual,
             const at::Tensor& cu_seqlens, const at::Tensor& widths,
             const at::Tensor& weight, const at::Tensor& bias) {
  auto r = check_routes(x, cu_seqlens, widths, x.dim() == 2 ? x.size(1) : 0, kOp);
  check_like(residual, x, kOp, "residual", x.sizes());
  check_like(weight, x, kOp, "weight", {x.size(1)});
  check_like(bias, x, kOp, "bias", {x.size(1)});
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const at::Tensor& residual_,
    const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& weight_, const at::Tensor& bias_, double eps) {
  auto r = check(x_, residual_, cu_seqlens, widths, weight_, bias_);
  const auto x = x_.contiguous(), res = residual_.contiguous();
  const auto weight = weight_.contiguous(), bias = bias_.contiguous();
  const int64_t T = x.size(0), D = x.size(1);
  const auto tw = token_widths(r, T);
  auto out = at::empty_like(x);
  const auto stat = x.options().dtype(acc_type(x.scalar_type()));
  auto mean = at::zeros({T}, stat), rstd = at::zeros({T}, stat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_add_layernorm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pr = res.data_ptr<scalar_t>();
    const scalar_t *pw = weight.data_ptr<scalar_t>(), *pb = bias.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    acc_t *pm = mean.data_ptr<acc_t>(), *ps = rstd.data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> s(D);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t w = tw[t];
        const scalar_t *xr = px + t * D, *rr = pr + t * D;
        acc_t sum = 0;
_Pragma("omp simd reduction(+ : sum)")
        for (int64_t f = 0; f < w; ++f) {
          s[f] = acc_t(xr[f]) + acc_t(rr[f]);
          sum += s[f];
        }
        const acc_t mu = sum / w;
        acc_t var = 0;
_Pragma("omp simd reduction(+ : var)")
        for (int64_t f = 0; f < w; ++f) var += (s[f] - mu) * (s[f] - mu);
        const acc_t rs = acc_t(1) / std::sqrt(var / w + acc_t(eps));
        scalar_t* o = po + t * D;
_Pragma("omp simd")
        for (int64_t f = 0; f < w; ++f)
          o[f] = scalar_t((s[f] - mu) * rs * acc_t(pw[f]) + acc_t(pb[f]));
        for (int64_t f = w; f < D; ++f) o[f] = scalar_t(0);
        pm[t] = mu;
        ps[t] = rs;
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_,
    const at::Tensor& residual_, const at::Tensor& cu_seqlens,
    const at::Tensor& widths, const at::Tensor& weight_,
    const at::Tensor& mean_, const at::Tensor& rstd_) {
  auto r = check(x_, residual_, cu_seqlens, widths, weight_, weight_);
  check_like(grad_out_, x_, "sliced_add_layernorm_backward", "grad_out", x_.sizes());
  const auto x = x_.contiguous(), res = residual_.contiguous();
  const auto weight = weight_.contiguous(), dy = grad_out_.contiguous();
  const int64_t T = x.size(0), D = x.size(1);
  const auto stat_t = acc_type(x.scalar_type());
  TORCH_CHECK_VALUE(mean_.sizes() == at::IntArrayRef{T} && rstd_.sizes() == at::IntArrayRef{T},
                    "canet.sliced_add_layernorm_backward: mean and rstd must have shape [", T, "]");
  const auto mean = mean_.to(stat_t).contiguous(), rstd = rstd_.to(stat_t).contiguous();
  const auto tw = token_widths(r, T);
  auto grad_in = at::empty_like(x);
  const int64_t chunks = (T + kChunkRows - 1) / kChunkRows;
  auto part_w = at::zeros({std::max<int64_t>(chunks, 1), D}, x.options().dtype(stat_t));
  auto part_b = at::zeros_like(part_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sliced_add_layernorm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *px = x.data_ptr<scalar_t>(), *pr = res.data_ptr<scalar_t>();
    const scalar_t *pw = weight.data_ptr<scalar_t>(), *pdy = dy.data_ptr<scalar_t>();
    const acc_t *pm = mean.data_ptr<acc_t>(), *ps = rstd.data_ptr<acc_t>();
    scalar_t* pg = grad_in.data_ptr<scalar_t>();
    acc_t *ppw = part_w.data_ptr<acc_t>(), *ppb = part_b.data_ptr<acc_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> xhat(D), g(D);
      for (int64_t c = c0; c < c1; ++c) {
        acc_t *gw = ppw + c * D, *gb = ppb + c * D;
        for (int64_t t = c * kChunkRows; t < std::min(T, (c + 1) * kChunkRows); ++t) {
          const int64_t w = tw[t];
          const scalar_t *xr = px + t * D, *rr = pr + t * D, *dr = pdy + t * D;
          acc_t sg = 0, sgx = 0;
_Pragma("omp simd reduction(+ : sg, sgx)")
          for (int64_t f = 0; f < w; ++f) {
            xhat[f] = (acc_t(xr[f]) + acc_t(rr[f]) - pm[t]) * ps[t];
            const acc_t d = acc_t(dr[f]);
            g[f] = d * acc_t(pw[f]);
            sg += g[f];
            sgx += g[f] * xhat[f];
            gw[f] += d * xhat[f];
            gb[f] += d;
          }
          sg /= w;
          sgx /= w;
          scalar_t* o = pg + t * D;
_Pragma("omp simd")
          for (int64_t f = 0; f < w; ++f)
            o[f] = scalar_t(ps[t] * (g[f] - sg - xhat[f] * sgx));
          for (int64_t f = w; f < D; ++f) o[f] = scalar_t(0);
        }
      }
    });
  });
  const auto dt = x.scalar_type();
  return {grad_in, part_w.sum(0).to(dt), part_b.sum(0).to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_add_layernorm_fwd", &fwd_cpu);
  m.impl("sliced_add_layernorm_backward", &bwd_cpu);
}

}  // namespace canet
