// Autograd for the fused cross entropy, in C++: the forward already holds
// d loss / d logits, so backward is one multiplication. (A Python formula registered
// with torch.library costs ~0.1 ms of interpreter time per training step.)
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "stats.h"

namespace csl_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(const at::Tensor& logits,
                                                        const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        int64_t ignore_index, double smoothing,
                                                        int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("csl_fast::cross_entropy_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           int64_t, double, int64_t)>();
  return op.call(logits, target, weight, ignore_index, smoothing, reduction);
}

// What both functions below keep from the forward: the gradient, and the reduction.
variable_list save_grad(AutogradContext* ctx, const at::Tensor& loss, const at::Tensor& grad,
                        const at::Tensor& stats, int64_t reduction) {
  // No zero-filled logits-sized gradient for the unused `grad` output.
  ctx->set_materialize_grads(false);
  ctx->save_for_backward({grad});
  ctx->saved_data["reduction"] = reduction;
  ctx->mark_non_differentiable({grad, stats});
  return {loss, grad, stats};
}

// d loss / d logits = the saved gradient times the upstream one; `inputs` gradients in all.
variable_list scaled_grad(AutogradContext* ctx, const variable_list& grad_outputs, size_t inputs) {
  // create_graph=True: the saved gradient has no graph back to the logits, so a second
  // derivative would silently come out as zero.
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "csl_fast: double backward through the fused cross entropy is not supported; "
              "use backend='reference' (plain F.cross_entropy) for higher-order gradients");
  const at::Tensor& upstream = grad_outputs[0];
  variable_list out(inputs);
  if (!upstream.defined()) return out;  // the loss took no part in what is differentiated
  const at::Tensor grad = ctx->get_saved_variables()[0];
  const bool per_row = ctx->saved_data["reduction"].toInt() == kNone;
  out[0] = grad * (per_row ? upstream.unsqueeze(1) : upstream);
  return out;
}

class CrossEntropy : public torch::autograd::Function<CrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               int64_t ignore_index, double smoothing, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad, stats] = call_fwd(logits, target, weight, ignore_index, smoothing, reduction);
    return save_grad(ctx, loss, grad, stats, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scaled_grad(ctx, grad_outputs, 6);
  }
};

// track_cross_entropy: the same gradient; the tracker buffers it writes need none.
class TrackCrossEntropy : public torch::autograd::Function<TrackCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               int64_t ignore_index, double smoothing, int64_t reduction,
                               const at::Tensor& index, at::Tensor csl, at::Tensor count,
                               int64_t epoch, at::Tensor last_loss, at::Tensor last_max_prob,
                               at::Tensor last_correct, at::Tensor forgetting,
                               at::Tensor learned_epoch, at::Tensor grad_norm_sum,
                               at::Tensor margin_sum, at::Tensor p_true_sum,
                               at::Tensor p_true_sq_sum) {
    static auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("csl_fast::track_cross_entropy", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                double, int64_t, const at::Tensor&, at::Tensor&, at::Tensor&, int64_t,
                at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                at::Tensor&, at::Tensor&, at::Tensor&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad, stats] =
        op.call(logits, target, weight, ignore_index, smoothing, reduction, index, csl, count,
                epoch, last_loss, last_max_prob, last_correct, forgetting, learned_epoch,
                grad_norm_sum, margin_sum, p_true_sum, p_true_sq_sum);
    return save_grad(ctx, loss, grad, stats, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    return scaled_grad(ctx, grad_outputs, 19);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double smoothing, int64_t reduction) {
  auto out = CrossEntropy::apply(logits, target, weight, ignore_index, smoothing, reduction);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> track_cross_entropy_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double smoothing, int64_t reduction, const at::Tensor& index,
    at::Tensor& csl, at::Tensor& count, int64_t epoch, at::Tensor& last_loss,
    at::Tensor& last_max_prob, at::Tensor& last_correct, at::Tensor& forgetting,
    at::Tensor& learned_epoch, at::Tensor& grad_norm_sum, at::Tensor& margin_sum,
    at::Tensor& p_true_sum, at::Tensor& p_true_sq_sum) {
  auto out = TrackCrossEntropy::apply(logits, target, weight, ignore_index, smoothing, reduction,
                                      index, csl, count, epoch, last_loss, last_max_prob,
                                      last_correct, forgetting, learned_epoch, grad_norm_sum,
                                      margin_sum, p_true_sum, p_true_sq_sum);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, Autograd, m) {
  m.impl("cross_entropy_fwd", &csl_fast::cross_entropy_fwd_autograd);
  m.impl("track_cross_entropy", &csl_fast::track_cross_entropy_autograd);
}
