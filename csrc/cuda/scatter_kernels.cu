// Scatter of per-row statistics into dataset-sized buffers (csl_fast::scatter_stats):
//   csl[index[i]] += stats[kLoss, i],  count[index[i]] += stats[kValid, i].
// Two modes (see kernels.h): atomics (default, one launch) and a deterministic mode that
// groups duplicate indices with a stable radix sort and adds each group in row order.
#include <cub/device/device_radix_sort.cuh>

#include <cstdint>
#include <type_traits>

#include "../stats.h"
#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;

__device__ __forceinline__ void atomic_add_value(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add_value(double* p, float v) {
  atomicAdd(p, static_cast<double>(v));
}
__device__ __forceinline__ void atomic_add_value(int32_t* p, float v) {
  atomicAdd(reinterpret_cast<int*>(p), static_cast<int>(v));
}
__device__ __forceinline__ void atomic_add_value(int64_t* p, float v) {
  // Two's complement: adding the unsigned image of a negative value subtracts.
  atomicAdd(reinterpret_cast<unsigned long long*>(p),
            static_cast<unsigned long long>(static_cast<long long>(v)));
}

__device__ __forceinline__ void flag(int* error_flag) {
  if (error_flag != nullptr) atomicOr(error_flag, kErrIndexOutOfRange);
}

template <typename I, typename CslT, typename CountT>
__global__ void __launch_bounds__(kThreads)
    scatter_atomic_kernel(const float* __restrict__ stats, int64_t rows,
                          const I* __restrict__ index, CslT* __restrict__ csl, int64_t csl_size,
                          CountT* __restrict__ count, int64_t count_size, int* error_flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = static_cast<int64_t>(index[i]);
    if (csl != nullptr) {
      if (idx >= 0 && idx < csl_size) {
        atomic_add_value(csl + idx, stats[kLoss * rows + i]);
      } else {
        flag(error_flag);
      }
    }
    if (count != nullptr) {
      if (idx >= 0 && idx < count_size) {
        atomic_add_value(count + idx, stats[kValid * rows + i]);
      } else {
        flag(error_flag);
      }
    }
  }
}

// Deterministic mode, step 1: sort keys (index, or the sentinel `limit` when out of range
// of every buffer) and row ids.
template <typename I>
__global__ void __launch_bounds__(kThreads)
    scatter_keys_kernel(const I* __restrict__ index, int64_t rows, uint64_t limit,
                        uint64_t* __restrict__ keys, int32_t* __restrict__ ids) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = static_cast<int64_t>(index[i]);
    keys[i] = (idx >= 0 && static_cast<uint64_t>(idx) < limit) ? static_cast<uint64_t>(idx)
                                                                 : limit;
    ids[i] = static_cast<int32_t>(i);
  }
}

// Step 3: the first entry of each run of equal sorted keys adds the run's values, in
// ascending row order (the radix sort is stable), with a plain read-modify-write: no other
// thread touches that slot.
template <typename CslT, typename CountT>
__global__ void __launch_bounds__(kThreads)
    scatter_groups_kernel(const float* __restrict__ stats, int64_t rows,
                          const uint64_t* __restrict__ keys, const int32_t* __restrict__ ids,
                          CslT* __restrict__ csl, int64_t csl_size, CountT* __restrict__ count,
                          int64_t count_size, int* error_flag) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < rows;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = keys[k];
    if (k > 0 && keys[k - 1] == key) continue;  // not the head of its run
    int64_t end = k + 1;
    while (end < rows && keys[end] == key) ++end;
    if (csl != nullptr) {
      if (key < static_cast<uint64_t>(csl_size)) {
        CslT acc = csl[key];
        for (int64_t q = k; q < end; ++q) acc += static_cast<CslT>(stats[kLoss * rows + ids[q]]);
        csl[key] = acc;
      } else {
        flag(error_flag);
      }
    }
    if (count != nullptr) {
      if (key < static_cast<uint64_t>(count_size)) {
        CountT acc = count[key];
        for (int64_t q = k; q < end; ++q)
          acc += static_cast<CountT>(stats[kValid * rows + ids[q]]);
        count[key] = acc;
      } else {
        flag(error_flag);
      }
    }
  }
}

// Type dispatch: calls f(I*, CslT*, CountT*) with typed null pointers (tags).
template <typename F>
cudaError_t dispatch_index(DType d, F&& f) {
  switch (d) {
    case DType::kInt32:
      return f(static_cast<const int32_t*>(nullptr));
    case DType::kInt64:
      return f(static_cast<const int64_t*>(nullptr));
    default:
      return cudaErrorInvalidValue;
  }
}
template <typename F>
cudaError_t dispatch_csl(const ScatterParams& p, F&& f) {
  if (p.csl == nullptr) return f(static_cast<float*>(nullptr));
  switch (p.csl_dtype) {
    case DType::kFloat32:
      return f(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return f(static_cast<double*>(nullptr));
    default:
      return cudaErrorInvalidValue;
  }
}
template <typename F>
cudaError_t dispatch_count(const ScatterParams& p, F&& f) {
  if (p.count == nullptr) return f(static_cast<float*>(nullptr));
  switch (p.count_dtype) {
    case DType::kFloat32:
      return f(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return f(static_cast<double*>(nullptr));
    case DType::kInt32:
      return f(static_cast<int32_t*>(nullptr));
    case DType::kInt64:
      return f(static_cast<int64_t*>(nullptr));
    default:
      return cudaErrorInvalidValue;
  }
}

int64_t buffer_limit(const ScatterParams& p) {
  int64_t n = 0;
  if (p.csl != nullptr && p.csl_size > n) n = p.csl_size;
  if (p.count != nullptr && p.count_size > n) n = p.count_size;
  return n;
}

int key_bits(int64_t limit) {  // bits to represent 0..limit (limit is the sentinel)
  int bits = 1;
  while (bits < 63 && (static_cast<uint64_t>(limit) >> bits) != 0) ++bits;
  return bits;
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  uint64_t* keys_in;
  uint64_t* keys_out;
  int32_t* ids_in;
  int32_t* ids_out;
  void* temp;
  size_t temp_bytes;
};

cudaError_t sort_temp_bytes(int64_t rows, int bits, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(nullptr, *bytes, static_cast<const uint64_t*>(nullptr),
                                         static_cast<uint64_t*>(nullptr),
                                         static_cast<const int32_t*>(nullptr),
                                         static_cast<int32_t*>(nullptr), rows, 0, bits);
}

size_t arrays_bytes(int64_t rows) {
  const size_t n = static_cast<size_t>(rows);
  return 2 * align_up(n * sizeof(uint64_t)) + 2 * align_up(n * sizeof(int32_t));
}

}  // namespace

cudaError_t scatter_stats_atomic(const ScatterParams& p, cudaStream_t stream) {
  if (p.rows < 0) return cudaErrorInvalidValue;
  if (p.rows == 0 || (p.csl == nullptr && p.count == nullptr)) return cudaSuccess;
  if (p.stats == nullptr || p.index == nullptr) return cudaErrorInvalidValue;
  return dispatch_index(p.index_dtype, [&](auto index_tag) {
    using I = std::remove_const_t<std::remove_pointer_t<decltype(index_tag)>>;
    return dispatch_csl(p, [&](auto csl_tag) {
      using CslT = std::remove_pointer_t<decltype(csl_tag)>;
      return dispatch_count(p, [&](auto count_tag) {
        using CountT = std::remove_pointer_t<decltype(count_tag)>;
        scatter_atomic_kernel<I, CslT, CountT><<<grid_for(p.rows, kThreads), kThreads, 0, stream>>>(
            p.stats, p.rows, static_cast<const I*>(p.index), static_cast<CslT*>(p.csl),
            p.csl_size, static_cast<CountT*>(p.count), p.count_size, p.error_flag);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t scatter_stats_deterministic_workspace_bytes(int64_t rows, int64_t max_buffer_size,
                                                        size_t* bytes) {
  *bytes = 0;
  if (rows < 0 || rows > INT32_MAX || max_buffer_size < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  size_t temp = 0;
  const cudaError_t err = sort_temp_bytes(rows, key_bits(max_buffer_size), &temp);
  if (err != cudaSuccess) return err;
  *bytes = arrays_bytes(rows) + align_up(temp);
  return cudaSuccess;
}

cudaError_t scatter_stats_deterministic(const ScatterParams& p, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream) {
  if (p.rows < 0 || p.rows > INT32_MAX) return cudaErrorInvalidValue;
  if (p.rows == 0 || (p.csl == nullptr && p.count == nullptr)) return cudaSuccess;
  if (p.stats == nullptr || p.index == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t limit = buffer_limit(p);
  const int bits = key_bits(limit);
  size_t temp = 0;
  cudaError_t err = sort_temp_bytes(p.rows, bits, &temp);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < arrays_bytes(p.rows) + align_up(temp)) return cudaErrorInvalidValue;

  const size_t n = static_cast<size_t>(p.rows);
  char* base = static_cast<char*>(workspace);
  Workspace w;
  w.keys_in = reinterpret_cast<uint64_t*>(base);
  base += align_up(n * sizeof(uint64_t));
  w.keys_out = reinterpret_cast<uint64_t*>(base);
  base += align_up(n * sizeof(uint64_t));
  w.ids_in = reinterpret_cast<int32_t*>(base);
  base += align_up(n * sizeof(int32_t));
  w.ids_out = reinterpret_cast<int32_t*>(base);
  base += align_up(n * sizeof(int32_t));
  w.temp = base;
  w.temp_bytes = temp;

  const unsigned grid = grid_for(p.rows, kThreads);
  err = dispatch_index(p.index_dtype, [&](auto index_tag) {
    using I = std::remove_const_t<std::remove_pointer_t<decltype(index_tag)>>;
    scatter_keys_kernel<I><<<grid, kThreads, 0, stream>>>(
        static_cast<const I*>(p.index), p.rows, static_cast<uint64_t>(limit), w.keys_in,
        w.ids_in);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  err = cub::DeviceRadixSort::SortPairs(w.temp, w.temp_bytes, w.keys_in, w.keys_out, w.ids_in,
                                        w.ids_out, p.rows, 0, bits, stream);
  if (err != cudaSuccess) return err;
  return dispatch_csl(p, [&](auto csl_tag) {
    using CslT = std::remove_pointer_t<decltype(csl_tag)>;
    return dispatch_count(p, [&](auto count_tag) {
      using CountT = std::remove_pointer_t<decltype(count_tag)>;
      scatter_groups_kernel<CslT, CountT><<<grid, kThreads, 0, stream>>>(
          p.stats, p.rows, w.keys_out, w.ids_out, static_cast<CslT*>(p.csl), p.csl_size,
          static_cast<CountT*>(p.count), p.count_size, p.error_flag);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace csl_fast
