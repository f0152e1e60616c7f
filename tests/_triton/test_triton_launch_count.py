"""The device kernels one ``accumulate`` + ``backward`` issues on the Triton backend
(``benchmarks/launch_count.py``): below large vocabularies each launch is host time on a
GPU, so a change that adds one shows here. Counted under the interpreter (ATen ops that
would launch a kernel, plus Triton launches); the GPU run's profiler has the real count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from csl_fast._triton import cross_entropy
from csl_fast._triton._registry import is_interpreted

pytestmark = pytest.mark.skipif(
    not is_interpreted(cross_entropy._ce_fwd_kernel),
    reason="counts the interpreter's launches; on a GPU run the script",
)

_SCRIPT = Path(__file__).parents[2] / "benchmarks" / "launch_count.py"

# Before the mean's denominator kernel and the one-kernel divisions of the half path:
# 11, 4, 3, 12, 6, 5 into a CSL tensor and 13, 6, 5, 14, 8, 7 into a CSLTracker. The
# float32 backward's two more (a comparison and a where: an ignored row's upstream
# gradient is not read, as in F.cross_entropy) came after: 6, 4, 3 and 8, 6, 5 before.
EXPECTED = {
    "float32 mean csl": 8,
    "float32 sum csl": 6,
    "float32 none csl": 5,
    "bfloat16 mean csl": 9,
    "bfloat16 sum csl": 6,
    "bfloat16 none csl": 5,
    "float32 mean tracker": 10,
    "float32 sum tracker": 8,
    "float32 none tracker": 7,
    "bfloat16 mean tracker": 11,
    "bfloat16 sum tracker": 8,
    "bfloat16 none tracker": 7,
}


def test_kernels_per_call():
    spec = importlib.util.spec_from_file_location("launch_count", _SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.count_all("cpu")
    got = {case: sum(c.values()) for case, c in counts.items()}
    assert got == EXPECTED, {case: dict(c) for case, c in counts.items()}
