// One training step into a CSLTracker on the CPU, in one op: the fused cross entropy, the
// CSL sum/count scatter and the tracker's per-presentation state, back to back. These are
// the three kernels csl_fast.accumulate otherwise calls one by one; at a few classes each
// op call and its Python glue cost more than the arithmetic, so the eager CPU path for
// trackers pays them once (csl_fast/accumulate.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace csl_fast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> track_cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& index,
    at::Tensor& csl, at::Tensor& count, int64_t epoch, at::Tensor& last_loss,
    at::Tensor& last_max_prob, at::Tensor& last_correct, at::Tensor& forgetting,
    at::Tensor& learned_epoch, at::Tensor& grad_norm_sum, at::Tensor& margin_sum,
    at::Tensor& p_true_sum, at::Tensor& p_true_sq_sum) {
  check_logits_2d(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto [loss, stats] = cross_entropy_into(logits, target, weight, ignore_index, label_smoothing,
                                          reduction, grad);
  // scatter_stats checks every index and both buffers before it writes; the tracker's
  // state buffers are its own (right dtypes and sizes), so record_last cannot fail after.
  scatter_stats(stats, index, true, csl, count);
  record_last(stats, index, std::nullopt, epoch, last_loss, last_max_prob, last_correct,
              forgetting, learned_epoch, grad_norm_sum, margin_sum, p_true_sum, p_true_sq_sum);
  return {loss, grad, stats};
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("track_cross_entropy", &csl_fast::cpu::track_cross_entropy);
}
