// Per-row squared L2 norms of scale * grad over a contiguous [rows, cols] view
// (csl_fast::input_grad_norms). Accumulates in float32 (float64 for float64 grads), writes
// float32. Rows of up to kWarpMaxCols get one warp each; longer rows one block each, and a
// row longer than kColsPerBlock is split over several blocks; their partial sums
// go to a workspace and a second kernel adds them in a fixed order (no atomics), so the
// result is bitwise reproducible.
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int64_t kColsPerBlock = 16384;  // multiple of every vector width
constexpr int64_t kMaxSplits = 4096;
constexpr int64_t kWarpMaxCols = 1024;  // shorter rows: one warp per row

template <typename T>
__device__ __forceinline__ acc_t<T> sq(T g, acc_t<T> scale) {
  const acc_t<T> x = to_acc(g) * scale;
  return x * x;
}

// Block b handles row b / splits, columns [(b % splits) * chunk, ...). kVec: 16-byte loads
// (the launcher checks alignment: base pointer, cols and chunk multiples of the width).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    norms_kernel(const T* __restrict__ grad, int64_t rows, int64_t cols, acc_t<T> scale,
                 int64_t splits, int64_t chunk, float* __restrict__ out,
                 acc_t<T>* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t total = rows * splits;
  for (int64_t b = blockIdx.x; b < total; b += gridDim.x) {
    const int64_t row = b / splits;
    const int64_t split = b - row * splits;
    const int64_t begin = split * chunk;
    int64_t end = begin + chunk < cols ? begin + chunk : cols;
    if (end < begin) end = begin;  // trailing splits can be empty after rounding the chunk
    const T* __restrict__ g = grad + row * cols;
    A acc[1] = {A(0)};
    int64_t scalar_begin = begin;
    if constexpr (kVec) {
      constexpr int V = 16 / sizeof(T);
      const int64_t nvec = (end - begin) / V;
      const uint4* __restrict__ gv = reinterpret_cast<const uint4*>(g + begin);
      for (int64_t q = threadIdx.x; q < nvec; q += blockDim.x) {
        const uint4 raw = gv[q];
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[0] += sq(e[v], scale);
      }
      scalar_begin = begin + nvec * V;
    }
    for (int64_t j = scalar_begin + threadIdx.x; j < end; j += blockDim.x) acc[0] += sq(g[j], scale);
    block_allreduce(acc, SumOp(), A(0), smem);
    if (threadIdx.x == 0) {
      if (splits == 1) {
        out[row] = static_cast<float>(acc[0]);
      } else {
        partial[b] = acc[0];
      }
    }
  }
}

// Short rows (cols <= kWarpMaxCols): one warp per row, 8 rows per block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    norms_warp_kernel(const T* __restrict__ grad, int64_t rows, int64_t cols, acc_t<T> scale,
                      float* __restrict__ out) {
  using A = acc_t<T>;
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* __restrict__ g = grad + row * cols;
    A acc = A(0);
    for (int64_t j = lane; j < cols; j += 32) acc += sq(g[j], scale);
    acc = warp_allreduce(acc, SumOp());
    if (lane == 0) out[row] = static_cast<float>(acc);
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    norms_finish_kernel(const A* __restrict__ partial, int64_t rows, int64_t splits,
                        float* __restrict__ out) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int64_t k = 0; k < splits; ++k) s += partial[row * splits + k];
    out[row] = static_cast<float>(s);
  }
}

struct Plan {
  int64_t splits;
  int64_t chunk;
};

Plan plan(const InputGradNormsParams& p) {
  Plan pl;
  pl.splits = ceil_div(p.cols, kColsPerBlock);
  if (pl.splits < 1) pl.splits = 1;
  if (pl.splits > kMaxSplits) pl.splits = kMaxSplits;
  pl.chunk = ceil_div(p.cols, pl.splits);
  // Multiple of 8 elements: chunk starts stay 16-byte aligned when cols is a multiple of the
  // vector width (the vector path's condition).
  pl.chunk = ceil_div(pl.chunk, 8) * 8;
  return pl;
}

size_t acc_size(DType d) { return d == DType::kFloat64 ? sizeof(double) : sizeof(float); }

template <typename T>
cudaError_t launch(const InputGradNormsParams& p, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const T* grad = static_cast<const T*>(p.grad);
  const A scale = static_cast<A>(p.scale);
  if (p.cols <= kWarpMaxCols) {
    norms_warp_kernel<T><<<grid_for(p.rows, kThreads / 32), kThreads, 0, stream>>>(
        grad, p.rows, p.cols, scale, p.out);
    return cudaGetLastError();
  }
  const Plan pl = plan(p);
  constexpr int V = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(grad) % 16 == 0 && p.cols % V == 0 &&
                   pl.chunk % V == 0;
  A* partial = static_cast<A*>(workspace);
  const unsigned grid = grid_for(p.rows * pl.splits, 1);
  if (vec) {
    norms_kernel<T, true><<<grid, kThreads, 0, stream>>>(grad, p.rows, p.cols, scale, pl.splits,
                                                         pl.chunk, p.out, partial);
  } else {
    norms_kernel<T, false><<<grid, kThreads, 0, stream>>>(grad, p.rows, p.cols, scale,
                                                          pl.splits, pl.chunk, p.out, partial);
  }
  if (pl.splits > 1) {
    norms_finish_kernel<A><<<grid_for(p.rows, kThreads), kThreads, 0, stream>>>(
        partial, p.rows, pl.splits, p.out);
  }
  return cudaGetLastError();
}

}  // namespace

size_t input_grad_norms_workspace_bytes(const InputGradNormsParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return 0;
  const Plan pl = plan(p);
  return pl.splits > 1 ? static_cast<size_t>(p.rows * pl.splits) * acc_size(p.dtype) : 0;
}

cudaError_t input_grad_norms(const InputGradNormsParams& p, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (p.cols == 0) return cudaMemsetAsync(p.out, 0, static_cast<size_t>(p.rows) * sizeof(float),
                                          stream);
  if (p.grad == nullptr) return cudaErrorInvalidValue;
  const size_t need = input_grad_norms_workspace_bytes(p);
  if (need > 0 && (workspace == nullptr || workspace_bytes < need)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch<float>(p, workspace, stream);
    case DType::kFloat16:
      return launch<__half>(p, workspace, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(p, workspace, stream);
    case DType::kFloat64:
      return launch<double>(p, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace csl_fast
