"""The Triton kernels compile for a real GPU (sm_90 cubin), even on a machine without one.

The interpreter used by the other tests is more permissive than the compiler; this runs the
real pipeline (``triton.compile`` with an explicit ``GPUTarget``) in a subprocess with
``TRITON_INTERPRET=0``. ``CSL_FAST_TRITON_AOT`` = minimal (default) | quick | full | off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    mode = os.environ.get("CSL_FAST_TRITON_AOT", "minimal")
    if mode == "off":
        pytest.skip("CSL_FAST_TRITON_AOT=off")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_sm90.py")), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 4
