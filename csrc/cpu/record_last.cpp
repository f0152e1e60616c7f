// Tracker per-presentation state on the CPU: one sequential pass in batch order, which
// is the rule the tracker documents for duplicate indices (the reference reaches the same
// result on any device with a stable sort and segment operations).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../checks.h"
#include "../stats.h"

namespace csl_fast {
namespace cpu {
namespace {

// One Boyer-Moore majority-vote step per valid misclassified row, for its predicted class
// (the runner-up of y), in batch order (csl_fast/reference.py: record_last, vote_step).
void vote_rows(const float* st, const int64_t* ip, int64_t B, int32_t* label, int32_t* votes,
               int32_t* hits) {
  for (int64_t i = 0; i < B; ++i) {
    const float r_f = st[kOtherArgmax * B + i];
    if (st[kValid * B + i] <= 0.f || st[kCorrect * B + i] > 0.f || !(r_f >= 0.f)) continue;
    const int32_t r = static_cast<int32_t>(r_f);
    const int64_t j = ip[i];
    if (label[j] == r) {
      votes[j] += 1;
      hits[j] += 1;
    } else if (votes[j] == 0) {
      label[j] = r;
      votes[j] = 1;
      hits[j] = 1;
    } else {
      votes[j] -= 1;
    }
  }
}

template <typename f_t>
void record_rows(const float* st, const int64_t* ip, const float* mp, int64_t B, int64_t epoch,
                 f_t* last_loss, f_t* last_max_prob, bool* last_correct, int32_t* forgetting,
                 int32_t* learned_epoch) {
  for (int64_t i = 0; i < B; ++i) {
    if (st[kValid * B + i] <= 0.f) continue;
    const int64_t j = ip[i];
    const bool c = st[kCorrect * B + i] > 0.f;
    const float loss = st[kLoss * B + i];
    if (forgetting != nullptr) {
      const bool prev = last_correct[j];
      if (prev && !c) forgetting[j] += 1;
      if (c && !prev) learned_epoch[j] = static_cast<int32_t>(epoch);
      if (!c) learned_epoch[j] = -1;
    }
    last_loss[j] = static_cast<f_t>(loss);
    // max_j p_j = exp(-(loss + min(margin, 0))), in log space: no overflow, no 0 * inf.
    last_max_prob[j] = static_cast<f_t>(
        mp ? mp[i] : std::exp(-(static_cast<double>(loss) +
                                std::min(0.0, static_cast<double>(st[kMargin * B + i])))));
    last_correct[j] = c;
  }
}

// sums[k][index[i]] += stats[row, i] for GRAD_NORM_SQ, MARGIN, P_TRUE, then P_TRUE^2.
template <typename f_t>
void add_sums(const float* st, const int64_t* ip, int64_t B, f_t* const sums[4]) {
  const int rows[3] = {kGradNormSq, kMargin, kPTrue};
  for (int64_t i = 0; i < B; ++i) {
    const int64_t j = ip[i];
    for (int k = 0; k < 3; ++k) {
      if (sums[k] != nullptr) sums[k][j] += static_cast<f_t>(st[rows[k] * B + i]);
    }
    if (sums[3] != nullptr) {
      const f_t p = static_cast<f_t>(st[kPTrue * B + i]);
      sums[3][j] += p * p;
    }
  }
}

void record_last(const at::Tensor& stats, const at::Tensor& index,
                 const std::optional<at::Tensor>& max_prob, int64_t epoch, at::Tensor& last_loss,
                 at::Tensor& last_max_prob, at::Tensor& last_correct,
                 const std::optional<at::Tensor>& forgetting,
                 const std::optional<at::Tensor>& learned_epoch,
                 const std::optional<at::Tensor>& grad_norm_sum,
                 const std::optional<at::Tensor>& margin_sum,
                 const std::optional<at::Tensor>& p_true_sum,
                 const std::optional<at::Tensor>& p_true_sq_sum,
                 const std::optional<at::Tensor>& suggest_label,
                 const std::optional<at::Tensor>& suggest_votes,
                 const std::optional<at::Tensor>& suggest_hits,
                 const std::optional<at::Tensor>& epoch_now) {
  if (epoch_now.has_value()) {
    CSL_CHECK_VALUE(epoch_now->dim() == 0 && epoch_now->is_cpu() &&
                          !at::isFloatingType(epoch_now->scalar_type()) &&
                          epoch_now->scalar_type() != at::kBool,
                      "csl_fast.record_last: epoch_now must be a 0-d integer CPU tensor");
    epoch = epoch_now->item<int64_t>();
  }
  CSL_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kNumStats &&
                        stats.scalar_type() == at::kFloat,
                    "csl_fast.record_last: stats must be float32 [", int(kNumStats), ", B], got ",
                    stats.sizes());
  const int64_t B = stats.size(1);
  CSL_CHECK_VALUE(index.dim() == 1 && index.size(0) == B,
                    "csl_fast.record_last: index must be [B = ", B, "], got ", index.sizes());
  // a float index was truncated (1.7 wrote sample 1), as scatter_stats refuses it
  CSL_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
                   "csl_fast.record_last: index must be int64 or int32 dataset indices, got ",
                   index.scalar_type());
  CSL_CHECK_VALUE(forgetting.has_value() == learned_epoch.has_value(),
                    "csl_fast.record_last: pass forgetting and learned_epoch together");
  const int64_t n = last_loss.numel();
  const auto f = last_loss.scalar_type();
  CSL_CHECK_TYPE(f == at::kFloat || f == at::kDouble,
                   "csl_fast.record_last: last_loss must be float32 or float64");
  check_state_buffer("record_last", last_loss, "last_loss", f, n);
  check_state_buffer("record_last", last_max_prob, "last_max_prob", f, n);
  check_state_buffer("record_last", last_correct, "last_correct", at::kBool, n);
  if (forgetting.has_value()) {
    check_state_buffer("record_last", *forgetting, "forgetting", at::kInt, n);
    check_state_buffer("record_last", *learned_epoch, "learned_epoch", at::kInt, n);
  }
  CSL_CHECK_VALUE(suggest_label.has_value() == suggest_votes.has_value() &&
                        suggest_label.has_value() == suggest_hits.has_value(),
                    "csl_fast.record_last: pass suggest_label, suggest_votes and suggest_hits "
                    "together");
  if (suggest_label.has_value()) {
    check_state_buffer("record_last", *suggest_label, "suggest_label", at::kInt, n);
    check_state_buffer("record_last", *suggest_votes, "suggest_votes", at::kInt, n);
    check_state_buffer("record_last", *suggest_hits, "suggest_hits", at::kInt, n);
  }
  const std::optional<at::Tensor>* sum_args[4] = {&grad_norm_sum, &margin_sum, &p_true_sum,
                                                   &p_true_sq_sum};
  const char* sum_names[4] = {"grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum"};
  for (int k = 0; k < 4; ++k) {
    if (sum_args[k]->has_value()) {
      check_state_buffer("record_last", **sum_args[k], sum_names[k], f, n);
    }
  }
  const at::Tensor st = stats.contiguous();
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  check_index_range("CSLTracker", ip, B, n);  // (the user made a tracker, not this op)
  at::Tensor mp;
  if (max_prob.has_value()) {
    CSL_CHECK_VALUE(max_prob->dim() == 1 && max_prob->size(0) == B,
                      "csl_fast.record_last: max_prob must be [B = ", B, "]");
    mp = max_prob->to(at::kFloat).contiguous();
  }
  int32_t* fp = forgetting.has_value() ? forgetting->mutable_data_ptr<int32_t>() : nullptr;
  int32_t* lp = learned_epoch.has_value() ? learned_epoch->mutable_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(f, "csl_fast_record_last", [&] {
    record_rows<scalar_t>(st.const_data_ptr<float>(), ip,
                          mp.defined() ? mp.const_data_ptr<float>() : nullptr, B, epoch,
                          last_loss.mutable_data_ptr<scalar_t>(),
                          last_max_prob.mutable_data_ptr<scalar_t>(),
                          last_correct.mutable_data_ptr<bool>(), fp, lp);
    scalar_t* sums[4];
    for (int k = 0; k < 4; ++k) {
      sums[k] = sum_args[k]->has_value() ? (*sum_args[k])->mutable_data_ptr<scalar_t>() : nullptr;
    }
    add_sums<scalar_t>(st.const_data_ptr<float>(), ip, B, sums);
  });
  if (suggest_label.has_value()) {
    vote_rows(st.const_data_ptr<float>(), ip, B, suggest_label->mutable_data_ptr<int32_t>(),
              suggest_votes->mutable_data_ptr<int32_t>(),
              suggest_hits->mutable_data_ptr<int32_t>());
  }
}

void record_vote(const at::Tensor& stats, const at::Tensor& index, at::Tensor& label,
                 at::Tensor& votes, at::Tensor& hits) {
  const int64_t B = check_vote_args(stats, index, label, votes, hits);
  const int64_t n = label.numel();
  const at::Tensor st = stats.contiguous();
  const at::Tensor idx = index.to(at::kLong).contiguous();
  check_index_range("CSLTracker", idx.const_data_ptr<int64_t>(), B, n);
  vote_rows(st.const_data_ptr<float>(), idx.const_data_ptr<int64_t>(), B,
            label.mutable_data_ptr<int32_t>(), votes.mutable_data_ptr<int32_t>(),
            hits.mutable_data_ptr<int32_t>());
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("record_last", &csl_fast::cpu::record_last);
  m.impl("record_vote", &csl_fast::cpu::record_vote);
}
