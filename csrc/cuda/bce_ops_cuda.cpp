// Torch glue of the binary-cross-entropy CUDA kernels (csrc/cuda/bce_kernels.cu): argument
// checks (csrc/bce_checks.h, shared with the CPU kernels), outputs, launch on PyTorch's
// current stream. No host synchronisation: an index outside [0, N) is skipped on the
// device (csl_fast.accumulate_bce(validate=True) checks the indices on the host first).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../bce_checks.h"
#include "kernels.h"

namespace csl_fast {
namespace cuda {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default: break;
  }
  CSL_CHECK(false, "csl_fast: internal error: no CUDA kernel for dtype ", t);
}

void same_device(const at::Tensor& t, const char* name, const at::Tensor& logits) {
  CSL_CHECK_VALUE(t.device() == logits.device(), "csl_fast: ", name, " is on ", t.device(),
                    " but logits are on ", logits.device(), "; move it with .to(logits.device)");
}

// The checks every BCE op makes, and the kernels' view of logits, target and weights
// (converted to the acc type before they are broadcast: no [B, L] copy of an [L] weight).
struct Inputs {
  BceInputs in;
  at::Tensor weight, pos_weight;  // keep the converted weights alive
};

Inputs inputs(const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& weight,
              const std::optional<at::Tensor>& pos_weight) {
  check_bce_inputs(logits, target);
  const at::ScalarType dt = logits.scalar_type();
  CSL_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "csl_fast: logits must be float32, float16, bfloat16 or float64, got ", dt);
  same_device(target, "target", logits);
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  Inputs r;
  r.in.logits = logits.const_data_ptr();
  r.in.target = target.const_data_ptr();
  r.in.dtype = dtype_of(dt);
  r.in.rows = logits.size(0);
  r.in.labels = logits.size(1);
  for (int d = 0; d < 2; ++d) {
    r.in.z_stride[d] = logits.stride(d);
    r.in.y_stride[d] = target.stride(d);
  }
  if (weight.has_value()) {
    same_device(*weight, "weight", logits);
    r.weight = weight->to(acc).expand(logits.sizes());
    r.in.weight = r.weight.const_data_ptr();
    for (int d = 0; d < 2; ++d) r.in.w_stride[d] = r.weight.stride(d);
  }
  if (pos_weight.has_value()) {
    same_device(*pos_weight, "pos_weight", logits);
    r.pos_weight = pos_weight->to(acc).expand(logits.sizes());
    r.in.pos_weight = r.pos_weight.const_data_ptr();
    for (int d = 0; d < 2; ++d) r.in.pw_stride[d] = r.pos_weight.stride(d);
  }
  return r;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> bce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& pos_weight,
                                                int64_t reduction) {
  check_bce_inputs(logits, target);
  check_bce_options(logits, weight, pos_weight, reduction);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Inputs in = inputs(logits, target, weight, pos_weight);
  const int64_t B = logits.size(0), L = logits.size(1);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({kBceNumStats, B}, logits.options().dtype(at::kFloat));
  at::Tensor loss, row_sums;
  BceFwdParams p;
  p.in = in.in;
  p.reduction = static_cast<int>(reduction);
  if (reduction == kNone) {
    loss = at::empty({B, L}, logits.options());
    p.loss = loss.mutable_data_ptr();
  } else {
    row_sums = at::empty({B}, logits.options().dtype(acc));
    p.row_sums = row_sums.mutable_data_ptr();
  }
  p.stats = stats.mutable_data_ptr<float>();
  C10_CUDA_CHECK(bce_fwd(p, stream()));
  if (reduction != kNone) {
    // Summed in float64 on the device (no host sync); mean over B * L entries, 0 / 0 = NaN.
    at::Tensor total = row_sums.to(at::kDouble).sum();
    if (reduction == kMean) total = total.div(static_cast<double>(B * L));
    loss = total.to(logits.scalar_type());
  }
  return {loss, stats};
}

at::Tensor bce_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_bce_inputs(logits, target);
  check_bce_options(logits, weight, pos_weight, reduction);
  CSL_CHECK_VALUE(reduction == kNone ? grad.sizes() == logits.sizes() : grad.dim() == 0,
                    "csl_fast: the upstream gradient must have the loss's shape, got ",
                    grad.sizes());
  CSL_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(),
                   "csl_fast: the upstream gradient must have the logits' dtype ",
                   logits.scalar_type(), ", got ", grad.scalar_type());
  same_device(grad, "the upstream gradient", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Inputs in = inputs(logits, target, weight, pos_weight);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  BceBwdParams p;
  p.in = in.in;
  p.reduction = static_cast<int>(reduction);
  p.grad = grad.const_data_ptr();
  if (reduction == kNone) {
    p.g_stride[0] = grad.stride(0);
    p.g_stride[1] = grad.stride(1);
  }
  p.out = out.mutable_data_ptr();
  C10_CUDA_CHECK(bce_bwd(p, stream()));
  return out;
}

void bce_record_cuda(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                     const at::Tensor& index, bool deterministic,
                     const std::optional<at::Tensor>& csl, const std::optional<at::Tensor>& count,
                     const std::optional<at::Tensor>& wrong,
                     const std::optional<at::Tensor>& min_margin,
                     const std::optional<at::Tensor>& label_csl,
                     const std::optional<at::Tensor>& label_margin,
                     const std::optional<at::Tensor>& label_prob) {
  const int64_t n = check_bce_record_args(
      logits, target, stats, index, csl, count, wrong, min_margin, label_csl, label_margin,
      label_prob,
      [&](const at::Tensor& buf, const char* name) { same_device(buf, name, logits); });
  same_device(stats, "stats", logits);
  same_device(index, "index", logits);
  if (n < 0 || logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const Inputs in = inputs(logits, target, std::nullopt, std::nullopt);
  const at::Tensor idx = contiguous_index_for_writes(
      index, {csl, count, wrong, min_margin, label_csl, label_margin, label_prob});
  BceRecordParams p;
  p.in = in.in;
  p.stats = stats.const_data_ptr<float>();
  p.index = idx.const_data_ptr();
  p.index_dtype = dtype_of(idx.scalar_type());
  p.n = n;
  auto set = [](const std::optional<at::Tensor>& t, void*& ptr, DType& dt) {
    if (!t.has_value()) return;
    ptr = t->mutable_data_ptr();
    dt = dtype_of(t->scalar_type());
  };
  set(csl, p.csl, p.csl_dtype);
  set(count, p.count, p.count_dtype);
  set(wrong, p.wrong, p.wrong_dtype);
  set(min_margin, p.min_margin, p.min_margin_dtype);
  set(label_csl, p.label_csl, p.label_csl_dtype);
  set(label_margin, p.label_margin, p.label_margin_dtype);
  set(label_prob, p.label_prob, p.label_prob_dtype);
  if (deterministic) {
    const auto sorted = idx.to(at::kLong).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
    C10_CUDA_CHECK(bce_record_sorted(p, std::get<0>(sorted).const_data_ptr<int64_t>(),
                                     std::get<1>(sorted).const_data_ptr<int64_t>(), stream()));
  } else {
    C10_CUDA_CHECK(bce_record_atomic(p, stream()));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CUDA, m) {
  m.impl("bce_fwd", &csl_fast::cuda::bce_fwd_cuda);
  m.impl("bce_bwd", &csl_fast::cuda::bce_bwd_cuda);
  m.impl("bce_record", &csl_fast::cuda::bce_record_cuda);
}
