// The Python module csl_fast._C. Importing it runs the op registrations of every source
// file; its one function is csl_fast.accumulate's eager CPU step without torch.ops.
//
// At ten classes a batch's cross entropy, CSL scatter and tracker update are a few
// microseconds of arithmetic, and each call through torch.ops costs more than that again
// (every argument converted to an IValue against the schema, a boxed call, the outputs
// wrapped one by one). `step` takes its arguments straight from Python and makes the
// same three op calls from C++, through the dispatcher: autograd, profilers and dispatch
// modes see the ops as they would from torch.ops.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <optional>

namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The tracker state record_last updates, in its schema's order after `epoch`.
constexpr Py_ssize_t kStateSize = 12;
using State = std::array<at::Tensor, kStateSize>;

// loss of csl_fast.accumulate(logits, target, index, csl, count=count, ...) and, with
// `state`, the tracker update record_last makes; reduction is csl_fast.reference's code.
// CPU tensors only (the state is a CPU tracker's own).
// scatter_stats checks every index and both buffers before it writes anything, and the
// state buffers are a tracker's own, so a bad argument raises with nothing written.
at::Tensor step(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                int64_t ignore_index, double smoothing, int64_t reduction,
                const at::Tensor& index, const at::Tensor& csl, const OptTensor& count,
                int64_t epoch, std::optional<State>& state) {
  static const auto fwd = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, double, int64_t)>(
      "csl_fast::cross_entropy_fwd");
  static const auto scatter =
      op<void(const at::Tensor&, const at::Tensor&, bool, const OptTensor&, const OptTensor&)>(
          "csl_fast::scatter_stats");
  static const auto record = op<void(
      const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t, at::Tensor&, at::Tensor&,
      at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
      const OptTensor&)>("csl_fast::record_last");
  // Each op would dispatch on a stray device (a meta buffer to its fake kernel, which
  // writes nothing); accumulate's checks name the device when this raises.
  for (const OptTensor& t : {OptTensor(logits), OptTensor(target), weight, OptTensor(index),
                             OptTensor(csl), count}) {
    TORCH_CHECK_VALUE(!t || t->is_cpu(), "csl_fast._C.step: every tensor must be on the CPU");
  }
  auto [loss, grad, stats] = fwd.call(logits, target, weight, ignore_index, smoothing, reduction);
  scatter.call(stats, index, /*deterministic=*/true, csl, count);
  if (state) {
    State& s = *state;
    record.call(stats, index, std::nullopt, epoch, s[0], s[1], s[2], s[3], s[4], s[5], s[6],
                s[7], s[8], s[9], s[10], s[11]);
  }
  return loss;
}

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "csl_fast._C.step: ", name, " must be a tensor, got ",
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
//      epoch, state) -> loss; weight and count may be None, state is None or the tuple of
// a tracker's (last_loss, last_max_prob, last_correct, forgetting, learned_epoch,
// grad_norm_sum, margin_sum, p_true_sum, p_true_sq_sum, suggest_label, suggest_votes,
// suggest_hits).
PyObject* py_step(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 11, "csl_fast._C.step takes 11 arguments, got ", nargs);
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
    TORCH_CHECK_TYPE(PyTuple_Check(tuple) && PyTuple_GET_SIZE(tuple) == kStateSize,
                     "csl_fast._C.step: state must be None or a tuple of ", kStateSize,
                     " tensors");
    state.emplace();
    for (Py_ssize_t k = 0; k < kStateSize; ++k) {
      (*state)[k] = tensor_arg(PyTuple_GET_ITEM(tuple, k), "every state entry");
    }
  }
  at::Tensor loss;
  {
    // As torch's own bindings do: other Python threads run while the kernels do.
    pybind11::gil_scoped_release no_gil;
    loss = step(logits, target, weight, ignore_index, smoothing, reduction, index, csl, count,
                epoch, state);
  }
  return THPVariable_Wrap(std::move(loss));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"step", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_step)),
     METH_FASTCALL, "csl_fast.accumulate's eager CPU step (see csrc/module.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// PyMODINIT_FUNC: extern "C" and exported, whatever the platform's symbol visibility.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
