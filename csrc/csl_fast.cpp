// Every csl_fast op schema, defined once. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cpp, C++ autograd in csrc/autograd.cpp; the other
// autograd and fake kernels are registered from Python (csl_fast/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(csl_fast, m) {
  // Fused cross entropy. loss: F.cross_entropy's value (logits dtype; [] for mean/sum,
  // [B] for none). grad: d loss / d logits for a unit upstream gradient ([B, C], logits
  // dtype). stats: float32 [7, B], see csrc/stats.h.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor grad, Tensor stats)");
  // The same, with the gradient written over the (contiguous) logits instead of a new buffer.
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int reduction) -> (Tensor loss, Tensor stats)");
  // The same without the gradient: loss and stats only, no logits-sized buffer (for
  // callers that do not use it: the float16/bfloat16 forward, whose backward is
  // cross_entropy_bwd, and no-grad passes). Not differentiable.
  m.def(
      "cross_entropy_fwd_stats(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction) -> (Tensor loss, Tensor stats)");
  // Backward of cross_entropy_fwd (softcap, z_loss_scale: of cross_entropy_fwd_extra; 0:
  // off) for float16/bfloat16 logits in one elementwise pass: scale_i * d objective_i /
  // d logits (reduction 'none'), computed in float32 from the logits and the forward's
  // stats (lse = stats[LOSS] + z'_y) and rounded once to the logits' dtype; zero on
  // ignored rows. scale: float32, B entries (per row) or one.
  m.def(
      "cross_entropy_bwd(Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "Tensor scale, int ignore_index, float label_smoothing, float softcap=0., "
      "float z_loss_scale=0.) -> Tensor");
  // The same with a language-model head's extras: the loss taken on soft-capped logits
  // z' = softcap * tanh(z / softcap) (softcap 0: off), plus the z-loss
  // z_loss_scale * logsumexp(z')^2 per non-ignored row (0: off), reduced like the loss
  // and included in it; z_loss is that term alone (zeros when off). stats are of z'.
  m.def(
      "cross_entropy_fwd_extra(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, float softcap, float z_loss_scale) -> "
      "(Tensor loss, Tensor grad, Tensor stats, Tensor z_loss)");
  m.def(
      "cross_entropy_fwd_extra_inplace(Tensor(a!) logits, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int reduction, float softcap, "
      "float z_loss_scale) -> (Tensor loss, Tensor stats, Tensor z_loss)");
  m.def(
      "cross_entropy_fwd_extra_stats(Tensor logits, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int reduction, float softcap, "
      "float z_loss_scale) -> (Tensor loss, Tensor stats, Tensor z_loss)");
  // csl[index[i]] += stats[LOSS, i]; count[index[i]] += stats[VALID, i].
  m.def(
      "scatter_stats(Tensor stats, Tensor index, bool deterministic, Tensor(a!)? csl, "
      "Tensor(b!)? count) -> ()");
  // Per-row squared L2 norm of scale * grad over all but the first dim: float32 [B].
  m.def("input_grad_norms(Tensor grad, float scale) -> Tensor");
  // A tracker's per-presentation state, rows taken in batch order (see
  // csl_fast/reference.py: record_last): last values, forgetting/learned_epoch (given
  // together or not), the optional sums of GRAD_NORM_SQ, MARGIN, P_TRUE and P_TRUE^2, and
  // the optional majority vote over OTHER_ARGMAX (suggest_label/votes/hits, together).
  // epoch_now, a 0-d integer tensor, replaces `epoch` when given: a compiled graph reads
  // the tracker's epoch from it at run time, where an int would be a constant of the graph.
  m.def(
      "record_last(Tensor stats, Tensor index, Tensor? max_prob, int epoch, "
      "Tensor(a!) last_loss, Tensor(b!) last_max_prob, Tensor(c!) last_correct, "
      "Tensor(d!)? forgetting, Tensor(e!)? learned_epoch, Tensor(f!)? grad_norm_sum, "
      "Tensor(g!)? margin_sum, Tensor(h!)? p_true_sum, Tensor(i!)? p_true_sq_sum, "
      "Tensor(j!)? suggest_label=None, Tensor(k!)? suggest_votes=None, "
      "Tensor(l!)? suggest_hits=None, Tensor? epoch_now=None) -> ()");
  // The suggested-label vote of record_last alone (its GPU kernel: the cuda backend's
  // record_last is otherwise the device-only reference).
  m.def(
      "record_vote(Tensor stats, Tensor index, Tensor(a!) suggest_label, "
      "Tensor(b!) suggest_votes, Tensor(c!) suggest_hits) -> ()");
  // Squared input-gradient norms [B] (the buffers' dtype) added at index into a tracker's
  // input-gradient buffers, skipping rows that are not finite or not valid (see
  // csl_fast/reference.py: record_input_grad).
  m.def(
      "record_input_grad(Tensor sq_norms, Tensor index, Tensor? valid, Tensor(a!) sq_sum, "
      "Tensor(b!) norm_sum, Tensor(c!) count, Tensor(d!) epoch_sq_sum, "
      "Tensor(e!) epoch_count) -> ()");
  // Fused binary cross entropy with logits (csl_fast.accumulate_bce; csl_fast/reference.py:
  // bce_fwd, bce_bwd, bce_record). logits, target [B, L] of one dtype; weight and
  // pos_weight broadcast to [B, L]. loss: F.binary_cross_entropy_with_logits's value
  // (logits dtype; [] for mean/sum, [B, L] for none); stats: float32 [4, B], see
  // csrc/bce_stats.h. bce_bwd: d loss / d logits for the upstream gradient `grad`.
  m.def(
      "bce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction) -> (Tensor loss, Tensor stats)");
  m.def(
      "bce_bwd(Tensor grad, Tensor logits, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "int reduction) -> Tensor");
  // At index[i], for valid rows: the per-sample stats into csl, count, wrong, min_margin
  // ([N]) and the plain entry losses, signed margins and probabilities of the given targets
  // (exp(-plain entry loss)) into label_csl, label_margin, label_prob ([N, L]).
  m.def(
      "bce_record(Tensor logits, Tensor target, Tensor stats, Tensor index, bool deterministic, "
      "Tensor(a!)? csl, Tensor(b!)? count, Tensor(c!)? wrong, Tensor(d!)? min_margin, "
      "Tensor(e!)? label_csl, Tensor(f!)? label_margin, Tensor(g!)? label_prob) -> ()");
  // csl_fast.record_loss: for each row whose loss (float32) is finite, csl[index[i]] +=
  // loss[i], count[index[i]] += 1, last_loss[index[i]] = loss[i] (last valid row in batch
  // order), epoch_loss_sum/epoch_count likewise (given together or not); no other row.
  m.def(
      "record_loss(Tensor loss, Tensor index, Tensor(a!) csl, Tensor(b!)? count, "
      "Tensor(c!)? last_loss, Tensor(d!)? epoch_loss_sum, Tensor(e!)? epoch_count) -> ()");
}
