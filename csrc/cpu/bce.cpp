// Fused binary cross entropy with logits on the CPU (csl_fast.accumulate_bce): the loss
// and per-sample statistics in one pass over [B, L], parallel over rows; the backward
// pass recomputes the gradient from the logits (one rounding for any upstream gradient);
// the recording pass adds per-sample values and per-entry plain losses and margins at
// each sample's dataset index, in batch order (deterministic), parallel over labels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../bce_checks.h"

namespace csl_fast {
namespace cpu {
namespace {

// A [B, L] operand read through its strides (an expanded weight has stride 0).
template <typename T>
struct Strided {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0;
  T at(int64_t i, int64_t l) const { return p[i * s0 + l * s1]; }
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// One entry: the plain loss softplus(z) - y z and the weighted loss of
// F.binary_cross_entropy_with_logits, in the form of csl_fast/reference.py:
// bce_entry_losses (no large terms cancel for hard targets).
template <typename acc_t>
struct Entry {
  acc_t plain, weighted;
};

template <typename acc_t>
inline Entry<acc_t> entry_loss(acc_t z, acc_t y, acc_t w, acc_t pw) {
  const acc_t log_term = std::log1p(std::exp(-std::abs(z)));
  const bool pos = z >= acc_t(0);
  const acc_t plain = (pos ? (acc_t(1) - y) * z : -y * z) + log_term;
  const acc_t linear = pos ? (acc_t(1) - y) * z : -(pw * y) * z;
  const acc_t weighted = w * (linear + (acc_t(1) + (pw - acc_t(1)) * y) * log_term);
  return {plain, weighted};
}

// d/dz of the weighted entry loss: w ((1 - y) sigmoid(z) - pw y sigmoid(-z)), each
// sigmoid from exp(-|z|) without cancellation.
template <typename acc_t>
inline acc_t entry_grad(acc_t z, acc_t y, acc_t w, acc_t pw) {
  const acc_t e = std::exp(-std::abs(z));
  const acc_t big = acc_t(1) / (acc_t(1) + e), small = e * big;
  const bool pos = z >= acc_t(0);
  const acc_t sig = pos ? big : small, sig_neg = pos ? small : big;
  return w * ((acc_t(1) - y) * sig - pw * y * sig_neg);
}

template <typename acc_t>
inline acc_t opt_at(const Strided<acc_t>& t, int64_t i, int64_t l) {
  return t.p ? t.at(i, l) : acc_t(1);
}

// Optional weight, pos_weight: converted (unexpanded) to acc_t, then broadcast to [B, L].
at::Tensor broadcast_option(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                            at::ScalarType acc) {
  if (!t.has_value()) return at::Tensor();
  return t->to(acc).expand(logits.sizes());
}

template <typename acc_t>
Strided<acc_t> strided_or_null(const at::Tensor& t) {
  return t.defined() ? strided<acc_t>(t) : Strided<acc_t>{};
}

std::tuple<at::Tensor, at::Tensor> bce_fwd(const at::Tensor& logits, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& pos_weight,
                                           int64_t reduction) {
  check_bce_inputs(logits, target);
  check_bce_options(logits, weight, pos_weight, reduction);
  const int64_t B = logits.size(0), L = logits.size(1);
  at::Tensor stats = at::empty({kBceNumStats, B}, logits.options().dtype(at::kFloat));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "bce_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = at::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wt = broadcast_option(weight, logits, acc);
    const at::Tensor pwt = broadcast_option(pos_weight, logits, acc);
    const Strided<scalar_t> z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
    const Strided<acc_t> w = strided_or_null<acc_t>(wt), pw = strided_or_null<acc_t>(pwt);
    const bool per_entry = reduction == kNone;
    scalar_t* out = nullptr;
    if (per_entry) {
      loss = at::empty({B, L}, logits.options());
      out = loss.mutable_data_ptr<scalar_t>();
    }
    std::vector<double> objective(per_entry ? 0 : B);
    float* st = stats.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double plain_sum = 0, weighted_sum = 0;  // double: exact enough at any L
        int64_t wrong = 0;
        acc_t min_margin = std::numeric_limits<acc_t>::infinity();
        for (int64_t l = 0; l < L; ++l) {
          const acc_t zv = static_cast<acc_t>(z.at(i, l)), yv = static_cast<acc_t>(y.at(i, l));
          const Entry<acc_t> e = entry_loss(zv, yv, opt_at(w, i, l), opt_at(pw, i, l));
          plain_sum += e.plain;
          if (per_entry) {
            out[i * L + l] = static_cast<scalar_t>(e.weighted);
          } else {
            weighted_sum += e.weighted;
          }
          wrong += (zv >= acc_t(0)) != (yv >= acc_t(0.5));
          min_margin = std::min(min_margin, (acc_t(2) * yv - acc_t(1)) * zv);
        }
        if (!per_entry) objective[i] = weighted_sum;
        const acc_t row_loss = static_cast<acc_t>(plain_sum);
        const bool valid = std::isfinite(row_loss);
        st[kBceLoss * B + i] = valid ? static_cast<float>(row_loss) : 0.f;
        st[kBceValid * B + i] = valid ? 1.f : 0.f;
        st[kBceWrong * B + i] = valid ? static_cast<float>(wrong) : 0.f;
        st[kBceMinMargin * B + i] = valid ? static_cast<float>(min_margin) : 0.f;
      }
    });
    if (!per_entry) {
      double total = 0;  // fixed order: the reduction is deterministic
      for (int64_t i = 0; i < B; ++i) total += objective[i];
      // Mean over all B * L entries, as F.binary_cross_entropy_with_logits (0 / 0 = NaN).
      if (reduction == kMean) total /= static_cast<double>(B * L);
      loss = at::scalar_tensor(total, logits.options());
    }
  });
  return {loss, stats};
}

at::Tensor bce_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_bce_inputs(logits, target);
  check_bce_options(logits, weight, pos_weight, reduction);
  const int64_t B = logits.size(0), L = logits.size(1);
  TORCH_CHECK_VALUE(reduction == kNone ? grad.sizes() == logits.sizes() : grad.dim() == 0,
                    "csl_fast: the upstream gradient must have the loss's shape, got ",
                    grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(),
                   "csl_fast: the upstream gradient must have the logits' dtype ",
                   logits.scalar_type(), ", got ", grad.scalar_type());
  at::Tensor out = at::empty({B, L}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "bce_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = at::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wt = broadcast_option(weight, logits, acc);
    const at::Tensor pwt = broadcast_option(pos_weight, logits, acc);
    const Strided<scalar_t> z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
    const Strided<acc_t> w = strided_or_null<acc_t>(wt), pw = strided_or_null<acc_t>(pwt);
    // One scale for mean/sum: the upstream gradient, over B * L for mean.
    acc_t scale = acc_t(1);
    Strided<scalar_t> g;
    if (reduction == kNone) {
      g = strided<scalar_t>(grad);
    } else {
      scale = static_cast<acc_t>(grad.item<double>());
      if (reduction == kMean) scale /= static_cast<acc_t>(B * L);
    }
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t l = 0; l < L; ++l) {
          const acc_t s = g.p ? static_cast<acc_t>(g.at(i, l)) : scale;
          const acc_t d = entry_grad(static_cast<acc_t>(z.at(i, l)), static_cast<acc_t>(y.at(i, l)),
                                     opt_at(w, i, l), opt_at(pw, i, l));
          o[i * L + l] = static_cast<scalar_t>(s * d);
        }
      }
    });
  });
  return out;
}

template <typename out_t>
void add_rows(const at::Tensor& out, const int64_t* idx, const float* values, int64_t B) {
  out_t* p = out.mutable_data_ptr<out_t>();
  for (int64_t i = 0; i < B; ++i) p[idx[i]] += static_cast<out_t>(values[i]);
}

// buf[idx[i]] += values[i] for every row (values are 0 for rows that are not valid).
void add_per_sample(const std::optional<at::Tensor>& buf, const int64_t* idx, const float* values,
                    int64_t B) {
  if (!buf.has_value()) return;
  switch (buf->scalar_type()) {
    case at::kFloat: return add_rows<float>(*buf, idx, values, B);
    case at::kDouble: return add_rows<double>(*buf, idx, values, B);
    case at::kLong: return add_rows<int64_t>(*buf, idx, values, B);
    case at::kInt: return add_rows<int32_t>(*buf, idx, values, B);
    default: TORCH_CHECK(false, "csl_fast: unreachable buffer dtype");
  }
}

// label_csl[idx[i], l] += plain entry loss, label_margin[idx[i], l] += (2 y - 1) z over the
// valid rows in batch order; each thread owns a range of labels (no two write one entry).
template <typename scalar_t, typename csl_t, typename margin_t>
void add_per_entry(const at::Tensor& logits, const at::Tensor& target, const float* valid,
                   const int64_t* idx, csl_t* label_csl, margin_t* label_margin) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = logits.size(0), L = logits.size(1);
  const Strided<scalar_t> z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(B, 1));
  at::parallel_for(0, L, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = 0; i < B; ++i) {
      if (valid[i] == 0.f) continue;
      const int64_t row = idx[i] * L;
      for (int64_t l = lo; l < hi; ++l) {
        const acc_t zv = static_cast<acc_t>(z.at(i, l)), yv = static_cast<acc_t>(y.at(i, l));
        if (label_csl) {
          label_csl[row + l] += static_cast<csl_t>(entry_loss(zv, yv, acc_t(1), acc_t(1)).plain);
        }
        if (label_margin) {
          label_margin[row + l] += static_cast<margin_t>((acc_t(2) * yv - acc_t(1)) * zv);
        }
      }
    }
  });
}

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

void bce_record(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                const at::Tensor& index, bool deterministic, const std::optional<at::Tensor>& csl,
                const std::optional<at::Tensor>& count, const std::optional<at::Tensor>& wrong,
                const std::optional<at::Tensor>& min_margin,
                const std::optional<at::Tensor>& label_csl,
                const std::optional<at::Tensor>& label_margin) {
  (void)deterministic;  // the CPU kernel is always deterministic
  auto on_cpu = [](const at::Tensor& buf, const char* name) {
    TORCH_CHECK_VALUE(buf.is_cpu(), "csl_fast: ", name, " must be on the CPU, got ",
                      buf.device());
  };
  const int64_t n = check_bce_record_args(logits, target, stats, index, csl, count, wrong,
                                          min_margin, label_csl, label_margin, on_cpu);
  if (n < 0) return;
  const int64_t B = logits.size(0);
  const at::Tensor idx = index.to(at::kLong).contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Every index checked before anything is written: a bad call leaves the buffers untouched.
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < n, "csl_fast: index[", i, "] = ", ip[i],
                      " is outside [0, N = ", n, ") where N is the size of the csl buffer; ",
                      "pass dataset indices (csl_fast.data.IndexedDataset) and a buffer with ",
                      "one entry per dataset sample");
  }
  const float* sp = stats.const_data_ptr<float>();
  add_per_sample(csl, ip, sp + kBceLoss * B, B);
  add_per_sample(count, ip, sp + kBceValid * B, B);
  add_per_sample(wrong, ip, sp + kBceWrong * B, B);
  add_per_sample(min_margin, ip, sp + kBceMinMargin * B, B);
  if (!label_csl.has_value() && !label_margin.has_value()) return;
  const bool csl64 = label_csl.has_value() && label_csl->scalar_type() == at::kDouble;
  const bool margin64 = label_margin.has_value() && label_margin->scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "bce_record",
                                  [&] {
    const float* valid = sp + kBceValid * B;
    auto run = [&](auto* c, auto* m) {
      add_per_entry<scalar_t>(logits, target, valid, ip, c, m);
    };
    if (csl64 && margin64) {
      run(ptr_or_null<double>(label_csl), ptr_or_null<double>(label_margin));
    } else if (csl64) {
      run(ptr_or_null<double>(label_csl), ptr_or_null<float>(label_margin));
    } else if (margin64) {
      run(ptr_or_null<float>(label_csl), ptr_or_null<double>(label_margin));
    } else {
      run(ptr_or_null<float>(label_csl), ptr_or_null<float>(label_margin));
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("bce_fwd", &csl_fast::cpu::bce_fwd);
  m.impl("bce_bwd", &csl_fast::cpu::bce_bwd);
  m.impl("bce_record", &csl_fast::cpu::bce_record);
}
