// Test-only C entry points into the host-emulated binary-cross-entropy kernels
// (csrc/cuda/bce_kernels.cu through host_emulation.h), called through ctypes by
// tests/test_bce_cuda.py. Not part of any build.
#include <cstdint>

#include "kernels.h"

using namespace csl_fast::cuda;

namespace {

// logits, target, dtype, rows, labels, their strides, weight / pos_weight (acc type) and
// strides: the inputs every entry point takes, in this order.
BceInputs inputs(const void* z, const void* y, int dtype, int64_t rows, int64_t labels,
                 const int64_t* zs, const int64_t* ys, const void* w, const int64_t* ws,
                 const void* pw, const int64_t* ps) {
  BceInputs in;
  in.logits = z;
  in.target = y;
  in.dtype = static_cast<DType>(dtype);
  in.rows = rows;
  in.labels = labels;
  in.weight = w;
  in.pos_weight = pw;
  for (int d = 0; d < 2; ++d) {
    in.z_stride[d] = zs[d];
    in.y_stride[d] = ys[d];
    in.w_stride[d] = ws[d];
    in.pw_stride[d] = ps[d];
  }
  return in;
}

}  // namespace

extern "C" {

int emu_bce_fwd(const void* z, const void* y, int dtype, int64_t rows, int64_t labels,
                const int64_t* zs, const int64_t* ys, const void* w, const int64_t* ws,
                const void* pw, const int64_t* ps, int reduction, void* loss, void* row_sums,
                float* stats) {
  BceFwdParams p;
  p.in = inputs(z, y, dtype, rows, labels, zs, ys, w, ws, pw, ps);
  p.reduction = reduction;
  p.loss = loss;
  p.row_sums = row_sums;
  p.stats = stats;
  return static_cast<int>(bce_fwd(p, nullptr));
}

int emu_bce_bwd(const void* z, const void* y, int dtype, int64_t rows, int64_t labels,
                const int64_t* zs, const int64_t* ys, const void* w, const int64_t* ws,
                const void* pw, const int64_t* ps, int reduction, const void* grad,
                const int64_t* gs, void* out) {
  BceBwdParams p;
  p.in = inputs(z, y, dtype, rows, labels, zs, ys, w, ws, pw, ps);
  p.reduction = reduction;
  p.grad = grad;
  p.g_stride[0] = gs[0];
  p.g_stride[1] = gs[1];
  p.out = out;
  return static_cast<int>(bce_bwd(p, nullptr));
}

// buffers: csl, count, wrong, min_margin, label_csl, label_margin, label_prob (null when
// absent), with their DType codes; sorted / perm null: the atomic kernel.
int emu_bce_record(const void* z, const void* y, int dtype, int64_t rows, int64_t labels,
                   const int64_t* zs, const int64_t* ys, const float* stats, const void* index,
                   int index_dtype, int64_t n, void* const* buffers, const int* dtypes,
                   const int64_t* sorted, const int64_t* perm) {
  const int64_t none[2] = {0, 0};
  BceRecordParams p;
  p.in = inputs(z, y, dtype, rows, labels, zs, ys, nullptr, none, nullptr, none);
  p.stats = stats;
  p.index = index;
  p.index_dtype = static_cast<DType>(index_dtype);
  p.n = n;
  void** ptrs[7] = {&p.csl,       &p.count,        &p.wrong,     &p.min_margin,
                    &p.label_csl, &p.label_margin, &p.label_prob};
  DType* types[7] = {&p.csl_dtype,       &p.count_dtype,        &p.wrong_dtype,
                     &p.min_margin_dtype, &p.label_csl_dtype,    &p.label_margin_dtype,
                     &p.label_prob_dtype};
  for (int k = 0; k < 7; ++k) {
    *ptrs[k] = buffers[k];
    *types[k] = static_cast<DType>(dtypes[k]);
  }
  const cudaError_t rc =
      sorted != nullptr ? bce_record_sorted(p, sorted, perm, nullptr) : bce_record_atomic(p, nullptr);
  return static_cast<int>(rc);
}

}  // extern "C"
