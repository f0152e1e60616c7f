// csl[index[i]] += stats[LOSS, i]; count[index[i]] += stats[VALID, i].
// Sequential in row order: cheap (B values) and deterministic, duplicates included.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../stats.h"

namespace csl_fast {
namespace cpu {
namespace {

void check_buffer(const at::Tensor& buf, const char* name, bool allow_int) {
  const auto dt = buf.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_int && (dt == at::kLong || dt == at::kInt));
  TORCH_CHECK_TYPE(ok, "csl_fast: ", name, " must be a float32 or float64",
                   allow_int ? " (or int32/int64)" : "", " tensor, got ", dt,
                   "; allocate it with torch.zeros(num_samples, dtype=torch.float32)");
  TORCH_CHECK_VALUE(buf.dim() == 1 && buf.is_contiguous(), "csl_fast: ", name,
                    " must be a contiguous 1-D tensor of one entry per dataset sample, got shape ",
                    buf.sizes(), " and strides ", buf.strides());
}

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
    default: TORCH_CHECK(false, "csl_fast: unreachable buffer dtype");
  }
}

void scatter_stats(const at::Tensor& stats, const at::Tensor& index, bool deterministic,
                   const std::optional<at::Tensor>& csl, const std::optional<at::Tensor>& count) {
  (void)deterministic;  // the CPU kernel is always deterministic
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kNumStats && stats.is_contiguous() &&
                        stats.scalar_type() == at::kFloat,
                    "csl_fast: stats must be a contiguous float32 [", int(kNumStats),
                    ", B] tensor from cross_entropy_fwd, got ", stats.sizes());
  const int64_t B = stats.size(1);
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast: index must be 1-D with one dataset index per row (B = ", B,
                    "), got shape ", index.sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  int64_t n = -1;
  for (const auto* buf : {&csl, &count}) {
    if (!buf->has_value()) continue;
    const bool is_count = buf == &count;
    check_buffer(**buf, is_count ? "count" : "csl", is_count);
    TORCH_CHECK_VALUE(n < 0 || (*buf)->numel() == n, "csl_fast: count has ", (*buf)->numel(),
                      " entries but csl has ", n, "; both must have one entry per sample");
    n = (*buf)->numel();
  }
  if (n < 0) return;
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Check every index before writing anything: a bad call leaves the buffers untouched.
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < n, "csl_fast: index[", i, "] = ", ip[i],
                      " is outside [0, N = ", n, ") where N is the size of the csl buffer; ",
                      "pass dataset indices (csl_fast.data.IndexedDataset) and a buffer with ",
                      "one entry per dataset sample");
  }
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
