// FFN sublayer gelu(x W1^T + b1) W2^T + b2 at per-sample width, on the CPU.
// Forward: tiles of rows of equal-width samples, two BLAS calls each with
// GELU in between on cache-resident rows, tiles spread over the threads.
// Backward: two BLAS calls per run of equal-width samples.
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/vec_math.h"

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

// h = h + bias (the pre-activation, rounded to the tensor's dtype as it is
// stored) and a = gelu(h), row by row; a may be h. One pass instead of the
// bias broadcast a BLAS call with bias makes plus ATen's GELU pass.
template <typename scalar_t>
void bias_gelu(at::Tensor& h, const at::Tensor& bias, at::Tensor& a) {
  const int64_t rows = h.size(0), cols = h.size(1);
  const int64_t hs = h.stride(0), as = a.stride(0);
  scalar_t* ph = h.data_ptr<scalar_t>();
  scalar_t* pa = a.data_ptr<scalar_t>();
  const scalar_t* pb = bias.data_ptr<scalar_t>();
  // rows over the threads when the caller runs serially (a few tiles)
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : cols);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* hr = ph + r * hs;
      scalar_t* ar = pa + r * as;
      if constexpr (std::is_same_v<scalar_t, double>) {
        for (int64_t j = 0; j < cols; ++j) ar[j] = gelu_erf(hr[j] += pb[j]);
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        for (int64_t j = 0; j < cols; ++j) hr[j] += pb[j];
        gelu_erf(hr, ar, cols);
      } else {  // 16-bit: GELU of the stored (rounded) pre-activation, in fp32
        for (int64_t j = 0; j < cols; ++j) {
          hr[j] = scalar_t(float(hr[j]) + float(pb[j]));
          buf[j] = float(hr[j]);
        }
        gelu_erf(buf.data(), buf.data(), cols);
        for (int64_t j = 0; j < cols; ++j) ar[j] = scalar_t(buf[j]);
      }
    }
  });
}

// Rows per forward tile. Measured on 2 cores (256 x 50 tokens, widths
// 64-128, 2 threads): 512-1024 rows 6-8% faster than one call per run, 128
// slower (per-call overhead).
constexpr int64_t kTileRows = 512;

std::tuple<at::Tensor, at::Tensor> fwd_cpu(
    const at::Tensor& x_, const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& w1_, const at::Tensor& b1, const at::Tensor& w2_,
    const at::Tensor& b2, int64_t ratio, bool save_hidden) {
  const auto runs = check(x_, cu_seqlens, widths, w1_, w2_, ratio);
  check_like(b1, x_, kOp, "b1", {w1_.size(0)});
  check_like(b2, x_, kOp, "b2", {x_.size(1)});
  const auto x = x_.contiguous(), w1 = w1_.contiguous(), w2 = w2_.contiguous();
  const auto b1c = b1.contiguous();
  const int64_t I = w1.size(0), D = x.size(1);
  auto hidden = at::empty({save_hidden ? x.size(0) : 0, I}, x.options());
  auto out = at::empty_like(x);
  std::vector<Run> tiles;  // never crossing a run
  for (const Run& r : runs)
    for (int64_t s = r.row0; s < r.row1; s += kTileRows)
      tiles.push_back({s, std::min(s + kTileRows, r.row1), r.in_w, r.out_w});
  // act: the tile's activation (and its pre-activation in inference); the
  // pre-activation of training goes straight into `hidden`, saved for
  // backward. Columns beyond the width are zeroed after the GEMMs wrote
  // (and faulted in) the rows: cheaper than zero-filling whole buffers.
  auto run_tile = [&](const Run& t, at::Tensor& act) {
    const int64_t w = t.in_w, inner = ratio * w, rows = t.row1 - t.row0;
    auto a = act.view(-1).slice(0, 0, rows * inner).view({rows, inner});
    auto h = save_hidden ? block(hidden, t, 0, inner) : a;
    mm_into(h, block(x, t, 0, w), w1.slice(0, 0, inner).slice(1, 0, w).t());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "sliced_ffn_gelu", [&] {
      bias_gelu<scalar_t>(h, b1c.slice(0, 0, inner), a);
    });
    if (save_hidden) block(hidden, t, inner, I).zero_();
    addmm_into(block(out, t, 0, w), b2.slice(0, 0, w), a,
               w2.slice(0, 0, w).slice(1, 0, inner).t());
    block(out, t, w, D).zero_();
  };
  // Tiles in order (a 128-wide tile costs 4x a 64-wide one: taken one at a
  // time, they balance over the threads).
  parallel_items(static_cast<int64_t>(tiles.size()), [&](const auto& take) {
    auto act = at::empty({kTileRows * I}, x.options());
    for (int64_t i = take(); i >= 0; i = take()) run_tile(tiles[i], act);
  });
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
