// Binary cross entropy with logits (csl_fast.accumulate_bce): forward with per-sample
// statistics, backward recomputed from the logits, and the recording pass (see kernels.h).
#include <cstdint>

#include "../bce_stats.h"
#include "../stats.h"
#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct MinOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a < b ? a : b;
  }
};

template <typename A>
struct EntryLoss {
  A plain, weighted;
};

// The form of csl_fast/reference.py: bce_entry_losses (no large terms cancel for hard
// targets); NaN logits or targets give NaN.
template <typename A>
__device__ __forceinline__ EntryLoss<A> entry_loss(A z, A y, A w, A pw) {
  const A log_term = dev_log1p(dev_exp(-fabs(z)));
  const bool pos = z >= A(0);
  // (z - z): NaN at z = -inf, as torch's form gives (csrc/cpu/bce.cpp)
  const A plain = (pos ? (A(1) - y) * z : -y * z + (z - z)) + log_term;
  const A linear = pos ? (A(1) - y) * z : -(pw * y) * z + (z - z);
  return {plain, w * (linear + (A(1) + (pw - A(1)) * y) * log_term)};
}

// w ((1 - y) sigmoid(z) - pw y sigmoid(-z)), both sigmoids from exp(-|z|). An infinite pw
// gives NaN, as PyTorch's form ((pw y + 1 - y) sigmoid(z) - pw y: inf - inf) does.
template <typename A>
__device__ __forceinline__ A entry_grad(A z, A y, A w, A pw) {
  if (is_inf(pw)) return nan_of<A>();
  const A e = dev_exp(-fabs(z));
  const A big = A(1) / (A(1) + e), small = e * big;
  const bool pos = z >= A(0);
  return w * ((A(1) - y) * (pos ? big : small) - pw * y * (pos ? small : big));
}

template <typename T>
__device__ __forceinline__ acc_t<T> at(const void* p, const int64_t* s, int64_t i, int64_t l) {
  return to_acc(static_cast<const T*>(p)[i * s[0] + l * s[1]]);
}

// An optional acc-type weight, 1 when absent.
template <typename A>
__device__ __forceinline__ A weight_at(const void* p, const int64_t* s, int64_t i, int64_t l) {
  return p == nullptr ? A(1) : static_cast<const A*>(p)[i * s[0] + l * s[1]];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bce_fwd_kernel(BceInputs in, bool per_entry, T* __restrict__ loss,
                   acc_t<T>* __restrict__ row_sums, float* __restrict__ stats) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  // Every lane of a warp takes the same rows: the shuffles below see the full warp.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < in.rows;
       i += step) {
    A plain = 0, weighted = 0, min_margin = inf_of<A>();
    int wrong = 0;
    for (int64_t l = lane; l < in.labels; l += 32) {
      const A z = at<T>(in.logits, in.z_stride, i, l), y = at<T>(in.target, in.y_stride, i, l);
      const EntryLoss<A> e = entry_loss(z, y, weight_at<A>(in.weight, in.w_stride, i, l),
                                        weight_at<A>(in.pos_weight, in.pw_stride, i, l));
      plain += e.plain;
      if (per_entry) {
        loss[i * in.labels + l] = Store<T>::from(e.weighted);
      } else {
        weighted += e.weighted;
      }
      wrong += (z >= A(0)) != (y >= A(0.5));
      const A margin = (A(2) * y - A(1)) * z;
      min_margin = margin < min_margin ? margin : min_margin;
    }
    plain = warp_allreduce(plain, SumOp());
    weighted = warp_allreduce(weighted, SumOp());
    wrong = warp_allreduce(wrong, SumOp());
    min_margin = warp_allreduce(min_margin, MinOp());
    if (lane == 0) {
      const bool valid = fits_float(plain);  // finite in the float32 statistics
      const int64_t B = in.rows;
      stats[kBceLoss * B + i] = valid ? static_cast<float>(plain) : 0.f;
      stats[kBceValid * B + i] = valid ? 1.f : 0.f;
      stats[kBceWrong * B + i] = valid ? static_cast<float>(wrong) : 0.f;
      stats[kBceMinMargin * B + i] = valid ? static_cast<float>(min_margin) : 0.f;
      if (!per_entry) row_sums[i] = weighted;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bce_bwd_kernel(BceInputs in, int reduction, const T* __restrict__ grad, int64_t g0,
                   int64_t g1, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t total = in.rows * in.labels;
  A scale = A(1);
  if (reduction != kNone) {
    scale = to_acc(grad[0]);
    if (reduction == kMean) scale /= static_cast<A>(total);
  }
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / in.labels, l = e % in.labels;
    const A g = reduction == kNone ? to_acc(grad[i * g0 + l * g1]) : scale;
    const A d = entry_grad(at<T>(in.logits, in.z_stride, i, l), at<T>(in.target, in.y_stride, i, l),
                           weight_at<A>(in.weight, in.w_stride, i, l),
                           weight_at<A>(in.pos_weight, in.pw_stride, i, l));
    out[e] = Store<T>::from(g * d);
  }
}

// buf[off] += v in the buffer's dtype: atomically, or (one writer per slot) plainly.
template <bool kAtomic, typename V>
__device__ __forceinline__ void add_to(void* buf, DType dt, int64_t off, V v) {
  switch (dt) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(buf) + off;
      if (kAtomic) atomicAdd(p, static_cast<float>(v)); else *p += static_cast<float>(v);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(buf) + off;
      if (kAtomic) atomicAdd(p, static_cast<double>(v)); else *p += static_cast<double>(v);
      break;
    }
    case DType::kInt32: {
      int* p = static_cast<int*>(buf) + off;
      if (kAtomic) atomicAdd(p, static_cast<int>(v)); else *p += static_cast<int>(v);
      break;
    }
    case DType::kInt64: {
      long long* p = static_cast<long long*>(buf) + off;
      // Two's complement: adding the unsigned image of a negative value subtracts.
      if (kAtomic) {
        atomicAdd(reinterpret_cast<unsigned long long*>(p),
                  static_cast<unsigned long long>(static_cast<long long>(v)));
      } else {
        *p += static_cast<long long>(v);
      }
      break;
    }
    default:
      break;
  }
}

__device__ __forceinline__ int64_t index_at(const BceRecordParams& p, int64_t i) {
  return p.index_dtype == DType::kInt32 ? static_cast<int64_t>(static_cast<const int32_t*>(p.index)[i])
                                        : static_cast<const int64_t*>(p.index)[i];
}

// Row i's values at slot k: the per-sample ones from the label-0 thread, label l's entry.
template <bool kAtomic, typename T>
__device__ __forceinline__ void add_row(const BceRecordParams& p, int64_t i, int64_t k,
                                        int64_t l) {
  using A = acc_t<T>;
  const int64_t B = p.in.rows;
  if (l == 0) {
    if (p.csl) add_to<kAtomic>(p.csl, p.csl_dtype, k, p.stats[kBceLoss * B + i]);
    if (p.count) add_to<kAtomic>(p.count, p.count_dtype, k, p.stats[kBceValid * B + i]);
    if (p.wrong) add_to<kAtomic>(p.wrong, p.wrong_dtype, k, p.stats[kBceWrong * B + i]);
    if (p.min_margin) {
      add_to<kAtomic>(p.min_margin, p.min_margin_dtype, k, p.stats[kBceMinMargin * B + i]);
    }
  }
  if (p.label_csl == nullptr && p.label_margin == nullptr && p.label_prob == nullptr) return;
  const A z = at<T>(p.in.logits, p.in.z_stride, i, l), y = at<T>(p.in.target, p.in.y_stride, i, l);
  const int64_t off = k * p.in.labels + l;
  if (p.label_csl || p.label_prob) {
    const A plain = entry_loss(z, y, A(1), A(1)).plain;
    if (p.label_csl) add_to<kAtomic>(p.label_csl, p.label_csl_dtype, off, plain);
    if (p.label_prob) add_to<kAtomic>(p.label_prob, p.label_prob_dtype, off, dev_exp(-plain));
  }
  if (p.label_margin) {
    add_to<kAtomic>(p.label_margin, p.label_margin_dtype, off, (A(2) * y - A(1)) * z);
  }
}

// Columns of the record launches: the labels, or one when no per-entry buffer is given.
__host__ __device__ __forceinline__ int64_t record_cols(const BceRecordParams& p) {
  return (p.label_csl || p.label_margin || p.label_prob) ? p.in.labels : 1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bce_record_atomic_kernel(BceRecordParams p) {
  const int64_t cols = record_cols(p);
  const int64_t total = p.in.rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, l = e % cols;
    const int64_t k = index_at(p, i);
    if (p.stats[kBceValid * p.in.rows + i] > 0.f && k >= 0 && k < p.n) {
      add_row<true, T>(p, i, k, l);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    bce_record_sorted_kernel(BceRecordParams p, const int64_t* __restrict__ sorted,
                             const int64_t* __restrict__ perm) {
  const int64_t cols = record_cols(p);
  const int64_t B = p.in.rows;
  const int64_t total = B * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pos = e / cols, l = e % cols;
    const int64_t k = sorted[pos];
    // The first position of a run owns the slot; a run outside [0, n) is skipped.
    if ((pos > 0 && sorted[pos - 1] == k) || k < 0 || k >= p.n) continue;
    for (int64_t q = pos; q < B && sorted[q] == k; ++q) {
      const int64_t i = perm[q];
      if (p.stats[kBceValid * B + i] > 0.f) add_row<false, T>(p, i, k, l);
    }
  }
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bce_fwd(const BceFwdParams& p, cudaStream_t stream) {
  if (p.in.rows == 0) return cudaSuccess;
  const unsigned grid = grid_for(p.in.rows, kWarps);
  return dispatch(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    bce_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
        p.in, p.reduction == kNone, static_cast<T*>(p.loss),
        static_cast<acc_t<T>*>(p.row_sums), p.stats);
  });
}

cudaError_t bce_bwd(const BceBwdParams& p, cudaStream_t stream) {
  if (p.in.rows * p.in.labels == 0) return cudaSuccess;
  const unsigned grid = grid_for(p.in.rows * p.in.labels, kThreads);
  return dispatch(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    bce_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(p.in, p.reduction,
                                                      static_cast<const T*>(p.grad), p.g_stride[0],
                                                      p.g_stride[1], static_cast<T*>(p.out));
  });
}

cudaError_t bce_record_atomic(const BceRecordParams& p, cudaStream_t stream) {
  if (p.in.rows == 0) return cudaSuccess;
  const unsigned grid = grid_for(p.in.rows * record_cols(p), kThreads);
  return dispatch(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    bce_record_atomic_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  });
}

cudaError_t bce_record_sorted(const BceRecordParams& p, const int64_t* sorted_index,
                              const int64_t* perm, cudaStream_t stream) {
  if (p.in.rows == 0) return cudaSuccess;
  const unsigned grid = grid_for(p.in.rows * record_cols(p), kThreads);
  return dispatch(p.in.dtype, [&](auto tag) {
    using T = decltype(tag);
    bce_record_sorted_kernel<T><<<grid, kThreads, 0, stream>>>(p, sorted_index, perm);
  });
}

}  // namespace cuda
}  // namespace csl_fast
