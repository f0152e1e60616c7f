// Test-only C entry points into the host-emulated kernels (see host_emulation.h), called
// through ctypes by tests/test_cuda_compile.py. Not part of any build.
#include <cstdint>

#include "kernels.h"

using namespace csl_fast::cuda;

extern "C" {

int64_t emu_ce_prep_size(int64_t rows, int reduction, int has_weight, double label_smoothing) {
  CrossEntropyParams p;
  p.rows = rows;
  p.reduction = reduction;
  p.weight = has_weight ? reinterpret_cast<const void*>(1) : nullptr;
  p.label_smoothing = label_smoothing;
  return cross_entropy_prep_size(p);
}

int emu_cross_entropy_fwd(const void* logits, int dtype, int64_t rows, int64_t classes,
                          int64_t row_stride, const int64_t* target, int64_t ignore_index,
                          const void* weight, double label_smoothing, int reduction, void* prep,
                          void* objective, void* grad, float* stats, int* error_flag) {
  CrossEntropyParams p;
  p.logits = logits;
  p.logits_dtype = static_cast<DType>(dtype);
  p.rows = rows;
  p.classes = classes;
  p.logits_row_stride = row_stride;
  p.target = target;
  p.ignore_index = ignore_index;
  p.weight = weight;
  p.label_smoothing = label_smoothing;
  p.reduction = reduction;
  p.prep = prep;
  p.objective = objective;
  p.grad = grad;
  p.stats = stats;
  p.error_flag = error_flag;
  return static_cast<int>(cross_entropy_fwd(p, nullptr));
}

// emu_cross_entropy_fwd with the extras: soft-capping and the z-loss (z_loss: acc type [rows]).
int emu_cross_entropy_fwd_extra(const void* logits, int dtype, int64_t rows, int64_t classes,
                                const int64_t* target, int64_t ignore_index,
                                double label_smoothing, int reduction, void* prep,
                                void* objective, void* grad, float* stats, double softcap,
                                double z_loss_scale, void* z_loss) {
  CrossEntropyParams p;
  p.logits = logits;
  p.logits_dtype = static_cast<DType>(dtype);
  p.rows = rows;
  p.classes = classes;
  p.logits_row_stride = classes;
  p.target = target;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.reduction = reduction;
  p.prep = prep;
  p.objective = objective;
  p.grad = grad;
  p.stats = stats;
  p.softcap = softcap;
  p.z_loss_scale = z_loss_scale;
  p.z_loss = z_loss;
  return static_cast<int>(cross_entropy_fwd(p, nullptr));
}

// The float16/bfloat16 backward (cross_entropy_bwd): weight/weight_sum float32 or null.
int emu_cross_entropy_bwd(const void* logits, int dtype, int64_t rows, int64_t classes,
                          int64_t row_stride, const int64_t* target, int64_t ignore_index,
                          const float* weight, const float* weight_sum, double label_smoothing,
                          const float* stats, const float* scale, int per_row_scale, void* grad,
                          int* error_flag, double softcap, double z_loss_scale) {
  CrossEntropyBwdParams p;
  p.logits = logits;
  p.logits_dtype = static_cast<DType>(dtype);
  p.rows = rows;
  p.classes = classes;
  p.logits_row_stride = row_stride;
  p.target = target;
  p.ignore_index = ignore_index;
  p.weight = weight;
  p.weight_sum = weight_sum;
  p.label_smoothing = label_smoothing;
  p.stats = stats;
  p.scale = scale;
  p.per_row_scale = per_row_scale != 0;
  p.grad = grad;
  p.error_flag = error_flag;
  p.softcap = softcap;
  p.z_loss_scale = z_loss_scale;
  return static_cast<int>(cross_entropy_bwd(p, nullptr));
}

int emu_vote_sorted(const float* stats, int64_t rows, const int64_t* sorted_index,
                    const int64_t* perm, int32_t* label, int32_t* votes, int32_t* hits,
                    int64_t n) {
  VoteParams p;
  p.stats = stats;
  p.rows = rows;
  p.sorted_index = sorted_index;
  p.perm = perm;
  p.label = label;
  p.votes = votes;
  p.hits = hits;
  p.n = n;
  return static_cast<int>(vote_sorted(p, nullptr));
}

int64_t emu_input_grad_norms_workspace(int dtype, int64_t rows, int64_t cols) {
  InputGradNormsParams p;
  p.dtype = static_cast<DType>(dtype);
  p.rows = rows;
  p.cols = cols;
  return static_cast<int64_t>(input_grad_norms_workspace_bytes(p));
}

int emu_input_grad_norms(const void* grad, int dtype, int64_t rows, int64_t cols, double scale,
                         float* out, void* workspace, int64_t workspace_bytes) {
  InputGradNormsParams p;
  p.grad = grad;
  p.dtype = static_cast<DType>(dtype);
  p.rows = rows;
  p.cols = cols;
  p.scale = scale;
  p.out = out;
  return static_cast<int>(
      input_grad_norms(p, workspace, static_cast<size_t>(workspace_bytes), nullptr));
}

int64_t emu_scatter_workspace(int64_t rows, int64_t max_buffer_size) {
  size_t bytes = 0;
  const cudaError_t err =
      scatter_stats_deterministic_workspace_bytes(rows, max_buffer_size, &bytes);
  return err == cudaSuccess ? static_cast<int64_t>(bytes) : -1;
}

int emu_scatter_stats(const float* stats, int64_t rows, const void* index, int index_dtype,
                      void* csl, int csl_dtype, int64_t csl_size, void* count, int count_dtype,
                      int64_t count_size, int deterministic, void* workspace,
                      int64_t workspace_bytes, int* error_flag) {
  ScatterParams p;
  p.stats = stats;
  p.rows = rows;
  p.index = index;
  p.index_dtype = static_cast<DType>(index_dtype);
  p.csl = csl;
  p.csl_dtype = static_cast<DType>(csl_dtype);
  p.csl_size = csl_size;
  p.count = count;
  p.count_dtype = static_cast<DType>(count_dtype);
  p.count_size = count_size;
  p.error_flag = error_flag;
  const cudaError_t err =
      deterministic ? scatter_stats_deterministic(p, workspace,
                                                  static_cast<size_t>(workspace_bytes), nullptr)
                    : scatter_stats_atomic(p, nullptr);
  return static_cast<int>(err);
}

}  // extern "C"
