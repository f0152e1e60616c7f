// Autograd for the fused cross entropy, in C++: the forward already holds
// d loss / d logits, so backward is one multiplication. (A Python formula registered
// with torch.library costs ~0.1 ms of interpreter time per training step.)
#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "message.h"
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

class CrossEntropy : public torch::autograd::Function<CrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               int64_t ignore_index, double smoothing, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad, stats] = call_fwd(logits, target, weight, ignore_index, smoothing, reduction);
    // No zero-filled logits-sized gradient for the unused `grad` output.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, target});
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({grad, stats});
    return {loss, grad, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // create_graph=True: the saved gradient has no graph back to the logits, so a second
    // derivative would silently come out as zero.
    CSL_CHECK(!at::GradMode::is_enabled(),
                "csl_fast: double backward through the fused cross entropy is not supported; "
                "use backend='reference' (plain F.cross_entropy) for higher-order gradients");
    const at::Tensor& upstream = grad_outputs[0];
    variable_list out(6);
    if (!upstream.defined()) return out;  // the loss took no part in what is differentiated
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = saved[0];
    const at::Tensor& target = saved[1];
    const bool per_row = ctx->saved_data["reduction"].toInt() == kNone;
    // An ignored row keeps its stored value (0, or NaN where its logits are not finite):
    // F.cross_entropy never reads its upstream gradient, whose NaN (a per-sequence mean
    // over a padding row, 0 / 0) made the row NaN (csl_fast/ops.py: _per_row).
    // (sym_size: under torch.compile a plain size() would specialise the graph to this batch.)
    const at::Tensor rows = per_row ? upstream : upstream.expand_symint({target.sym_size(0)});
    // (int64: an int32 target compared with an ignore_index past int32 would wrap onto it)
    const at::Tensor active = target.to(at::kLong).ne(ctx->saved_data["ignore_index"].toInt());
    out[0] = grad * at::where(active, rows, at::ones({}, rows.options())).unsqueeze(1);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_autograd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double smoothing, int64_t reduction) {
  auto out = CrossEntropy::apply(logits, target, weight, ignore_index, smoothing, reduction);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, Autograd, m) {
  m.impl("cross_entropy_fwd", &csl_fast::cross_entropy_fwd_autograd);
}
