// Torch glue of the CUDA kernels: argument checks, output allocation, launch on PyTorch's
// current stream. The kernels themselves (csrc/cuda/*.cu, declared in kernels.h) are plain
// CUDA. Compiled by setup.py only when torch has CUDA and nvcc exists (-DWITH_CUDA); the
// schemas are defined once in csrc/csl_fast.cpp, semantics in csl_fast/reference.py.
//
// Differences from the CPU kernels, all from "no host synchronisation on the hot path":
// target and index values are not checked on the host. A target outside [0, C) that is
// not ignore_index gives that row a NaN objective and gradient (so a NaN loss) and zero
// statistics; an index outside the buffers is skipped. With the environment variable
// CSL_FAST_VALIDATE=1 (read once, at the first call) the kernels also raise a device-side
// error flag that the glue reads back (one synchronisation per call) and turns into the same
// IndexError as the CPU kernels. csl_fast.accumulate(validate=True) checks on the host
// before the call instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../stats.h"
#include "kernels.h"

namespace csl_fast {
namespace cuda {
namespace {

bool validate_mode() {
  static const bool on = [] {
    const char* v = std::getenv("CSL_FAST_VALIDATE");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

bool is_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    case at::kInt:
      return DType::kInt32;
    case at::kLong:
      return DType::kInt64;
    default:
      break;
  }
  CSL_CHECK(false, "csl_fast: internal error: no CUDA kernel for dtype ", t);
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  CSL_CHECK_VALUE(t.device() == ref.device(), "csl_fast: ", name, " is on ", t.device(),
                    " but ", ref_name, " is on ", ref.device(), "; move it with .to(",
                    ref_name, ".device)");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Reads the device error flag (validate mode only: synchronises with the stream).
int read_flag(const at::Tensor& flag) { return flag.defined() ? flag.item<int>() : 0; }

// The device error flag the kernels OR their ErrorBits into: one int32 zero on `like`'s
// device in validate mode, else undefined (and error_flag_ptr gives the kernels null).
at::Tensor error_flag_like(const at::Tensor& like) {
  return validate_mode() ? at::zeros({1}, like.options().dtype(at::kInt)) : at::Tensor();
}

int* error_flag_ptr(at::Tensor& flag) {
  return flag.defined() ? flag.mutable_data_ptr<int>() : nullptr;
}

// After a cross-entropy kernel (validate mode): a target outside [0, C) not ignore_index.
void check_target_flag(const at::Tensor& flag, int64_t C, int64_t ignore_index) {
  CSL_CHECK_INDEX(read_flag(flag) == 0, "csl_fast: target has values outside [0, C = ", C,
                    ") that are not ignore_index (", ignore_index,
                    "); fix the labels or pass the right ignore_index (found by "
                    "CSL_FAST_VALIDATE=1)");
}

// ---------------------------------------------------------------------------------------
// (loss, stats, z_loss) with the gradient written into `grad` ([B, C] contiguous, logits
// dtype), which may be the (contiguous) logits themselves; undefined: no gradient is
// written. z_loss (reduced like the loss) is undefined when z_loss_scale is 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_into_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& grad,
    double softcap = 0.0, double z_loss_scale = 0.0) {
  check_logits_2d(logits);
  check_cross_entropy_extras(weight, softcap, z_loss_scale);
  CSL_CHECK_TYPE(is_logits_dtype(logits.scalar_type()),
                   "csl_fast: logits must be float32, float16, bfloat16 or float64, got ",
                   logits.scalar_type());
  check_cross_entropy_args(logits, target, label_smoothing, reduction);
  check_same_device(target, "target", logits, "logits");
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  CSL_CHECK_VALUE(C > 0 || B == 0, "csl_fast: logits have C = 0 classes");
  CSL_CHECK_VALUE(C <= kMaxClasses, "csl_fast: the CUDA kernels support at most ",
                    kMaxClasses, " classes, got C = ", C);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w;
  if (weight.has_value()) {
    check_weight_shape(*weight, C);
    CSL_CHECK_TYPE(at::isFloatingType(weight->scalar_type()),
                     "csl_fast: weight must be a floating-point tensor, got ",
                     weight->scalar_type());
    check_same_device(*weight, "weight", logits, "logits");
    w = weight->to(acc).contiguous();
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({kNumStats, B}, f32);
  if (B == 0) {
    at::Tensor loss = reduction == kNone ? at::empty({0}, logits.options())
                      : reduction == kSum ? at::zeros({}, logits.options())
                                          : at::full({}, NAN, logits.options());  // 0 / 0
    return {loss, stats, z_loss_scale > 0.0 ? loss.clone() : at::Tensor()};
  }

  // Rows must be unit-stride; a row stride (e.g. a column slice) is used as is.
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  at::Tensor objective = at::empty({B}, logits.options().dtype(acc));
  at::Tensor z_rows;
  if (z_loss_scale > 0.0) z_rows = at::empty({B}, logits.options().dtype(acc));

  CrossEntropyParams p;
  p.logits = z.const_data_ptr();
  p.logits_dtype = to_dtype(z.scalar_type());
  p.rows = B;
  p.classes = C;
  p.logits_row_stride = z.stride(0);
  p.target = t.const_data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  p.label_smoothing = label_smoothing;
  p.reduction = static_cast<int>(reduction);
  p.objective = objective.mutable_data_ptr();
  p.grad = grad.defined() ? grad.mutable_data_ptr() : nullptr;
  p.stats = stats.mutable_data_ptr<float>();
  p.softcap = softcap;
  p.z_loss_scale = z_loss_scale;
  p.z_loss = z_rows.defined() ? z_rows.mutable_data_ptr() : nullptr;
  at::Tensor prep;
  const int64_t prep_size = cross_entropy_prep_size(p);
  if (prep_size > 0) {
    prep = at::empty({prep_size}, logits.options().dtype(acc));
    p.prep = prep.mutable_data_ptr();
  }
  at::Tensor flag = error_flag_like(logits);
  p.error_flag = error_flag_ptr(flag);
  C10_CUDA_CHECK(cross_entropy_fwd(p, current_stream()));
  check_target_flag(flag, C, ignore_index);

  const auto reduce = [&](const at::Tensor& rows) {
    if (reduction == kNone) return rows.to(logits.scalar_type());
    if (reduction == kSum) return rows.sum().to(logits.scalar_type());
    // D = prep[0] stays on the device; D = 0 gives NaN, as F.cross_entropy (a sum that
    // label smoothing made non-zero over zero-weight rows would otherwise give inf).
    const at::Tensor d = prep.select(0, 0);
    return at::where(d.ne(0), rows.sum().div(d), std::numeric_limits<double>::quiet_NaN())
        .to(logits.scalar_type());
  };
  return {reduce(objective), stats, z_rows.defined() ? reduce(z_rows) : at::Tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_logits_2d(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto [loss, stats, z_loss] = cross_entropy_into_cuda(logits, target, weight, ignore_index,
                                                       label_smoothing, reduction, grad);
  return {loss, grad, stats};
}

// The gradient overwrites the logits (csl_fast.accumulate(inplace_grad=True)).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cuda(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_inplace_logits(logits);
  auto [loss, stats, z_loss] = cross_entropy_into_cuda(logits, target, weight, ignore_index,
                                                       label_smoothing, reduction, logits);
  return {loss, stats};
}

// Loss and statistics only: the kernels skip the gradient's stores, and no logits-sized
// buffer is allocated.
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_stats_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  auto [loss, stats, z_loss] = cross_entropy_into_cuda(logits, target, weight, ignore_index,
                                                       label_smoothing, reduction, at::Tensor());
  return {loss, stats};
}

// With soft-capping and the z-loss (z_loss zeros when z_loss_scale is 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  check_logits_2d(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto [loss, stats, z_loss] =
      cross_entropy_into_cuda(logits, target, weight, ignore_index, label_smoothing, reduction,
                              grad, softcap, z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, grad, stats, z_loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra_inplace_cuda(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  check_inplace_logits(logits);
  auto [loss, stats, z_loss] =
      cross_entropy_into_cuda(logits, target, weight, ignore_index, label_smoothing, reduction,
                              logits, softcap, z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, stats, z_loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra_stats_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  auto [loss, stats, z_loss] =
      cross_entropy_into_cuda(logits, target, weight, ignore_index, label_smoothing, reduction,
                              at::Tensor(), softcap, z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, stats, z_loss};
}

// The float16/bfloat16 backward in one elementwise pass (kernels.h: cross_entropy_bwd).
at::Tensor cross_entropy_bwd_cuda(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& stats, const at::Tensor& scale,
                                  int64_t ignore_index, double label_smoothing, double softcap,
                                  double z_loss_scale) {
  check_cross_entropy_bwd_args(logits, target, weight, stats, scale, label_smoothing, softcap,
                               z_loss_scale);
  check_same_device(target, "target", logits, "logits");
  check_same_device(stats, "stats", logits, "logits");
  check_same_device(scale, "scale", logits, "logits");
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  CSL_CHECK_VALUE(C <= kMaxClasses, "csl_fast: the CUDA kernels support at most ",
                    kMaxClasses, " classes, got C = ", C);
  at::Tensor w, w_sum;
  if (weight.has_value()) {
    CSL_CHECK_TYPE(at::isFloatingType(weight->scalar_type()),
                     "csl_fast: weight must be a floating-point tensor, got ",
                     weight->scalar_type());
    check_same_device(*weight, "weight", logits, "logits");
    w = weight->to(at::kFloat).contiguous();
    w_sum = w.sum().reshape({1});
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({B, C}, logits.options());
  if (B == 0 || C == 0) return grad;
  const at::Tensor z = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor st = stats.contiguous();
  const at::Tensor sc = scale.reshape({-1}).contiguous();
  CrossEntropyBwdParams p;
  p.logits = z.const_data_ptr();
  p.logits_dtype = to_dtype(z.scalar_type());
  p.rows = B;
  p.classes = C;
  p.logits_row_stride = z.stride(0);
  p.target = t.const_data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.weight = w.defined() ? w.const_data_ptr<float>() : nullptr;
  p.weight_sum = w_sum.defined() ? w_sum.const_data_ptr<float>() : nullptr;
  p.label_smoothing = label_smoothing;
  p.stats = st.const_data_ptr<float>();
  p.scale = sc.const_data_ptr<float>();
  p.per_row_scale = sc.numel() == B && B > 1;
  p.grad = grad.mutable_data_ptr();
  p.softcap = softcap;
  p.z_loss_scale = z_loss_scale;
  at::Tensor flag = error_flag_like(logits);
  p.error_flag = error_flag_ptr(flag);
  C10_CUDA_CHECK(cross_entropy_bwd(p, current_stream()));
  check_target_flag(flag, C, ignore_index);
  return grad;
}

// ---------------------------------------------------------------------------------------
void scatter_stats_cuda(const at::Tensor& stats, const at::Tensor& index, bool deterministic,
                        const std::optional<at::Tensor>& csl,
                        const std::optional<at::Tensor>& count) {
  const int64_t B = check_scatter_args(stats, index);
  check_same_device(index, "index", stats, "stats");
  const int64_t n = check_buffers(csl, count, [&](const at::Tensor& buf, const char* name) {
    check_same_device(buf, name, stats, "stats");
  });
  if (n < 0 || B == 0) return;
  CSL_CHECK_VALUE(!deterministic || B <= INT32_MAX,
                    "csl_fast: deterministic scatter supports at most 2^31 - 1 rows, got ", B,
                    "; split the batch or pass deterministic=False");

  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor idx = contiguous_index_for_writes(index, {csl, count});
  ScatterParams p;
  p.stats = stats.const_data_ptr<float>();
  p.rows = B;
  p.index = idx.const_data_ptr();
  p.index_dtype = to_dtype(idx.scalar_type());
  if (csl.has_value()) {
    p.csl = csl->mutable_data_ptr();
    p.csl_dtype = to_dtype(csl->scalar_type());
    p.csl_size = csl->numel();
  }
  if (count.has_value()) {
    p.count = count->mutable_data_ptr();
    p.count_dtype = to_dtype(count->scalar_type());
    p.count_size = count->numel();
  }
  at::Tensor flag = error_flag_like(stats);
  p.error_flag = error_flag_ptr(flag);
  const cudaStream_t stream = current_stream();
  if (deterministic) {
    size_t bytes = 0;
    C10_CUDA_CHECK(scatter_stats_deterministic_workspace_bytes(B, n, &bytes));
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(bytes)}, stats.options().dtype(at::kByte));
    C10_CUDA_CHECK(scatter_stats_deterministic(p, workspace.mutable_data_ptr(), bytes, stream));
  } else {
    C10_CUDA_CHECK(scatter_stats_atomic(p, stream));
  }
  CSL_CHECK_INDEX(read_flag(flag) == 0, "csl_fast: index has values outside [0, N = ", n,
                    ") where N is the size of the csl buffer; pass dataset indices "
                    "(csl_fast.data.IndexedDataset) and a buffer with one entry per dataset "
                    "sample (found by CSL_FAST_VALIDATE=1; those rows were skipped)");
}

// ---------------------------------------------------------------------------------------
// The tracker's suggested-label vote: a stable sort of the indices, then one pass in which
// each run of equal indices is walked in batch order (kernels.h: VoteParams).
void record_vote_cuda(const at::Tensor& stats, const at::Tensor& index, at::Tensor& label,
                      at::Tensor& votes, at::Tensor& hits) {
  const int64_t B = check_vote_args(stats, index, label, votes, hits);
  const int64_t n = label.numel();
  check_same_device(index, "index", stats, "stats");
  check_same_device(label, "suggest_label", stats, "stats");
  check_same_device(votes, "suggest_votes", stats, "stats");
  check_same_device(hits, "suggest_hits", stats, "stats");
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor st = stats.contiguous();
  const auto sorted = index.to(at::kLong).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& keys = std::get<0>(sorted);
  const at::Tensor& perm = std::get<1>(sorted);
  VoteParams p;
  p.stats = st.const_data_ptr<float>();
  p.rows = B;
  p.sorted_index = keys.const_data_ptr<int64_t>();
  p.perm = perm.const_data_ptr<int64_t>();
  p.label = label.mutable_data_ptr<int32_t>();
  p.votes = votes.mutable_data_ptr<int32_t>();
  p.hits = hits.mutable_data_ptr<int32_t>();
  p.n = n;
  C10_CUDA_CHECK(vote_sorted(p, current_stream()));
}

// ---------------------------------------------------------------------------------------
at::Tensor input_grad_norms_cuda(const at::Tensor& grad, double scale) {
  CSL_CHECK_VALUE(grad.dim() >= 1, "csl_fast: grad must have a batch dimension, got a scalar");
  CSL_CHECK_TYPE(is_logits_dtype(grad.scalar_type()),
                   "csl_fast: grad must be float32, float16, bfloat16 or float64, got ",
                   grad.scalar_type());
  const int64_t B = grad.size(0);
  at::Tensor out = at::empty({B}, grad.options().dtype(at::kFloat));
  if (B == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  InputGradNormsParams p;
  p.grad = g.const_data_ptr();
  p.dtype = to_dtype(g.scalar_type());
  p.rows = B;
  p.cols = g.numel() / B;
  p.scale = scale;
  p.out = out.mutable_data_ptr<float>();
  const size_t bytes = input_grad_norms_workspace_bytes(p);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, grad.options().dtype(at::kByte));
  }
  C10_CUDA_CHECK(input_grad_norms(p, bytes > 0 ? workspace.mutable_data_ptr() : nullptr, bytes,
                                  current_stream()));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CUDA, m) {
  m.impl("cross_entropy_fwd", &csl_fast::cuda::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &csl_fast::cuda::cross_entropy_fwd_inplace_cuda);
  m.impl("cross_entropy_fwd_stats", &csl_fast::cuda::cross_entropy_fwd_stats_cuda);
  m.impl("cross_entropy_bwd", &csl_fast::cuda::cross_entropy_bwd_cuda);
  m.impl("cross_entropy_fwd_extra", &csl_fast::cuda::cross_entropy_fwd_extra_cuda);
  m.impl("cross_entropy_fwd_extra_inplace",
         &csl_fast::cuda::cross_entropy_fwd_extra_inplace_cuda);
  m.impl("cross_entropy_fwd_extra_stats", &csl_fast::cuda::cross_entropy_fwd_extra_stats_cuda);
  m.impl("scatter_stats", &csl_fast::cuda::scatter_stats_cuda);
  m.impl("input_grad_norms", &csl_fast::cuda::input_grad_norms_cuda);
  m.impl("record_vote", &csl_fast::cuda::record_vote_cuda);
}
