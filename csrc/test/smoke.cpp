// C++ smoke test of the CMake-built library: libcanet.so is linked (kept
// with --no-as-needed), so its static registrations ran before main; the op
// is found through the dispatcher like any C++ user would find it, called on
// CPU tensors with mixed widths, and checked against a hand computation.
// Exit status 0 on success, 1 on any mismatch or error.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <optional>

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t t, int64_t o, double got,
            double want) {
  if (!ok) {
    std::fprintf(stderr, "FAIL %s at [%lld, %lld]: got %g, want %g\n", what,
                 static_cast<long long>(t), static_cast<long long>(o), got,
                 want);
    ++failures;
  }
}

// Small integers: every product and sum is exact in float32.
double value(int64_t i, int64_t j, int64_t salt) {
  return static_cast<double>((i * 7 + j * 3 + salt) % 5 - 2);
}

void run(bool with_bias) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const std::optional<at::Tensor>&);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("canet::sliced_linear", "")
                .typed<Sig>();

  // Three samples: rows 0-1, none (empty), rows 2-4.
  const int64_t T = 5, I = 4, O = 3;
  const int64_t cu[] = {0, 2, 2, 5};
  const int64_t in_w[] = {4, 3, 2};
  const int64_t out_w[] = {3, 1, 2};
  const int64_t sample_of_row[] = {0, 0, 2, 2, 2};

  auto x = at::empty({T, I}, at::kFloat);
  auto weight = at::empty({O, I}, at::kFloat);
  auto bias = at::empty({O}, at::kFloat);
  auto xa = x.accessor<float, 2>();
  auto wa = weight.accessor<float, 2>();
  auto ba = bias.accessor<float, 1>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) xa[t][i] = value(t, i, 1);
  for (int64_t o = 0; o < O; ++o) {
    ba[o] = value(o, 0, 4);
    for (int64_t i = 0; i < I; ++i) wa[o][i] = value(o, i, 2);
  }
  auto cu_t = at::tensor(at::ArrayRef<int64_t>(cu, 4), at::kLong);
  // int32 widths on purpose: both index dtypes are part of the contract.
  auto in_t = at::tensor(at::ArrayRef<int64_t>(in_w, 3), at::kLong).to(at::kInt);
  auto out_t = at::tensor(at::ArrayRef<int64_t>(out_w, 3), at::kLong);

  std::optional<at::Tensor> b;
  if (with_bias) b = bias;
  const at::Tensor y = op.call(x, cu_t, in_t, out_t, weight, b);
  if (y.sizes() != at::IntArrayRef({T, O}) || y.scalar_type() != at::kFloat) {
    std::fprintf(stderr, "FAIL: output has shape %s, dtype %s\n",
                 c10::str(y.sizes()).c_str(), c10::toString(y.scalar_type()));
    ++failures;
    return;
  }
  auto ya = y.accessor<float, 2>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sample_of_row[t];
    for (int64_t o = 0; o < O; ++o) {
      double want = 0.0;
      if (o < out_w[s]) {
        want = with_bias ? value(o, 0, 4) : 0.0;
        for (int64_t i = 0; i < in_w[s]; ++i)
          want += value(t, i, 1) * value(o, i, 2);
      }
      expect(ya[t][o] == want,
             o < out_w[s] ? "value" : "column beyond width is not zero", t, o,
             ya[t][o], want);
    }
  }
}

}  // namespace

// A library configured with CANET_WITH_CUDA=ON must carry CUDA kernels
// (checked through the dispatcher: no GPU is needed).
void check_cuda_registered() {
#ifdef CANET_SMOKE_EXPECT_CUDA
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
      "canet::sliced_add_layernorm_fwd", "");
  if (!op.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    std::fprintf(stderr, "FAIL: no CUDA kernel for canet::sliced_add_layernorm_fwd\n");
    ++failures;
  }
#endif
}

int main() {
  try {
    run(/*with_bias=*/true);
    run(/*with_bias=*/false);
    check_cuda_registered();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: %s\n", e.what());
    return 1;
  }
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return 1;
  }
  std::printf("canet smoke test passed: canet::sliced_linear on CPU%s\n",
#ifdef CANET_SMOKE_EXPECT_CUDA
              ", CUDA kernels registered"
#else
              ""
#endif
  );
  return 0;
}
