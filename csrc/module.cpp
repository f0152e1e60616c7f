// The Python module csl_fast._C. Importing it runs the op registrations of every source
// file; its functions are the eager CPU steps of csl_fast.accumulate and accumulate_bce
// without torch.ops, and the buffer locks (csrc/buffer_locks.h) for the Python paths.
//
// At ten classes a batch's cross entropy, CSL scatter and tracker update are a few
// microseconds of arithmetic, and each call through torch.ops costs more than that again
// (every argument converted to an IValue against the schema, a boxed call, the outputs
// wrapped one by one). `step` takes its arguments straight from Python and makes the
// same three op calls from C++, through the dispatcher: autograd, profilers and dispatch
// modes see the ops as they would from torch.ops. The lock, the checks that decide
// whether the step applies and the version-counter bumps are here too: each costs about
// a microsecond in Python, as much as the arithmetic.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <limits>
#include <mutex>
#include <optional>

#include "bce_stats.h"
#include "buffer_locks.h"
#include "checks.h"
#include "stats.h"

namespace {

using OptTensor = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const OptTensor&, int64_t, double,
                                                           int64_t);

const c10::TypedOperatorHandle<Fwd>& fwd_op() {
  static const auto handle = op<Fwd>("csl_fast::cross_entropy_fwd");
  return handle;
}

using FwdStats = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const OptTensor&, int64_t, double, int64_t);

// csl_fast::cross_entropy_fwd_stats: loss and statistics, no logits-sized gradient.
const c10::TypedOperatorHandle<FwdStats>& fwd_stats_op() {
  static const auto handle = op<FwdStats>("csl_fast::cross_entropy_fwd_stats");
  return handle;
}

// The tracker state record_last updates, in its schema's order after `epoch`.
constexpr Py_ssize_t kStateSize = 12;
using State = std::array<at::Tensor, kStateSize>;

using RecordLast = void(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                        at::Tensor&, at::Tensor&, at::Tensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                        const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&);

const c10::TypedOperatorHandle<RecordLast>& record_last_op() {
  static const auto handle = op<RecordLast>("csl_fast::record_last");
  return handle;
}

// float32 D of reduction 'mean', NaN where it is 0 (csl_fast/ops.py: _mean_denominator,
// which says why; the same ops).
at::Tensor mean_denominator(const at::Tensor& target, const OptTensor& weight,
                            int64_t ignore_index, int64_t num_classes) {
  // (int64, as csrc/autograd.cpp: an int32 target compared with an ignore_index past int32
  // wrapped onto it, 2**32 onto class 0, whose rows then left the denominator)
  const at::Tensor active = target.to(at::kLong).ne(ignore_index);
  at::Tensor d;
  if (!weight) {
    d = active.sum(at::kFloat);
  } else {
    const at::Tensor y = at::where(active, target, 0).to(at::kLong).clamp(
        0, std::max<int64_t>(num_classes - 1, 0));
    d = at::where(active, weight->to(at::kFloat).index_select(0, y), 0.0).sum();
  }
  return at::where(d.eq(0), std::numeric_limits<float>::quiet_NaN(), d);
}

using Bwd = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                       const at::Tensor&, int64_t, double, double, double);

// csl_fast::cross_entropy_bwd: the float16/bfloat16 gradient in one elementwise pass.
const c10::TypedOperatorHandle<Bwd>& bwd_op() {
  static const auto handle = op<Bwd>("csl_fast::cross_entropy_bwd");
  return handle;
}

// The fused cross entropy for float16/bfloat16 logits with the gradient rounded once, as
// csl_fast/ops.py: _RoundOnceCrossEntropy (which says why) computes it, op for op, so the
// step and the op-by-op path agree bit for bit: the forward is the op of a call without
// grad (csl_fast::cross_entropy_fwd_stats: no gradient formed, a mean formed in float32 and
// rounded once, so the loss does not depend on whether grad is wanted), it saves the
// logits, the statistics and a mean's denominator D, and backward computes their gradient
// in float32 in one elementwise pass (csl_fast::cross_entropy_bwd), scales it and rounds
// once.
class RoundOnceCrossEntropy : public torch::autograd::Function<RoundOnceCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& target, const OptTensor& weight,
                               int64_t ignore_index, double smoothing, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool mean = reduction == csl_fast::kMean;
    auto [loss, stats] =
        fwd_stats_op().call(logits, target, weight, ignore_index, smoothing, reduction);
    ctx->set_materialize_grads(false);
    ctx->saved_data["reduction"] = reduction;
    if (mean) {
      ctx->saved_data["denom"] = mean_denominator(target, weight, ignore_index, logits.size(1));
    }
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["smoothing"] = smoothing;
    ctx->saved_data["has_weight"] = weight.has_value();
    ctx->save_for_backward({logits, target, weight ? *weight : at::Tensor(), stats});
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    CSL_CHECK(!at::GradMode::is_enabled(),
                "csl_fast: double backward through the fused cross entropy is not supported; "
                "use backend='reference' (plain F.cross_entropy) for higher-order gradients");
    variable_list out(6);
    const at::Tensor& upstream = grad_outputs[0];
    if (!upstream.defined()) return out;  // the loss took no part in what is differentiated
    at::Tensor scale = upstream.to(at::kFloat);
    const auto denom = ctx->saved_data.find("denom");
    if (denom != ctx->saved_data.end()) scale = scale.div(denom->second.toTensor());
    const variable_list saved = ctx->get_saved_variables();
    const OptTensor weight =
        ctx->saved_data["has_weight"].toBool() ? OptTensor(saved[2]) : OptTensor();
    out[0] = bwd_op().call(saved[0], saved[1], weight, saved[3], scale.reshape({-1}),
                           ctx->saved_data["ignore_index"].toInt(),
                           ctx->saved_data["smoothing"].toDouble(), 0.0, 0.0);
    return out;
  }
};

// Whether two buffers share memory (csl_fast/accumulate_checks.py: _overlap).
bool overlap(const at::Tensor& a, const at::Tensor& b) {
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data_ptr());
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data_ptr());
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// A call the step does not take (it returns None and the op-by-op path, whose checks name
// whatever is wrong, takes it): logits that are not [B, C] floats on the CPU or a target
// that is not [B] (other layouts, sequences), buffers it would refuse (requiring grad,
// sharing memory), a weight requiring grad under grad mode, and a torch function mode
// (which must see torch.ops; Python checks for functorch transforms). An inference
// tensor written outside inference mode would fail its version bump after the write:
// the op-by-op path raises that as it always has.
bool declines(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& index,
              const OptTensor& weight, const at::Tensor& csl, const OptTensor& count,
              const std::optional<State>& state) {
  const auto dt = logits.scalar_type();
  if (!logits.is_cpu() || logits.dim() != 2 || target.dim() != 1 ||
      !(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16)) {
    return true;
  }
  if (csl.requires_grad() || (count && (count->requires_grad() || overlap(csl, *count)))) {
    return true;
  }
  // A buffer sharing memory with the index: the Python checks refuse it.
  // or with the target or logits read (count=target added into the labels): the same
  for (const at::Tensor* read : {&index, &target, &logits}) {
    if (csl_fast::spans_overlap(csl, *read) || (count && csl_fast::spans_overlap(*count, *read))) {
      return true;
    }
  }
  if (weight && weight->requires_grad() && at::GradMode::is_enabled()) return true;
  if (at::impl::torch_function_mode_enabled()) return true;
  if (!c10::InferenceMode::is_enabled()) {
    if (csl.is_inference() || (count && count->is_inference())) return true;
    if (state) {
      for (const at::Tensor& t : *state) {
        if (t.is_inference()) return true;
      }
    }
  }
  return false;
}

// loss of csl_fast.accumulate(logits, target, index, csl, count=count, ...) and, with
// `state`, the tracker update record_last makes; reduction is csl_fast.reference's code.
// None where the step declines the call (see declines). scatter_stats checks every index
// and both buffers before it writes anything, and the state buffers are a tracker's own,
// so a bad argument raises with nothing written. Called with the GIL held; the kernels
// run without it, under the buffer lock, so other threads' writes into csl wait.
std::optional<at::Tensor> step(const at::Tensor& logits, const at::Tensor& target,
                               const OptTensor& weight, int64_t ignore_index, double smoothing,
                               int64_t reduction, const at::Tensor& index, const at::Tensor& csl,
                               const OptTensor& count, int64_t epoch,
                               std::optional<State>& state) {
  static const auto scatter =
      op<void(const at::Tensor&, const at::Tensor&, bool, const OptTensor&, const OptTensor&)>(
          "csl_fast::scatter_stats");
  if (declines(logits, target, index, weight, csl, count, state)) return std::nullopt;
  // Each op would dispatch on a stray device (a meta buffer to its fake kernel, which
  // writes nothing); accumulate's checks name the device when this raises.
  for (const OptTensor& t : {OptTensor(target), weight, OptTensor(index), OptTensor(csl), count}) {
    CSL_CHECK_VALUE(!t || t->is_cpu(), "csl_fast._C.step: every tensor must be on the CPU");
  }
  const auto dt = logits.scalar_type();
  // float16/bfloat16 logits whose gradient is wanted: the gradient is rounded once (as by
  // ops.cross_entropy_fwd); other logits whose gradient is wanted: the op's own autograd;
  // no gradient wanted: loss and statistics only.
  const bool wants_grad = logits.requires_grad() && at::GradMode::is_enabled();
  const bool round_once = (dt == at::kHalf || dt == at::kBFloat16) && wants_grad;
  // As torch's own bindings do: other Python threads run while the kernels do.
  pybind11::gil_scoped_release no_gil;
  std::lock_guard<std::recursive_mutex> locked(csl_fast::buffer_lock(csl.data_ptr()));
  at::Tensor loss, stats;
  if (round_once) {
    auto out = RoundOnceCrossEntropy::apply(logits, target, weight, ignore_index, smoothing,
                                            reduction);
    loss = std::move(out[0]);
    stats = std::move(out[1]);
  } else if (wants_grad) {
    std::tie(loss, std::ignore, stats) =
        fwd_op().call(logits, target, weight, ignore_index, smoothing, reduction);
  } else {
    std::tie(loss, stats) =
        fwd_stats_op().call(logits, target, weight, ignore_index, smoothing, reduction);
  }
  scatter.call(stats, index, /*deterministic=*/true, csl, count);
  if (state) {
    State& s = *state;
    record_last_op().call(stats, index, std::nullopt, epoch, s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                s[7], s[8], s[9], s[10], s[11], std::nullopt);
  }
  // The ops write through data pointers: make autograd see the writes.
  torch::autograd::impl::bump_version(csl);
  if (count) torch::autograd::impl::bump_version(*count);
  if (state) {
    for (const at::Tensor& t : *state) torch::autograd::impl::bump_version(t);
  }
  return loss;
}

// Whether `obj` is a tensor subclass (which may mean something else by each op, and would
// see torch.ops on the op-by-op path): a step declines such an argument.
bool is_tensor_subclass(PyObject* obj) {
  return THPVariable_Check(obj) && !THPVariable_CheckExact(obj);
}

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  CSL_CHECK_TYPE(THPVariable_Check(obj), "csl_fast._C.step: ", name, " must be a tensor, got ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

OptTensor optional_tensor_arg(PyObject* obj, const char* name) {
  return obj == Py_None ? OptTensor() : OptTensor(tensor_arg(obj, name));
}

// PyLong_AsLongLong or PyFloat_AsDouble, their TypeError raised as is.
template <typename T>
T number_arg(PyObject* obj, T (*convert)(PyObject*)) {
  const T value = convert(obj);
  if (value == T(-1) && PyErr_Occurred()) throw python_error();
  return value;
}

// step(logits, target, weight, ignore_index, label_smoothing, reduction, index, csl, count,
//      epoch, state) -> loss, or None where the step declines the call; weight and count
// may be None, state is None or the tuple of a tracker's (last_loss, last_max_prob,
// last_correct, forgetting, learned_epoch, grad_norm_sum, margin_sum, p_true_sum,
// p_true_sq_sum, suggest_label, suggest_votes, suggest_hits).
PyObject* py_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  CSL_CHECK_TYPE(nargs == 11, "csl_fast._C.step takes 11 arguments, got ", nargs);
  const at::Tensor& logits = tensor_arg(args[0], "logits");
  const at::Tensor& target = tensor_arg(args[1], "target");
  const OptTensor weight = optional_tensor_arg(args[2], "weight");
  const int64_t ignore_index = number_arg<long long>(args[3], PyLong_AsLongLong);
  const double smoothing = number_arg<double>(args[4], PyFloat_AsDouble);
  const int64_t reduction = number_arg<long long>(args[5], PyLong_AsLongLong);
  const at::Tensor& index = tensor_arg(args[6], "index");
  const at::Tensor& csl = tensor_arg(args[7], "csl");
  const OptTensor count = optional_tensor_arg(args[8], "count");
  const int64_t epoch = number_arg<long long>(args[9], PyLong_AsLongLong);
  std::optional<State> state;
  if (args[10] != Py_None) {
    PyObject* tuple = args[10];
    CSL_CHECK_TYPE(PyTuple_Check(tuple) && PyTuple_GET_SIZE(tuple) == kStateSize,
                     "csl_fast._C.step: state must be None or a tuple of ", kStateSize,
                     " tensors");
    state.emplace();
    for (Py_ssize_t k = 0; k < kStateSize; ++k) {
      (*state)[k] = tensor_arg(PyTuple_GET_ITEM(tuple, k), "every state entry");
    }
  }
  // A tensor subclass may mean something else by each op (it is seen by torch.ops).
  for (PyObject* obj : {args[0], args[1], args[7]}) {
    if (!THPVariable_CheckExact(obj)) Py_RETURN_NONE;
  }
  for (PyObject* obj : {args[2], args[6], args[8]}) {
    if (is_tensor_subclass(obj)) Py_RETURN_NONE;
  }
  if (args[10] != Py_None) {
    for (Py_ssize_t k = 0; k < kStateSize; ++k) {
      if (is_tensor_subclass(PyTuple_GET_ITEM(args[10], k))) Py_RETURN_NONE;
    }
  }
  std::optional<at::Tensor> loss = step(logits, target, weight, ignore_index, smoothing,
                                        reduction, index, csl, count, epoch, state);
  if (!loss) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(*loss));
  END_HANDLE_TH_ERRORS
}

// ----------------------------------------------------------------- binary cross entropy
// csl_fast.accumulate_bce's eager CPU step: the same two op calls (bce_fwd, whose autograd
// is csrc/bce_autograd.cpp, and bce_record) and, for a tracker, its last_loss, made from
// C++. At a few labels the op calls and the Python checks around them cost more than the
// arithmetic (accumulate_bce took 1.3x the eager reference's time at 256 x 10).

using BceFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                  const OptTensor&, const OptTensor&, int64_t);
using BceRecord = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, bool, const OptTensor&, const OptTensor&,
                       const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&);

// bce_record's buffers, in its schema's order: csl, count, wrong, min_margin, label_csl,
// label_margin, label_prob.
constexpr Py_ssize_t kBceBuffers = 7;
using BceBuffers = std::array<OptTensor, kBceBuffers>;
// A tracker's last_loss and the two scratch buffers that take record_last's max probability
// and correctness (csl_fast/record_loss.py: _record_tracker).
constexpr Py_ssize_t kBceLastSize = 3;
using BceLast = std::array<at::Tensor, kBceLastSize>;

// Every target in [0, 1], read in one pass (NaN is not: the op-by-op path then decides).
bool targets_in_unit_range(const at::Tensor& target) {
  if (target.numel() == 0) return true;
  const auto [lo, hi] = at::aminmax(target);
  return lo.item<double>() >= 0.0 && hi.item<double>() <= 1.0;
}

// A call bce_step does not take (it returns None and the op-by-op path, whose checks name
// whatever is wrong, takes it): other layouts, devices or dtypes, an option that does not
// broadcast, a target outside [0, 1], buffers the checks would refuse (requiring grad,
// inference tensors outside inference mode, sharing memory with each other or the index),
// a target, weight or pos_weight requiring grad under grad mode, and a torch function mode.
// A buffer of the wrong dtype or shape raises in bce_record before anything is written.
bool bce_declines(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& index,
                  const OptTensor& weight, const OptTensor& pos_weight, int64_t reduction,
                  const BceBuffers& bufs, const std::optional<BceLast>& last) {
  const auto dt = logits.scalar_type();
  if (!logits.is_cpu() || logits.dim() != 2 ||
      !(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16)) {
    return true;
  }
  if (!target.is_cpu() || target.sizes() != logits.sizes() || target.scalar_type() != dt) {
    return true;
  }
  if (logits.size(1) == 0 && logits.size(0) > 0) return true;
  if (!index.is_cpu() || index.dim() != 1 || index.size(0) != logits.size(0) ||
      !(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt)) {
    return true;
  }
  if (reduction < csl_fast::kNone || reduction > csl_fast::kSum) return true;
  const bool grad_mode = at::GradMode::is_enabled();
  if (grad_mode && target.requires_grad()) return true;
  for (const OptTensor& t : {weight, pos_weight}) {
    if (!t) continue;
    if (!t->is_cpu() || !at::isFloatingType(t->scalar_type()) ||
        !at::is_expandable_to(t->sizes(), logits.sizes()) || (grad_mode && t->requires_grad())) {
      return true;
    }
  }
  if (!bufs[0]) return true;
  const bool outside_inference = !c10::InferenceMode::is_enabled();
  for (size_t k = 0; k < bufs.size(); ++k) {
    if (!bufs[k]) continue;
    const at::Tensor& b = *bufs[k];
    if (!b.is_cpu() || b.requires_grad() || (outside_inference && b.is_inference()) ||
        csl_fast::spans_overlap(b, index) || csl_fast::spans_overlap(b, target) ||
        csl_fast::spans_overlap(b, logits)) {
      return true;
    }
    for (size_t j = 0; j < k; ++j) {
      if (bufs[j] && csl_fast::spans_overlap(b, *bufs[j])) return true;
    }
  }
  if (last && outside_inference) {
    for (const at::Tensor& t : *last) {
      if (t.is_inference()) return true;
    }
  }
  if (at::impl::torch_function_mode_enabled()) return true;
  return !targets_in_unit_range(target);
}

// loss of csl_fast.accumulate_bce(logits, target, index, csl, ...) with the buffers `bufs`
// and, with `last`, a tracker's last_loss; None where the step declines the call (see
// bce_declines). bce_record checks every index and buffer before it writes anything, and
// record_last writes only the tracker's own buffers, so a bad argument raises with nothing
// written. Called with the GIL held; the kernels run without it, under csl's buffer lock.
std::optional<at::Tensor> bce_step(const at::Tensor& logits, const at::Tensor& target,
                                   const OptTensor& weight, const OptTensor& pos_weight,
                                   int64_t reduction, const at::Tensor& index,
                                   const BceBuffers& bufs, std::optional<BceLast>& last) {
  static const auto fwd = op<BceFwd>("csl_fast::bce_fwd");
  static const auto record = op<BceRecord>("csl_fast::bce_record");
  if (bce_declines(logits, target, index, weight, pos_weight, reduction, bufs, last)) {
    return std::nullopt;
  }
  pybind11::gil_scoped_release no_gil;
  std::lock_guard<std::recursive_mutex> locked(csl_fast::buffer_lock(bufs[0]->data_ptr()));
  auto [loss, stats] = fwd.call(logits, target, weight, pos_weight, reduction);
  record.call(logits.detach(), target.detach(), stats, index, /*deterministic=*/true, bufs[0],
              bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6]);
  if (last) {
    // record_last's [kNumStats, B] statistics: the loss and validity, every other row 0.
    at::Tensor rows = at::zeros({csl_fast::kNumStats, logits.size(0)}, stats.options());
    rows[csl_fast::kLoss].copy_(stats[csl_fast::kBceLoss]);
    rows[csl_fast::kValid].copy_(stats[csl_fast::kBceValid]);
    BceLast& l = *last;
    record_last_op().call(rows, index, std::nullopt, 0, l[0], l[1], l[2], std::nullopt,
                          std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                          std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                          std::nullopt);
  }
  // The ops write through data pointers: make autograd see the writes.
  for (const OptTensor& b : bufs) {
    if (b) torch::autograd::impl::bump_version(*b);
  }
  if (last) {
    for (const at::Tensor& t : *last) torch::autograd::impl::bump_version(t);
  }
  return loss;
}

// bce_step(logits, target, weight, pos_weight, reduction, index, csl, count, wrong,
//          min_margin, label_csl, label_margin, label_prob, last) -> loss, or None where
// the step declines the call; every buffer but csl may be None, last is None or a
// tracker's (last_loss, scratch max probability, scratch correctness).
PyObject* py_bce_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  CSL_CHECK_TYPE(nargs == 8 + kBceBuffers - 1, "csl_fast._C.bce_step takes ",
                   8 + kBceBuffers - 1, " arguments, got ", nargs);
  // A tensor subclass may mean something else by each op (it is seen by torch.ops).
  for (Py_ssize_t k : {0, 1, 5, 6}) {
    if (!THPVariable_CheckExact(args[k])) Py_RETURN_NONE;
  }
  for (Py_ssize_t k = 2; k < 6 + kBceBuffers; ++k) {
    if (is_tensor_subclass(args[k])) Py_RETURN_NONE;
  }
  const at::Tensor& logits = tensor_arg(args[0], "logits");
  const at::Tensor& target = tensor_arg(args[1], "target");
  const OptTensor weight = optional_tensor_arg(args[2], "weight");
  const OptTensor pos_weight = optional_tensor_arg(args[3], "pos_weight");
  const int64_t reduction = number_arg<long long>(args[4], PyLong_AsLongLong);
  const at::Tensor& index = tensor_arg(args[5], "index");
  BceBuffers bufs;
  for (Py_ssize_t k = 0; k < kBceBuffers; ++k) {
    bufs[k] = optional_tensor_arg(args[6 + k], "every buffer");
  }
  std::optional<BceLast> last;
  PyObject* tuple = args[6 + kBceBuffers];
  if (tuple != Py_None) {
    CSL_CHECK_TYPE(PyTuple_Check(tuple) && PyTuple_GET_SIZE(tuple) == kBceLastSize,
                     "csl_fast._C.bce_step: last must be None or a tuple of ", kBceLastSize,
                     " tensors");
    last.emplace();
    for (Py_ssize_t k = 0; k < kBceLastSize; ++k) {
      PyObject* entry = PyTuple_GET_ITEM(tuple, k);
      if (is_tensor_subclass(entry)) Py_RETURN_NONE;
      (*last)[k] = tensor_arg(entry, "every entry of last");
    }
  }
  std::optional<at::Tensor> loss =
      bce_step(logits, target, weight, pos_weight, reduction, index, bufs, last);
  if (!loss) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(*loss));
  END_HANDLE_TH_ERRORS
}

std::recursive_mutex& lock_of(PyObject* address) {
  void* data = PyLong_AsVoidPtr(address);
  if (data == nullptr && PyErr_Occurred()) throw python_error();
  return csl_fast::buffer_lock(data);
}

// lock_buffer(address): takes the lock of the buffer whose data_ptr() is `address`
// (csrc/buffer_locks.h), waiting without the GIL if another thread holds it, so that
// thread can finish. unlock_buffer(address) releases it; the calls pair up in one thread.
PyObject* py_lock_buffer(PyObject* /*module*/, PyObject* address) {
  HANDLE_TH_ERRORS
  std::recursive_mutex& lock = lock_of(address);
  if (!lock.try_lock()) {
    pybind11::gil_scoped_release no_gil;
    lock.lock();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* py_unlock_buffer(PyObject* /*module*/, PyObject* address) {
  HANDLE_TH_ERRORS
  lock_of(address).unlock();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_step)),
     METH_FASTCALL, "csl_fast.accumulate's eager CPU step (see csrc/module.cpp)."},
    {"bce_step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_bce_step)),
     METH_FASTCALL, "csl_fast.accumulate_bce's eager CPU step (see csrc/module.cpp)."},
    {"lock_buffer", py_lock_buffer, METH_O, "Take a buffer's lock (csrc/buffer_locks.h)."},
    {"unlock_buffer", py_unlock_buffer, METH_O, "Release a buffer's lock."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// PyMODINIT_FUNC: extern "C" and exported, whatever the platform's symbol visibility.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
