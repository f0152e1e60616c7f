// Backward of the fused cross entropy for float16/bfloat16 logits in one elementwise pass
// (csl_fast::cross_entropy_bwd; semantics: csl_fast/reference.py, cross_entropy_bwd).
//
// The forward's statistics hold the plain loss l = lse - z_y of every recorded row in
// float32, so p_j = exp((z_j - z_y) - l) needs no max or sum over the row: the half logits
// are read once, the gradient computed in float32, scaled by the upstream gradient and
// rounded once into the half output. z_j - z_y of two halves is exact in float32 wherever
// p_j is not negligible, so the error of p_j is l's own rounding, l * 2^-24 relative:
// for l <= kLossBound a 1/100 of a float16 rounding step. Rows past that bound, and rows
// the forward did not record (a loss not finite in the logits dtype, NaN or infinite
// logits), take their max and sum of exponentials from the row instead (two more reads,
// rare in training).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../stats.h"
#include "vec_math.h"

namespace csl_fast {
namespace cpu {
namespace {

constexpr float kLossBound = 64.f;
// Rows are processed through a float32 tile of this many values (several rows at small C,
// a slice of one row at large C): converted, exponentiated in one flat vector pass, stored.
constexpr int64_t kTile = 2048;
constexpr int64_t kMaxTileRows = 256;

template <typename scalar_t>
struct BwdRows {
  const scalar_t* in;
  int64_t row_stride;
  scalar_t* out;  // contiguous [B, C]
  const int64_t* target;
  const float* w;   // class weights or nullptr
  const float* ws;  // the weights of the smoothing term: w with label smoothing, else nullptr
  float w_total;    // sum of the weights (C without them); 0 without label smoothing
  const float* loss;   // stats[kLoss]
  const float* valid;  // stats[kValid]
  const float* scale;  // [B] or [1]
  bool per_row_scale;
  int64_t ignore_index;
  float eps;
  float cap;  // soft-cap s: the loss is of z' = s tanh(z / s); 0: off
  float zs;   // z-loss scale: zs * lse(z')^2 per row; 0: off
  int64_t B, C;
};

// Per row: p_j = exp((z'_j - ref) - off); g_j = (a p_j - b w_j) dz'_j/dz_j (w_j = 1
// without weights, z' = z and the factor 1 without a soft-cap), g_y = gy. ignored: a row of
// `fill`, 0, or NaN where F.cross_entropy's is (ignored_grad_is_nan).
struct RowCoef {
  float ref, off, a, b, gy;
  bool ignored;
  float fill;
};

template <typename scalar_t>
inline __attribute__((always_inline)) RowCoef row_coef(const BwdRows<scalar_t>& r, int64_t i) {
  const int64_t y = r.target[i];
  const scalar_t* z = r.in + i * r.row_stride;
  if (y == r.ignore_index) {
    const bool nan = ignored_grad_is_nan<float>(z, r.C, r.cap != 0.f);
    return {0.f, 0.f, 0.f, 0.f, 0.f, true, nan ? std::numeric_limits<float>::quiet_NaN() : 0.f};
  }
  const float cap = r.cap;
  // The forward's z' (the same tanh), so that z'_y + loss is its lse.
  const auto capped = [cap](float v) { return cap != 0.f ? cap * tanh_approx(v / cap) : v; };
  const float z_y = capped(static_cast<float>(z[y]));
  float ref = z_y, loss = r.loss[i];
  float off = loss;
  if (!(r.valid[i] > 0.f && loss <= kLossBound)) {
    // Not recorded or far from confident: m and log(sum_j exp(z'_j - m)) from the row.
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < r.C; ++j) {
      const float v = capped(static_cast<float>(z[j]));
      m = v > m ? v : m;
    }
    double s = 0;
    for (int64_t j = 0; j < r.C; ++j) s += std::exp(capped(static_cast<float>(z[j])) - m);
    const float log_s = static_cast<float>(std::log(s));
    ref = m;
    off = log_s;
    loss = log_s + (m - z_y);
  }
  const float scale = r.scale[r.per_row_scale ? i : 0];
  const float eps = r.eps;
  const float w_y = r.w ? r.w[y] : 1.f;
  const float smooth = eps / static_cast<float>(r.C);
  const float p_y = std::exp(-loss);
  const float q = -std::expm1(-loss);  // 1 - p_y without cancellation
  // The z-loss zs lse^2 adds 2 zs lse p_j (refused with class weights).
  const float z_coef = r.zs != 0.f ? 2.f * r.zs * (ref + off) : 0.f;
  // d objective / d z'_j = (1-eps) w_y (p_j - [j == y]) + smooth (W p_j - w_j) + z_coef p_j.
  const float a = ((1.f - eps) * w_y + smooth * r.w_total + z_coef) * scale;
  float gy =
      (-(1.f - eps) * w_y * q + smooth * (r.w_total * p_y - w_y) + z_coef * p_y) * scale;
  if (cap != 0.f) {
    const float t = tanh_approx(static_cast<float>(z[y]) / cap);
    gy *= 1.f - t * t;
  }
  return {ref, off, a, smooth * scale, gy, false, 0.f};
}

// out[j] = a e[j] - b w[j] over one range of classes (the portable path; see HalfOps).
template <typename scalar_t>
void store_range(scalar_t* out, const float* e, const float* w, int64_t n, float a, float b) {
  if (w == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(a * e[j] - b);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(a * e[j] - b * w[j]);
  }
}

inline __attribute__((always_inline)) void exp_tile(float* t, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) t[k] = exp_approx(t[k]);
}

// d[j] = (z[j] - ref) - off over one range of classes (the portable path; see HalfOps).
template <typename scalar_t>
void load_range(float* d, const scalar_t* z, int64_t n, float ref, float off) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) d[j] = (static_cast<float>(z[j]) - ref) - off;
}

// Half <-> float32 eight at a time with AVX2/F16C where the CPU has them: GCC 12 leaves the
// c10::Half and c10::BFloat16 conversions in the loops above scalar (~2-3x slower). Called
// per tile or row, through pointers picked once. CSL_FAST_CPU_PORTABLE=1 in the environment
// (read once) keeps the portable loops, as on a CPU without AVX2/F16C: tests run them so.
template <typename scalar_t>
struct HalfOps {
  void (*load)(float*, const scalar_t*, int64_t, float, float) = load_range<scalar_t>;
  void (*store)(scalar_t*, const float*, const float*, int64_t, float, float) =
      store_range<scalar_t>;
};

#if defined(__x86_64__)
#define CSL_V3 __attribute__((target("arch=x86-64-v3")))
CSL_V3 inline __m256 load8(const at::Half* z) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
}
CSL_V3 inline __m256 load8(const at::BFloat16* z) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
CSL_V3 inline void store8(at::Half* out, __m256 g) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even as c10::BFloat16 does, NaN to its quiet NaN 0x7fc0.
CSL_V3 inline void store8(at::BFloat16* out, __m256 g) {
  const __m256i bits = _mm256_castps_si256(g);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(g, g, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}
template <typename scalar_t>
CSL_V3 void load_v3(float* d, const scalar_t* z, int64_t n, float ref, float off) {
  const __m256 r = _mm256_set1_ps(ref), o = _mm256_set1_ps(off);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(d + j, _mm256_sub_ps(_mm256_sub_ps(load8(z + j), r), o));
  }
  for (; j < n; ++j) d[j] = (static_cast<float>(z[j]) - ref) - off;
}
template <typename scalar_t>
CSL_V3 void store_v3(scalar_t* out, const float* e, const float* w, int64_t n, float a, float b) {
  const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 ww = w ? _mm256_loadu_ps(w + j) : _mm256_set1_ps(1.f);
    const __m256 ae = _mm256_mul_ps(av, _mm256_loadu_ps(e + j));
    store8(out + j, _mm256_sub_ps(ae, _mm256_mul_ps(bv, ww)));
  }
  for (; j < n; ++j) out[j] = static_cast<scalar_t>(a * e[j] - b * (w ? w[j] : 1.f));
}
#undef CSL_V3
#endif

template <typename scalar_t>
const HalfOps<scalar_t>& half_ops() {
  static const HalfOps<scalar_t> ops = [] {
    HalfOps<scalar_t> o;
#if defined(__x86_64__)
    const char* portable = std::getenv("CSL_FAST_CPU_PORTABLE");
    const bool forced = portable != nullptr && portable[0] != '\0' && portable[0] != '0';
    if (!forced && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) {
      o.load = load_v3<scalar_t>;
      o.store = store_v3<scalar_t>;
    }
#endif
    return o;
  }();
  return ops;
}

// Soft-capped rows, one at a time in column tiles: z' and 1 - tanh^2 per element.
template <typename scalar_t>
inline __attribute__((always_inline)) void capped_rows(const BwdRows<scalar_t>& r, int64_t begin,
                                                       int64_t end) {
  const HalfOps<scalar_t>& ops = half_ops<scalar_t>();
  const float cap = r.cap;
  float tile[kTile], dcap[kTile];
  for (int64_t i = begin; i < end; ++i) {
    const RowCoef c = row_coef(r, i);
    scalar_t* g = r.out + i * r.C;
    if (c.ignored) {
      std::fill(g, g + r.C, static_cast<scalar_t>(c.fill));
      continue;
    }
    const scalar_t* z = r.in + i * r.row_stride;
    for (int64_t lo = 0; lo < r.C; lo += kTile) {
      const int64_t n = std::min(kTile, r.C - lo);
      const float* w = r.ws ? r.ws + lo : nullptr;
      ops.load(tile, z + lo, n, 0.f, 0.f);  // the logits as they are
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float t = tanh_approx(tile[j] / cap);
        dcap[j] = 1.f - t * t;
        tile[j] = exp_approx((cap * t - c.ref) - c.off);
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        tile[j] = (c.a * tile[j] - c.b * (w ? w[j] : 1.f)) * dcap[j];
      }
      ops.store(g + lo, tile, nullptr, n, 1.f, 0.f);  // rounds only
    }
    g[r.target[i]] = static_cast<scalar_t>(c.gy);
  }
}

template <typename scalar_t>
inline __attribute__((always_inline)) void bwd_block(const BwdRows<scalar_t>& r, int64_t begin,
                                                     int64_t end) {
  const int64_t C = r.C;
  if (r.cap != 0.f) {
    capped_rows(r, begin, end);
    return;
  }
  const HalfOps<scalar_t>& ops = half_ops<scalar_t>();
  float tile[kTile];
  if (C <= kTile) {
    // Several rows per tile: per-row vector loops would be all setup at C = 10.
    const int64_t per = std::min(kMaxTileRows, kTile / C);
    RowCoef coef[kMaxTileRows];
    for (int64_t lo = begin; lo < end; lo += per) {
      const int64_t hi = std::min(end, lo + per);
      for (int64_t i = lo; i < hi; ++i) {
        const RowCoef c = coef[i - lo] = row_coef(r, i);
        float* d = tile + (i - lo) * C;
        if (c.ignored) {
          std::fill(d, d + C, 0.f);
        } else {
          ops.load(d, r.in + i * r.row_stride, C, c.ref, c.off);
        }
      }
      exp_tile(tile, (hi - lo) * C);
      for (int64_t i = lo; i < hi; ++i) {
        const RowCoef& c = coef[i - lo];
        scalar_t* g = r.out + i * C;
        if (c.ignored) {
          std::fill(g, g + C, static_cast<scalar_t>(c.fill));
          continue;
        }
        ops.store(g, tile + (i - lo) * C, r.ws, C, c.a, c.b);
        g[r.target[i]] = static_cast<scalar_t>(c.gy);
      }
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    const RowCoef c = row_coef(r, i);
    scalar_t* g = r.out + i * C;
    if (c.ignored) {
      std::fill(g, g + C, static_cast<scalar_t>(c.fill));
      continue;
    }
    const scalar_t* z = r.in + i * r.row_stride;
    for (int64_t lo = 0; lo < C; lo += kTile) {
      const int64_t n = std::min(kTile, C - lo);
      ops.load(tile, z + lo, n, c.ref, c.off);
      exp_tile(tile, n);
      ops.store(g + lo, tile, r.ws ? r.ws + lo : nullptr, n, c.a, c.b);
    }
    g[r.target[i]] = static_cast<scalar_t>(c.gy);
  }
}

// Cloned per instruction set with every helper inlined (as csrc/cpu/cross_entropy.cpp).
#define CSL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
CSL_CLONES void bwd_f16(const BwdRows<at::Half>& r, int64_t begin, int64_t end) {
  bwd_block(r, begin, end);
}
CSL_CLONES void bwd_bf16(const BwdRows<at::BFloat16>& r, int64_t begin, int64_t end) {
  bwd_block(r, begin, end);
}
#undef CSL_CLONES
inline void run_bwd(const BwdRows<at::Half>& r, int64_t b, int64_t e) { bwd_f16(r, b, e); }
inline void run_bwd(const BwdRows<at::BFloat16>& r, int64_t b, int64_t e) { bwd_bf16(r, b, e); }

at::Tensor cross_entropy_bwd(const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                             const at::Tensor& scale, int64_t ignore_index,
                             double label_smoothing, double softcap, double z_loss_scale) {
  check_cross_entropy_bwd_args(logits, target, weight, stats, scale, label_smoothing, softcap,
                               z_loss_scale);
  const int64_t B = logits.size(0);
  const int64_t C = logits.size(1);
  const at::Tensor t = target.to(at::kLong).contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  check_targets_in_range(tp, B, C, ignore_index);
  const at::Tensor z = (C == 0 || logits.stride(1) == 1) ? logits : logits.contiguous();
  const at::Tensor st = stats.contiguous();
  const at::Tensor sc = scale.reshape({-1}).contiguous();
  std::vector<float> w;
  float w_total = static_cast<float>(C);
  if (weight.has_value()) {
    const at::Tensor wt = weight->to(at::kFloat).contiguous();
    w.assign(wt.const_data_ptr<float>(), wt.const_data_ptr<float>() + C);
    w_total = 0;
    for (float v : w) w_total += v;  // the forward's order: the same W
  }
  // Without label smoothing the weights of classes j != y do not enter the gradient:
  // leave them out rather than multiply them by 0, so that a NaN or inf class weight
  // reaches only the rows of its class, as in F.cross_entropy.
  const bool smoothing = label_smoothing != 0.0;
  if (!smoothing) w_total = 0.f;
  at::Tensor out = at::empty({B, C}, logits.options());
  if (B == 0 || C == 0) return out;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(logits.scalar_type(), "csl_fast_cross_entropy_bwd", [&] {
    const float* sp = st.const_data_ptr<float>();
    const BwdRows<scalar_t> rows{z.const_data_ptr<scalar_t>(),
                                 z.stride(0),
                                 out.mutable_data_ptr<scalar_t>(),
                                 tp,
                                 w.empty() ? nullptr : w.data(),
                                 w.empty() || !smoothing ? nullptr : w.data(),
                                 w_total,
                                 sp + kLoss * B,
                                 sp + kValid * B,
                                 sc.const_data_ptr<float>(),
                                 sc.numel() == B && B > 1,
                                 ignore_index,
                                 static_cast<float>(label_smoothing),
                                 static_cast<float>(softcap),
                                 static_cast<float>(z_loss_scale),
                                 B,
                                 C};
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) { run_bwd(rows, begin, end); });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace csl_fast

TORCH_LIBRARY_IMPL(csl_fast, CPU, m) {
  m.impl("cross_entropy_bwd", &csl_fast::cpu::cross_entropy_bwd);
}
