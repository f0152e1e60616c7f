// Test-only: cub::DeviceRadixSort::SortPairs for the host emulation (host_emulation.h), so
// that scatter_kernels.cu's deterministic mode runs on the CPU. Found before the CUDA
// toolkit's cub because csrc/cuda/testing is on the include path first. A stable sort of
// the pairs by the key bits [begin_bit, end_bit), as the radix sort; the size query
// returns one byte. Not part of any build.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <vector>

namespace cub {

struct DeviceRadixSort {
  template <typename K, typename V, typename N>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, N num_items, int begin_bit = 0,
                               int end_bit = static_cast<int>(sizeof(K) * 8),
                               cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 1;
      return cudaSuccess;
    }
    const int width = end_bit - begin_bit;
    const K mask = width >= static_cast<int>(sizeof(K) * 8) ? ~K(0) : ((K(1) << width) - 1);
    auto bits = [&](size_t i) { return (keys_in[i] >> begin_bit) & mask; };
    std::vector<size_t> order(static_cast<size_t>(num_items));
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return bits(a) < bits(b); });
    for (size_t i = 0; i < order.size(); ++i) {
      keys_out[i] = keys_in[order[i]];
      values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};

}  // namespace cub
