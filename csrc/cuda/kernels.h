// Plain-CUDA kernels of csl_fast: raw pointers, no torch headers, so that `nvcc -c` can
// compile-check them on any machine with nvcc (tests/test_cuda_compile.py), even where torch
// has no CUDA. The torch glue is csrc/cuda/ops_cuda.cpp.
//
// Every launcher is asynchronous on the given stream, never synchronises the host, and returns
// cudaGetLastError() after its launches (cudaSuccess when there was nothing to launch).
//
// Error flag. Kernels never read or write out of bounds because of bad user data: a target
// outside [0, C) that is not ignore_index, or a scatter index outside the destination buffer,
// is detected on the device. Such a row is treated as invalid (cross entropy: objective and
// gradient row NaN, all statistics 0; scatter: the row is skipped) and, when `error_flag` is
// not null, the corresponding ErrorBits bit is OR-ed into *error_flag. Reading the flag needs
// a host synchronisation, so the torch glue only allocates and checks it in validate mode
// (environment variable CSL_FAST_VALIDATE=1); otherwise error_flag is null and a bad target
// shows up as a NaN loss.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace csl_fast {
namespace cuda {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

enum ErrorBits : int {
  kErrTargetOutOfRange = 1,  // cross entropy: target not in [0, C) and not ignore_index
  kErrIndexOutOfRange = 2,   // scatter: index not in [0, len(buffer))
};

// ---------------------------------------------------------------------------------------
// Fused cross entropy forward (+ gradient + per-row statistics).
//
// "acc" below is the compute type: float64 for float64 logits, float32 otherwise.
// With eps = label_smoothing, w = weight (ones if null), W = sum_j w_j, lse = logsumexp(z_i),
// y = target[i], p = softmax(z_i):
//   objective[i] = (1-eps) w_y (lse - z_y) + (eps/C) sum_j w_j (lse - z_j)
//   grad[i, j]   = scale * ((1-eps) w_y p_j + (eps/C)(W p_j - w_j))                 j != y
//   grad[i, y]   = scale * (-(1-eps) w_y sum_{j!=y} p_j + (eps/C)(W p_y - w_y))
// scale = 1 / D for reduction == mean, where D = sum over rows whose target is in [0, C)
// (ignored rows excluded) of w[target] (their count when unweighted), read from the device
// (prep[0]) so the host never waits (D = 0: scale NaN, as F.cross_entropy's 0 / 0, and
// so the mean); scale = 1 otherwise. Ignored rows: objective 0,
// statistics 0, grad row 0, or NaN where F.cross_entropy's is (a NaN or +inf logit, or all
// -inf; soft-capped, a NaN only: common.cuh, ignored_row_part). Statistics (float32
// [kNumStats, rows], csrc/stats.h) are those of plain cross entropy (unweighted,
// unsmoothed); rows that are ignored, have a bad target or a non-finite loss have all
// statistics 0.
// The loss F.cross_entropy returns is sum(objective) / D (mean), sum(objective) (sum) or
// objective (none); the glue reduces it with torch ops.
// Extras (cross_entropy_fwd_extra): softcap s > 0 replaces every z_j by s tanh(z_j / s)
// before all of the above and multiplies grad[i, j] by 1 - tanh^2(z_j / s); z_loss_scale
// zs > 0 adds z_loss[i] = zs lse^2 to objective[i] (not for ignored rows, and unweighted:
// the glue refuses it with weights, so D is the row count) and scale * 2 zs lse p_j to
// grad[i, j] for every j.
struct CrossEntropyParams {
  const void* logits = nullptr;  // [rows, classes], row stride logits_row_stride, unit col stride
  DType logits_dtype = DType::kFloat32;  // float32, float16, bfloat16 or float64
  int64_t rows = 0;
  int64_t classes = 0;  // 1 <= classes <= kMaxClasses
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;  // [rows]
  int64_t ignore_index = -100;
  const void* weight = nullptr;  // acc type, [classes], or null
  double label_smoothing = 0.0;  // in [0, 1]
  int reduction = 1;             // csl_fast::ReductionKind: 0 none, 1 mean, 2 sum
  // acc type [cross_entropy_prep_size()] workspace: prep[0] = D, prep[1] = W (then partial
  // sums), written by the launcher's first kernel(s). Needed (non-null) iff
  // cross_entropy_prep_size() > 0; otherwise ignored.
  void* prep = nullptr;
  void* objective = nullptr;  // acc type, [rows]
  // logits dtype, [rows, classes] contiguous; null: not written. May be `logits` itself
  // (contiguous logits): the gradient then overwrites them.
  void* grad = nullptr;
  float* stats = nullptr;     // float32 [kNumStats, rows] contiguous
  int* error_flag = nullptr;  // optional, see the top of this file
  double softcap = 0.0;       // 0: off
  double z_loss_scale = 0.0;  // 0: off
  void* z_loss = nullptr;     // acc type, [rows]; needed (non-null) iff z_loss_scale > 0
};

constexpr int64_t kMaxClasses = (int64_t{1} << 31) - (int64_t{1} << 16);

// Number of acc-type elements of the `prep` workspace the launch needs: 0 unless the
// reduction is mean or class weights come with label smoothing; then 2, plus one partial
// sum per 16384 rows when there are more than 16384 rows.
int64_t cross_entropy_prep_size(const CrossEntropyParams& p);

// Launches the prep kernel (when needed) and one row kernel. Kernel choice by C:
//   C <= 512:    one warp per row (8 rows per 256-thread block), row held in registers;
//   C <= 8192:   one block per row, row held in registers (float64: C <= 4096);
//   larger:      one block per row, two reads of the row (online softmax) + one write.
// All reductions have a fixed order: results are bitwise reproducible run to run.
cudaError_t cross_entropy_fwd(const CrossEntropyParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Backward of the fused cross entropy for float16/bfloat16 logits in one elementwise pass
// (csl_fast::cross_entropy_bwd, csl_fast/reference.py: cross_entropy_bwd): with the forward's
// statistics, p_j = exp((z_j - z_y) - stats[kLoss, i]) and
//   grad[i, j] = scale_i ((1-eps) w_y (p_j - [j == y]) + (eps/C)(W p_j - w_j))
// in float32, rounded once to the logits' dtype (the true class's 1 - p_y as -expm1(-loss)).
// Extras (of cross_entropy_fwd_extra): softcap s > 0 takes z' = s tanh(z / s) for z above
// and multiplies grad[i, j] by 1 - tanh^2(z_j / s); z_loss_scale zs > 0 adds
// scale_i 2 zs lse p_j, lse = stats[kLoss, i] + z'_y.
// Rows with stats[kValid] == 0 or a loss above kBwdLossBound take lse from the row (a max and
// a sum pass). Ignored rows: 0, or NaN as the forward's; a target outside [0, C) that is
// not ignore_index: NaN (and the error flag bit, as the forward). One warp per (row, chunk
// of kBwdChunk classes); an ignored row is its first chunk's warp's, whole.
struct CrossEntropyBwdParams {
  const void* logits = nullptr;  // [rows, classes], row stride logits_row_stride, unit col stride
  DType logits_dtype = DType::kFloat16;  // float16 or bfloat16
  int64_t rows = 0;
  int64_t classes = 0;  // 1 <= classes <= kMaxClasses
  int64_t logits_row_stride = 0;
  const int64_t* target = nullptr;  // [rows]
  int64_t ignore_index = -100;
  const float* weight = nullptr;    // float32 [classes], or null
  const float* weight_sum = nullptr;  // float32 [1], W; needed iff weight is given
  double label_smoothing = 0.0;
  const float* stats = nullptr;  // float32 [kNumStats, rows] contiguous, the forward's
  const float* scale = nullptr;  // float32 [rows] (per_row_scale) or [1]
  bool per_row_scale = false;
  void* grad = nullptr;       // logits dtype, [rows, classes] contiguous
  int* error_flag = nullptr;  // optional, see the top of this file
  double softcap = 0.0;       // 0: off
  double z_loss_scale = 0.0;  // 0: off
};
constexpr float kBwdLossBound = 64.0f;
constexpr int64_t kBwdChunk = 4096;
cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Scatter of per-row statistics into dataset-sized buffers:
//   csl[index[i]]   += stats[kLoss, i]    (csl: float32 or float64)
//   count[index[i]] += stats[kValid, i]   (count: float32, float64, int32 or int64)
// Duplicate indices add up. Either buffer may be null.
struct ScatterParams {
  const float* stats = nullptr;  // float32 [kNumStats, rows] contiguous
  int64_t rows = 0;
  const void* index = nullptr;  // [rows], int32 or int64
  DType index_dtype = DType::kInt64;
  void* csl = nullptr;
  DType csl_dtype = DType::kFloat32;
  int64_t csl_size = 0;
  void* count = nullptr;
  DType count_dtype = DType::kFloat32;
  int64_t count_size = 0;
  int* error_flag = nullptr;  // optional, see the top of this file
};

// Default, non-deterministic mode: one atomicAdd per row and buffer. Correct with duplicate
// indices, but the order of floating-point additions to a duplicated slot is not fixed.
// (Integer counts are exact either way.)
cudaError_t scatter_stats_atomic(const ScatterParams& p, cudaStream_t stream);

// Deterministic mode: a stable radix sort (cub) of the indices groups duplicates in row
// order; the first row of each group then adds its group's values into the slot one by
// one, in ascending row order, with a plain read-modify-write. The result is bitwise
// reproducible and equal to a sequential index_add_ in row order (the CPU reference).
// Cost: a workspace of scatter_stats_deterministic_workspace_bytes() bytes and ~6 small
// launches (key build, radix sort over ceil(log2(N+1)) bits, group sums) instead of 1;
// a slot that appears k times in a batch costs k dependent additions on one thread.
cudaError_t scatter_stats_deterministic_workspace_bytes(int64_t rows, int64_t max_buffer_size,
                                                        size_t* bytes);
cudaError_t scatter_stats_deterministic(const ScatterParams& p, void* workspace,
                                        size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// The suggested-label vote of a tracker (csl_fast/reference.py: record_last, vote_step):
// one Boyer-Moore step per valid misclassified row (stats[kValid] > 0, stats[kCorrect] == 0)
// for its predicted class r = stats[kOtherArgmax] >= 0, on label/votes/hits[index], rows
// taken in batch order. The caller sorts the indices
// stably (sorted_index, and perm: sorted position -> row); the first position of each run of
// equal indices walks its run, so every sample has one writer: no atomics, deterministic.
// Indices outside [0, n) are skipped.
struct VoteParams {
  const float* stats = nullptr;  // float32 [kNumStats, rows] contiguous
  int64_t rows = 0;
  const int64_t* sorted_index = nullptr;  // [rows]
  const int64_t* perm = nullptr;          // [rows]
  int32_t* label = nullptr;               // [n]
  int32_t* votes = nullptr;               // [n]
  int32_t* hits = nullptr;                // [n]
  int64_t n = 0;
};
cudaError_t vote_sorted(const VoteParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Input-gradient norms: out[i] = sum_k (scale * grad[i, k])^2 over a contiguous [rows, cols]
// view, accumulated in float32 (float64 for float64 grads), stored as float32. Rows of up to
// 1024 columns get a warp each, longer rows a block each, and rows over 16384 columns are
// split over several blocks whose partial sums are combined in a fixed order (no atomics):
// bitwise reproducible.
struct InputGradNormsParams {
  const void* grad = nullptr;  // [rows, cols] contiguous; float32, float16, bfloat16, float64
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t cols = 0;
  double scale = 1.0;
  float* out = nullptr;  // float32 [rows]
};
size_t input_grad_norms_workspace_bytes(const InputGradNormsParams& p);
cudaError_t input_grad_norms(const InputGradNormsParams& p, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Binary cross entropy with logits (csl_fast.accumulate_bce; csl_fast/reference.py: bce_fwd,
// bce_bwd, bce_record; kernels in bce_kernels.cu). Entries (i, l) of [rows, labels] logits
// z and targets y (one dtype: float32, float16, bfloat16 or float64; any strides), with the
// optional weight w and pos_weight p in the acc type, read through [rows, labels] strides
// (a broadcast weight has stride 0). Plain entry loss: softplus(z) - y z; weighted:
// w ([z >= 0](1 - y) z - [z < 0] p y z + (1 + (p - 1) y) log1p(exp(-|z|))).
struct BceInputs {
  const void* logits = nullptr;
  const void* target = nullptr;
  DType dtype = DType::kFloat32;
  int64_t rows = 0;
  int64_t labels = 0;
  int64_t z_stride[2] = {0, 0};
  int64_t y_stride[2] = {0, 0};
  const void* weight = nullptr;  // acc type, or null
  int64_t w_stride[2] = {0, 0};
  const void* pos_weight = nullptr;  // acc type, or null
  int64_t pw_stride[2] = {0, 0};
};

// One warp per row: the weighted entry losses (reduction none: into `loss`, logits dtype,
// [rows, labels] contiguous; mean/sum: their row sums into `row_sums`, acc type [rows]) and
// the per-sample statistics (float32 [kBceNumStats, rows], csrc/bce_stats.h). Warp sums in
// a fixed order: bitwise reproducible.
struct BceFwdParams {
  BceInputs in;
  int reduction = 1;  // csl_fast::ReductionKind
  void* loss = nullptr;
  void* row_sums = nullptr;
  float* stats = nullptr;
};
cudaError_t bce_fwd(const BceFwdParams& p, cudaStream_t stream);

// d loss / d z = g w ((1 - y) sigmoid(z) - p y sigmoid(-z)), one thread per entry, into
// `out` (logits dtype, [rows, labels] contiguous). g: the upstream gradient, [rows, labels]
// through g_stride for reduction none, else a scalar read on the device, over rows * labels
// for mean.
struct BceBwdParams {
  BceInputs in;
  int reduction = 1;
  const void* grad = nullptr;  // logits dtype
  int64_t g_stride[2] = {0, 0};
  void* out = nullptr;
};
cudaError_t bce_bwd(const BceBwdParams& p, cudaStream_t stream);

// For every valid row i (stats[kBceValid, i] > 0) with k = index[i] in [0, n) (others are
// skipped): csl[k] += LOSS, count[k] += 1, wrong[k] += WRONG, min_margin[k] += MIN_MARGIN
// (float32/float64; count and wrong also int32/int64) and, per label l, label_csl[k, l] +=
// the plain entry loss, label_margin[k, l] += (2 y - 1) z, label_prob[k, l] += exp(-plain
// entry loss) (float32/float64, [n, labels] contiguous). Any buffer may be null.
struct BceRecordParams {
  BceInputs in;  // weight and pos_weight unused
  const float* stats = nullptr;  // float32 [kBceNumStats, rows] contiguous
  const void* index = nullptr;   // [rows], int32 or int64
  DType index_dtype = DType::kInt64;
  int64_t n = 0;
  void* csl = nullptr;
  DType csl_dtype = DType::kFloat32;
  void* count = nullptr;
  DType count_dtype = DType::kFloat32;
  void* wrong = nullptr;
  DType wrong_dtype = DType::kFloat32;
  void* min_margin = nullptr;
  DType min_margin_dtype = DType::kFloat32;
  void* label_csl = nullptr;
  DType label_csl_dtype = DType::kFloat32;
  void* label_margin = nullptr;
  DType label_margin_dtype = DType::kFloat32;
  void* label_prob = nullptr;
  DType label_prob_dtype = DType::kFloat32;
};
// One atomicAdd per value (with duplicate indices the order of float additions may vary).
cudaError_t bce_record_atomic(const BceRecordParams& p, cudaStream_t stream);
// Deterministic: given the stable sort of the indices (sorted_index, int64, and perm:
// sorted position -> row), the first position of each run of equal indices adds the run's
// rows in batch order, one writer per slot: equal to a sequential loop in batch order.
cudaError_t bce_record_sorted(const BceRecordParams& p, const int64_t* sorted_index,
                              const int64_t* perm, cudaStream_t stream);

}  // namespace cuda
}  // namespace csl_fast
