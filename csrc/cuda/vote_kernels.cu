// The suggested-label vote of a tracker on the GPU (see kernels.h: VoteParams). Plain CUDA
// (no torch headers); csl_fast/reference.py (vote_step) is the semantic ground truth.
#include "../stats.h"
#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kVoteThreads = 256;

// Position pos starts a run of equal sorted indices: walk it in batch order (the sort is
// stable) with the sample's state in registers, then write the state back once. A run of
// k duplicates is k dependent steps on one thread; runs are short in practice.
__global__ void __launch_bounds__(kVoteThreads) vote_sorted_kernel(const VoteParams p) {
  const int64_t rows = p.rows;
  for (int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; pos < rows;
       pos += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = p.sorted_index[pos];
    if ((pos > 0 && p.sorted_index[pos - 1] == key) || key < 0 || key >= p.n) continue;
    int32_t label = p.label[key], votes = p.votes[key], hits = p.hits[key];
    for (int64_t q = pos; q < rows && p.sorted_index[q] == key; ++q) {
      const int64_t row = p.perm[q];
      const float r_f = p.stats[kOtherArgmax * rows + row];
      if (!(p.stats[kValid * rows + row] > 0.0f) || p.stats[kCorrect * rows + row] > 0.0f ||
          !(r_f >= 0.0f)) {
        continue;
      }
      const int32_t r = static_cast<int32_t>(r_f);
      if (label == r) {
        votes += 1;
        hits += 1;
      } else if (votes == 0) {
        label = r;
        votes = 1;
        hits = 1;
      } else {
        votes -= 1;
      }
    }
    p.label[key] = label;
    p.votes[key] = votes;
    p.hits[key] = hits;
  }
}

}  // namespace

cudaError_t vote_sorted(const VoteParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.n < 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.stats == nullptr || p.sorted_index == nullptr || p.perm == nullptr ||
      p.label == nullptr || p.votes == nullptr || p.hits == nullptr) {
    return cudaErrorInvalidValue;
  }
  vote_sorted_kernel<<<grid_for(p.rows, kVoteThreads), kVoteThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace csl_fast
