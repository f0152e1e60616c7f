// csl[index[i]] += stats[LOSS, i]; count[index[i]] += stats[VALID, i].
// Sequential in row order: cheap (B values) and deterministic, duplicates included.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../checks.h"
#include "../stats.h"

namespace csl_fast {
namespace cpu {
namespace {

template <typename out_t>
void add_rows(at::Tensor& out, const int64_t* idx, const float* values, int64_t B) {
  out_t* p = out.mutable_data_ptr<out_t>();
  for (int64_t i = 0; i < B; ++i) p[idx[i]] += static_cast<out_t>(values[i]);
}

void add_into(at::Tensor& out, const int64_t* idx, const float* values, int64_t B) {
  switch (out.scalar_type()) {
    case at::kFloat: return add_rows<float>(out, idx, values, B);
    case at::kDouble: return add_rows<double>(out, idx, values, B);
    case at::kLong: return add_rows<int64_t>(out, idx, values, B);
    case at::kInt: return add_rows<int32_t>(out, idx, values, B);
    default: CSL_CHECK(false, "csl_fast: unreachable buffer dtype");
  }
}

void scatter_stats(const at::Tensor& stats, const at::Tensor& index, bool deterministic,
                   const std::optional<at::Tensor>& csl, const std::optional<at::Tensor>& count) {
  (void)deterministic;  // the CPU kernel is always deterministic
  const int64_t B = check_scatter_args(stats, index);
  const int64_t n = check_buffers(csl, count, [](const at::Tensor&, const char*) {});
  if (n < 0) return;
  const at::Tensor idx = index_for_writes(index, {csl, count});
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Every index checked before anything is written: a bad call leaves the buffers untouched.
  check_dataset_index(ip, B, n);
  const float* sp = stats.const_data_ptr<float>();
  if (csl.has_value()) {
    at::Tensor out = *csl;
    add_into(out, ip, sp + kLoss * B, B);
  }
  if (count.has_value()) {
    at::Tensor out = *count;
    add_into(out, ip, sp + kValid * B, B);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("scatter_stats", &csl_fast::cpu::scatter_stats);
}
