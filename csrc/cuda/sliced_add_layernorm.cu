// sliced_add_layernorm on CUDA: LayerNorm(x + residual) over each token's
// first w features (w = widths[sample of the token]), zero beyond w.
//
// Layout of the work:
// - forward and grad_input: one warp per token row (blocks of 4 warps). The
//   row's sample is found by a binary search over cu_seqlens, so routes stay
//   on the device: no host sync, CUDA-graph friendly. A lane keeps its
//   features (lane, lane + 32, ...) in registers; rows up to 128 features use
//   a 4-per-lane variant, wider rows (<= 1024) a 32-per-lane one.
// - grad_weight / grad_bias: block (fx, ry) owns 32 features and a fixed
//   chunk of rows; it writes one partial row into a [chunks, D] buffer that is
//   then summed over dim 0. No atomics: results are bitwise reproducible.
// - 16-bit inputs accumulate in fp32 and return fp32 mean/rstd; fp64 stays
//   fp64 throughout.
// - x + residual is rounded to x's dtype before the statistics, as the
//   PyTorch reference (and an unfused add + layer_norm) does.
//
// Route values (cu_seqlens, widths) are not validated here: that would need
// their data on the host. The CPU kernel validates them; on the GPU a width is
// only clamped to [0, D] so a bad route cannot read or write out of bounds
// (a width of 0 gives a zero row, mean 0 and rstd 0).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace canet {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;    // warps (rows) per block, fwd / grad_input
constexpr int kMaxFeatures = 1024;  // 32 values per lane
constexpr int kDwRows = 8;          // row streams per grad_weight block
constexpr int kDwMaxChunks = 1024;  // bound on the partial buffer's rows

// Sample b with cu[b] <= t < cu[b + 1]; empty samples are skipped because the
// last b with cu[b] <= t is taken.
__device__ __forceinline__ int64_t sample_of(const int64_t* cu, int64_t B,
                                             int64_t t) {
  int64_t lo = 0, hi = B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= t) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ int clamp_width(int64_t w, int D) {
  return static_cast<int>(w < 0 ? 0 : (w > D ? D : w));
}

__device__ __forceinline__ int row_width(const int64_t* cu,
                                         const int64_t* widths, int64_t B,
                                         int64_t t, int D) {
  if (B <= 0) return 0;
  return clamp_width(widths[sample_of(cu, B, t)], D);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// s = x + residual rounded to the input dtype, widened to acc_t.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t add_rounded(scalar_t a, scalar_t b) {
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(a) +
                                                  static_cast<acc_t>(b)));
}

template <typename scalar_t, typename acc_t, int VPT>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
add_ln_fwd_kernel(const scalar_t* __restrict__ x,
                  const scalar_t* __restrict__ res,
                  const int64_t* __restrict__ cu,
                  const int64_t* __restrict__ widths, int64_t B,
                  const scalar_t* __restrict__ weight,
                  const scalar_t* __restrict__ bias,
                  scalar_t* __restrict__ out, acc_t* __restrict__ mean_out,
                  acc_t* __restrict__ rstd_out, int64_t T, int D, acc_t eps) {
  const int lane = threadIdx.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (t >= T) return;
  const int w = row_width(cu, widths, B, t, D);
  const int64_t base = t * D;

  acc_t v[VPT];
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int f = lane + i * kWarp;
    v[i] = 0;
    if (f < w) {
      v[i] = add_rounded<scalar_t, acc_t>(x[base + f], res[base + f]);
      sum += v[i];
    }
  }
  const acc_t inv_w = w > 0 ? acc_t(1) / acc_t(w) : acc_t(0);
  const acc_t mean = warp_sum(sum) * inv_w;
  acc_t sq = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int f = lane + i * kWarp;
    if (f < w) {
      const acc_t d = v[i] - mean;
      sq += d * d;
    }
  }
  const acc_t var = warp_sum(sq) * inv_w;
  const acc_t rstd = w > 0 ? acc_t(1) / sqrt(var + eps) : acc_t(0);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int f = lane + i * kWarp;
    if (f < w) {
      out[base + f] = static_cast<scalar_t>(
          (v[i] - mean) * rstd * static_cast<acc_t>(weight[f]) +
          static_cast<acc_t>(bias[f]));
    }
  }
  // Features beyond the row's width (also past VPT * 32 when D is not a
  // multiple of it) are zero by contract.
  for (int f = w + lane; f < D; f += kWarp) out[base + f] = scalar_t(0);
  if (lane == 0) {
    mean_out[t] = mean;
    rstd_out[t] = rstd;
  }
}

template <typename scalar_t, typename acc_t, int VPT>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
add_ln_grad_input_kernel(const scalar_t* __restrict__ dy,
                         const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ res,
                         const int64_t* __restrict__ cu,
                         const int64_t* __restrict__ widths, int64_t B,
                         const scalar_t* __restrict__ weight,
                         const acc_t* __restrict__ mean_in,
                         const acc_t* __restrict__ rstd_in,
                         scalar_t* __restrict__ dx, int64_t T, int D) {
  const int lane = threadIdx.x;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (t >= T) return;
  const int w = row_width(cu, widths, B, t, D);
  const int64_t base = t * D;
  const acc_t mean = mean_in[t], rstd = rstd_in[t];

  acc_t xhat[VPT], g[VPT];
  acc_t sum_g = 0, sum_gx = 0;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int f = lane + i * kWarp;
    xhat[i] = 0;
    g[i] = 0;
    if (f < w) {
      xhat[i] = (add_rounded<scalar_t, acc_t>(x[base + f], res[base + f]) - mean) * rstd;
      g[i] = static_cast<acc_t>(dy[base + f]) * static_cast<acc_t>(weight[f]);
      sum_g += g[i];
      sum_gx += g[i] * xhat[i];
    }
  }
  const acc_t inv_w = w > 0 ? acc_t(1) / acc_t(w) : acc_t(0);
  const acc_t mean_g = warp_sum(sum_g) * inv_w;
  const acc_t mean_gx = warp_sum(sum_gx) * inv_w;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int f = lane + i * kWarp;
    if (f < w) {
      dx[base + f] = static_cast<scalar_t>(rstd * (g[i] - mean_g - xhat[i] * mean_gx));
    }
  }
  for (int f = w + lane; f < D; f += kWarp) dx[base + f] = scalar_t(0);
}

// Block (blockIdx.x, blockIdx.y): features [32 * blockIdx.x, +32) and rows
// [blockIdx.y * chunk, +chunk). Thread (tx, ty) walks rows ty, ty + 8, ... of
// the chunk; the 8 streams are summed in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kDwRows)
add_ln_grad_weight_kernel(const scalar_t* __restrict__ dy,
                          const scalar_t* __restrict__ x,
                          const scalar_t* __restrict__ res,
                          const int64_t* __restrict__ cu,
                          const int64_t* __restrict__ widths, int64_t B,
                          const acc_t* __restrict__ mean_in,
                          const acc_t* __restrict__ rstd_in,
                          acc_t* __restrict__ part_w, acc_t* __restrict__ part_b,
                          int64_t T, int D, int64_t chunk) {
  __shared__ acc_t sw[kDwRows][kWarp];
  __shared__ acc_t sb[kDwRows][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int f = blockIdx.x * kWarp + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t r1 = r0 + chunk < T ? r0 + chunk : T;

  acc_t dw = 0, db = 0;
  if (f < D && B > 0) {
    int64_t b = -1, next = 0;  // current sample and the row where it ends
    int w = 0;
    for (int64_t t = r0 + ty; t < r1; t += kDwRows) {
      if (b < 0 || t >= next) {  // rows only grow: search only on a change
        b = sample_of(cu, B, t);
        next = b + 1 < B ? cu[b + 1] : T;
        w = clamp_width(widths[b], D);
      }
      if (f < w) {
        const int64_t i = t * D + f;
        const acc_t d = static_cast<acc_t>(dy[i]);
        const acc_t xh = (add_rounded<scalar_t, acc_t>(x[i], res[i]) - mean_in[t]) * rstd_in[t];
        dw += d * xh;
        db += d;
      }
    }
  }
  sw[ty][tx] = dw;
  sb[ty][tx] = db;
  __syncthreads();
  if (ty == 0 && f < D) {
    acc_t aw = 0, ab = 0;
#pragma unroll
    for (int r = 0; r < kDwRows; ++r) {
      aw += sw[r][tx];
      ab += sb[r][tx];
    }
    part_w[static_cast<int64_t>(blockIdx.y) * D + f] = aw;
    part_b[static_cast<int64_t>(blockIdx.y) * D + f] = ab;
  }
}

// ------------------------------------------------------------ host side ---

constexpr const char* kFwd = "sliced_add_layernorm_fwd";
constexpr const char* kBwd = "sliced_add_layernorm_backward";

at::ScalarType stat_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

void check_x(const at::Tensor& x, const char* op) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       dt == at::kDouble,
                   "canet.", op, ": x must be float32, float16, bfloat16 or "
                   "float64, got ", dt);
  TORCH_CHECK_VALUE(x.is_cuda(), "canet.", op,
                    ": x must be a CUDA tensor for this kernel, got ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "canet.", op,
                    ": x must be packed tokens [T, features], got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(1) <= kMaxFeatures, "canet.", op,
                    ": the CUDA kernel supports 1 to ", kMaxFeatures,
                    " features, x has ", x.size(1));
}

void check_same(const at::Tensor& t, const at::Tensor& x, const char* op,
                const char* name, at::IntArrayRef shape,
                at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "canet.", op, ": ", name,
                   " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "canet.", op, ": ", name,
                    " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, "canet.", op, ": ", name,
                    " must have shape ", shape, ", got ", t.sizes());
}

// Routes as contiguous int64 on x's device (a no-op for int64 inputs).
at::Tensor route_ints(const at::Tensor& t, const at::Tensor& x, const char* op,
                      const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   "canet.", op, ": ", name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "canet.", op, ": ", name,
                    " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.dim() == 1, "canet.", op, ": ", name,
                    " must be 1-D, got shape ", t.sizes());
  return t.to(at::kLong).contiguous();
}

struct Args {
  at::Tensor cu, widths;
  int64_t T, B;
  int D;
};

Args check_common(const at::Tensor& x, const at::Tensor& residual,
                  const at::Tensor& cu_seqlens, const at::Tensor& widths,
                  const at::Tensor& weight, const char* op) {
  check_x(x, op);
  const int64_t T = x.size(0), D = x.size(1);
  check_same(residual, x, op, "residual", {T, D}, x.scalar_type());
  check_same(weight, x, op, "weight", {D}, x.scalar_type());
  Args a;
  a.cu = route_ints(cu_seqlens, x, op, "cu_seqlens");
  a.widths = route_ints(widths, x, op, "widths");
  TORCH_CHECK_VALUE(a.cu.numel() >= 1, "canet.", op,
                    ": cu_seqlens must have B + 1 >= 1 entries");
  TORCH_CHECK_VALUE(a.widths.numel() + 1 == a.cu.numel(), "canet.", op,
                    ": widths has ", a.widths.numel(),
                    " entries but cu_seqlens describes ", a.cu.numel() - 1,
                    " samples");
  a.T = T;
  a.B = a.widths.numel();
  a.D = static_cast<int>(D);
  return a;
}

template <int VPT>
void launch_fwd(const at::Tensor& x, const at::Tensor& res, const Args& a,
                const at::Tensor& weight, const at::Tensor& bias,
                at::Tensor& out, at::Tensor& mean, at::Tensor& rstd,
                double eps) {
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((a.T + kRowsPerBlock - 1) / kRowsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "canet_add_ln_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        add_ln_fwd_kernel<scalar_t, acc_t, VPT><<<grid, block, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), res.const_data_ptr<scalar_t>(),
            a.cu.const_data_ptr<int64_t>(), a.widths.const_data_ptr<int64_t>(),
            a.B, weight.const_data_ptr<scalar_t>(),
            bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(),
            a.T, a.D, static_cast<acc_t>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sliced_add_layernorm_fwd_cuda(
    const at::Tensor& x_, const at::Tensor& residual_,
    const at::Tensor& cu_seqlens, const at::Tensor& widths,
    const at::Tensor& weight_, const at::Tensor& bias_, double eps) {
  const Args a = check_common(x_, residual_, cu_seqlens, widths, weight_, kFwd);
  check_same(bias_, x_, kFwd, "bias", {a.D}, x_.scalar_type());
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto x = x_.contiguous(), residual = residual_.contiguous();
  const auto weight = weight_.contiguous(), bias = bias_.contiguous();
  auto out = at::empty({a.T, a.D}, x.options());
  auto stats = x.options().dtype(stat_type(x.scalar_type()));
  auto mean = at::empty({a.T}, stats);
  auto rstd = at::empty({a.T}, stats);
  if (a.T > 0) {
    if (a.D <= 4 * kWarp) {
      launch_fwd<4>(x, residual, a, weight, bias, out, mean, rstd, eps);
    } else {
      launch_fwd<kMaxFeatures / kWarp>(x, residual, a, weight, bias, out, mean,
                                       rstd, eps);
    }
  }
  return {out, mean, rstd};
}

template <int VPT>
void launch_grad_input(const at::Tensor& dy, const at::Tensor& x,
                       const at::Tensor& res, const Args& a,
                       const at::Tensor& weight, const at::Tensor& mean,
                       const at::Tensor& rstd, at::Tensor& dx) {
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((a.T + kRowsPerBlock - 1) / kRowsPerBlock));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "canet_add_ln_grad_input", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        add_ln_grad_input_kernel<scalar_t, acc_t, VPT><<<grid, block, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            res.const_data_ptr<scalar_t>(), a.cu.const_data_ptr<int64_t>(),
            a.widths.const_data_ptr<int64_t>(), a.B,
            weight.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
            rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), a.T,
            a.D);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
sliced_add_layernorm_backward_cuda(const at::Tensor& grad_out_,
                                   const at::Tensor& x_,
                                   const at::Tensor& residual_,
                                   const at::Tensor& cu_seqlens,
                                   const at::Tensor& widths,
                                   const at::Tensor& weight_,
                                   const at::Tensor& mean_,
                                   const at::Tensor& rstd_) {
  const Args a = check_common(x_, residual_, cu_seqlens, widths, weight_, kBwd);
  check_same(grad_out_, x_, kBwd, "grad_out", {a.T, a.D}, x_.scalar_type());
  const auto st = stat_type(x_.scalar_type());
  check_same(mean_, x_, kBwd, "mean", {a.T}, st);
  check_same(rstd_, x_, kBwd, "rstd", {a.T}, st);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto dy = grad_out_.contiguous(), x = x_.contiguous();
  const auto residual = residual_.contiguous(), weight = weight_.contiguous();
  const auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  auto dx = at::empty({a.T, a.D}, x.options());
  if (a.T == 0) {
    auto zeros = at::zeros({a.D}, x.options());
    return {dx, zeros, zeros.clone()};
  }
  if (a.D <= 4 * kWarp) {
    launch_grad_input<4>(dy, x, residual, a, weight, mean, rstd, dx);
  } else {
    launch_grad_input<kMaxFeatures / kWarp>(dy, x, residual, a, weight, mean,
                                            rstd, dx);
  }

  // The chunk size depends on T only, so the summation order (and the bits
  // of the result) do not depend on the GPU or on the run.
  int64_t chunk = (a.T + kDwMaxChunks - 1) / kDwMaxChunks;
  chunk = std::max<int64_t>(64, (chunk + kDwRows - 1) / kDwRows * kDwRows);
  const int64_t chunks = (a.T + chunk - 1) / chunk;
  auto part_w = at::empty({chunks, a.D}, x.options().dtype(st));
  auto part_b = at::empty({chunks, a.D}, x.options().dtype(st));
  const dim3 block(kWarp, kDwRows);
  const dim3 grid(static_cast<unsigned>((a.D + kWarp - 1) / kWarp),
                  static_cast<unsigned>(chunks));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "canet_add_ln_grad_weight", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        add_ln_grad_weight_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            residual.const_data_ptr<scalar_t>(), a.cu.const_data_ptr<int64_t>(),
            a.widths.const_data_ptr<int64_t>(), a.B, mean.const_data_ptr<acc_t>(),
            rstd.const_data_ptr<acc_t>(), part_w.mutable_data_ptr<acc_t>(),
            part_b.mutable_data_ptr<acc_t>(), a.T, a.D, chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  auto grad_w = at::sum(part_w, 0).to(x.scalar_type());
  auto grad_b = at::sum(part_b, 0).to(x.scalar_type());
  return {dx, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(canet, CUDA, m) {
  m.impl("sliced_add_layernorm_fwd", &sliced_add_layernorm_fwd_cuda);
  m.impl("sliced_add_layernorm_backward", &sliced_add_layernorm_backward_cuda);
}

}  // namespace canet
