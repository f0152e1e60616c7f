// Fused cross entropy on the CPU: one pass over each row (statistics, exponentials
// kept in a per-thread scratch row, then the gradient), parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../stats.h"
#include "vec_math.h"

namespace csl_fast {
namespace cpu {
namespace {

// Accumulators of the exponential pass over a range of classes that excludes y.
template <typename acc_t>
struct ExpSums {
  acc_t sum = 0;        // sum_j exp(z_j - m)
  acc_t sum_sq = 0;     // sum_j exp(z_j - m)^2
  acc_t sum_shift = 0;  // sum_j w_j (z_j - m), for label smoothing
};

template <typename acc_t>
inline __attribute__((always_inline)) acc_t range_max(const acc_t* z, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

// e[j] = exp(z[j] - m) over one range of classes, with the sums above.
template <typename acc_t>
inline __attribute__((always_inline)) ExpSums<acc_t> range_exp(const acc_t* z, const acc_t* w,
                                                               acc_t* e, int64_t n, acc_t m) {
  acc_t s = 0, s2 = 0, sz = 0;
  if (w == nullptr) {
#pragma omp simd reduction(+ : s, s2, sz)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d = z[j] - m;  // read before e[j] is written: e may alias z
      const acc_t v = exp_approx(d);
      e[j] = v;
      s += v;
      s2 += v * v;
      sz += d;
    }
  } else {
#pragma omp simd reduction(+ : s, s2, sz)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d = z[j] - m;
      const acc_t v = exp_approx(d);
      e[j] = v;
      s += v;
      s2 += v * v;
      sz += w[j] * d;
    }
  }
  return {s, s2, sz};
}

// g[j] = a * e[j] - b * w[j] (w = 1 when absent), in place over the scratch row.
template <typename acc_t>
inline __attribute__((always_inline)) void range_grad(acc_t* e, const acc_t* w, int64_t n, acc_t a,
                                                      acc_t b) {
  if (w == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = a * e[j] - b;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) e[j] = a * e[j] - b * w[j];
  }
}

// Float instantiations get an x86-64-v3 (AVX2+FMA) clone picked at load time by CPU
// features ("arch=haswell" would test for that exact CPU model); the templates above
// are inlined into each clone and compiled for its instruction set.
#define CSL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
CSL_CLONES float range_max_f(const float* z, int64_t n) { return range_max(z, n); }
CSL_CLONES ExpSums<float> range_exp_f(const float* z, const float* w, float* e, int64_t n, float m) {
  return range_exp(z, w, e, n, m);
}
CSL_CLONES void range_grad_f(float* e, const float* w, int64_t n, float a, float b) {
  range_grad(e, w, n, a, b);
}
#undef CSL_CLONES

inline float row_max(const float* z, int64_t n) { return range_max_f(z, n); }
// Sums over chunks, added up in double: one long vector accumulation per lane would
// lose ~sqrt(C / 8) ulps at C = 32k, several times PyTorch's cascade summation.
inline ExpSums<float> row_exp(const float* z, const float* w, float* e, int64_t n, float m) {
  constexpr int64_t kChunk = 512;
  double s = 0, s2 = 0, sz = 0;
  for (int64_t lo = 0; lo < n; lo += kChunk) {
    const int64_t len = std::min(kChunk, n - lo);
    const ExpSums<float> part = range_exp_f(z + lo, w ? w + lo : nullptr, e + lo, len, m);
    s += part.sum;
    s2 += part.sum_sq;
    sz += part.sum_shift;
  }
  return {static_cast<float>(s), static_cast<float>(s2), static_cast<float>(sz)};
}
inline void row_grad(float* e, const float* w, int64_t n, float a, float b) {
  range_grad_f(e, w, n, a, b);
}
inline double row_max(const double* z, int64_t n) { return range_max(z, n); }
inline ExpSums<double> row_exp(const double* z, const double* w, double* e, int64_t n, double m) {
  return range_exp(z, w, e, n, m);
}
inline void row_grad(double* e, const double* w, int64_t n, double a, double b) {
  range_grad(e, w, n, a, b);
}

struct Options {
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
};

// One row: statistics into stats[k * B + i], objective into objective[i], gradient row
// (times row_scale) into g. z and e are contiguous acc_t rows of length C.
template <typename acc_t>
acc_t process_row(const acc_t* z, acc_t* e, int64_t C, int64_t y, const acc_t* w, acc_t w_total,
                  acc_t row_scale, const Options& opt, float* stats, int64_t B, int64_t i) {
  // Statistics of the classes before and after y, kept apart so that nothing has to
  // be subtracted later (1 - p_y = sum_{j != y} p_j without cancellation).
  const acc_t z_y = z[y];
  const acc_t max_before = row_max(z, y);
  const acc_t max_after = row_max(z + y + 1, C - y - 1);
  const acc_t max_other = std::max(max_before, max_after);
  const acc_t m = std::max(max_other, z_y);
  const ExpSums<acc_t> before = row_exp(z, w, e, y, m);
  const ExpSums<acc_t> after = row_exp(z + y + 1, w ? w + y + 1 : nullptr, e + y + 1, C - y - 1, m);
  const acc_t e_y = exp_approx(z_y - m);
  const acc_t s_other = before.sum + after.sum;
  const acc_t s = s_other + e_y;
  // When y holds the max, e_y = 1 and log(s) = log1p(s_other): keeps tiny losses of
  // confident rows that log(1 + s_other) would round to 0.
  const acc_t log_s = z_y >= max_other ? std::log1p(s_other) : std::log(s);
  const acc_t loss = log_s + (m - z_y);
  const acc_t inv_s = acc_t(1) / s;
  const acc_t q = s_other * inv_s;  // 1 - p_y
  const acc_t p_y = e_y * inv_s;

  const acc_t eps = static_cast<acc_t>(opt.label_smoothing);
  const acc_t w_y = w ? w[y] : acc_t(1);
  const acc_t smooth = eps / static_cast<acc_t>(C);
  acc_t objective = (acc_t(1) - eps) * w_y * loss;
  if (eps != acc_t(0)) {
    const acc_t shift_sum = before.sum_shift + after.sum_shift + w_y * (z_y - m);
    objective += smooth * (w_total * log_s - shift_sum);
  }

  const bool finite = std::isfinite(static_cast<double>(loss));
  stats[kLoss * B + i] = finite ? static_cast<float>(loss) : 0.f;
  stats[kPTrue * B + i] = finite ? static_cast<float>(p_y) : 0.f;
  stats[kMargin * B + i] = finite ? static_cast<float>(C > 1 ? z_y - max_other : acc_t(0)) : 0.f;
  // argmax with the first index winning ties, as torch.argmax.
  stats[kCorrect * B + i] = finite && z_y > max_before && z_y >= max_after ? 1.f : 0.f;
  stats[kGradNormSq * B + i] =
      finite ? static_cast<float>((before.sum_sq + after.sum_sq) * inv_s * inv_s + q * q) : 0.f;
  stats[kValid * B + i] = finite ? 1.f : 0.f;

  // d objective / d z_j = (1-eps) w_y (p_j - [j == y]) + smooth (W p_j - w_j).
  const acc_t a = ((acc_t(1) - eps) * w_y + smooth * w_total) * inv_s * row_scale;
  row_grad(e, w, C, a, smooth * row_scale);
  e[y] = (-(acc_t(1) - eps) * w_y * q + smooth * (w_total * p_y - w_y)) * row_scale;
  return objective;
}

template <typename scalar_t, typename acc_t>
void cross_entropy_rows(const at::Tensor& logits, const int64_t* target, const acc_t* w,
                        acc_t w_total, acc_t row_scale, const Options& opt, at::Tensor& grad,
                        float* stats, acc_t* objective) {
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const scalar_t* in = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.mutable_data_ptr<scalar_t>();
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));

  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> zbuf(kSameType ? 0 : C);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = in + i * row_stride;
      scalar_t* grow = out + i * C;
      const int64_t y = target[i];
      if (y == opt.ignore_index) {
        std::fill(grow, grow + C, scalar_t(0));
        for (int k = 0; k < kNumStats; ++k) stats[k * B + i] = 0.f;
        objective[i] = 0;
        continue;
      }
      const acc_t* z;
      acc_t* e;
      if constexpr (kSameType) {
        z = row;
        e = grow;  // exponentials, then the gradient, written straight into the output
      } else {
        for (int64_t j = 0; j < C; ++j) zbuf[j] = static_cast<acc_t>(row[j]);
        z = zbuf.data();
        // One buffer serves both: the exponential pass reads z[j] before writing e[j].
        e = zbuf.data();
      }
      objective[i] = process_row(z, e, C, y, w, w_total, row_scale, opt, stats, B, i);
      if constexpr (!kSameType) {
        for (int64_t j = 0; j < C; ++j) grow[j] = static_cast<scalar_t>(e[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_logits_2d(logits);
  check_cross_entropy_args(logits, target, label_smoothing, reduction);
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  TORCH_CHECK_VALUE(C > 0 || B == 0, "csl_fast: logits have C = 0 classes");
  if (weight.has_value()) {
    check_weight_shape(*weight, C);
  }
  const at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_INDEX(tp[i] == ignore_index || (tp[i] >= 0 && tp[i] < C), "csl_fast: target[", i,
                      "] = ", tp[i], " is outside [0, C = ", C, ") and is not ignore_index (",
                      ignore_index, "); fix the labels or pass the right ignore_index");
  }
  // Rows must be unit-stride; a row stride (e.g. a column slice) is used as is.
  const at::Tensor z = (C == 0 || logits.stride(1) == 1) ? logits : logits.contiguous();
  at::Tensor grad = at::empty({B, C}, logits.options());
  at::Tensor stats = at::empty({kNumStats, B}, logits.options().dtype(at::kFloat));
  const Options opt{ignore_index, label_smoothing, reduction};

  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "csl_fast_cross_entropy_fwd", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        std::vector<acc_t> w;
        acc_t w_total = 0;
        if (weight.has_value()) {
          const at::Tensor wt = weight->to(at::CppTypeToScalarType<acc_t>::value).contiguous();
          w.assign(wt.const_data_ptr<acc_t>(), wt.const_data_ptr<acc_t>() + C);
          for (acc_t v : w) w_total += v;
        } else {
          w_total = static_cast<acc_t>(C);
        }
        const acc_t* wp = w.empty() ? nullptr : w.data();
        // Mean divides by the summed weight of the non-ignored targets, as nll_loss does.
        double denom = 0;
        for (int64_t i = 0; i < B; ++i) {
          if (tp[i] != ignore_index) denom += wp ? static_cast<double>(wp[tp[i]]) : 1.0;
        }
        const acc_t row_scale = reduction == kMean ? static_cast<acc_t>(1.0 / denom) : acc_t(1);
        std::vector<acc_t> objective(B);
        cross_entropy_rows<scalar_t, acc_t>(z, tp, wp, w_total, row_scale, opt, grad,
                                            stats.mutable_data_ptr<float>(), objective.data());
        if (reduction == kNone) {
          loss = at::empty({B}, logits.options());
          scalar_t* lp = loss.mutable_data_ptr<scalar_t>();
          for (int64_t i = 0; i < B; ++i) lp[i] = static_cast<scalar_t>(objective[i]);
        } else {
          double total = 0;  // fixed order: the reduction is deterministic
          for (int64_t i = 0; i < B; ++i) total += static_cast<double>(objective[i]);
          if (reduction == kMean) total /= denom;  // 0 / 0 = NaN, as F.cross_entropy
          loss = at::scalar_tensor(total, logits.options());
        }
      });
  return {loss, grad, stats};
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("cross_entropy_fwd", &csl_fast::cpu::cross_entropy_fwd);
}
