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

}  // extern "C"
