// Layout of the per-row statistics tensor [kNumStats, B] (float32) that every
// cross-entropy kernel emits. Mirrors csl_fast/stats.py (checked by tests/test_stats.py).
#pragma once

namespace csl_fast {

enum Stat : int {
  kLoss = 0,         // l_i = logsumexp(z_i) - z_{i,y}
  kPTrue = 1,        // p_y = exp(-l_i)
  kMargin = 2,       // min(z_y - max_{j != y} z_j, kMarginCap) (0 when C == 1)
  kCorrect = 3,      // argmax (first index on ties) == y
  kGradNormSq = 4,   // sum_{j != y} p_j^2 + (1 - p_y)^2
  kValid = 5,        // row recorded: not ignored and finite loss
  kOtherArgmax = 6,  // runner-up: first j != y with z_j = max_{j != y} z_j, as a float;
                     // -1 when C == 1 or the row is not valid
  kNumStats = 7,
};

// The largest margin emitted (csl_fast/stats.py: MARGIN_CAP, which says why).
constexpr float kMarginCap = 1000.0f;

// Same values as at::Reduction.
enum ReductionKind : int { kNone = 0, kMean = 1, kSum = 2 };

}  // namespace csl_fast
