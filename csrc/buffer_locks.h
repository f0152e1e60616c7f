// The locks that make writes into one dataset-sized buffer (or a tracker's buffers) from
// several threads take turns: the CPU kernels add without atomics, and a tracker's state
// is read, then written. One lock per stripe of addresses, keyed on the data pointer of
// the buffer that names the write (a CSL buffer, a tracker's csl_sum): buffers share a
// stripe only by chance, which costs contention, never correctness. Recursive, so that a
// Python recorder may call accumulate from its own record().
//
// Shared by every writer in this library (one instance: an inline function's static),
// and by Python through csl_fast._C.lock_buffer / unlock_buffer (csl_fast/buffer_locks.py),
// so the one-call C++ step and the op-by-op Python path exclude each other.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>

namespace csl_fast {

constexpr std::uintptr_t kLockStripes = 61;

inline std::recursive_mutex& buffer_lock(const void* data) {
  static std::array<std::recursive_mutex, kLockStripes> stripes;
  return stripes[reinterpret_cast<std::uintptr_t>(data) % kLockStripes];
}

}  // namespace csl_fast
