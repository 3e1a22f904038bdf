// FFN sublayer gelu(x W1^T + b1) W2^T + b2 at per-sample width, on the CPU:
// two BLAS calls per run of equal-width samples.
#include <torch/library.h>

#include "common.h"

namespace canet {
namespace {

constexpr const char* kOp = "sliced_ffn";

std::vector<Run> check(const at::Tensor& x, const at::Tensor& cu_seqlens,
                       const at::Tensor& widths, const at::Tensor& w1,
                       const at::Tensor& w2, int64_t ratio) {
  check_float(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, "canet.sliced_ffn: x must be [T, D], got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(ratio >= 1, "canet.sliced_ffn: ratio must be >= 1, got ", ratio);
  const int64_t D = x.size(1);
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(1) == D && w1.size(0) >= ratio * D,
                    "canet.sliced_ffn: w1 must be [>= ratio * D, D] = [>= ",
                    ratio * D, ", ", D, "], got shape ", w1.sizes());
  check_like(w1, x, kOp, "w1", w1.sizes());
  check_like(w2, x, kOp, "w2", {D, w1.size(0)});
  return make_runs(check_routes(x, cu_seqlens, widths, D, kOp));
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w1_, const at::Tensor& b1, const at::Tensor& w2_,
    const at::Tensor& b2, int64_t ratio, bool save_hidden) {
  const auto runs = check(x_, cu_seqlens, widths, w1_, w2_, ratio);
  check_like(b1, x_, kOp, "b1", {w1_.size(0)});
  check_like(b2, x_, kOp, "b2", {x_.size(1)});
  const auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  // Columns beyond each run's width are zeroed after the GEMMs have written
  // (and faulted in) the rows: cheaper than zero-filling whole buffers first.
  const int64_t I = w1.size(0), D = x.size(1);
  auto hidden = at::empty({save_hidden ? x.size(0) : 0, I}, x.options());
  auto out = at::empty_like(x);
  for (const Run& r : runs) {
    const int64_t w = r.in_w, inner = ratio * w;
    // A contiguous pre-activation keeps GELU and the second GEMM on dense
    // memory; the copy into `hidden` (saved for backward) is cheap beside it.
    auto h = at::addmm(b1.slice(0, 0, inner), block(x, r, 0, w),
                       w1.slice(0, 0, inner).slice(1, 0, w).t());
    addmm_into(block(out, r, 0, w), b2.slice(0, 0, w), at::gelu(h),
               w2.slice(0, 0, w).slice(1, 0, inner).t());
    block(out, r, w, D).zero_();
    if (save_hidden) {
      block(hidden, r, 0, inner).copy_(h);
      block(hidden, r, inner, I).zero_();
    }
  }
  return {out, hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_,
    const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w1_, const at::Tensor& w2_, const at::Tensor& hidden_,
    int64_t ratio) {
  const auto runs = check(x_, cu_seqlens, widths, w1_, w2_, ratio);
  check_like(grad_out_, x_, "sliced_ffn_backward", "grad_out", x_.sizes());
  check_like(hidden_, x_, "sliced_ffn_backward", "hidden",
             {x_.size(0), w1_.size(0)});
  const auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const auto dy = grad_out_.contiguous(), hidden = hidden_.contiguous();
  const auto acc_t = acc_type(x.scalar_type());
  const auto acc = x.options().dtype(acc_t);
  auto gx = at::zeros_like(x);
  auto gw1 = at::zeros(w1.sizes(), acc), gb1 = at::zeros({w1.size(0)}, acc);
  auto gw2 = at::zeros(w2.sizes(), acc), gb2 = at::zeros({w2.size(0)}, acc);
  // Runs add into the shared leading blocks one after another: deterministic.
  for (const Run& r : runs) {
    const int64_t w = r.in_w, inner = ratio * w;
    auto d = block(dy, r, 0, w);
    auto h = block(hidden, r, 0, inner);
    auto w1s = w1.slice(0, 0, inner).slice(1, 0, w);
    auto w2s = w2.slice(0, 0, w).slice(1, 0, inner);
    gw2.slice(0, 0, w).slice(1, 0, inner).add_(at::mm(d.t(), at::gelu(h)).to(acc_t));
    gb2.slice(0, 0, w).add_(d.sum(0, false, acc_t));
    auto dh = at::gelu_backward(at::mm(d, w2s), h);
    gw1.slice(0, 0, inner).slice(1, 0, w).add_(
        at::mm(dh.t(), block(x, r, 0, w)).to(acc_t));
    gb1.slice(0, 0, inner).add_(dh.sum(0, false, acc_t));
    mm_into(block(gx, r, 0, w), dh, w1s);
  }
  const auto dt = x.scalar_type();
  return {gx, gw1.to(dt), gb1.to(dt), gw2.to(dt), gb2.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_ffn_fwd", &fwd_cpu);
  m.impl("sliced_ffn_backward", &bwd_cpu);
}

}  // namespace canet
