// csl_fast.record_loss on the CPU in one pass: csl[index[i]] += loss_i, count[index[i]] += 1,
// and for a tracker last_loss[index[i]] = loss_i (the last valid row in batch order wins)
// and the per-epoch sums, for every row whose loss (rounded to float32) is finite. The same
// arithmetic as the composition it replaces (loss statistics, scatter_stats, record_last):
// a row that is not finite adds 0 to the sums and 0 to the counts. Indices are checked
// before anything is written. Under the buffer lock of csl, and the version counters of
// what it writes are bumped, as csl_fast.accumulate's one-call step does.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "../buffer_locks.h"
#include "../checks.h"

namespace csl_fast {
namespace cpu {
namespace {

template <typename out_t>
void add_rows(const at::Tensor& out, const int64_t* idx, const float* values, int64_t B) {
  out_t* p = out.mutable_data_ptr<out_t>();
  for (int64_t i = 0; i < B; ++i) p[idx[i]] += static_cast<out_t>(values[i]);
}

// out[idx[i]] += values[i] in out's dtype (float32/float64/int64/int32).
void add_into(const at::Tensor& out, const int64_t* idx, const float* values, int64_t B) {
  switch (out.scalar_type()) {
    case at::kFloat: return add_rows<float>(out, idx, values, B);
    case at::kDouble: return add_rows<double>(out, idx, values, B);
    case at::kLong: return add_rows<int64_t>(out, idx, values, B);
    case at::kInt: return add_rows<int32_t>(out, idx, values, B);
    default: CSL_CHECK(false, "csl_fast: unreachable buffer dtype");
  }
}

bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data_ptr());
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

template <typename f_t>
void set_last(const at::Tensor& last, const int64_t* idx, const float* loss, const float* valid,
              int64_t B) {
  f_t* p = last.mutable_data_ptr<f_t>();
  for (int64_t i = 0; i < B; ++i) {
    if (valid[i] > 0.f) p[idx[i]] = static_cast<f_t>(loss[i]);
  }
}

void record_loss(const at::Tensor& loss, const at::Tensor& index, const at::Tensor& csl,
                 const std::optional<at::Tensor>& count,
                 const std::optional<at::Tensor>& last_loss,
                 const std::optional<at::Tensor>& epoch_loss_sum,
                 const std::optional<at::Tensor>& epoch_count) {
  const auto dt = loss.scalar_type();
  CSL_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "csl_fast.record_loss: loss must be float32, float64, float16 or bfloat16, got ",
                   dt);
  CSL_CHECK_VALUE(loss.dim() == 1, "csl_fast.record_loss: loss must be 1-D [B], got shape ",
                    loss.sizes());
  const int64_t B = loss.size(0);
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast.record_loss: index must be 1-D with B = ", B,
                    " entries, one per loss, got shape ", index.sizes());
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast.record_loss: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  const int64_t n = check_buffers(csl, count, [](const at::Tensor&, const char*) {});
  std::vector<at::Tensor> written{csl};
  if (count) written.push_back(*count);
  const std::optional<at::Tensor>* state[3] = {&last_loss, &epoch_loss_sum, &epoch_count};
  const char* names[3] = {"last_loss", "epoch_loss_sum", "epoch_count"};
  CSL_CHECK_VALUE(epoch_loss_sum.has_value() == epoch_count.has_value(),
                    "csl_fast.record_loss: epoch_loss_sum and epoch_count go together");
  for (int k = 0; k < 3; ++k) {
    if (!state[k]->has_value()) continue;
    const at::Tensor& t = **state[k];
    CSL_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     "csl_fast.record_loss: ", names[k], " must be float32 or float64, got ",
                     t.scalar_type());
    check_state_buffer("record_loss", t, names[k], t.scalar_type(), n);
    written.push_back(t);
  }
  CSL_CHECK_VALUE(!count || !shares_memory(csl, *count),
                    "csl_fast.record_loss: csl and count share memory; allocate them separately");
  for (const at::Tensor& t : written) {
    CSL_CHECK_VALUE(!t.requires_grad(), "csl_fast.record_loss: a buffer requires grad, but ",
                      "buffers are written in place with no gradient; pass them detached");
    CSL_CHECK_VALUE(t.device() == loss.device() && index.device() == loss.device(),
                      "csl_fast.record_loss: every tensor must be on the loss's device (",
                      loss.device(), ")");
    // The index's entries would change under the adds, after their range check.
    CSL_CHECK_VALUE(!spans_overlap(t, index), "csl_fast.record_loss: a buffer shares memory ",
                      "with index; allocate the buffers separately");
    // The bump below would raise after the write.
    CSL_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(),
                "csl_fast.record_loss: a buffer is an inference tensor, which can only be "
                "written inside torch.inference_mode(); allocate the buffers outside it");
  }
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Every index checked before anything is written: a bad call leaves the buffers untouched.
  // With a tracker's last_loss the user passed a tracker, and the message names its size.
  if (last_loss.has_value()) {
    check_index_range("record_loss", ip, B, n);
  } else {
    check_dataset_index(ip, B, n);
  }
  // The LOSS and VALID rows of csl_fast.record_loss.loss_stats: the loss rounded to
  // float32 where it is finite, else 0 (and not valid).
  std::vector<float> values(2 * B);
  float* value = values.data();
  float* valid = value + B;
  const at::Tensor l = loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "record_loss", [&] {
    const scalar_t* lp = l.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < B; ++i) {
      const float v = static_cast<float>(lp[i]);
      const bool finite = std::isfinite(v);
      value[i] = finite ? v : 0.f;
      valid[i] = finite ? 1.f : 0.f;
    }
  });
  std::lock_guard<std::recursive_mutex> locked(buffer_lock(csl.data_ptr()));
  add_into(csl, ip, value, B);
  if (count) add_into(*count, ip, valid, B);
  if (epoch_loss_sum) {
    add_into(*epoch_loss_sum, ip, value, B);
    add_into(*epoch_count, ip, valid, B);
  }
  if (last_loss) {
    if (last_loss->scalar_type() == at::kFloat) {
      set_last<float>(*last_loss, ip, value, valid, B);
    } else {
      set_last<double>(*last_loss, ip, value, valid, B);
    }
  }
  // The writes went through data pointers: make autograd see them.
  for (const at::Tensor& t : written) torch::autograd::impl::bump_version(t);
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) { m.impl("record_loss", &csl_fast::cpu::record_loss); }
