// sliced_linear on the CPU: one BLAS call per run of equal-width samples.
#include <torch/library.h>

#include "common.h"

namespace canet {
namespace {

constexpr const char* kOp = "sliced_linear";

struct LinearArgs {
  Routes routes;
  std::vector<Run> runs;
};

LinearArgs check(const at::Tensor& x, const at::Tensor& cu_seqlens,
                 const at::Tensor& in_widths, const at::Tensor& out_widths,
                 const at::Tensor& weight) {
  check_float(weight, kOp, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "canet.sliced_linear: weight must be "
                    "[out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= weight.size(1),
                    "canet.sliced_linear: x must be [T, >= ", weight.size(1),
                    "], got shape ", x.sizes());
  check_like(weight, x, kOp, "weight", weight.sizes());
  LinearArgs a;
  a.routes = check_routes(x, cu_seqlens, in_widths, weight.size(1), kOp,
                          "in_widths");
  auto ow = check_widths(out_widths, x, a.routes.samples(), weight.size(0),
                         kOp, "out_widths");
  a.runs = make_runs(a.routes, ow);
  return a;
}

at::Tensor sliced_linear_cpu(const at::Tensor& x_, const at::Tensor& cu_seqlens,
                             const at::Tensor& in_widths,
                             const at::Tensor& out_widths,
                             const at::Tensor& weight_,
                             const std::optional<at::Tensor>& bias_) {
  auto a = check(x_, cu_seqlens, in_widths, out_widths, weight_);
  const auto x = x_.contiguous();
  const auto weight = weight_.contiguous();
  const int64_t O = weight.size(0);
  if (bias_) check_like(*bias_, x, kOp, "bias", {O});
  // Tails beyond each run's width are zeroed after its GEMM wrote the rows.
  auto out = at::empty({x.size(0), O}, x.options());
  for (const Run& r : a.runs) {
    auto y = block(out, r, 0, r.out_w);
    auto w = weight.slice(0, 0, r.out_w).slice(1, 0, r.in_w).t();
    if (bias_) {
      addmm_into(y, bias_->slice(0, 0, r.out_w), block(x, r, 0, r.in_w), w);
    } else {
      mm_into(y, block(x, r, 0, r.in_w), w);
    }
    block(out, r, r.out_w, O).zero_();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliced_linear_backward_cpu(
    const at::Tensor& grad_out_, const at::Tensor& x_,
    const at::Tensor& cu_seqlens, const at::Tensor& in_widths,
    const at::Tensor& out_widths, const at::Tensor& weight_, bool has_bias) {
  auto a = check(x_, cu_seqlens, in_widths, out_widths, weight_);
  check_like(grad_out_, x_, "sliced_linear_backward", "grad_out",
             {x_.size(0), weight_.size(0)});
  const auto x = x_.contiguous();
  const auto weight = weight_.contiguous();
  const auto grad_out = grad_out_.contiguous();
  const auto acc_t = acc_type(x.scalar_type());
  const auto acc = x.options().dtype(acc_t);
  auto grad_x = at::zeros_like(x);
  auto grad_w = at::zeros(weight.sizes(), acc);
  auto grad_b = at::zeros({has_bias ? weight.size(0) : 0}, acc);
  for (const Run& r : a.runs) {
    auto dy = block(grad_out, r, 0, r.out_w);
    auto xs = block(x, r, 0, r.in_w);
    mm_into(block(grad_x, r, 0, r.in_w), dy,
               weight.slice(0, 0, r.out_w).slice(1, 0, r.in_w));
    // Runs add into the shared leading block one after another: deterministic.
    grad_w.slice(0, 0, r.out_w).slice(1, 0, r.in_w)
        .add_(at::mm(dy.t(), xs).to(acc_t));
    if (has_bias) grad_b.slice(0, 0, r.out_w).add_(dy.sum(0, false, acc_t));
  }
  return {grad_x, grad_w.to(x.scalar_type()), grad_b.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CPU, m) {
  m.impl("sliced_linear", &sliced_linear_cpu);
  m.impl("sliced_linear_backward", &sliced_linear_backward_cpu);
}

}  // namespace canet
