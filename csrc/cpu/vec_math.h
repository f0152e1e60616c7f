// Small numeric helpers shared by the CPU kernels. Written so GCC vectorises them
// (no calls into libm in hot loops, `omp simd` reductions) without -ffast-math, which
// would drop the NaN propagation that F.cross_entropy has.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace csl_fast {
namespace cpu {

// Whether a per-row loss may be recorded: finite once stored as a float32 statistic. A
// float64 loss past float32's range (3.4e38) would be +inf there, and one such step would
// make the sample's CSL inf for good; NaN and +-inf are refused too.
inline bool fits_float(double x) {
  return std::fabs(x) <= static_cast<double>(std::numeric_limits<float>::max());
}

// exp(r) for |r| <= ln(2) / 2 by a degree-6 minimax polynomial (Cephes' coefficients),
// after the range reduction x = n ln 2 + r of an x already clamped to [-104, 88];
// `n` is returned through `n_out`. Shared by the two expf below.
inline __attribute__((always_inline)) float exp_reduced(float xc, int32_t& n_out) {
  // Round-to-nearest by the 1.5 * 2^23 trick: vectorises on plain SSE2.
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  n_out = static_cast<int32_t>(n);
  return p * r * r + r + 1.0f;
}

inline __attribute__((always_inline)) float pow2(int32_t n) {  // n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

// expf within ~2 ulp of std::exp on its normal range. Branch-free so it vectorises; NaN
// in gives NaN out; below the smallest normal result it returns exactly 0, as exp(-inf)
// must: the softmax of the cross-entropy kernels, where such terms cannot change a loss
// and a gradient entry under 1e-38 is 0 to any optimiser (keeping them, as
// exp_subnormal does, cost ~10% of the forward at 32000 classes). always_inline: it must
// be inlined into each target clone of the hot loops to vectorise.
inline __attribute__((always_inline)) float exp_approx(float x) {
  const float hi = 88.0f;  // keeps n <= 127; csl_fast only calls it with x <= 0
  const float lo = -87.3365447505531f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  int32_t n;
  const float p = exp_reduced(xc, n);
  const float result = p * pow2(n);
  return x < lo ? 0.0f : result;
}

// expf as exp_approx, but results below the smallest normal come out subnormal, as
// std::exp's do, down to 2^-150: 2^n is applied as two normal factors, so the one
// rounding to a subnormal is the last multiply. For BCE, whose gradient sigmoid(z) at
// z < -87.3, or a loss term that small times a large weight (6e-9 at z = -88 with a
// weight of 1e30), is an entry's whole value.
inline __attribute__((always_inline)) float exp_subnormal(float x) {
  const float hi = 88.0f;
  const float lo = -103.972077f;  // ln 2^-150: anything below rounds to 0
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  int32_t n;
  const float p = exp_reduced(xc, n);
  const int32_t half = n >> 1;  // n in [-150, 127]: both halves normal
  const float result = (p * pow2(half)) * pow2(n - half);
  return x < lo ? 0.0f : result;
}

inline __attribute__((always_inline)) double exp_subnormal(double x) { return std::exp(x); }
inline __attribute__((always_inline)) double exp_approx(double x) { return std::exp(x); }

// tanh without libm, so soft-capping vectorises: (1 - e) / (1 + e) with e = exp(-2|x|),
// and below |x| = 1/4, where 1 - e would cancel, the odd Taylor polynomial
// x + x^3 P(x^2) to x^11 (truncation < 1e-10 there). Within a few ulp of std::tanh; NaN
// gives NaN, +-inf gives +-1. (The Triton kernel takes tanh the same way.)
inline __attribute__((always_inline)) float tanh_approx(float x) {
  const float a = std::fabs(x);
  const float e = exp_approx(-2.0f * a);
  const float far = (1.0f - e) / (1.0f + e);
  const float x2 = x * x;
  float p = -1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float near = a + a * x2 * p;
  return std::copysign(a < 0.25f ? near : far, x);
}

inline __attribute__((always_inline)) double tanh_approx(double x) { return std::tanh(x); }

// Whether F.cross_entropy's gradient of an ignored row (target == ignore_index) is NaN
// rather than 0: log_softmax's backward forms 0 - softmax(z) * 0, and softmax(z) is NaN
// when the row holds a NaN or a +inf, or is all -inf (soft-capped, only a NaN: s tanh(z/s)
// is finite). One read of the row; ignored rows only, and only where a gradient is formed.
template <typename acc_t, typename scalar_t>
inline __attribute__((always_inline)) bool ignored_grad_is_nan(const scalar_t* z, int64_t n,
                                                               bool capped) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(z[j]);
    m = v > m ? v : m;
    nan |= v != v;
  }
  return nan != 0 || (!capped && !std::isfinite(m));
}

}  // namespace cpu
}  // namespace csl_fast
