// Small numeric helpers shared by the CPU kernels. Written so GCC vectorises them
// (no calls into libm in hot loops, `omp simd` reductions) without -ffast-math, which
// would drop the NaN propagation that F.cross_entropy has.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace csl_fast {
namespace cpu {

// expf by range reduction and a degree-6 minimax polynomial (Cephes' coefficients),
// within ~2 ulp of std::exp on its domain. Branch-free so it vectorises; NaN in gives
// NaN out; below the smallest normal result it returns exactly 0, as exp(-inf) must.
// always_inline: it must be inlined into each target clone of the hot loops to vectorise.
inline __attribute__((always_inline)) float exp_approx(float x) {
  const float hi = 88.0f;  // keeps n <= 127; csl_fast only calls it with x <= 0
  const float lo = -87.3365447505531f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
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
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  return x < lo ? 0.0f : result;
}

inline __attribute__((always_inline)) double exp_approx(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace csl_fast
