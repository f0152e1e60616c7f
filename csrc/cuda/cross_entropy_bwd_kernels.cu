// Backward of the fused cross entropy for float16/bfloat16 logits in one elementwise pass
// (declared and specified in kernels.h: cross_entropy_bwd). One warp per (row, chunk of
// kBwdChunk classes), 8 warps per block, grid-stride: the per-row coefficients come from
// the forward's statistics, so a warp reads its chunk once and writes it once; only rows
// the forward did not record (or with a loss above kBwdLossBound) reduce over the row,
// and an ignored row is read and written whole by one warp (its gradient, 0 or NaN, depends
// on every column).
#include "../stats.h"
#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kBwdWarpsPerBlock = 8;

template <typename T>
struct BwdArgs {
  const T* logits;
  int64_t rows, ld, classes, chunks;
  const int64_t* target;
  int64_t ignore_index;
  const float* weight;
  const float* weight_sum;
  float eps;
  const float* stats;
  const float* scale;
  bool per_row_scale;
  T* grad;
  int* error_flag;
  float cap, zs;
};

// z' = cap tanh(z / cap) (the forward's), or z without a cap.
__device__ __forceinline__ float capped(float z, float cap) {
  return cap != 0.f ? cap * dev_tanh(z / cap) : z;
}

template <typename T>
__global__ void __launch_bounds__(kBwdWarpsPerBlock * 32) ce_bwd_kernel(const BwdArgs<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t items = a.rows * a.chunks;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdWarpsPerBlock;
  const int64_t C = a.classes;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kBwdWarpsPerBlock + (threadIdx.x >> 5);
       item < items; item += stride) {
    const int64_t i = item / a.chunks;
    const int64_t lo = (item % a.chunks) * kBwdChunk;
    const int64_t hi = lo + kBwdChunk < C ? lo + kBwdChunk : C;
    const T* z = a.logits + i * a.ld;
    T* g = a.grad + i * C;
    const int64_t y = a.target[i];
    if (y == a.ignore_index) {
      // 0, or NaN as F.cross_entropy's, which depends on every column (ignored_row_part): the
      // first chunk's warp reads and writes the whole row, once; the others have nothing to do.
      if (lo != 0) continue;
      const int part = warp_allreduce(ignored_row_part(z, C, lane, 32, a.cap != 0.f), MaxIntOp());
      const T fill = Store<T>::from(part != 1 ? nan_of<float>() : 0.f);
      for (int64_t j = lane; j < C; j += 32) g[j] = fill;
      continue;
    }
    if (y < 0 || y >= C) {
      if (lane == 0 && a.error_flag != nullptr) atomicOr(a.error_flag, kErrTargetOutOfRange);
      const T fill = Store<T>::from(nan_of<float>());
      for (int64_t j = lo + lane; j < hi; j += 32) g[j] = fill;
      continue;
    }
    const float cap = a.cap;
    const float z_y = capped(to_acc(z[y]), cap);
    float loss = a.stats[kLoss * a.rows + i];
    float ref = z_y, off = loss;
    if (!(a.stats[kValid * a.rows + i] > 0.f && loss <= kBwdLossBound)) {
      // Not recorded or far from confident: lse from the row (warp-uniform branch).
      float m = -inf_of<float>();
      for (int64_t j = lane; j < C; j += 32) m = dev_max(m, capped(to_acc(z[j]), cap));
      m = warp_allreduce(m, MaxOp());
      float s = 0.f;
      for (int64_t j = lane; j < C; j += 32) s += dev_exp(capped(to_acc(z[j]), cap) - m);
      s = warp_allreduce(s, SumOp());
      const float log_s = dev_log(s);
      ref = m;
      off = log_s;
      loss = log_s + (m - z_y);
    }
    const float scale = a.scale[a.per_row_scale ? i : 0];
    const float eps = a.eps;
    const float w_y = a.weight ? a.weight[y] : 1.f;
    // Without label smoothing the other classes' weights are left out, not multiplied by
    // 0: a NaN or inf class weight then reaches only the rows of its class, as in F.
    const bool smoothing = eps != 0.f;
    const float* ws = smoothing ? a.weight : nullptr;
    const float w_total = !smoothing ? 0.f : a.weight ? *a.weight_sum : static_cast<float>(C);
    const float smooth = eps / static_cast<float>(C);
    const float p_y = dev_exp(-loss);
    const float q = -expm1f(-loss);  // 1 - p_y without cancellation
    const float z_coef = a.zs != 0.f ? 2.f * a.zs * (ref + off) : 0.f;  // the z-loss's
    // d objective / d z'_j = (1-eps) w_y (p_j - [j == y]) + smooth (W p_j - w_j) + z_coef p_j.
    const float coef = ((1.f - eps) * w_y + smooth * w_total + z_coef) * scale;
    const float b = smooth * scale;
    const float g_y =
        (-(1.f - eps) * w_y * q + smooth * (w_total * p_y - w_y) + z_coef * p_y) * scale;
    for (int64_t j = lo + lane; j < hi; j += 32) {
      const float zj = to_acc(z[j]);
      float v;
      if (cap != 0.f) {
        const float t = dev_tanh(zj / cap);
        const float p = dev_exp((cap * t - ref) - off);
        v = (j == y ? g_y : coef * p - b * (ws ? ws[j] : 1.f)) * (1.f - t * t);
      } else {
        const float p = dev_exp((zj - ref) - off);
        v = j == y ? g_y : coef * p - b * (ws ? ws[j] : 1.f);
      }
      g[j] = Store<T>::from(v);
    }
  }
}

template <typename T>
cudaError_t launch_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  BwdArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.rows = p.rows;
  a.ld = p.logits_row_stride;
  a.classes = p.classes;
  a.chunks = ceil_div(p.classes, kBwdChunk);
  a.target = p.target;
  a.ignore_index = p.ignore_index;
  a.weight = p.weight;
  a.weight_sum = p.weight_sum;
  a.eps = static_cast<float>(p.label_smoothing);
  a.stats = p.stats;
  a.scale = p.scale;
  a.per_row_scale = p.per_row_scale;
  a.grad = static_cast<T*>(p.grad);
  a.error_flag = p.error_flag;
  a.cap = static_cast<float>(p.softcap);
  a.zs = static_cast<float>(p.z_loss_scale);
  if (p.rows == 0) return cudaGetLastError();
  const unsigned blocks = grid_for(p.rows * a.chunks, kBwdWarpsPerBlock);
  ce_bwd_kernel<T><<<blocks, kBwdWarpsPerBlock * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.classes < 1 || p.classes > kMaxClasses || p.logits_row_stride < 0 ||
      p.softcap < 0.0 || p.z_loss_scale < 0.0) {
    return cudaErrorInvalidValue;
  }
  if (p.rows > 0 && (p.logits == nullptr || p.target == nullptr || p.stats == nullptr ||
                     p.scale == nullptr || p.grad == nullptr ||
                     (p.weight != nullptr && p.weight_sum == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (p.logits_dtype) {
    case DType::kFloat16:
      return launch_bwd<__half>(p, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace csl_fast
