// A batch's squared input-gradient norms into a CPU tracker's buffers: one sequential pass
// in batch order, the order csl_fast.reference.record_input_grad adds duplicates in.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"

namespace csl_fast {
namespace cpu {
namespace {

constexpr int kBuffers = 5;
const char* const kNames[kBuffers] = {"sq_sum", "norm_sum", "count", "epoch_sq_sum",
                                      "epoch_count"};

// Rows whose norm is not finite, or that `valid` excludes, add nothing (the reference adds
// zeros there, which leaves every sum unchanged).
template <typename f_t>
void add_rows(const f_t* sq, const int64_t* ip, const bool* valid, int64_t B,
              f_t* const out[kBuffers]) {
  for (int64_t i = 0; i < B; ++i) {
    const f_t v = sq[i];
    if (!std::isfinite(v) || (valid != nullptr && !valid[i])) continue;
    const int64_t j = ip[i];
    out[0][j] += v;
    out[1][j] += std::sqrt(v);
    out[2][j] += f_t(1);
    out[3][j] += v;
    out[4][j] += f_t(1);
  }
}

void record_input_grad(const at::Tensor& sq_norms, const at::Tensor& index,
                       const std::optional<at::Tensor>& valid, at::Tensor& sq_sum,
                       at::Tensor& norm_sum, at::Tensor& count, at::Tensor& epoch_sq_sum,
                       at::Tensor& epoch_count) {
  at::Tensor* const bufs[kBuffers] = {&sq_sum, &norm_sum, &count, &epoch_sq_sum, &epoch_count};
  const auto dt = sq_sum.scalar_type();
  CSL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble,
                   "csl_fast.record_input_grad: the buffers must be float32 or float64, got ", dt);
  const int64_t n = sq_sum.numel();
  for (int k = 0; k < kBuffers; ++k) {
    check_state_buffer("record_input_grad", *bufs[k], kNames[k], dt, n);
  }
  CSL_CHECK_TYPE(sq_norms.scalar_type() == dt, "csl_fast.record_input_grad: sq_norms must be ",
                   dt, " like the buffers, got ", sq_norms.scalar_type());
  CSL_CHECK_VALUE(sq_norms.dim() == 1, "csl_fast.record_input_grad: sq_norms must be 1-D [B], ",
                    "got shape ", sq_norms.sizes());
  const int64_t B = sq_norms.size(0);
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast.record_input_grad: index must be 1-D with B = ", B,
                    " entries, got shape ", index.sizes());
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast.record_input_grad: index must be int64 or int32, got ",
                   index.scalar_type());
  if (valid.has_value()) {
    CSL_CHECK_VALUE(valid->scalar_type() == at::kBool && valid->dim() == 1 &&
                          valid->size(0) == B,
                      "csl_fast.record_input_grad: valid must be a bool [B = ", B,
                      "] tensor, got ", valid->scalar_type(), " of shape ", valid->sizes());
  }
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  check_index_range("CSLTracker", ip, B, n);
  const at::Tensor sq = sq_norms.contiguous();
  const at::Tensor ok = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* vp = ok.defined() ? ok.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(dt, "csl_fast_record_input_grad", [&] {
    const scalar_t* v = sq.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      // (before any write: its sqrt would make the sample's loss_sensitivity NaN for good)
      CSL_CHECK_VALUE(!(v[i] < scalar_t(0)), "CSLTracker.record_input_grad: sq_norms[", i,
                      "] = ", v[i], " is negative; a squared norm is >= 0: pass the squares ",
                      "of the per-row input-gradient norms");
    }
    scalar_t* out[kBuffers];
    for (int k = 0; k < kBuffers; ++k) out[k] = bufs[k]->mutable_data_ptr<scalar_t>();
    add_rows<scalar_t>(sq.const_data_ptr<scalar_t>(), ip, vp, B, out);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("record_input_grad", &csl_fast::cpu::record_input_grad);
}
