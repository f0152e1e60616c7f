"""Compile checks of the CUDA backend that need no GPU.

- every ``csrc/cuda/*.cu`` (plain CUDA, no torch headers) compiles with ``nvcc -c`` for
  sm_80 and sm_90, warning-free under ``-Xcompiler -Wall``;
- the torch glue ``csrc/cuda/ops_cuda.cpp`` passes ``g++ -fsyntax-only -Wall -Wextra``
  against the installed torch's headers (a CPU build of torch ships the c10/cuda headers but
  not the generated ``c10/cuda/impl/cuda_cmake_macros.h``, which is stubbed here);
- the glue registers a CUDA kernel for every op schema of ``csrc/csl_fast.cpp``.

All compilers run concurrently (module fixture), so the module costs about as long as the
slowest file. Each check is skipped, with the reason, where its compiler or headers are
missing. The kernels' numerics are tested against ``csl_fast/reference.py`` by the device
tests, which need a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
GLUE = CUDA_DIR / "ops_cuda.cpp"
ARCHS = ("80", "90")
TIMEOUT_S = 600


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()


def _cuda_include() -> Path | None:
    candidates = []
    if NVCC:
        candidates.append(Path(NVCC).resolve().parents[1] / "include")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "include")
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


def _torch_include() -> Path | None:
    try:
        import torch.utils.cpp_extension as ext
    except ImportError:
        return None
    paths = [Path(p) for p in ext.include_paths()]
    return next((p for p in paths if (p / "c10" / "cuda" / "CUDAStream.h").is_file()), None)


def _nvcc_cmd(src: str, out_dir: Path) -> list[str]:
    cmd = [NVCC, "-c", str(CUDA_DIR / src), "-o", str(out_dir / (src + ".o")), "-std=c++17"]
    cmd += ["-O1", "-Xcompiler", "-Wall"]  # host -O1 saves time; device code is still -O3
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def _glue_cmd(stub_dir: Path, torch_inc: Path, cuda_inc: Path) -> list[str]:
    cxx = shutil.which("g++") or shutil.which("c++")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DWITH_CUDA"]
    # -isystem: warnings inside torch's own headers are not ours to fix.
    for inc in (
        stub_dir,
        torch_inc,
        torch_inc / "torch" / "csrc" / "api" / "include",
        cuda_inc,
        Path(sysconfig.get_paths()["include"]),
    ):
        cmd += ["-isystem", str(inc)]
    return [*cmd, str(GLUE)]


class _Job:
    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.start = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self._result: tuple[int, str, float] | None = None

    def result(self) -> tuple[int, str, float]:
        if self._result is None:
            try:
                out, _ = self.proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
                out += f"\n[timed out after {TIMEOUT_S} s]"
            self._result = (self.proc.returncode, out, time.monotonic() - self.start)
        return self._result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, _Job | str]:
    """Starts every compile at once; values are jobs, or the reason a check is skipped."""
    out_dir = tmp_path_factory.mktemp("cuda_objs")
    started: dict[str, _Job | str] = {}
    for src in CU_FILES:
        started[src] = _Job(_nvcc_cmd(src, out_dir)) if NVCC else "nvcc not found"
    torch_inc, cuda_inc = _torch_include(), _cuda_include()
    if not GLUE.is_file():
        started["glue"] = "csrc/cuda/ops_cuda.cpp not found"
    elif torch_inc is None:
        started["glue"] = "the installed torch has no c10/cuda headers"
    elif cuda_inc is None:
        started["glue"] = "CUDA runtime headers (cuda_runtime_api.h) not found"
    elif not (shutil.which("g++") or shutil.which("c++")):
        started["glue"] = "no host C++ compiler"
    else:
        stub = tmp_path_factory.mktemp("stub")
        macros = Path("c10") / "cuda" / "impl" / "cuda_cmake_macros.h"
        if not (torch_inc / macros).is_file():
            (stub / macros).parent.mkdir(parents=True)
            (stub / macros).write_text("#pragma once\n")
        started["glue"] = _Job(_glue_cmd(stub, torch_inc, cuda_inc))
    yield started
    for job in started.values():
        if isinstance(job, _Job) and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def _run(jobs: dict[str, _Job | str], key: str) -> tuple[str, float]:
    job = jobs[key]
    if isinstance(job, str):
        pytest.skip(job)
    rc, out, seconds = job.result()
    print(f"{key}: {seconds:.1f} s: {' '.join(job.cmd)}", file=sys.stderr)
    assert rc == 0, f"{' '.join(job.cmd)}\nfailed with exit code {rc}:\n{out}"
    return out, seconds


def test_kernel_sources_exist():
    assert {"cross_entropy_kernels.cu", "scatter_kernels.cu"} <= set(CU_FILES)
    assert (CUDA_DIR / "kernels.h").is_file()


@pytest.mark.parametrize("src", CU_FILES)
def test_nvcc_compiles(jobs, src):
    out, _ = _run(jobs, src)
    # Warnings from our own sources fail the test; toolkit-header noise does not.
    ours = [line for line in out.splitlines() if "warning" in line.lower() and "csrc" in line]
    assert not ours, "\n".join(ours)


def test_kernels_header_has_no_torch_dependency():
    for path in [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), CUDA_DIR / "kernels.h"]:
        text = path.read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), path.name


def test_glue_syntax(jobs):
    _run(jobs, "glue")


def test_glue_registers_every_op():
    schemas = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "csl_fast.cpp").read_text())
    glue = GLUE.read_text()
    assert "TORCH_LIBRARY_IMPL(csl_fast, CUDA, m)" in glue
    impls = re.findall(r'm\.impl\("(\w+)"', glue)
    assert sorted(impls) == sorted(schemas)
