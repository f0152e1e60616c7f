// Fused binary cross entropy with logits on the CPU (csl_fast.accumulate_bce): the loss
// and per-sample statistics in one pass over [B, L], parallel over rows; the backward
// pass recomputes the gradient from the logits (one rounding for any upstream gradient);
// the recording pass adds per-sample values and per-entry plain losses and margins at
// each sample's dataset index, in batch order (deterministic), parallel over labels.
//
// Each row is first read into contiguous compute-type buffers (any strides, any of the
// four dtypes), so the arithmetic runs in unit-stride loops GCC vectorises: exp by the
// polynomial of vec_math.h, log(1 + e) by a short odd series, no libm calls (float64
// uses libm).
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
#include "vec_math.h"

namespace csl_fast {
namespace cpu {
namespace {

// log(1 + e) for e = exp(-|z|) in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], by its
// odd series to s^15 (the next term is below 2e-9 of the sum); every term is positive, so
// tiny e keep their relative precision. NaN in, NaN out.
inline __attribute__((always_inline)) float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
inline __attribute__((always_inline)) double log1p_unit(double e) { return std::log1p(e); }

// The plain entry loss softplus(z) - y z and the weighted loss of
// F.binary_cross_entropy_with_logits, in the form of csl_fast/reference.py:
// bce_entry_losses (no large terms cancel for hard targets). (z - z) is 0 for a finite z
// and NaN at z = -inf, where torch's form (-inf + inf) gives NaN, not +inf.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t plain_loss(acc_t z, acc_t y, acc_t log_term) {
  return (z >= acc_t(0) ? (acc_t(1) - y) * z : -y * z + (z - z)) + log_term;
}
template <typename acc_t>
inline __attribute__((always_inline)) acc_t weighted_loss(acc_t z, acc_t y, acc_t w, acc_t pw,
                                                          acc_t log_term) {
  const acc_t linear = z >= acc_t(0) ? (acc_t(1) - y) * z : -(pw * y) * z + (z - z);
  return w * (linear + (acc_t(1) + (pw - acc_t(1)) * y) * log_term);
}

// A [B, L] operand read through its strides (an expanded weight has stride 0).
template <typename T>
struct Strided {
  const T* p = nullptr;
  int64_t s0 = 0, s1 = 0;
};

template <typename T>
Strided<T> strided(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1)};
}

// Columns [lo, hi) of row i into dst (compute type); 1 where the operand is absent.
template <typename T, typename acc_t>
void load_row(const Strided<T>& t, int64_t i, int64_t lo, int64_t hi, acc_t* dst) {
  if (t.p == nullptr) {
    std::fill(dst, dst + (hi - lo), acc_t(1));
    return;
  }
  const T* row = t.p + i * t.s0;
  for (int64_t l = lo; l < hi; ++l) dst[l - lo] = static_cast<acc_t>(row[l * t.s1]);
}

// Optional weight, pos_weight: converted (unexpanded) to acc_t, then broadcast to [B, L].
at::Tensor broadcast_option(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                            at::ScalarType acc) {
  if (!t.has_value()) return at::Tensor();
  return t->to(acc).expand(logits.sizes());
}

// Per-row sums over one chunk of labels.
template <typename acc_t>
struct ChunkSums {
  acc_t plain = 0, weighted = 0, min_margin = std::numeric_limits<acc_t>::infinity();
  int32_t wrong = 0;
};

// Entries of one chunk: the weighted losses into out (reduction none), the sums.
template <typename acc_t>
inline __attribute__((always_inline)) ChunkSums<acc_t> fwd_chunk(const acc_t* z, const acc_t* y,
                                                                 const acc_t* w, const acc_t* pw,
                                                                 acc_t* out, int64_t n) {
  acc_t plain = 0, weighted = 0, mm = std::numeric_limits<acc_t>::infinity();
  int32_t wrong = 0;
#pragma omp simd reduction(+ : plain, weighted, wrong) reduction(min : mm)
  for (int64_t l = 0; l < n; ++l) {
    const acc_t zl = z[l], yl = y[l];
    const acc_t log_term = log1p_unit(exp_subnormal(-std::abs(zl)));
    plain += plain_loss(zl, yl, log_term);
    const acc_t v = weighted_loss(zl, yl, w[l], pw[l], log_term);
    out[l] = v;
    weighted += v;
    wrong += (zl >= acc_t(0)) != (yl >= acc_t(0.5)) ? 1 : 0;
    const acc_t m = (acc_t(2) * yl - acc_t(1)) * zl;
    mm = m < mm ? m : mm;
  }
  return {plain, weighted, mm, wrong};
}

// d/dz of the weighted entry loss times the upstream gradient g: g w ((1 - y) sigmoid(z)
// - pw y sigmoid(-z)), both sigmoids from exp(-|z|) without cancellation. An infinite pw
// gives NaN, as PyTorch's form ((pw y + 1 - y) sigmoid(z) - pw y: inf - inf) does, where
// this one would give -inf for y > 0.
template <typename acc_t>
inline __attribute__((always_inline)) void bwd_chunk(const acc_t* z, const acc_t* y,
                                                     const acc_t* w, const acc_t* pw,
                                                     const acc_t* g, acc_t* out, int64_t n) {
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    const acc_t e = exp_subnormal(-std::abs(z[l]));
    const acc_t big = acc_t(1) / (acc_t(1) + e), small = e * big;
    const bool pos = z[l] >= acc_t(0);
    const acc_t d = (acc_t(1) - y[l]) * (pos ? big : small) - pw[l] * y[l] * (pos ? small : big);
    const bool inf_pw = std::abs(pw[l]) == std::numeric_limits<acc_t>::infinity();
    out[l] = inf_pw ? std::numeric_limits<acc_t>::quiet_NaN() : g[l] * w[l] * d;
  }
}

// Plain entry losses and signed margins of one chunk.
template <typename acc_t>
inline __attribute__((always_inline)) void record_chunk(const acc_t* z, const acc_t* y,
                                                        acc_t* plain, acc_t* margin, int64_t n) {
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    plain[l] = plain_loss(z[l], y[l], log1p_unit(exp_subnormal(-std::abs(z[l]))));
    margin[l] = (acc_t(2) * y[l] - acc_t(1)) * z[l];
  }
}

// Labels per chunk: the vector sums stay short (float32 lanes), chunks add up in double.
constexpr int64_t kChunk = 256;
// Entries per parallel task, as PyTorch's own elementwise kernels.
constexpr int64_t kGrain = 32768;

// The row loops are cloned per instruction set (as csrc/cpu/cross_entropy.cpp's): every
// helper is inlined into each clone, picked at load time.
#define CSL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
CSL_CLONES ChunkSums<float> fwd_run(const float* z, const float* y, const float* w,
                                    const float* pw, float* out, int64_t n) {
  return fwd_chunk(z, y, w, pw, out, n);
}
CSL_CLONES void bwd_run(const float* z, const float* y, const float* w, const float* pw,
                        const float* g, float* out, int64_t n) {
  bwd_chunk(z, y, w, pw, g, out, n);
}
CSL_CLONES void record_run(const float* z, const float* y, float* plain, float* margin,
                           int64_t n) {
  record_chunk(z, y, plain, margin, n);
}
// The probabilities of the given targets, exp(-plain loss), vectorised.
CSL_CLONES void prob_run(const float* plain, float* prob, int64_t n) {
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) prob[l] = exp_subnormal(-plain[l]);
}
#undef CSL_CLONES
ChunkSums<double> fwd_run(const double* z, const double* y, const double* w, const double* pw,
                          double* out, int64_t n) {
  return fwd_chunk(z, y, w, pw, out, n);
}
void bwd_run(const double* z, const double* y, const double* w, const double* pw,
             const double* g, double* out, int64_t n) {
  bwd_chunk(z, y, w, pw, g, out, n);
}
void record_run(const double* z, const double* y, double* plain, double* margin, int64_t n) {
  record_chunk(z, y, plain, margin, n);
}
void prob_run(const double* plain, double* prob, int64_t n) {
  for (int64_t l = 0; l < n; ++l) prob[l] = std::exp(-plain[l]);
}

// Compute-type scratch for one chunk of each operand.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> buf;
  explicit Scratch(int k) : buf(static_cast<size_t>(k) * kChunk) {}
  acc_t* operator[](int k) { return buf.data() + k * kChunk; }
};

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
    const auto z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
    const auto w = strided<acc_t>(wt), pw = strided<acc_t>(pwt);
    const bool per_entry = reduction == kNone;
    scalar_t* out = nullptr;
    if (per_entry) {
      loss = at::empty({B, L}, logits.options());
      out = loss.mutable_data_ptr<scalar_t>();
    }
    std::vector<double> objective(per_entry ? 0 : B);
    float* st = stats.mutable_data_ptr<float>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)),
                     [&](int64_t begin, int64_t end) {
      Scratch<acc_t> s(5);
      for (int64_t i = begin; i < end; ++i) {
        double plain = 0, weighted = 0;  // chunk sums added in double: exact enough at any L
        int64_t wrong = 0;
        acc_t min_margin = std::numeric_limits<acc_t>::infinity();
        for (int64_t lo = 0; lo < L; lo += kChunk) {
          const int64_t hi = std::min(L, lo + kChunk), n = hi - lo;
          load_row(z, i, lo, hi, s[0]);
          load_row(y, i, lo, hi, s[1]);
          load_row(w, i, lo, hi, s[2]);
          load_row(pw, i, lo, hi, s[3]);
          const ChunkSums<acc_t> c = fwd_run(s[0], s[1], s[2], s[3], s[4], n);
          plain += c.plain;
          weighted += c.weighted;
          wrong += c.wrong;
          min_margin = std::min(min_margin, c.min_margin);
          if (per_entry) {
            for (int64_t l = 0; l < n; ++l) out[i * L + lo + l] = static_cast<scalar_t>(s[4][l]);
          }
        }
        if (!per_entry) objective[i] = weighted;
        const acc_t row_loss = static_cast<acc_t>(plain);
        const bool valid = fits_float(static_cast<double>(row_loss));  // in the float32 stats
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
  CSL_CHECK_VALUE(reduction == kNone ? grad.sizes() == logits.sizes() : grad.dim() == 0,
                    "csl_fast: the upstream gradient must have the loss's shape, got ",
                    grad.sizes());
  CSL_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(),
                   "csl_fast: the upstream gradient must have the logits' dtype ",
                   logits.scalar_type(), ", got ", grad.scalar_type());
  at::Tensor out = at::empty({B, L}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "bce_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = at::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wt = broadcast_option(weight, logits, acc);
    const at::Tensor pwt = broadcast_option(pos_weight, logits, acc);
    const auto z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
    const auto w = strided<acc_t>(wt), pw = strided<acc_t>(pwt);
    const bool per_entry = reduction == kNone;
    // mean/sum: one scale, the upstream gradient (over B * L for mean).
    acc_t scale = acc_t(1);
    Strided<scalar_t> g;
    if (per_entry) {
      g = strided<scalar_t>(grad);
    } else {
      scale = static_cast<acc_t>(grad.item<double>());
      if (reduction == kMean) scale /= static_cast<acc_t>(B * L);
    }
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)),
                     [&](int64_t begin, int64_t end) {
      Scratch<acc_t> s(6);
      if (!per_entry) std::fill(s[4], s[4] + kChunk, scale);
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t lo = 0; lo < L; lo += kChunk) {
          const int64_t hi = std::min(L, lo + kChunk), n = hi - lo;
          load_row(z, i, lo, hi, s[0]);
          load_row(y, i, lo, hi, s[1]);
          load_row(w, i, lo, hi, s[2]);
          load_row(pw, i, lo, hi, s[3]);
          if (per_entry) load_row(g, i, lo, hi, s[4]);
          bwd_run(s[0], s[1], s[2], s[3], s[4], s[5], n);
          for (int64_t l = 0; l < n; ++l) o[i * L + lo + l] = static_cast<scalar_t>(s[5][l]);
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
    default: CSL_CHECK(false, "csl_fast: unreachable buffer dtype");
  }
}

// label_csl[idx[i], l] += plain entry loss, label_margin[idx[i], l] += (2 y - 1) z,
// label_prob[idx[i], l] += exp(-plain entry loss) over the valid rows in batch order; each
// task owns a range of labels (no two write one entry).
template <typename scalar_t, typename csl_t, typename margin_t, typename prob_t>
void add_per_entry(const at::Tensor& logits, const at::Tensor& target, const float* valid,
                   const int64_t* idx, csl_t* label_csl, margin_t* label_margin,
                   prob_t* label_prob) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = logits.size(0), L = logits.size(1);
  const auto z = strided<scalar_t>(logits), y = strided<scalar_t>(target);
  at::parallel_for(0, L, std::max<int64_t>(kChunk, kGrain / std::max<int64_t>(B, 1)),
                   [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(5);
    for (int64_t i = 0; i < B; ++i) {
      if (valid[i] == 0.f) continue;
      const int64_t row = idx[i] * L;
      for (int64_t lo = begin; lo < end; lo += kChunk) {
        const int64_t hi = std::min(end, lo + kChunk), n = hi - lo;
        load_row(z, i, lo, hi, s[0]);
        load_row(y, i, lo, hi, s[1]);
        record_run(s[0], s[1], s[2], s[3], n);
        if (label_csl) {
          for (int64_t l = 0; l < n; ++l) label_csl[row + lo + l] += static_cast<csl_t>(s[2][l]);
        }
        if (label_margin) {
          for (int64_t l = 0; l < n; ++l) {
            label_margin[row + lo + l] += static_cast<margin_t>(s[3][l]);
          }
        }
        if (label_prob) {
          prob_run(s[2], s[4], n);
          for (int64_t l = 0; l < n; ++l) label_prob[row + lo + l] += static_cast<prob_t>(s[4][l]);
        }
      }
    }
  });
}

// f(the [N, L] buffer's data as double* or float*; a null float* when absent).
template <typename F>
void with_entry_ptr(const std::optional<at::Tensor>& t, F&& f) {
  if (!t.has_value()) return f(static_cast<float*>(nullptr));
  if (t->scalar_type() == at::kDouble) return f(t->mutable_data_ptr<double>());
  f(t->mutable_data_ptr<float>());
}

void bce_record(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& stats,
                const at::Tensor& index, bool deterministic, const std::optional<at::Tensor>& csl,
                const std::optional<at::Tensor>& count, const std::optional<at::Tensor>& wrong,
                const std::optional<at::Tensor>& min_margin,
                const std::optional<at::Tensor>& label_csl,
                const std::optional<at::Tensor>& label_margin,
                const std::optional<at::Tensor>& label_prob) {
  (void)deterministic;  // the CPU kernel is always deterministic
  auto on_cpu = [](const at::Tensor& buf, const char* name) {
    CSL_CHECK_VALUE(buf.is_cpu(), "csl_fast: ", name, " must be on the CPU, got ",
                      buf.device());
  };
  const int64_t n = check_bce_record_args(logits, target, stats, index, csl, count, wrong,
                                          min_margin, label_csl, label_margin, label_prob,
                                          on_cpu);
  if (n < 0) return;
  const int64_t B = logits.size(0);
  const at::Tensor idx = index_for_writes(
      index, {csl, count, wrong, min_margin, label_csl, label_margin, label_prob});
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Every index checked before anything is written: a bad call leaves the buffers untouched.
  check_dataset_index(ip, B, n);
  const float* sp = stats.const_data_ptr<float>();
  add_per_sample(csl, ip, sp + kBceLoss * B, B);
  add_per_sample(count, ip, sp + kBceValid * B, B);
  add_per_sample(wrong, ip, sp + kBceWrong * B, B);
  add_per_sample(min_margin, ip, sp + kBceMinMargin * B, B);
  if (!label_csl.has_value() && !label_margin.has_value() && !label_prob.has_value()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "bce_record",
                                  [&] {
    const float* valid = sp + kBceValid * B;
    with_entry_ptr(label_csl, [&](auto* c) {
      with_entry_ptr(label_margin, [&](auto* m) {
        with_entry_ptr(label_prob, [&](auto* p) {
          add_per_entry<scalar_t>(logits, target, valid, ip, c, m, p);
        });
      });
    });
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
