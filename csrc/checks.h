// Argument checks shared by the CPU kernels (csrc/cpu) and the CUDA glue
// (csrc/cuda/ops_cuda.cpp): one condition, one message, whichever device runs the op.
// Device-specific checks (dtype support, same device, size limits) stay with each device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

#include "message.h"
#include "stats.h"

namespace csl_fast {

// cross_entropy_fwd: logits must be [B, C].
inline void check_logits_2d(const at::Tensor& logits) {
  CSL_CHECK_VALUE(logits.dim() == 2, "csl_fast: logits must be 2-D [B, C], got shape ",
                    logits.sizes(), "; flatten extra dimensions into the batch");
}

// cross_entropy_fwd_inplace: the gradient is written over the logits, row after row.
inline void check_inplace_logits(const at::Tensor& logits) {
  check_logits_2d(logits);
  CSL_CHECK_VALUE(logits.is_contiguous(),
                    "csl_fast: inplace_grad=True writes the gradient over the logits and needs "
                    "them contiguous, got strides ",
                    logits.strides(), "; pass inplace_grad=False (or contiguous logits)");
}

// cross_entropy_fwd: target [B] of int64/int32 class indices, reduction and label smoothing.
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                     double label_smoothing, int64_t reduction) {
  CSL_CHECK_VALUE(target.dim() == 1 && target.size(0) == logits.size(0),
                    "csl_fast: target must be 1-D with B = ", logits.size(0),
                    " entries to match logits, got shape ", target.sizes());
  CSL_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "csl_fast: target must hold class indices as int64 or int32, got ",
                   target.scalar_type(), "; class-probability targets are not supported");
  CSL_CHECK_VALUE(reduction >= kNone && reduction <= kSum,
                    "csl_fast: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  CSL_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "csl_fast: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// cross_entropy_fwd_extra: the soft-cap s (0: off) and z-loss scale (0: off).
inline void check_cross_entropy_extras(const std::optional<at::Tensor>& weight, double softcap,
                                       double z_loss_scale) {
  CSL_CHECK_VALUE(softcap == 0.0 || (softcap > 0.0 && softcap < 1e300),
                    "csl_fast: softcap must be a finite number > 0 (or 0 / None for none), got ",
                    softcap);
  CSL_CHECK_VALUE(z_loss_scale >= 0.0 && z_loss_scale < 1e300,
                    "csl_fast: z_loss_scale must be finite and >= 0, got ", z_loss_scale);
  CSL_CHECK_VALUE(z_loss_scale == 0.0 || !weight.has_value(),
                    "csl_fast: the z-loss is not supported with class weights (the z-loss is "
                    "unweighted, and 'mean' would divide it by the weights' sum); pass "
                    "weight=None or z_loss_scale=0");
}

// cross_entropy_fwd: class weights must be [C].
inline void check_weight_shape(const at::Tensor& weight, int64_t C) {
  CSL_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == C,
                    "csl_fast: weight must be a 1-D tensor of C = ", C,
                    " class weights, got shape ", weight.sizes());
}

// cross_entropy_bwd: half logits [B, C], the forward's target, weight, extras and float32
// stats [kNumStats, B], and a float32 upstream scale of B entries (per row) or one.
inline void check_cross_entropy_bwd_args(const at::Tensor& logits, const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight,
                                         const at::Tensor& stats, const at::Tensor& scale,
                                         double label_smoothing, double softcap,
                                         double z_loss_scale) {
  check_logits_2d(logits);
  CSL_CHECK_TYPE(logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16,
                   "csl_fast: cross_entropy_bwd takes float16 or bfloat16 logits, got ",
                   logits.scalar_type(), "; the float32/float64 ops keep the forward's gradient");
  check_cross_entropy_args(logits, target, label_smoothing, kNone);
  check_cross_entropy_extras(weight, softcap, z_loss_scale);
  const int64_t B = logits.size(0);
  CSL_CHECK_VALUE(logits.size(1) > 0 || B == 0, "csl_fast: logits have C = 0 classes");
  if (weight.has_value()) check_weight_shape(*weight, logits.size(1));
  CSL_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == B &&
                        stats.scalar_type() == at::kFloat,
                    "csl_fast: stats must be the float32 [", int(kNumStats), ", B = ", B,
                    "] statistics of the forward on these logits, got ", stats.scalar_type(),
                    " ", stats.sizes());
  CSL_CHECK_VALUE(scale.scalar_type() == at::kFloat && (scale.numel() == 1 || scale.numel() == B),
                    "csl_fast: scale must be float32 with one upstream factor per row (B = ", B,
                    ") or one for all, got ", scale.scalar_type(), " ", scale.sizes());
}

// cross_entropy_fwd/_bwd on the CPU: every target (int64, host memory) is a class in
// [0, C) or ignore_index. The CUDA kernels cannot raise: they flag it (CSL_FAST_VALIDATE=1).
inline void check_targets_in_range(const int64_t* target, int64_t B, int64_t C,
                                   int64_t ignore_index) {
  for (int64_t i = 0; i < B; ++i) {
    CSL_CHECK_INDEX(target[i] == ignore_index || (target[i] >= 0 && target[i] < C),
                      "csl_fast: target[", i, "] = ", target[i], " is outside [0, C = ", C,
                      ") and is not ignore_index (", ignore_index,
                      "); fix the labels or pass the right ignore_index");
  }
}

// scatter_stats: stats is the contiguous float32 [kNumStats, B] tensor of cross_entropy_fwd
// and index holds one int64/int32 dataset index per row. Returns B.
inline int64_t check_scatter_args(const at::Tensor& stats, const at::Tensor& index) {
  CSL_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kNumStats && stats.is_contiguous() &&
                        stats.scalar_type() == at::kFloat,
                    "csl_fast: stats must be a contiguous float32 [", int(kNumStats),
                    ", B] tensor from cross_entropy_fwd, got ", stats.sizes());
  const int64_t B = stats.size(1);
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast: index must be 1-D with one dataset index per row (B = ", B,
                    "), got shape ", index.sizes());
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  return B;
}

// scatter_stats: a csl or count buffer is a contiguous 1-D float32/float64 tensor (count,
// allow_int, may also be int32/int64).
inline void check_buffer(const at::Tensor& buf, const char* name, bool allow_int) {
  const auto dt = buf.scalar_type();
  const bool ok = dt == at::kFloat || dt == at::kDouble ||
                  (allow_int && (dt == at::kLong || dt == at::kInt));
  CSL_CHECK_TYPE(ok, "csl_fast: ", name, " must be a float32 or float64",
                   allow_int ? " (or int32/int64)" : "", " tensor, got ", dt,
                   "; allocate it with torch.zeros(num_samples, dtype=torch.float32)");
  CSL_CHECK_VALUE(buf.dim() == 1 && buf.is_contiguous(), "csl_fast: ", name,
                    " must be a contiguous 1-D tensor of one entry per dataset sample, got shape ",
                    buf.sizes(), " and strides ", buf.strides());
}

// scatter_stats: checks the optional csl and count buffers with check_buffer, then with
// extra(buf, name) (a device's own checks), and that both have the same size. Returns that
// size N, or -1 when neither buffer is given.
template <typename Extra>
int64_t check_buffers(const std::optional<at::Tensor>& csl,
                      const std::optional<at::Tensor>& count, Extra&& extra) {
  int64_t n = -1;
  if (csl.has_value()) {
    check_buffer(*csl, "csl", false);
    extra(*csl, "csl");
    n = csl->numel();
  }
  if (count.has_value()) {
    check_buffer(*count, "count", true);
    extra(*count, "count");
    CSL_CHECK_VALUE(n < 0 || count->numel() == n, "csl_fast: count has ", count->numel(),
                      " entries but csl has ", n, "; both must have one entry per sample");
    n = count->numel();
  }
  return n;
}

// record_last, record_input_grad: a tracker state buffer of dtype `want`, contiguous [n].
inline void check_state_buffer(const char* op, const at::Tensor& t, const char* name,
                               at::ScalarType want, int64_t n) {
  CSL_CHECK_TYPE(t.scalar_type() == want, "csl_fast.", op, ": ", name, " must be ", want,
                   ", got ", t.scalar_type());
  CSL_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.numel() == n, "csl_fast.", op, ": ",
                    name, " must be a contiguous [N = ", n, "] tensor, got ", t.sizes());
}

// record_vote: stats [kNumStats, B] float32, index [B], and the three int32 [N] vote
// buffers; returns B.
inline int64_t check_vote_args(const at::Tensor& stats, const at::Tensor& index,
                               const at::Tensor& label, const at::Tensor& votes,
                               const at::Tensor& hits) {
  CSL_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kNumStats &&
                        stats.scalar_type() == at::kFloat,
                    "csl_fast.record_vote: stats must be float32 [", int(kNumStats), ", B], got ",
                    stats.sizes());
  const int64_t B = stats.size(1);
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast.record_vote: index must be [B = ", B, "], got ", index.sizes());
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast.record_vote: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  const int64_t n = label.numel();
  check_state_buffer("record_vote", label, "suggest_label", at::kInt, n);
  check_state_buffer("record_vote", votes, "suggest_votes", at::kInt, n);
  check_state_buffer("record_vote", hits, "suggest_hits", at::kInt, n);
  return B;
}

// record_last, record_input_grad: every index in [0, n), checked before anything is written.
inline void check_index_range(const char* op, const int64_t* index, int64_t B, int64_t n) {
  for (int64_t i = 0; i < B; ++i) {
    // (a tracker's first check in accumulate: without the hint, a CSLCallback sized to a
    // Subset named only this op, which the user never called)
    CSL_CHECK_INDEX(index[i] >= 0 && index[i] < n, "csl_fast.", op, ": index[", i, "] = ",
                      index[i], " is outside [0, N = ", n, ") where N is the tracker's ",
                      "num_samples; pass dataset indices (csl_fast.data.IndexedDataset) and a ",
                      "tracker of the whole indexed dataset (num_samples=len(dataset))");
  }
}

// Whether the bytes two tensors' elements span intersect, whatever their strides (>= 0).
inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const auto lo = reinterpret_cast<std::uintptr_t>(t.data_ptr());
    return std::pair{lo, lo + static_cast<std::uintptr_t>((last + 1) * t.element_size())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// The CUDA glue's index_for_writes: the index contiguous in its own dtype (int32 or int64,
// which the kernels read), a private copy where it shares memory with a buffer written.
inline at::Tensor contiguous_index_for_writes(
    const at::Tensor& index, std::initializer_list<std::optional<at::Tensor>> bufs) {
  at::Tensor idx = index.contiguous();
  for (const auto& buf : bufs) {
    if (buf.has_value() && spans_overlap(idx, *buf)) return idx.clone();
  }
  return idx;
}

// scatter_stats, record_loss, bce_record: the index as contiguous int64, read after
// check_dataset_index while `bufs` are written. A private copy where it shares memory
// with one of them (the count passed as the index too): each write would otherwise change
// entries after their check, to indices past the buffer's end.
inline at::Tensor index_for_writes(const at::Tensor& index,
                                   std::initializer_list<std::optional<at::Tensor>> bufs) {
  return contiguous_index_for_writes(index.to(at::kLong), bufs);
}

// scatter_stats, record_loss, bce_record: every dataset index in [0, n), n the csl buffer's
// size, checked before anything is written.
inline void check_dataset_index(const int64_t* index, int64_t B, int64_t n) {
  for (int64_t i = 0; i < B; ++i) {
    CSL_CHECK_INDEX(index[i] >= 0 && index[i] < n, "csl_fast: index[", i, "] = ", index[i],
                      " is outside [0, N = ", n, ") where N is the size of the csl buffer; ",
                      "pass dataset indices (csl_fast.data.IndexedDataset) and a buffer with ",
                      "one entry per dataset sample");
  }
}

}  // namespace csl_fast
