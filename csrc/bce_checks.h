// Argument checks of the binary-cross-entropy ops (csrc/cpu/bce.cpp and the CUDA glue
// csrc/cuda/ops_cuda.cpp): one condition, one message, whichever device runs the op.
// csl_fast.accumulate_bce checks the same in Python first, with the fix in the message.
#pragma once

#include <ATen/ExpandUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "bce_stats.h"
#include "checks.h"
#include "stats.h"

namespace csl_fast {

// bce_fwd, bce_bwd, bce_record: logits [B, L] (L > 0 unless B == 0) and targets of the
// same shape and dtype.
inline void check_bce_inputs(const at::Tensor& logits, const at::Tensor& target) {
  CSL_CHECK_VALUE(logits.dim() == 2, "csl_fast: logits must be 2-D [B, L], got shape ",
                    logits.sizes());
  CSL_CHECK_VALUE(target.sizes() == logits.sizes(), "csl_fast: target must have the logits' ",
                    "shape ", logits.sizes(), ", got ", target.sizes());
  CSL_CHECK_TYPE(target.scalar_type() == logits.scalar_type(),
                   "csl_fast: target must have the logits' dtype ", logits.scalar_type(),
                   ", got ", target.scalar_type());
  CSL_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0,
                    "csl_fast: logits have L = 0 labels");
}

// bce_fwd, bce_bwd: weight and pos_weight (optional) broadcast to [B, L]; reduction code.
inline void check_bce_options(const at::Tensor& logits, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&pos_weight, "pos_weight"}}) {
    if (!t->has_value()) continue;
    CSL_CHECK_VALUE(at::is_expandable_to((*t)->sizes(), logits.sizes()), "csl_fast: ", name,
                      " of shape ", (*t)->sizes(), " does not broadcast to the logits' shape ",
                      logits.sizes());
    CSL_CHECK_TYPE(at::isFloatingType((*t)->scalar_type()), "csl_fast: ", name,
                     " must be a floating-point tensor, got ", (*t)->scalar_type());
  }
  CSL_CHECK_VALUE(reduction >= kNone && reduction <= kSum,
                    "csl_fast: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// bce_record: stats float32 [kBceNumStats, B] contiguous, index [B] int64/int32 and the
// optional buffers, which share one N: csl, min_margin float32/float64 [N]; count, wrong
// also int32/int64; label_csl, label_margin, label_prob float32/float64 contiguous [N, L].
// `extra`
// is a device's own check of each buffer. Returns N, or -1 when no buffer is given.
template <typename Extra>
int64_t check_bce_record_args(const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& stats, const at::Tensor& index,
                              const std::optional<at::Tensor>& csl,
                              const std::optional<at::Tensor>& count,
                              const std::optional<at::Tensor>& wrong,
                              const std::optional<at::Tensor>& min_margin,
                              const std::optional<at::Tensor>& label_csl,
                              const std::optional<at::Tensor>& label_margin,
                              const std::optional<at::Tensor>& label_prob, Extra&& extra) {
  check_bce_inputs(logits, target);
  const int64_t B = logits.size(0), L = logits.size(1);
  CSL_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kBceNumStats && stats.size(1) == B &&
                        stats.is_contiguous() && stats.scalar_type() == at::kFloat,
                    "csl_fast: stats must be the contiguous float32 [", int(kBceNumStats), ", B = ",
                    B, "] tensor of bce_fwd, got ", stats.sizes());
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast: index must be 1-D with one dataset index per row (B = ", B,
                    "), got shape ", index.sizes());
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  int64_t n = check_buffers(csl, count, extra);
  auto same_n = [&](const at::Tensor& buf, const char* name) {
    CSL_CHECK_VALUE(n < 0 || buf.size(0) == n, "csl_fast: ", name, " has ", buf.size(0),
                      " rows but the other buffers have ", n, "; all need one per sample");
    n = buf.size(0);
    extra(buf, name);
  };
  if (wrong.has_value()) {
    check_buffer(*wrong, "wrong", true);
    same_n(*wrong, "wrong");
  }
  if (min_margin.has_value()) {
    check_buffer(*min_margin, "min_margin", false);
    same_n(*min_margin, "min_margin");
  }
  for (const auto& [t, name] :
       {std::pair{&label_csl, "label_csl"}, std::pair{&label_margin, "label_margin"},
        std::pair{&label_prob, "label_prob"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& buf = **t;
    CSL_CHECK_TYPE(buf.scalar_type() == at::kFloat || buf.scalar_type() == at::kDouble,
                     "csl_fast: ", name, " must be float32 or float64, got ", buf.scalar_type());
    CSL_CHECK_VALUE(buf.dim() == 2 && buf.size(1) == L && buf.is_contiguous(), "csl_fast: ",
                      name, " must be a contiguous [N, L = ", L, "] tensor, got shape ",
                      buf.sizes());
    same_n(buf, name);
  }
  return n;
}

}  // namespace csl_fast
