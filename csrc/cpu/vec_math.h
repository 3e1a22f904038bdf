// Elementwise math that vectorizes (plain arithmetic in loops under
// `#pragma omp simd`; libm calls would not), in fp32; fp64 keeps libm
// (gradcheck runs in fp64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace canet {

// exp for x <= 0 that vectorizes: with head dims of 16-32 the softmax
// exponentials cost as much as the matmuls, and std::exp does not vectorize.
// Range reduction x = k ln2 + r, a degree-6 polynomial for e^r, 2^k from the
// exponent bits; relative error ~1e-7. fp64 keeps std::exp (gradcheck).
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// GELU in the exact (erf) form of F.gelu, on 8 floats at a time (GCC vector
// types: the auto-vectorizer gives up on this body). x * Phi(x) with Phi(x)
// = 1 - erfc(z) / 2 for x >= 0 and erfc(z) / 2 below, z = |x| / sqrt(2),
// erfc(z) = t P(t) exp(-z^2), t = 1 / (1 + p z) (Abramowitz & Stegun
// 7.1.26, absolute error <= 1.5e-7); exp(-z^2) as in exp_nonpos (its
// round-to-nearest trick needs IEEE arithmetic: no -ffast-math). ATen's
// GELU took ~1.2 ns per element here, the FFN's largest cost after its
// GEMMs.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 gelu_erf(f32x8 x) {
  // casts between vector types of one size keep the bits (GCC, clang)
  const i32x8 bits = (i32x8)x;
  const i32x8 sign = bits & INT32_MIN;
  f32x8 z = (f32x8)(bits & INT32_MAX) * 0.70710678118654752f;
  z = z < 9.0f ? z : f32x8{} + 9.0f;  // erfc(9) ~ 4e-37: exp below stays normal
  const f32x8 t = 1.0f / (1.0f + 0.3275911f * z);
  f32x8 p = 1.061405429f * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const f32x8 y = -z * z;
  const f32x8 k = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  const f32x8 r = y - k * 0.693359375f + k * 2.12194440e-4f;
  f32x8 e = 1.9875691500e-4f * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.0f;
  const i32x8 pow2 = (__builtin_convertvector(k, i32x8) + 127) << 23;
  const f32x8 half_erfc = 0.5f * p * t * e * (f32x8)pow2;
  // Phi = 0.5 + copysign(0.5 - half_erfc, x)
  return x * (0.5f + (f32x8)((i32x8)(0.5f - half_erfc) | sign));
}

inline float gelu_erf(float x) {
  f32x8 v{};
  v[0] = x;
  return gelu_erf(v)[0];
}

inline double gelu_erf(double x) { return 0.5 * x * std::erfc(-x * 0.70710678118654752); }

// a[j] = gelu(x[j]) for n floats (a may be x).
inline void gelu_erf(const float* x, float* a, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    f32x8 v;
    std::memcpy(&v, x + j, sizeof(v));
    v = gelu_erf(v);
    std::memcpy(a + j, &v, sizeof(v));
  }
  for (; j < n; ++j) a[j] = gelu_erf(x[j]);
}

}  // namespace canet
