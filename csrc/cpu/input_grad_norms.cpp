// Per-row squared L2 norm of scale * grad over all but the first dimension.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../message.h"

namespace csl_fast {
namespace cpu {
namespace {

// Scaled before squaring, as the reference and the CUDA/Triton kernels do: squaring first
// underflows (|g| < 1e-19 in float32) or overflows (|g| > 1e19) where scale * g does not.
template <typename scalar_t, typename acc_t>
acc_t row_sum_sq(const scalar_t* row, int64_t n, acc_t scale) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]) * scale;
    s += v * v;
  }
  return s;
}

at::Tensor input_grad_norms(const at::Tensor& grad, double scale) {
  CSL_CHECK_VALUE(grad.dim() >= 1, "csl_fast: grad must have a batch dimension, got a scalar");
  CSL_CHECK_TYPE(at::isFloatingType(grad.scalar_type()),
                   "csl_fast: grad must be a floating-point tensor, got ", grad.scalar_type());
  const int64_t B = grad.size(0);
  // Not view({B, -1}): with no elements (an empty batch) the -1 is ambiguous.
  const int64_t K = c10::multiply_integers(grad.sizes().slice(1));
  const at::Tensor g = grad.contiguous().view({B, K});
  at::Tensor out = at::empty({B}, grad.options().dtype(at::kFloat));
  float* op = out.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "csl_fast_ign", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        // Chunked, chunks added in double: as accurate as a cascade sum for long rows.
        double s = 0;
        for (int64_t lo = 0; lo < K; lo += 1024) {
          s += row_sum_sq<scalar_t, acc_t>(gp + i * K + lo, std::min<int64_t>(1024, K - lo), sc);
        }
        op[i] = static_cast<float>(s);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("input_grad_norms", &csl_fast::cpu::input_grad_norms);
}
