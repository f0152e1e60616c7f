// Device helpers shared by the csl_fast CUDA kernels (internal; included by the .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>

#include <cstdint>

#include "kernels.h"

namespace csl_fast {
namespace cuda {
namespace detail {

// Compute ("accumulation") type of a storage type: float64 stays float64, the rest use float32.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
struct Store;
template <>
struct Store<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
};
template <>
struct Store<double> {
  __device__ __forceinline__ static double from(double x) { return x; }
};
template <>
struct Store<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Store<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }
// fmax semantics: a NaN operand is dropped. Callers rely on NaNs reaching the loss through
// the exponential sums instead.
__device__ __forceinline__ float dev_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dev_max(double a, double b) { return fmax(a, b); }

template <typename A>
__device__ __forceinline__ A inf_of() {
  return static_cast<A>(INFINITY);
}
template <typename A>
__device__ __forceinline__ A nan_of() {
  return static_cast<A>(NAN);
}
// Finite once stored as a float32 statistic (a float64 loss past 3.4e38 is inf there).
template <typename A>
__device__ __forceinline__ bool fits_float(A x) {
  return fabs(x) <= static_cast<A>(3.4028234663852886e38);  // FLT_MAX; false for NaN
}
template <typename A>
__device__ __forceinline__ bool is_inf(A x) {
  return fabs(x) == inf_of<A>();
}

constexpr unsigned kFullMask = 0xffffffffu;

struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return dev_max(a, b);
  }
};
// Integer minimum (no NaN to propagate): the runner-up column's first-index reduction.
struct MinIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a < b ? a : b; }
};

struct MaxIntOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// An ignored row's gradient (target == ignore_index) is 0, or NaN as F.cross_entropy's:
// log_softmax's backward forms 0 - softmax(z) * 0, and softmax(z) is NaN when the row holds a
// NaN or a +inf logit, or is all -inf (soft-capped, a NaN only: s tanh(z / s) is finite).
// This thread's part, over the columns j = first, first + step, ... below n: 2 when one of
// them makes the row NaN, else 1 when one is above -inf (capped: when it has any), else 0.
// The row's gradient is 0 exactly when the maximum of the parts over the row is 1.
template <typename T>
__device__ __forceinline__ int ignored_row_part(const T* z, int64_t n, int64_t first,
                                                int64_t step, bool capped) {
  using A = acc_t<T>;
  int part = 0;
  for (int64_t j = first; j < n; j += step) {
    const A v = to_acc(z[j]);
    if (isnan(v) || (!capped && v == inf_of<A>())) {
      part = 2;
    } else if (part == 0 && (capped || v > -inf_of<A>())) {
      part = 1;
    }
  }
  return part;
}

// Butterfly all-reduce within a full warp (fixed order: bitwise reproducible).
template <typename A, typename Op>
__device__ __forceinline__ A warp_allreduce(A v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// All-reduce of NV values over the block. blockDim.x must be a multiple of 32 (<= 1024);
// smem must hold 32 * NV values of type A. Every thread gets the result. Fixed order.
template <int NV, typename A, typename Op>
__device__ __forceinline__ void block_allreduce(A (&v)[NV], Op op, A identity, A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_allreduce(v[i], op);
  __syncthreads();  // the previous use of smem is finished
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A x = lane < nwarps ? smem[i * 32 + lane] : identity;
    v[i] = warp_allreduce(x, op);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for grid-stride loops over `work` items of `per_block` each.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = ceil_div(work, per_block);
  const int64_t cap = int64_t{1} << 30;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace detail
}  // namespace cuda
}  // namespace csl_fast
