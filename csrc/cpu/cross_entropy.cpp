// Fused cross entropy on the CPU, parallel over rows: per row, the statistics, then the
// exponentials (kept in the gradient row, or a scratch row for 16-bit logits), then the
// gradient in place. Rows of up to kNarrowC classes go in blocks whose exponentials are
// taken in one flat vector pass.
//
// The language-model extras (cross_entropy_fwd_extra): soft-capping z' = s tanh(z / s)
// turns each row into z' in a scratch row first (with 1 - tanh^2 beside it for the chain
// rule), and everything below runs on z'; the z-loss zs * lse(z')^2 adds to the objective
// and 2 zs lse p_j to the gradient. Off (s = 0, zs = 0), they cost a test per row.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>
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

// w (z_j - m), one term of the label-smoothing shift sum: 0 at the row max whatever w is. An
// infinite weight there would give inf * 0 = NaN, where F's w_j (lse - z_j) is inf.
template <typename acc_t>
inline __attribute__((always_inline)) acc_t weighted_shift(acc_t w, acc_t d) {
  return d == acc_t(0) ? acc_t(0) : w * d;
}

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
      sz += weighted_shift(w[j], d);
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

// Sums over chunks, added up in double: one long vector accumulation per lane would
// lose ~sqrt(C / 8) ulps at C = 32k, several times PyTorch's cascade summation.
template <typename acc_t>
inline __attribute__((always_inline)) ExpSums<acc_t> row_exp(const acc_t* z, const acc_t* w,
                                                             acc_t* e, int64_t n, acc_t m) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return range_exp(z, w, e, n, m);
  } else {
    constexpr int64_t kChunk = 512;
    if (n <= kChunk) return range_exp(z, w, e, n, m);
    double s = 0, s2 = 0, sz = 0;
    for (int64_t lo = 0; lo < n; lo += kChunk) {
      const int64_t len = std::min(kChunk, n - lo);
      const ExpSums<float> part = range_exp(z + lo, w ? w + lo : nullptr, e + lo, len, m);
      s += part.sum;
      s2 += part.sum_sq;
      sz += part.sum_shift;
    }
    return {static_cast<float>(s), static_cast<float>(s2), static_cast<float>(sz)};
  }
}

struct Options {
  int64_t ignore_index;
  double label_smoothing;
  int64_t reduction;
  double softcap = 0;       // s > 0: the loss is taken on s tanh(z / s); 0: off
  double z_loss_scale = 0;  // zs: adds zs * lse^2 per row; 0: off
};

template <typename scalar_t, typename acc_t>
struct Rows {
  const scalar_t* in;
  int64_t row_stride;
  scalar_t* out;  // contiguous [B, C] gradient, or nullptr: not written (loss and stats only)
  const int64_t* target;
  const acc_t* w;  // class weights or nullptr
  acc_t w_total;
  acc_t row_scale;
  Options opt;
  float* stats;  // [kNumStats, B]
  acc_t* objective;
  acc_t* z_loss;  // [B] per-row zs * lse^2, or nullptr when the z-loss is off
  int64_t B, C;
};

// What a row's statistics and gradient need from the passes over it: z_y, the largest
// other logit before and after y (kept apart for torch.argmax's first-index tie rule),
// m = max(z), e_y = exp(z_y - m), and the sums over j != y (never formed by subtracting
// y's term, so 1 - p_y = s_other / s keeps its precision as p_y -> 1).
template <typename acc_t>
struct RowPasses {
  acc_t z_y, max_before, max_after, m, e_y;
  ExpSums<acc_t> other;
  int64_t other_argmax;  // first j != y at max(max_before, max_after), or -1
  bool ignored_nan;      // an ignored row whose gradient is NaN (ignored_grad_is_nan)
};

// The first j in [lo, hi) with z_j = v, or -1. Blocks of 64 are tested whole by a vector
// pass and only the block that holds it is scanned: a scalar scan with an early exit does
// not vectorise, and at C = 1000 it was a tenth of the row's time.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) int64_t first_equal(const scalar_t* z, int64_t lo,
                                                          int64_t hi, acc_t v) {
  constexpr int64_t kBlock = 64;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int64_t e = std::min(hi, b + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = b; j < e; ++j) hit |= static_cast<acc_t>(z[j]) == v;
    if (!hit) continue;
    for (int64_t j = b; j < e; ++j) {
      if (static_cast<acc_t>(z[j]) == v) return j;
    }
  }
  return -1;
}

// The first j != y with z_j = max(mb, ma) (mb, ma: the maxima before and after y), or -1
// when there is none (C == 1, or NaN logits, whose row is not valid anyway). Scans from
// the range that holds the maximum, so ties go to the first index, as torch.argmax.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) int64_t other_argmax(const scalar_t* z, int64_t y,
                                                           int64_t C, acc_t mb, acc_t ma) {
  const acc_t mo = std::max(mb, ma);
  if (mb >= ma) {
    const int64_t j = first_equal(z, 0, y, mo);
    if (j >= 0) return j;
  }
  return first_equal(z, y + 1, C, mo);
}

// Row i's statistics into stats[k * B + i] and its objective (returned); turns the
// exponentials e (length C) into the gradient row, times row_scale.
template <bool kExtras, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) acc_t finish_row(const Rows<scalar_t, acc_t>& r, int64_t i,
                                                       int64_t y, const RowPasses<acc_t>& p,
                                                       acc_t* e) {
  const int64_t B = r.B, C = r.C;
  const acc_t* w = r.w;
  const acc_t max_other = std::max(p.max_before, p.max_after);
  const acc_t s_other = p.other.sum;
  const acc_t s = s_other + p.e_y;
  // When y holds the max, e_y = 1 and log(s) = log1p(s_other): keeps tiny losses of
  // confident rows that log(1 + s_other) would round to 0.
  const acc_t log_s = p.z_y >= max_other ? std::log1p(s_other) : std::log(s);
  const acc_t loss = log_s + (p.m - p.z_y);
  const acc_t inv_s = acc_t(1) / s;
  const acc_t q = s_other * inv_s;  // 1 - p_y
  const acc_t p_y = p.e_y * inv_s;

  const acc_t eps = static_cast<acc_t>(r.opt.label_smoothing);
  const acc_t w_y = w ? w[y] : acc_t(1);
  const acc_t smooth = eps / static_cast<acc_t>(C);
  acc_t objective = (acc_t(1) - eps) * w_y * loss;
  if (eps != acc_t(0)) {
    const acc_t shift_sum = p.other.sum_shift + weighted_shift(w_y, p.z_y - p.m);
    objective += smooth * (r.w_total * log_s - shift_sum);
  }
  // z-loss zs * lse^2 (unweighted; refused with class weights, so the mean's 1 / D is
  // 1 / rows for it too): d/dz_j = 2 zs lse p_j, folded into the coefficient of p_j.
  acc_t z_coef = 0;
  if (kExtras && r.z_loss != nullptr) {
    const acc_t zs = static_cast<acc_t>(r.opt.z_loss_scale);
    const acc_t lse = p.m + log_s;
    const acc_t z_row = zs * lse * lse;
    r.z_loss[i] = z_row;
    objective += z_row;
    z_coef = acc_t(2) * zs * lse;
  }

  float* stats = r.stats;
  // Recorded only if the loss is finite in the logits dtype, the dtype of the returned
  // per-row loss (float16 logits [-6e4, 6e4] give a float32 loss of 1.2e5 but an inf
  // one), and in float32, the statistics' dtype (a float64 loss of 1e39 is inf there).
  const bool finite = fits_float(static_cast<double>(static_cast<scalar_t>(loss)));
  stats[kLoss * B + i] = finite ? static_cast<float>(loss) : 0.f;
  stats[kPTrue * B + i] = finite ? static_cast<float>(p_y) : 0.f;
  const acc_t margin = C > 1 ? std::min(p.z_y - max_other, acc_t(kMarginCap)) : acc_t(0);
  stats[kMargin * B + i] = finite ? static_cast<float>(margin) : 0.f;
  // argmax with the first index winning ties, as torch.argmax.
  stats[kCorrect * B + i] = finite && p.z_y > p.max_before && p.z_y >= p.max_after ? 1.f : 0.f;
  stats[kGradNormSq * B + i] =
      finite ? static_cast<float>(p.other.sum_sq * inv_s * inv_s + q * q) : 0.f;
  stats[kValid * B + i] = finite ? 1.f : 0.f;
  stats[kOtherArgmax * B + i] = finite ? static_cast<float>(p.other_argmax) : -1.f;
  if (r.out == nullptr) return objective;

  // d objective / d z_j = (1-eps) w_y (p_j - [j == y]) + smooth (W p_j - w_j). Without
  // label smoothing the other classes' weights are left out rather than multiplied by 0:
  // a NaN or inf class weight then reaches only the rows of its class, as in F.
  const bool smoothing = eps != acc_t(0);
  const acc_t w_total = smoothing ? r.w_total : acc_t(0);
  const acc_t row_scale = r.row_scale;
  const acc_t a = ((acc_t(1) - eps) * w_y + smooth * w_total + z_coef) * inv_s * row_scale;
  range_grad(e, smoothing ? w : nullptr, C, a, smooth * row_scale);
  e[y] = (-(acc_t(1) - eps) * w_y * q + smooth * (w_total * p_y - w_y) + z_coef * p_y) *
         row_scale;
  return objective;
}

// A row of an ignored target: zero statistics and objective, and a zero gradient, or NaN
// as F.cross_entropy's where the row's softmax is NaN (nan_grad: ignored_grad_is_nan).
template <bool kExtras, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void ignore_row(const Rows<scalar_t, acc_t>& r, int64_t i,
                                                      bool nan_grad) {
  if (r.out != nullptr) {
    const scalar_t fill = nan_grad ? std::numeric_limits<scalar_t>::quiet_NaN() : scalar_t(0);
    std::fill(r.out + i * r.C, r.out + (i + 1) * r.C, fill);
  }
  for (int k = 0; k < kNumStats; ++k) r.stats[k * r.B + i] = 0.f;
  r.stats[kOtherArgmax * r.B + i] = -1.f;
  r.objective[i] = 0;
  if (kExtras && r.z_loss != nullptr) r.z_loss[i] = 0;
}

// Rows [begin, end), one at a time, each with vector passes over its classes (the
// classes before and after y in separate ranges). zbuf holds C acc_t values when
// scalar_t is narrower than acc_t or no gradient is written, 2 C with soft-capping (z',
// then 1 - tanh^2).
template <bool kExtras, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void wide_rows(const Rows<scalar_t, acc_t>& r,
                                                     int64_t begin, int64_t end, acc_t* zbuf) {
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t C = r.C;
  const acc_t* w = r.w;
  const acc_t cap = kExtras ? static_cast<acc_t>(r.opt.softcap) : acc_t(0);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* row = r.in + i * r.row_stride;
    scalar_t* grow = r.out != nullptr ? r.out + i * C : nullptr;
    const int64_t y = r.target[i];
    if (y == r.opt.ignore_index) {
      ignore_row<kExtras>(r, i,
                          grow != nullptr && ignored_grad_is_nan<acc_t>(row, C, cap != acc_t(0)));
      continue;
    }
    const acc_t* z;
    acc_t* e;
    if (kExtras && cap != acc_t(0)) {
      // The row is read whole before grow is written (it may be the same memory).
      acc_t* dcap = zbuf + C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const acc_t t = tanh_approx(static_cast<acc_t>(row[j]) / cap);
        zbuf[j] = cap * t;
        dcap[j] = acc_t(1) - t * t;
      }
      z = zbuf;
      e = zbuf;
    } else if constexpr (kSameType) {
      z = row;
      // The exponentials, then the gradient, straight into the output (if it is written).
      e = grow != nullptr ? grow : zbuf;
    } else {
      for (int64_t j = 0; j < C; ++j) zbuf[j] = static_cast<acc_t>(row[j]);
      z = zbuf;
      // One buffer serves both: the exponential pass reads z[j] before writing e[j].
      e = zbuf;
    }
    RowPasses<acc_t> p;
    p.z_y = z[y];
    p.max_before = range_max(z, y);
    p.max_after = range_max(z + y + 1, C - y - 1);
    p.m = std::max({p.max_before, p.max_after, p.z_y});
    // Before the exponentials: in place, they overwrite z.
    p.other_argmax = other_argmax(z, y, C, p.max_before, p.max_after);
    const ExpSums<acc_t> before = row_exp(z, w, e, y, p.m);
    const ExpSums<acc_t> after = row_exp(z + y + 1, w ? w + y + 1 : nullptr, e + y + 1,
                                         C - y - 1, p.m);
    p.e_y = exp_approx(p.z_y - p.m);
    p.other = {before.sum + after.sum, before.sum_sq + after.sum_sq,
               before.sum_shift + after.sum_shift};
    r.objective[i] = finish_row<kExtras>(r, i, y, p, e);
    if (grow == nullptr) continue;
    if (kExtras && cap != acc_t(0)) {
      const acc_t* dcap = zbuf + C;  // d z' / d z: the chain rule of the cap
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) grow[j] = static_cast<scalar_t>(e[j] * dcap[j]);
    } else if constexpr (!kSameType) {
      for (int64_t j = 0; j < C; ++j) grow[j] = static_cast<scalar_t>(e[j]);
    }
  }
}

// Rows with few classes (C <= kNarrowC), kNarrowRows at a time: per-row vector loops
// would be all setup and lane combining at C = 10, so the rows' exponentials are taken
// in one flat vector pass over the block and the short per-row loops stay scalar.
constexpr int64_t kNarrowC = 32;
constexpr int64_t kNarrowRows = 64;

template <bool kExtras, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void narrow_rows(const Rows<scalar_t, acc_t>& r,
                                                       int64_t begin, int64_t end, acc_t* zbuf) {
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t C = r.C;
  const acc_t* w = r.w;
  RowPasses<acc_t> passes[kNarrowRows];
  for (int64_t lo = begin; lo < end; lo += kNarrowRows) {
    const int64_t hi = std::min(end, lo + kNarrowRows);
    // The block's d = z - m (then e = exp(d), then the gradient): in the output for
    // float32 logits, else in zbuf (kNarrowRows x C), converted into the output last.
    acc_t* block = zbuf;
    if constexpr (kSameType) {
      if (r.out != nullptr) block = r.out + lo * C;
    }
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t y = r.target[i];
      const scalar_t* z = r.in + i * r.row_stride;
      RowPasses<acc_t>& p = passes[i - lo];
      if (y == r.opt.ignore_index) {
        // Read now: in place, the exponential pass below overwrites the row.
        p.ignored_nan = r.out != nullptr && ignored_grad_is_nan<acc_t>(z, C, false);
        continue;
      }
      acc_t* d = block + (i - lo) * C;
      p.z_y = static_cast<acc_t>(z[y]);
      acc_t mb = -std::numeric_limits<acc_t>::infinity(), ma = mb;
      for (int64_t j = 0; j < y; ++j) {
        const acc_t v = static_cast<acc_t>(z[j]);
        mb = v > mb ? v : mb;
      }
      for (int64_t j = y + 1; j < C; ++j) {
        const acc_t v = static_cast<acc_t>(z[j]);
        ma = v > ma ? v : ma;
      }
      p.max_before = mb;
      p.max_after = ma;
      p.m = std::max({mb, ma, p.z_y});
      p.other_argmax = other_argmax(z, y, C, mb, ma);  // before d overwrites z in place
      acc_t sz = 0;
      for (int64_t j = 0; j < C; ++j) {
        d[j] = static_cast<acc_t>(z[j]) - p.m;
        sz += j == y ? acc_t(0) : weighted_shift(w ? w[j] : acc_t(1), d[j]);
      }
      p.other.sum_shift = sz;
    }
    const int64_t n = (hi - lo) * C;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) block[k] = exp_approx(block[k]);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t y = r.target[i];
      if (y == r.opt.ignore_index) {
        ignore_row<kExtras>(r, i, passes[i - lo].ignored_nan);
        continue;
      }
      acc_t* e = block + (i - lo) * C;
      RowPasses<acc_t>& p = passes[i - lo];
      acc_t s = 0, s2 = 0;
      for (int64_t j = 0; j < C; ++j) {
        const acc_t v = j == y ? acc_t(0) : e[j];
        s += v;
        s2 += v * v;
      }
      p.e_y = e[y];
      p.other.sum = s;
      p.other.sum_sq = s2;
      r.objective[i] = finish_row<kExtras>(r, i, y, p, e);
      if (!kSameType && r.out != nullptr) {
        scalar_t* grow = r.out + i * C;
        for (int64_t j = 0; j < C; ++j) grow[j] = static_cast<scalar_t>(e[j]);
      }
    }
  }
}

// kExtras: soft-capping and the z-loss are compiled in (cross_entropy_fwd_extra); the plain
// op's rows are compiled without them, so they cost it nothing.
template <bool kExtras, typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void rows_block(const Rows<scalar_t, acc_t>& r,
                                                      int64_t begin, int64_t end, acc_t* zbuf) {
  if (r.C <= kNarrowC && !(kExtras && r.opt.softcap != 0)) {
    narrow_rows<kExtras>(r, begin, end, zbuf);
  } else {
    wide_rows<kExtras>(r, begin, end, zbuf);
  }
}

// The whole row loop is cloned, not just the vector loops inside it: each clone inlines
// every helper for its instruction set, so a row costs no calls through the clone
// resolver (at C = 10 those calls were most of the time). x86-64-v3 is AVX2 + FMA
// ("arch=haswell" would test for that exact CPU model), x86-64-v4 adds AVX-512 (16 lanes:
// 1.4-1.7x faster at C = 32000 on an AVX-512 AMD EPYC), picked at load time.
#define CSL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
CSL_CLONES void rows_f32(const Rows<float, float>& r, int64_t begin, int64_t end, float* zbuf) {
  rows_block<false>(r, begin, end, zbuf);
}
CSL_CLONES void rows_f16(const Rows<at::Half, float>& r, int64_t begin, int64_t end, float* zbuf) {
  rows_block<false>(r, begin, end, zbuf);
}
CSL_CLONES void rows_bf16(const Rows<at::BFloat16, float>& r, int64_t begin, int64_t end,
                          float* zbuf) {
  rows_block<false>(r, begin, end, zbuf);
}
// The same with soft-capping and the z-loss compiled in: functions of their own, so the
// plain ones above stay exactly what they were.
CSL_CLONES void rows_f32_extra(const Rows<float, float>& r, int64_t begin, int64_t end,
                               float* zbuf) {
  rows_block<true>(r, begin, end, zbuf);
}
CSL_CLONES void rows_f16_extra(const Rows<at::Half, float>& r, int64_t begin, int64_t end,
                               float* zbuf) {
  rows_block<true>(r, begin, end, zbuf);
}
CSL_CLONES void rows_bf16_extra(const Rows<at::BFloat16, float>& r, int64_t begin, int64_t end,
                                float* zbuf) {
  rows_block<true>(r, begin, end, zbuf);
}
#undef CSL_CLONES
// float64 calls std::exp, which no instruction set makes vectorise here.
void rows_f64(const Rows<double, double>& r, int64_t begin, int64_t end, double* zbuf) {
  rows_block<false>(r, begin, end, zbuf);
}
void rows_f64_extra(const Rows<double, double>& r, int64_t begin, int64_t end, double* zbuf) {
  rows_block<true>(r, begin, end, zbuf);
}
inline void run_rows(const Rows<float, float>& r, int64_t b, int64_t e, float* z, bool x) {
  x ? rows_f32_extra(r, b, e, z) : rows_f32(r, b, e, z);
}
inline void run_rows(const Rows<at::Half, float>& r, int64_t b, int64_t e, float* z, bool x) {
  x ? rows_f16_extra(r, b, e, z) : rows_f16(r, b, e, z);
}
inline void run_rows(const Rows<at::BFloat16, float>& r, int64_t b, int64_t e, float* z,
                     bool x) {
  x ? rows_bf16_extra(r, b, e, z) : rows_bf16(r, b, e, z);
}
inline void run_rows(const Rows<double, double>& r, int64_t b, int64_t e, double* z, bool x) {
  x ? rows_f64_extra(r, b, e, z) : rows_f64(r, b, e, z);
}

template <typename scalar_t, typename acc_t>
void cross_entropy_rows(const at::Tensor& logits, const int64_t* target, const acc_t* w,
                        acc_t w_total, acc_t row_scale, const Options& opt,
                        const at::Tensor& grad, float* stats, acc_t* objective, acc_t* z_loss) {
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  const Rows<scalar_t, acc_t> rows{logits.const_data_ptr<scalar_t>(),
                                   logits.stride(0),
                                   grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr,
                                   target,
                                   w,
                                   w_total,
                                   row_scale,
                                   opt,
                                   stats,
                                   objective,
                                   z_loss,
                                   B,
                                   C};
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    const bool narrow = C <= kNarrowC && opt.softcap == 0;
    std::vector<acc_t> zbuf(opt.softcap != 0                ? 2 * C
                            : kSameType && rows.out != nullptr ? 0
                                                               : (narrow ? kNarrowRows : 1) * C);
    run_rows(rows, begin, end, zbuf.data(), opt.softcap != 0 || z_loss != nullptr);
  });
}

// (loss, stats, z_loss); the gradient goes into `grad` ([B, C], contiguous, logits dtype),
// which may be the logits themselves: each row is read before it is overwritten. An
// undefined `grad`: no gradient is formed or written. z_loss is reduced like the loss, and
// undefined when z_loss_scale is 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_into(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& grad,
    double softcap = 0, double z_loss_scale = 0) {
  check_logits_2d(logits);
  check_cross_entropy_args(logits, target, label_smoothing, reduction);
  check_cross_entropy_extras(weight, softcap, z_loss_scale);
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  CSL_CHECK_VALUE(C > 0 || B == 0, "csl_fast: logits have C = 0 classes");
  if (weight.has_value()) {
    check_weight_shape(*weight, C);
  }
  const at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  check_targets_in_range(tp, B, C, ignore_index);
  // Rows must be unit-stride; a row stride (e.g. a column slice) is used as is.
  const at::Tensor z = (C == 0 || logits.stride(1) == 1) ? logits : logits.contiguous();
  at::Tensor stats = at::empty({kNumStats, B}, logits.options().dtype(at::kFloat));
  const Options opt{ignore_index, label_smoothing, reduction, softcap, z_loss_scale};

  at::Tensor loss, z_loss;
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
        // D = 0 (every valid row's class weight 0; with label smoothing the rows' objective
        // is not 0): F.cross_entropy's mean and gradient are NaN (its 0 / 0 term), not inf.
        const double inv_denom = denom != 0 ? 1.0 / denom : std::numeric_limits<double>::quiet_NaN();
        const acc_t row_scale = reduction == kMean ? static_cast<acc_t>(inv_denom) : acc_t(1);
        std::vector<acc_t> objective(B);
        // Not z_rows.empty(): with B = 0 the z-loss is still on, and its mean is 0 / 0.
        const bool has_z_loss = z_loss_scale != 0;
        std::vector<acc_t> z_rows(has_z_loss ? B : 0);
        cross_entropy_rows<scalar_t, acc_t>(z, tp, wp, w_total, row_scale, opt, grad,
                                            stats.mutable_data_ptr<float>(), objective.data(),
                                            has_z_loss ? z_rows.data() : nullptr);
        const auto reduce = [&](const std::vector<acc_t>& rows) {
          if (reduction == kNone) {
            at::Tensor out = at::empty({B}, logits.options());
            scalar_t* lp = out.mutable_data_ptr<scalar_t>();
            for (int64_t i = 0; i < B; ++i) lp[i] = static_cast<scalar_t>(rows[i]);
            return out;
          }
          double total = 0;  // fixed order: the reduction is deterministic
          for (int64_t i = 0; i < B; ++i) total += static_cast<double>(rows[i]);
          if (reduction == kMean) total *= inv_denom;  // D = 0: NaN, as F.cross_entropy
          return at::scalar_tensor(total, logits.options());
        };
        loss = reduce(objective);
        if (has_z_loss) z_loss = reduce(z_rows);
      });
  return {loss, stats, z_loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_logits_2d(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto [loss, stats, z_loss] =
      cross_entropy_into(logits, target, weight, ignore_index, label_smoothing, reduction, grad);
  return {loss, grad, stats};
}

// The gradient overwrites the logits (csl_fast.accumulate(inplace_grad=True)).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_inplace_logits(logits);
  auto [loss, stats, z_loss] = cross_entropy_into(logits, target, weight, ignore_index,
                                                  label_smoothing, reduction, logits);
  return {loss, stats};
}

// Loss and statistics only: no gradient is formed, no logits-sized buffer allocated (the
// float16/bfloat16 forward under autograd, whose backward recomputes the gradient; no-grad
// passes).
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_stats(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction) {
  auto [loss, stats, z_loss] = cross_entropy_into(logits, target, weight, ignore_index,
                                                  label_smoothing, reduction, at::Tensor());
  return {loss, stats};
}

// With soft-capping and the z-loss (zeros for z_loss when z_loss_scale is 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  check_logits_2d(logits);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  auto [loss, stats, z_loss] = cross_entropy_into(logits, target, weight, ignore_index,
                                                  label_smoothing, reduction, grad, softcap,
                                                  z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, grad, stats, z_loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra_inplace(
    at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  check_inplace_logits(logits);
  auto [loss, stats, z_loss] = cross_entropy_into(logits, target, weight, ignore_index,
                                                  label_smoothing, reduction, logits, softcap,
                                                  z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, stats, z_loss};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_extra_stats(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double label_smoothing, int64_t reduction, double softcap,
    double z_loss_scale) {
  auto [loss, stats, z_loss] = cross_entropy_into(logits, target, weight, ignore_index,
                                                  label_smoothing, reduction, at::Tensor(),
                                                  softcap, z_loss_scale);
  if (!z_loss.defined()) z_loss = at::zeros_like(loss);
  return {loss, stats, z_loss};
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("cross_entropy_fwd", &csl_fast::cpu::cross_entropy_fwd);
  m.impl("cross_entropy_fwd_inplace", &csl_fast::cpu::cross_entropy_fwd_inplace);
  m.impl("cross_entropy_fwd_stats", &csl_fast::cpu::cross_entropy_fwd_stats);
  m.impl("cross_entropy_fwd_extra", &csl_fast::cpu::cross_entropy_fwd_extra);
  m.impl("cross_entropy_fwd_extra_inplace", &csl_fast::cpu::cross_entropy_fwd_extra_inplace);
  m.impl("cross_entropy_fwd_extra_stats", &csl_fast::cpu::cross_entropy_fwd_extra_stats);
}
