// The CPU kernels' entry points, shared between the op registrations in this folder and
// track_cross_entropy.cpp, which runs them back to back in one call.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace csl_fast {
namespace cpu {

// (loss, stats) of the fused cross entropy; the gradient goes into `grad` ([B, C]
// contiguous, logits dtype), which may be the logits themselves.
std::tuple<at::Tensor, at::Tensor> cross_entropy_into(const at::Tensor& logits,
                                                      const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight,
                                                      int64_t ignore_index, double label_smoothing,
                                                      int64_t reduction, at::Tensor& grad);

// csl[index[i]] += stats[LOSS, i]; count[index[i]] += stats[VALID, i]. Checks every index
// before writing anything.
void scatter_stats(const at::Tensor& stats, const at::Tensor& index, bool deterministic,
                   const std::optional<at::Tensor>& csl, const std::optional<at::Tensor>& count);

// A tracker's per-presentation state, rows in batch order (csl_fast/reference.py).
void record_last(const at::Tensor& stats, const at::Tensor& index,
                 const std::optional<at::Tensor>& max_prob, int64_t epoch, at::Tensor& last_loss,
                 at::Tensor& last_max_prob, at::Tensor& last_correct,
                 const std::optional<at::Tensor>& forgetting,
                 const std::optional<at::Tensor>& learned_epoch,
                 const std::optional<at::Tensor>& grad_norm_sum,
                 const std::optional<at::Tensor>& margin_sum,
                 const std::optional<at::Tensor>& p_true_sum,
                 const std::optional<at::Tensor>& p_true_sq_sum);

}  // namespace cpu
}  // namespace csl_fast
