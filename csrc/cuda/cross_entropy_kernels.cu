// Fused cross entropy forward for csl_fast: loss terms, logits gradient and per-row
// statistics in one pass over the logits. Plain CUDA (no torch headers); see kernels.h for
// the contract and csl_fast/reference.py for the semantic ground truth.
//
// Per row i (acc = float32, float64 for float64 logits; z = logits row; y = target):
//   pass 1: m = max_j z_j, and max_{j<y} z_j, max_{j>y} z_j (margin and first-index argmax);
//           then the runner-up, the first j != y at max_{j != y} z_j (a min-reduction)
//   pass 2: s1 = sum_{j!=y} e_j, s2 = sum_{j!=y} e_j^2 with e_j = exp(z_j - m)
//           s = s1 + exp(z_y - m), loss = (m - z_y) + log s (lse = m + log s is never
//           rounded to one number: with |z| ~ 1e3, fp32 lse would be off by 6e-5;
//           log s = log1p(s1) when z_y is the max, or confident rows' losses round to 0),
//           sum_{j!=y} p_j = s1 / s (never 1 - p_y: that cancels as p_y -> 1),
//           ||dl/dz||^2 = s2 / s^2 + (s1 / s)^2
//   pass 3: p_j = exp((z_j - m) - log s), gradient row, and (label smoothing only)
//           sum_j w_j ((m - z_j) + log s) = sum_j w_j (lse - z_j) for the objective.
// The register kernels keep the row in registers across the passes (one read, one write
// of the logits); the streaming kernel fuses passes 1 and 2 with an online (running max)
// softmax and reads the row a second time for pass 3.
//
// Extras: with softcap s every loaded logit becomes s tanh(z / s) (the statistics too) and
// each gradient entry is multiplied by 1 - (z' / s)^2; the z-loss zs lse^2 adds to the
// objective (and is written alone) and 2 zs lse p_j to the gradient.
//
// Non-finite logits: m is replaced by 0 when it is +-inf (as torch.logsumexp does), so a
// row of -inf gets lse = -inf; a row with a +inf logit gets log s = NaN (finish_row), so
// its loss and gradient are NaN as F.cross_entropy's (its log_softmax computes inf - inf
// at the max) and the CPU kernels' are, not the +inf that lse = +inf would give. Such rows
// have a non-finite loss and are recorded as invalid (all statistics 0, runner-up -1). NaN
// logits propagate to the loss through the exponential sums. So are rows whose loss is
// finite in float32 but rounds to inf in the logits dtype (float16 from 65520 up).
#include <type_traits>

#include "../stats.h"
#include "common.cuh"

namespace csl_fast {
namespace cuda {
namespace {

using namespace detail;

constexpr int kWarpRowsPerBlock = 8;  // warp kernel: 8 rows (warps) per 256-thread block
constexpr int kStreamThreads = 1024;  // streaming kernel block size
constexpr int kStreamUnroll = 4;      // loads in flight per thread in the streaming kernel
constexpr int kPrepThreads = 1024;
constexpr int64_t kPrepRowsPerBlock = 16384;

// `logits` and `grad` may be the same memory (the in-place gradient of
// cross_entropy_fwd_inplace), so neither is __restrict__. Every kernel reads all it needs
// of a row before a barrier (block reduction or warp shuffle) that precedes the row's first
// gradient write, or reads and then writes an element in the same thread.
template <typename T>
struct CeArgs {
  using A = acc_t<T>;
  const T* logits;
  int64_t rows;
  int64_t ld;  // row stride of logits, in elements
  int classes;
  const int64_t* __restrict__ target;
  int64_t ignore_index;
  const A* __restrict__ weight;  // [classes] or null
  A eps;                         // label smoothing
  int reduction;
  const A* __restrict__ prep;  // [0] = D, [1] = W; null when not needed
  A* __restrict__ objective;
  T* grad;  // null: gradient not written; may equal logits
  float* __restrict__ stats;
  int* error_flag;
  A cap;                   // softcap, 0: off
  A zs;                    // z-loss scale, 0: off
  A* __restrict__ z_loss;  // [rows] when zs > 0
};

// A logit as the loss sees it: soft-capped when cap > 0.
template <typename A>
__device__ __forceinline__ A cap_logit(A z, A cap) {
  return cap > A(0) ? cap * dev_tanh(z / cap) : z;
}

enum RowKind : int { kActive = 0, kIgnored = 1, kBadTarget = 2 };

template <typename T>
__device__ __forceinline__ int classify_row(const CeArgs<T>& a, int64_t row, int* y) {
  const int64_t t = a.target[row];
  if (t == a.ignore_index) return kIgnored;
  if (t < 0 || t >= a.classes) return kBadTarget;
  *y = static_cast<int>(t);
  return kActive;
}

// Ignored rows: zero objective and statistics, a zero gradient or a NaN one where
// F.cross_entropy's is (ignored_row_part: one read of the row, only when the gradient is
// written). Rows with a bad target: NaN objective and gradient, zero statistics, error bit
// set. Threads tid of nthreads share the row: a warp (ismem null) or the block (ismem: 32
// ints of shared memory). In place, each thread writes only the columns it read.
template <typename T>
__device__ void write_inactive_row(const CeArgs<T>& a, int64_t row, int kind, int tid,
                                   int nthreads, int* ismem) {
  using A = acc_t<T>;
  const A fill = kind == kIgnored ? A(0) : nan_of<A>();
  if (a.grad != nullptr) {
    A grad_fill = fill;
    if (kind == kIgnored) {
      int part[1] = {ignored_row_part(a.logits + row * a.ld, a.classes, tid, nthreads,
                                      a.cap > A(0))};
      if (ismem == nullptr) {
        part[0] = warp_allreduce(part[0], MaxIntOp());
      } else {
        block_allreduce(part, MaxIntOp(), 0, ismem);
      }
      if (part[0] != 1) grad_fill = nan_of<A>();
    }
    T* g = a.grad + row * static_cast<int64_t>(a.classes);
    const T v = Store<T>::from(grad_fill);
    for (int j = tid; j < a.classes; j += nthreads) g[j] = v;
  }
  if (tid == 0) {
    a.objective[row] = fill;
    if (a.z_loss != nullptr) a.z_loss[row] = fill;
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) a.stats[k * a.rows + row] = 0.0f;
    a.stats[kOtherArgmax * a.rows + row] = -1.0f;
    if (kind == kBadTarget && a.error_flag != nullptr) atomicOr(a.error_flag, kErrTargetOutOfRange);
  }
}

// Per-launch constants.
template <typename A>
struct Coefs {
  A scale;       // 1/D (mean) or 1
  A W;           // sum_j w_j (C when unweighted)
  A one_m_eps;   // 1 - eps
  A c;           // eps / C
  A cap;         // softcap, 0: off
};

template <typename T>
__device__ __forceinline__ Coefs<acc_t<T>> load_coefs(const CeArgs<T>& a) {
  using A = acc_t<T>;
  Coefs<A> k;
  // D = 0 (class weight 0 at every valid row's target): NaN as F.cross_entropy, not inf.
  k.scale = a.reduction == kMean ? (a.prep[0] != A(0) ? A(1) / a.prep[0] : nan_of<A>()) : A(1);
  k.W = (a.weight != nullptr && a.eps > A(0)) ? a.prep[1] : static_cast<A>(a.classes);
  k.one_m_eps = A(1) - a.eps;
  k.c = a.eps / static_cast<A>(a.classes);
  k.cap = a.cap;
  return k;
}

// Row scalars from the reduced pass-1/2 quantities.
template <typename A>
struct RowScalars {
  A shift;  // safe_max(m): p_j = exp((z_j - shift) - log_s); z_j - shift is exact near the max
  A log_s;  // log sum_j exp(z_j - shift); lse = shift + log_s is never formed (it would round)
  A loss;
  A om;  // sum_{j != y} p_j
  A gn;  // ||dl/dz||^2
  A margin;
  bool correct;
};

template <typename A>
__device__ __forceinline__ A safe_max(A m) {
  return is_inf(m) ? A(0) : m;
}

template <typename A>
__device__ __forceinline__ RowScalars<A> finish_row(A m, A mb, A ma, A s1, A s2, A z_y,
                                                    int classes) {
  RowScalars<A> r;
  const A ms = safe_max(m);
  const A s = s1 + dev_exp(z_y - ms);
  r.shift = ms;
  // When y holds the (finite) max, exp(z_y - ms) = 1 and log s = log1p(s1), as the CPU
  // kernel: log(1 + s1) rounds a confident row's loss (s1 < 6e-8 in float32) to 0.
  r.log_s = z_y == ms ? dev_log1p(s1) : dev_log(s);
  if (m > A(0) && is_inf(m)) r.log_s = nan_of<A>();  // a +inf logit (see the top)
  r.loss = (ms - z_y) + r.log_s;
  r.om = s1 / s;
  r.gn = (s2 / s) / s + r.om * r.om;
  r.margin = classes > 1 ? fmin(z_y - dev_max(mb, ma), static_cast<A>(kMarginCap)) : A(0);
  r.correct = (z_y > mb) && (z_y >= ma);  // argmax with the first index on ties
  return r;
}

// Gradient coefficients of one row: grad_j = scale * (a p_j - c w_j) for j != y,
// grad_y = scale * (gy0 + cW p_y).
// zc = 2 zs lse (0 without the z-loss): the z-loss adds zc p_j to every entry, which is
// folded into a (j != y) and cW (j == y).
template <typename A>
struct GradCoefs {
  A a;
  A cW;
  A gy0;
};

template <typename A>
__device__ __forceinline__ GradCoefs<A> grad_coefs(const Coefs<A>& k, A w_y, A om, A zc) {
  GradCoefs<A> g;
  g.cW = k.c * k.W + zc;
  g.a = k.one_m_eps * w_y + g.cW;
  g.gy0 = -(k.one_m_eps * w_y) * om - k.c * w_y;
  return g;
}

// w_j of the smoothing term, the only place a class j != y enters with its weight; 1 (times
// eps / C = 0) without label smoothing, so that a NaN or inf class weight reaches only the
// rows of its class, as in F.cross_entropy, not every row through 0 * w_j.
template <typename T>
__device__ __forceinline__ acc_t<T> smoothing_weight(const CeArgs<T>& a, int j) {
  using A = acc_t<T>;
  return (a.weight != nullptr && a.eps > A(0)) ? a.weight[j] : A(1);
}

template <typename T>
__device__ __forceinline__ void write_grad(T* g, int j, int y,
                                           acc_t<T> z, acc_t<T> w_j,
                                           const RowScalars<acc_t<T>>& r,
                                           const Coefs<acc_t<T>>& k,
                                           const GradCoefs<acc_t<T>>& gc) {
  using A = acc_t<T>;
  const A p = dev_exp((z - r.shift) - r.log_s);
  A v = j == y ? gc.gy0 + gc.cW * p : gc.a * p - k.c * w_j;
  if (k.cap > A(0)) {
    const A t = z / k.cap;  // z is the capped logit, so t = tanh(z_original / cap)
    v *= A(1) - t * t;
  }
  g[j] = Store<T>::from(v * k.scale);
}

// A thread's candidate for the runner-up: its first column j != y (of those it holds, in
// increasing order) at mo = max_{j != y} z_j; `none` (= classes) when it holds none.
template <typename A>
__device__ __forceinline__ int runner_up_candidate(A z, int j, int y, int classes, A mo,
                                                   int cand) {
  return (cand == classes && j < classes && j != y && z == mo) ? j : cand;
}

// Objective and statistics of an active row (one thread). other_arg: the runner-up column,
// a.classes when there is none (C == 1, or NaN logits).
template <typename T>
__device__ __forceinline__ void write_row_results(const CeArgs<T>& a, int64_t row,
                                                  const RowScalars<acc_t<T>>& r, acc_t<T> w_y,
                                                  acc_t<T> smooth, const Coefs<acc_t<T>>& k,
                                                  int other_arg) {
  using A = acc_t<T>;
  A obj = k.one_m_eps * w_y * r.loss;
  if (a.eps > A(0)) obj += k.c * smooth;
  if (a.zs > A(0)) {
    const A lse = r.shift + r.log_s;
    const A z_row = a.zs * lse * lse;
    a.z_loss[row] = z_row;
    obj += z_row;
  }
  a.objective[row] = obj;
  // Recorded only if the loss is finite in the logits dtype T, the dtype of the returned
  // per-row loss (float16 logits [-6e4, 6e4] give a float32 loss of 1.2e5 but an inf
  // one), and in float32, the statistics' dtype (a float64 loss of 1e39 is inf there).
  const bool valid = fits_float(to_acc(Store<T>::from(r.loss)));
  float* st = a.stats + row;
  const int64_t n = a.rows;
  st[kLoss * n] = valid ? static_cast<float>(r.loss) : 0.0f;
  st[kPTrue * n] = valid ? static_cast<float>(dev_exp(-r.loss)) : 0.0f;
  st[kMargin * n] = valid ? static_cast<float>(r.margin) : 0.0f;
  st[kCorrect * n] = (valid && r.correct) ? 1.0f : 0.0f;
  st[kGradNormSq * n] = valid ? static_cast<float>(r.gn) : 0.0f;
  st[kValid * n] = valid ? 1.0f : 0.0f;
  st[kOtherArgmax * n] = (valid && other_arg < a.classes) ? static_cast<float>(other_arg) : -1.0f;
}

// ---------------------------------------------------------------------------------------
// D = sum of w[target] (or count) over non-ignored rows with a target in [0, C); W = sum w.
// Stage 1: block b sums rows [b * kPrepRowsPerBlock, ...) into partial[b] (prep[2 + b]);
// block 0 also writes W. With one block it writes D directly. Stage 2 (more than one block)
// sums the partials in index order. Fixed order throughout: bitwise reproducible.
template <typename A>
__global__ void __launch_bounds__(kPrepThreads)
    ce_prep_kernel(const int64_t* __restrict__ target, int64_t rows, int classes,
                   int64_t ignore_index, const A* __restrict__ weight, A* __restrict__ prep) {
  __shared__ A smem[2 * 32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPrepRowsPerBlock;
  const int64_t end = begin + kPrepRowsPerBlock < rows ? begin + kPrepRowsPerBlock : rows;
  A v[2] = {A(0), A(0)};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t t = target[i];
    if (t != ignore_index && t >= 0 && t < classes) v[0] += weight != nullptr ? weight[t] : A(1);
  }
  if (blockIdx.x == 0 && weight != nullptr) {
    for (int j = threadIdx.x; j < classes; j += blockDim.x) v[1] += weight[j];
  }
  block_allreduce(v, SumOp(), A(0), smem);
  if (threadIdx.x == 0) {
    prep[gridDim.x == 1 ? 0 : 2 + blockIdx.x] = v[0];
    if (blockIdx.x == 0) prep[1] = weight != nullptr ? v[1] : static_cast<A>(classes);
  }
}

template <typename A>
__global__ void __launch_bounds__(32) ce_prep_finish_kernel(A* __restrict__ prep, int partials) {
  A v = A(0);
  for (int b = threadIdx.x; b < partials; b += 32) v += prep[2 + b];
  v = warp_allreduce(v, SumOp());
  if (threadIdx.x == 0) prep[0] = v;
}

// ---------------------------------------------------------------------------------------
// One warp per row, N elements per lane (C <= 32 N), row in registers.
template <typename T, int N>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32) ce_warp_kernel(const CeArgs<T> a) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int C = a.classes;
  const Coefs<A> k = load_coefs(a);
  const A ninf = -inf_of<A>();
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + (threadIdx.x >> 5);
       row < a.rows; row += static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock) {
    int y = 0;
    const int kind = classify_row(a, row, &y);
    if (kind != kActive) {
      write_inactive_row(a, row, kind, lane, 32, nullptr);
      continue;
    }
    const T* zr = a.logits + row * a.ld;
    A z[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + 32 * i;
      z[i] = j < C ? cap_logit(to_acc(zr[j]), a.cap) : ninf;
    }
    const A z_y = cap_logit(to_acc(zr[y]), a.cap);
    // Pass 1: maxima (padding is -inf, neutral for all three).
    A m = ninf, mb = ninf, ma = ninf;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + 32 * i;
      m = dev_max(m, z[i]);
      if (j < y) mb = dev_max(mb, z[i]);
      if (j > y) ma = dev_max(ma, z[i]);
    }
    m = warp_allreduce(m, MaxOp());
    mb = warp_allreduce(mb, MaxOp());
    ma = warp_allreduce(ma, MaxOp());
    int other_arg = C;
    {
      const A mo = dev_max(mb, ma);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        other_arg = runner_up_candidate(z[i], lane + 32 * i, y, C, mo, other_arg);
      }
      other_arg = warp_allreduce(other_arg, MinIntOp());
    }
    // Pass 2: exponential sums over j != y.
    const A ms = safe_max(m);
    A s1 = A(0), s2 = A(0);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + 32 * i;
      if (j < C && j != y) {
        const A e = dev_exp(z[i] - ms);
        s1 += e;
        s2 += e * e;
      }
    }
    s1 = warp_allreduce(s1, SumOp());
    s2 = warp_allreduce(s2, SumOp());
    const RowScalars<A> r = finish_row(m, mb, ma, s1, s2, z_y, C);
    // Pass 3: gradient and the smoothing sum.
    const A w_y = a.weight != nullptr ? a.weight[y] : A(1);
    const A zc = a.zs > A(0) ? A(2) * a.zs * (r.shift + r.log_s) : A(0);
    const GradCoefs<A> gc = grad_coefs(k, w_y, r.om, zc);
    T* g = a.grad != nullptr ? a.grad + row * static_cast<int64_t>(C) : nullptr;
    A smooth = A(0);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const int j = lane + 32 * i;
      if (j < C) {
        const A w_j = smoothing_weight(a, j);
        if (g != nullptr) write_grad(g, j, y, z[i], w_j, r, k, gc);
        if (a.eps > A(0)) smooth += w_j * ((r.shift - z[i]) + r.log_s);
      }
    }
    if (a.eps > A(0)) smooth = warp_allreduce(smooth, SumOp());
    if (lane == 0) write_row_results(a, row, r, w_y, smooth, k, other_arg);
  }
}

// ---------------------------------------------------------------------------------------
// One block per row, E elements per thread (C <= blockDim.x * E), row in registers.
template <typename T, int E>
__global__ void __launch_bounds__(1024) ce_block_kernel(const CeArgs<T> a) {
  using A = acc_t<T>;
  __shared__ A smem[3 * 32];
  __shared__ int ismem[32];
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int C = a.classes;
  const Coefs<A> k = load_coefs(a);
  const A ninf = -inf_of<A>();
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    int y = 0;
    const int kind = classify_row(a, row, &y);  // uniform over the block
    if (kind != kActive) {
      write_inactive_row(a, row, kind, tid, nt, ismem);
      continue;
    }
    const T* zr = a.logits + row * a.ld;
    A z[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = tid + nt * i;
      z[i] = j < C ? cap_logit(to_acc(zr[j]), a.cap) : ninf;
    }
    const A z_y = cap_logit(to_acc(zr[y]), a.cap);
    A mx[3] = {ninf, ninf, ninf};  // m, max_{j<y}, max_{j>y}
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = tid + nt * i;
      mx[0] = dev_max(mx[0], z[i]);
      if (j < y) mx[1] = dev_max(mx[1], z[i]);
      if (j > y) mx[2] = dev_max(mx[2], z[i]);
    }
    block_allreduce(mx, MaxOp(), ninf, smem);
    int other_arg[1] = {C};
    {
      const A mo = dev_max(mx[1], mx[2]);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        other_arg[0] = runner_up_candidate(z[i], tid + nt * i, y, C, mo, other_arg[0]);
      }
      block_allreduce(other_arg, MinIntOp(), C, ismem);
    }
    const A ms = safe_max(mx[0]);
    A sums[2] = {A(0), A(0)};
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = tid + nt * i;
      if (j < C && j != y) {
        const A e = dev_exp(z[i] - ms);
        sums[0] += e;
        sums[1] += e * e;
      }
    }
    block_allreduce(sums, SumOp(), A(0), smem);
    const RowScalars<A> r = finish_row(mx[0], mx[1], mx[2], sums[0], sums[1], z_y, C);
    const A w_y = a.weight != nullptr ? a.weight[y] : A(1);
    const A zc = a.zs > A(0) ? A(2) * a.zs * (r.shift + r.log_s) : A(0);
    const GradCoefs<A> gc = grad_coefs(k, w_y, r.om, zc);
    T* g = a.grad != nullptr ? a.grad + row * static_cast<int64_t>(C) : nullptr;
    A smooth[1] = {A(0)};
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int j = tid + nt * i;
      if (j < C) {
        const A w_j = smoothing_weight(a, j);
        if (g != nullptr) write_grad(g, j, y, z[i], w_j, r, k, gc);
        if (a.eps > A(0)) smooth[0] += w_j * ((r.shift - z[i]) + r.log_s);
      }
    }
    if (a.eps > A(0)) block_allreduce(smooth, SumOp(), A(0), smem);
    if (tid == 0) write_row_results(a, row, r, w_y, smooth[0], k, other_arg[0]);
  }
}

// ---------------------------------------------------------------------------------------
// One block per row for rows too long for registers: online softmax over tiles of
// blockDim.x * U elements (first read), then the gradient pass (second read, mostly from L2).
template <typename A>
__device__ __forceinline__ A rescale(A s, A factor) {
  return s == A(0) ? s : s * factor;  // avoids 0 * inf
}

template <typename T, int U>
__global__ void __launch_bounds__(kStreamThreads) ce_stream_kernel(const CeArgs<T> a) {
  using A = acc_t<T>;
  __shared__ A smem[3 * 32];
  __shared__ int ismem[32];
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int C = a.classes;
  const Coefs<A> k = load_coefs(a);
  const A ninf = -inf_of<A>();
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    int y = 0;
    const int kind = classify_row(a, row, &y);
    if (kind != kActive) {
      write_inactive_row(a, row, kind, tid, nt, ismem);
      continue;
    }
    const T* zr = a.logits + row * a.ld;
    A mx[3] = {ninf, ninf, ninf};  // running max, max_{j<y}, max_{j>y}
    A sums[2] = {A(0), A(0)};      // relative to safe_max(mx[0])
    // This thread's largest other logit and its first column (C: none yet); the columns
    // a thread visits increase, so a strict > keeps the first of equal maxima.
    A best = ninf;
    int best_j = C;
    for (int base = tid; base < C; base += nt * U) {
      A z[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + nt * u;
        z[u] = j < C ? cap_logit(to_acc(zr[j]), a.cap) : ninf;
      }
      A tile_max = ninf;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + nt * u;
        tile_max = dev_max(tile_max, z[u]);
        if (j < y) mx[1] = dev_max(mx[1], z[u]);
        if (j > y) mx[2] = dev_max(mx[2], z[u]);
        if (j < C && j != y && (z[u] > best || best_j == C)) {
          best = z[u];
          best_j = j;
        }
      }
      if (tile_max > mx[0]) {
        const A f = dev_exp(safe_max(mx[0]) - safe_max(tile_max));
        sums[0] = rescale(sums[0], f);
        sums[1] = rescale(sums[1], f * f);
        mx[0] = tile_max;
      }
      const A ms = safe_max(mx[0]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + nt * u;
        if (j < C && j != y) {
          const A e = dev_exp(z[u] - ms);
          sums[0] += e;
          sums[1] += e * e;
        }
      }
    }
    // Before the reductions' barriers: in place, other threads overwrite the row after them.
    const A z_y = cap_logit(to_acc(zr[y]), a.cap);
    const A m_thread = mx[0];
    block_allreduce(mx, MaxOp(), ninf, smem);
    {
      const A f = dev_exp(safe_max(m_thread) - safe_max(mx[0]));  // 1 when equal
      sums[0] = rescale(sums[0], f);
      sums[1] = rescale(sums[1], f * f);
    }
    block_allreduce(sums, SumOp(), A(0), smem);
    int other_arg[1] = {best == dev_max(mx[1], mx[2]) ? best_j : C};
    block_allreduce(other_arg, MinIntOp(), C, ismem);
    const RowScalars<A> r = finish_row(mx[0], mx[1], mx[2], sums[0], sums[1], z_y, C);
    const A w_y = a.weight != nullptr ? a.weight[y] : A(1);
    const A zc = a.zs > A(0) ? A(2) * a.zs * (r.shift + r.log_s) : A(0);
    const GradCoefs<A> gc = grad_coefs(k, w_y, r.om, zc);
    T* g = a.grad != nullptr ? a.grad + row * static_cast<int64_t>(C) : nullptr;
    A smooth[1] = {A(0)};
    if (g != nullptr || a.eps > A(0)) {
      for (int base = tid; base < C; base += nt * U) {
        A z[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int j = base + nt * u;
          z[u] = j < C ? cap_logit(to_acc(zr[j]), a.cap) : A(0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int j = base + nt * u;
          if (j < C) {
            const A w_j = smoothing_weight(a, j);
            if (g != nullptr) write_grad(g, j, y, z[u], w_j, r, k, gc);
            if (a.eps > A(0)) smooth[0] += w_j * ((r.shift - z[u]) + r.log_s);
          }
        }
      }
    }
    if (a.eps > A(0)) block_allreduce(smooth, SumOp(), A(0), smem);
    if (tid == 0) write_row_results(a, row, r, w_y, smooth[0], k, other_arg[0]);
  }
}

// ---------------------------------------------------------------------------------------
inline int threads_for(int64_t classes, int per_thread) {
  int64_t t = (ceil_div(classes, per_thread) + 31) / 32 * 32;
  if (t < 64) t = 64;
  if (t > 1024) t = 1024;
  return static_cast<int>(t);
}

int64_t prep_blocks(int64_t rows) {
  const int64_t b = ceil_div(rows, kPrepRowsPerBlock);
  return b < 1 ? 1 : b;
}

template <typename T>
cudaError_t launch(const CrossEntropyParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  CeArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.rows = p.rows;
  a.ld = p.logits_row_stride;
  a.classes = static_cast<int>(p.classes);
  a.target = p.target;
  a.ignore_index = p.ignore_index;
  a.weight = static_cast<const A*>(p.weight);
  a.eps = static_cast<A>(p.label_smoothing);
  a.reduction = p.reduction;
  a.prep = static_cast<const A*>(p.prep);
  a.objective = static_cast<A*>(p.objective);
  a.grad = static_cast<T*>(p.grad);
  a.stats = p.stats;
  a.error_flag = p.error_flag;
  a.cap = static_cast<A>(p.softcap);
  a.zs = static_cast<A>(p.z_loss_scale);
  a.z_loss = static_cast<A*>(p.z_loss);

  if (cross_entropy_prep_size(p) > 0) {
    if (p.prep == nullptr) return cudaErrorInvalidValue;
    const int64_t blocks = prep_blocks(p.rows);
    A* prep = static_cast<A*>(p.prep);
    ce_prep_kernel<A><<<static_cast<unsigned>(blocks), kPrepThreads, 0, stream>>>(
        a.target, a.rows, a.classes, a.ignore_index, a.weight, prep);
    if (blocks > 1) ce_prep_finish_kernel<A><<<1, 32, 0, stream>>>(prep, static_cast<int>(blocks));
  }
  if (p.rows == 0) return cudaGetLastError();

  const int64_t C = p.classes;
  if (C <= 32) {
    ce_warp_kernel<T, 1><<<grid_for(p.rows, kWarpRowsPerBlock), kWarpRowsPerBlock * 32, 0, stream>>>(a);
  } else if (C <= 128) {
    ce_warp_kernel<T, 4><<<grid_for(p.rows, kWarpRowsPerBlock), kWarpRowsPerBlock * 32, 0, stream>>>(a);
  } else if (C <= 512) {
    ce_warp_kernel<T, 16><<<grid_for(p.rows, kWarpRowsPerBlock), kWarpRowsPerBlock * 32, 0, stream>>>(a);
  } else if (C <= 4 * 1024) {
    ce_block_kernel<T, 4><<<grid_for(p.rows, 1), threads_for(C, 4), 0, stream>>>(a);
  } else {
    bool done = false;
    if constexpr (!std::is_same<T, double>::value) {
      if (C <= 8 * 1024) {
        ce_block_kernel<T, 8><<<grid_for(p.rows, 1), threads_for(C, 8), 0, stream>>>(a);
        done = true;
      }
    }
    if (!done) {
      ce_stream_kernel<T, kStreamUnroll><<<grid_for(p.rows, 1), kStreamThreads, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

}  // namespace

int64_t cross_entropy_prep_size(const CrossEntropyParams& p) {
  const bool needed =
      p.reduction == kMean || (p.weight != nullptr && p.label_smoothing > 0.0);
  if (!needed) return 0;
  const int64_t blocks = prep_blocks(p.rows);
  return 2 + (blocks > 1 ? blocks : 0);
}

cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.classes < 1 || p.classes > kMaxClasses || p.logits_row_stride < 0 ||
      p.reduction < kNone || p.reduction > kSum) {
    return cudaErrorInvalidValue;
  }
  if (p.rows > 0 && (p.logits == nullptr || p.target == nullptr || p.objective == nullptr ||
                     p.stats == nullptr || (p.z_loss_scale > 0.0 && p.z_loss == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (p.softcap < 0.0 || p.z_loss_scale < 0.0) return cudaErrorInvalidValue;
  switch (p.logits_dtype) {
    case DType::kFloat32:
      return launch<float>(p, stream);
    case DType::kFloat16:
      return launch<__half>(p, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(p, stream);
    case DType::kFloat64:
      return launch<double>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace csl_fast
