// Layout of the per-sample statistics [kBceNumStats, B] (float32) of csl_fast::bce_fwd,
// shared by the CPU and CUDA kernels. Mirrors csl_fast/reference.py: BceStat (checked by
// tests/test_accumulate_bce.py). Every row is 0 for a sample that is not valid.
#pragma once

namespace csl_fast {

enum BceStat : int {
  kBceLoss = 0,       // sum_l plain entry loss softplus(z) - y z (no weight, no pos_weight)
  kBceValid = 1,      // the plain loss is finite: the sample is recorded
  kBceWrong = 2,      // #labels with (z >= 0) != (y >= 0.5)
  kBceMinMargin = 3,  // min_l (2 y - 1) z
  kBceNumStats = 4,
};

}  // namespace csl_fast
