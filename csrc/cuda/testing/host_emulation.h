// Test-only: runs the plain-CUDA kernels of csrc/cuda on the CPU, so that their maths and
// indexing can be checked against csl_fast/reference.py on machines without a GPU
// (tests/test_cuda_compile.py). Not part of any build.
//
// How: the .cu file is compiled by the host C++ compiler with this header force-included
// (-include) after the test rewrote each `kernel<<<grid, block, smem, stream>>>(args);` into
// `csl_emu::launch([=] { kernel(args); }, grid, block, smem, stream);`. A launch runs its
// blocks one after another on blockDim.x std::threads. __shared__ becomes a
// function-local static (one block at a time, so one copy per kernel is enough),
// __syncthreads a block barrier, __shfl_xor_sync an exchange through a per-warp buffer with
// a warp barrier. Only 1-D launches with blockDim.x a multiple of 32 are supported (all that
// csl_fast uses). Slow: tiny shapes only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace csl_emu {

struct Block {
  explicit Block(unsigned threads) : sync(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  struct Warp {
    Warp() : sync(32) {}
    std::barrier<> sync;
    double slots[32];
  };
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local uint3 t_thread{};
inline thread_local uint3 t_block{};
inline thread_local dim3 t_block_dim{};
inline thread_local dim3 t_grid_dim{};
inline thread_local Block* t_current = nullptr;

template <typename F>
void launch(F&& body, dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  if (block.x % 32 != 0 || block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) {
    throw std::runtime_error("csl_emu: unsupported launch shape");
  }
  // blockDim.x threads run the blocks in turn; a barrier separates consecutive blocks, so
  // the function-static __shared__ arrays are never used by two blocks at once.
  Block state(block.x);
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([&, t] {
      t_thread = uint3{t, 0, 0};
      t_block_dim = block;
      t_grid_dim = grid;
      t_current = &state;
      for (unsigned b = 0; b < grid.x; ++b) {
        t_block = uint3{b, 0, 0};
        body();
        state.sync.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
}

inline void syncthreads() { t_current->sync.arrive_and_wait(); }

template <typename T>
T shfl_xor(unsigned, T v, int offset) {
  Block::Warp& w = *t_current->warps[t_thread.x / 32];
  const unsigned lane = t_thread.x % 32;
  w.slots[lane] = static_cast<double>(v);  // float -> double -> float is exact
  w.sync.arrive_and_wait();
  const T r = static_cast<T>(w.slots[lane ^ static_cast<unsigned>(offset)]);
  w.sync.arrive_and_wait();
  return r;
}

inline int atomic_or(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

// atomicAdd for the types csl_fast uses (float, double, int, unsigned long long).
template <typename T>
T atomic_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}

}  // namespace csl_emu

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::csl_emu::t_thread)
#define blockIdx (::csl_emu::t_block)
#define blockDim (::csl_emu::t_block_dim)
#define gridDim (::csl_emu::t_grid_dim)
#define __syncthreads() ::csl_emu::syncthreads()
#define __shfl_xor_sync(mask, v, offset) ::csl_emu::shfl_xor(mask, v, offset)
#define atomicOr(p, v) ::csl_emu::atomic_or(p, v)
#define atomicAdd(p, v) ::csl_emu::atomic_add(p, v)
#undef cudaMemsetAsync
#define cudaGetLastError() (cudaSuccess)
#define cudaMemsetAsync(ptr, value, bytes, stream) \
  (std::memset((ptr), (value), (bytes)), static_cast<void>(stream), cudaSuccess)
