"""Checks of the CUDA backend that need no GPU.

- every ``csrc/cuda/*.cu`` (plain CUDA, no torch headers) compiles with ``nvcc -c`` for
  sm_80 and sm_90, warning-free under ``-Xcompiler -Wall``;
- the torch glue ``csrc/cuda/ops_cuda.cpp`` passes ``g++ -fsyntax-only -Wall -Wextra``
  against the installed torch's headers (a CPU build of torch ships the c10/cuda headers but
  not the generated ``c10/cuda/impl/cuda_cmake_macros.h``, which is stubbed here);
- the glue registers a CUDA kernel for every op schema of ``csrc/csl_fast.cpp``;
- the cross-entropy, input-gradient-norm, vote and scatter kernels (cub's radix sort
  replaced by a host stand-in), compiled for the host with
  ``csrc/cuda/testing/host_emulation.h`` (blocks of std::threads, barriers for
  ``__syncthreads``/``__shfl_xor_sync``), match ``csl_fast/reference.py`` on every kernel
  path (warp, block-in-registers and streaming rows; all four logits dtypes; weights, label
  smoothing, ignored rows, bad targets, non-finite logits, strided rows). This runs the real
  kernel source, not a re-implementation; what it cannot see is GPU-only behaviour (memory
  model, occupancy, real warp scheduling, atomics, cub).

All compilers run concurrently (module fixture), so the module costs about as long as the
slowest file. Each check is skipped, with the reason, where its compiler or headers are
missing.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from tolerances import assert_close_f32, assert_no_worse_than_torch

from csl_fast import reference
from csl_fast.stats import MARGIN_CAP, NUM_STATS, Stat

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


EMU_SOURCES = (
    "cross_entropy_kernels.cu",
    "cross_entropy_bwd_kernels.cu",
    "input_grad_norms_kernels.cu",
    "vote_kernels.cu",
    "scatter_kernels.cu",  # cub's radix sort: a host stand-in in csrc/cuda/testing/cub
)
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;{}<>]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def _emulated_source(name: str) -> str:
    """The .cu source with each ``k<<<cfg>>>(args);`` rewritten for host_emulation.h."""
    text = (CUDA_DIR / name).read_text()
    out, n = _LAUNCH.subn(lambda m: f"::csl_emu::launch([=] {{ {m[1]}({m[3]}); }}, {m[2]});", text)
    assert n > 0, f"no kernel launch found in {name}"
    return out


def _emu_cmd(work: Path, cuda_inc: Path) -> tuple[list[str], Path]:
    cxx = shutil.which("g++") or shutil.which("c++")
    sources = []
    for name in EMU_SOURCES:
        path = work / (name + ".cc")
        path.write_text(_emulated_source(name))
        sources.append(str(path))
    lib = work / "libcsl_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Werror"]
    cmd += ["-Wno-attributes", "-Wno-unknown-pragmas", "-include", "host_emulation.h"]
    cmd += ["-I", str(CUDA_DIR), "-I", str(CUDA_DIR / "testing"), "-isystem", str(cuda_inc)]
    cmd += [*sources, str(CUDA_DIR / "testing" / "harness.cpp"), "-o", str(lib)]
    return cmd, lib


def _emu_skip_reason(cuda_inc: Path | None) -> str | None:
    """Why the host emulation cannot be built here, or None."""
    if cuda_inc is None:
        return "CUDA headers (cuda_fp16.h, cuda_runtime_api.h) not found"
    if not (shutil.which("g++") or shutil.which("c++")):
        return "no host C++ compiler"
    if sys.platform != "linux":
        return "host emulation is only set up for Linux"
    return None


def build_emulation(work: Path) -> ctypes.CDLL:
    """The emulation library compiled in ``work`` (about a minute), for a test module of its
    own (tests/test_cuda_*_emulated.py); skips with the reason where it cannot be built."""
    cuda_inc = _cuda_include()
    reason = _emu_skip_reason(cuda_inc)
    if reason is not None:
        pytest.skip(reason)
    cmd, lib = _emu_cmd(work, cuda_inc)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return ctypes.CDLL(str(lib))


class _Job:
    def __init__(self, cmd: list[str], output: Path | None = None):
        self.cmd = cmd
        self.output = output
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
    reason = _emu_skip_reason(cuda_inc)
    if reason is not None:
        started["emu"] = reason
    else:
        cmd, lib = _emu_cmd(tmp_path_factory.mktemp("emu"), cuda_inc)
        started["emu"] = _Job(cmd, lib)
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
    assert "TORCH_LIBRARY_IMPL(csl_fast, CUDA, m)" in GLUE.read_text()
    # The binary cross entropy's glue is its own file (csrc/cuda/bce_ops_cuda.cpp).
    glue = "".join(p.read_text() for p in sorted(CUDA_DIR.glob("*.cpp")))
    impls = re.findall(r'm\.impl\("(\w+)"', glue)
    # record_last and record_input_grad update B values of tracker state: on a GPU they are
    # a Triton pass (csl_fast/_triton/record.py) or the device-only reference, by design
    # (see csl_fast.ops.record_last and record_input_grad).
    cpu_only = {"record_last", "record_input_grad"}
    # record_loss is the CPU's one-call op (csl_fast.record_loss composes scatter_stats and
    # record_last on a GPU).
    cpu_only.add("record_loss")
    assert sorted(impls) == sorted(set(schemas) - cpu_only)


# ---------------------------------------------------------------------------------------
# The real kernels, run on the CPU through host_emulation.h.

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_P, _I64, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


@pytest.fixture(scope="module")
def emu(jobs):
    _run(jobs, "emu")
    lib = ctypes.CDLL(str(jobs["emu"].output))
    lib.emu_ce_prep_size.argtypes = [_I64, _I, _I, _D]
    lib.emu_ce_prep_size.restype = _I64
    lib.emu_cross_entropy_fwd.argtypes = [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _D, _I]
    lib.emu_cross_entropy_fwd.argtypes += [_P] * 5
    lib.emu_input_grad_norms_workspace.argtypes = [_I, _I64, _I64]
    lib.emu_input_grad_norms_workspace.restype = _I64
    lib.emu_input_grad_norms.argtypes = [_P, _I, _I64, _I64, _D, _P, _P, _I64]
    lib.emu_vote_sorted.argtypes = [_P, _I64, _P, _P, _P, _P, _P, _I64]
    lib.emu_scatter_workspace.argtypes = [_I64, _I64]
    lib.emu_scatter_workspace.restype = _I64
    lib.emu_scatter_stats.argtypes = [_P, _I64, _P, _I, _P, _I, _I64, _P, _I, _I64, _I, _P]
    lib.emu_scatter_stats.argtypes += [_I64, _P]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _emu_cross_entropy(lib, logits, target, weight, ignore_index, eps, reduction, inplace=False):
    """What ops_cuda.cpp does around the launcher, on CPU tensors (``inplace``: the
    gradient written over a copy of the logits, as cross_entropy_fwd_inplace does)."""
    batch, classes = logits.shape
    assert logits.stride(1) == 1
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_prep = lib.emu_ce_prep_size(batch, reduction, weight is not None, eps)
    prep = torch.full((max(n_prep, 1),), math.nan, dtype=acc)
    objective = torch.full((batch,), math.nan, dtype=acc)
    if inplace:
        logits = logits.clone()
        grad = logits
    else:
        grad = torch.full((batch, classes), math.nan, dtype=logits.dtype)
    stats = torch.full((NUM_STATS, batch), math.nan)
    flag = torch.zeros(1, dtype=torch.int32)
    w = None if weight is None else weight.to(acc).contiguous()
    t = target.long().contiguous()
    rc = lib.emu_cross_entropy_fwd(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], batch, classes, logits.stride(0),
        t.data_ptr(), ignore_index, _ptr(w), eps, reduction, prep.data_ptr() if n_prep else None,
        objective.data_ptr(), grad.data_ptr(), stats.data_ptr(), flag.data_ptr(),
    )  # fmt: skip
    assert rc == 0, f"launcher returned cudaError {rc}"
    if reduction == 0:
        loss = objective.to(logits.dtype)
    elif reduction == 2:
        loss = objective.sum().to(logits.dtype)
    else:
        d = prep[0]
        loss = torch.where(d != 0, objective.sum() / d, math.nan).to(logits.dtype)
    return loss, grad, stats, int(flag.item())


def _check_against_reference(lib, logits, target, weight=None, ignore_index=-100, eps=0.0, red=1):
    out = _emu_cross_entropy(lib, logits, target, weight, ignore_index, eps, red)
    loss, grad, stats, flag = out
    assert flag == 0
    ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
        logits, target, weight, ignore_index, eps, red
    )
    exact_loss, exact_grad, exact_stats = reference.cross_entropy_fwd(
        logits.double(), target, weight, ignore_index, eps, red
    )
    assert loss.dtype == logits.dtype and loss.shape == ref_loss.shape
    if loss.dim() == 0:  # the helper masks NaNs, which 0-dim tensors do not support
        loss, ref_loss, exact_loss = loss[None], ref_loss[None], exact_loss[None]
    assert_no_worse_than_torch(loss, ref_loss, exact_loss, "loss")
    assert_no_worse_than_torch(grad, ref_grad, exact_grad, "grad")
    for k in (Stat.CORRECT, Stat.VALID, Stat.OTHER_ARGMAX):
        assert torch.equal(stats[k], ref_stats[k]), Stat(k).name
    for k in (Stat.LOSS, Stat.P_TRUE, Stat.MARGIN, Stat.GRAD_NORM_SQ):
        assert_close_f32(stats[k], exact_stats[k], Stat(k).name, rtol=3e-6)


# (classes, batch) per kernel path: warp N=1/4/16, block E=4, E=8 (float64: streaming), streaming.
_PATHS = [(1, 5), (7, 13), (100, 11), (513, 9), (5000, 3), (9000, 2)]


@pytest.mark.parametrize("classes,batch", _PATHS)
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_cross_entropy_paths(emu, classes, batch, dtype):
    logits = (torch.randn(batch, classes) * 3).to(dtype)
    target = torch.randint(0, classes, (batch,))
    target[1] = -100
    _check_against_reference(emu, logits, target)


@pytest.mark.parametrize("classes,batch", [c for c in _PATHS if c[0] > 1])
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_margin_is_capped(emu, classes, batch, dtype):
    """A row whose label holds the only finite logit (margin +inf) and one with a margin
    past MARGIN_CAP emit MARGIN_CAP, as the reference does, on every kernel path."""
    logits = (torch.randn(batch, classes) * 3).to(dtype)
    target = torch.randint(0, classes, (batch,))
    logits[0] = float("-inf")
    logits[0, target[0]] = 1.0
    logits[1, target[1]] = 5e3 if dtype != torch.float16 else 6e4
    _check_against_reference(emu, logits, target)
    _, _, stats, _ = _emu_cross_entropy(emu, logits, target, None, -100, 0.0, 0)
    assert stats[Stat.MARGIN, :2].tolist() == [MARGIN_CAP, MARGIN_CAP]


@pytest.mark.parametrize("classes,batch", _PATHS)
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_cross_entropy_in_place(emu, classes, batch, dtype):
    """grad == logits (cross_entropy_fwd_inplace): bitwise the same results on every path,
    with the emulated threads racing as GPU threads would."""
    logits = (torch.randn(batch, classes) * 3).to(dtype)
    target = torch.randint(0, classes, (batch,))
    target[1] = -100
    weight = torch.rand(classes) + 0.5
    for red in (0, 1):
        want = _emu_cross_entropy(emu, logits, target, weight, -100, 0.1, red)
        got = _emu_cross_entropy(emu, logits, target, weight, -100, 0.1, red, inplace=True)
        for a, b, what in zip(got[:3], want[:3], ("loss", "grad", "stats"), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=what)


_OPTIONS = [(True, 0.0, 1), (True, 0.1, 1), (False, 0.2, 2), (True, 0.3, 0)]


@pytest.mark.parametrize(
    "classes,batch,weighted,eps,red",
    [(c, b, *o) for c, b in [(33, 13), (700, 5)] for o in _OPTIONS] + [(9000, 2, True, 0.1, 1)],
)
def test_emulated_cross_entropy_options(emu, classes, batch, weighted, eps, red):
    logits = torch.randn(batch, classes + 3)[:, 1 : classes + 1]  # row stride > C
    target = torch.randint(0, classes, (batch,))
    target[0] = 7 if classes > 7 else 0  # ignore_index = 7 below, a valid class id
    weight = torch.rand(classes) + 0.5 if weighted else None
    _check_against_reference(emu, logits, target, weight, ignore_index=7, eps=eps, red=red)


@pytest.mark.parametrize("classes,batch", _PATHS[1:])
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_mean_over_zero_class_weight_is_nan(emu, classes, batch, dtype):
    """D = 0 ('mean', class weight 0 at every valid row's target, label smoothing): NaN loss
    and NaN gradient rows, as F.cross_entropy's 0 / 0; the scale 1 / D made them inf."""
    logits = torch.randn(batch, classes).to(dtype)
    target = torch.ones(batch, dtype=torch.long)
    target[0] = -100
    weight = torch.rand(classes) + 0.5
    weight[1] = 0.0
    loss, grad, _, flag = _emu_cross_entropy(emu, logits, target, weight, -100, 0.3, 1)
    assert flag == 0 and loss.isnan(), loss
    assert grad[1:].isnan().all() and grad[0].eq(0).all()


@pytest.mark.parametrize("classes,batch", _PATHS[1:])
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_emulated_non_finite_class_weight_reaches_only_its_rows(emu, classes, batch, dtype, bad):
    """Without label smoothing class 0's weight enters only the rows of class 0 (as in
    F.cross_entropy): the kernels once multiplied it by eps = 0 in every row's gradient."""
    logits = torch.randn(batch, classes).to(dtype)
    target = torch.randint(1, classes, (batch,))
    target[0] = -100
    weight = torch.rand(classes) + 0.5
    weight[0] = bad
    loss, grad, _, flag = _emu_cross_entropy(emu, logits, target, weight, -100, 0.0, 0)
    assert flag == 0 and loss.isfinite().all(), loss
    assert grad.isfinite().all() and grad[0].eq(0).all()


@pytest.mark.parametrize("classes,batch", [(40, 9), (600, 4), (9000, 2)])
def test_emulated_cross_entropy_extremes(emu, classes, batch):
    logits = torch.randn(batch, classes) * 1e3  # huge margins: p_y -> 1 rows
    logits[0, :] = 0.0  # all tied: first index wins argmax
    logits[1, ::3] = -math.inf  # masked classes
    target = torch.randint(0, classes, (batch,))
    target[0], target[1] = 0, 1
    _check_against_reference(emu, logits, target, red=2)
    # (Smoothing over a -inf logit makes that row's loss +inf: keep the comparison finite.)
    _check_against_reference(emu, logits.clamp_min(-1e4), target, eps=0.1, red=0)
    # No rows left: mean is NaN, the gradient is zero.
    _check_against_reference(emu, logits, torch.full((batch,), -100))


@pytest.mark.parametrize("classes", [10, 600, 9000])
def test_emulated_cross_entropy_nonfinite_and_bad_rows(emu, classes):
    logits = torch.randn(4, classes)
    logits[1, :] = -math.inf  # loss NaN
    logits[2, 3] = math.nan
    target = torch.tensor([classes, 1, 1, -1])  # rows 0 and 3: outside [0, C), not ignored
    loss, grad, stats, flag = _emu_cross_entropy(emu, logits, target, None, -100, 0.0, 0)
    assert flag == 1  # kErrTargetOutOfRange
    assert torch.isnan(loss).all()
    assert torch.isnan(grad[[0, 3]]).all()
    want = torch.zeros_like(stats)
    want[Stat.OTHER_ARGMAX] = -1.0  # no runner-up for a row that is not valid
    assert torch.equal(stats, want)
    ref_loss, _, ref_stats = reference.cross_entropy_fwd(logits[1:3], target[1:3], None, -100, 0, 0)
    assert torch.isnan(ref_loss).all() and torch.equal(ref_stats, want[:, 1:3])


@pytest.mark.parametrize("classes", [4, 100, 600, 9000])  # every kernel path
def test_emulated_cross_entropy_a_plus_inf_logit_makes_the_row_nan(emu, classes):
    """A +inf logit of an active row, at another class or at the target: loss and gradient
    NaN for every reduction, as F.cross_entropy and the CPU kernels. The CUDA kernels
    shifted by 0 and gave a loss of +inf and a gradient of NaN and 0 (audit helper-113)."""
    logits = torch.randn(3, classes)
    logits[0, 1] = math.inf
    logits[1, 2] = math.inf
    target = torch.tensor([0, 2, 1])  # row 1: the +inf logit is the target; row 2 finite
    for reduction in (0, 1, 2):
        loss, grad, stats, _ = _emu_cross_entropy(emu, logits, target, None, -100, 0.1, reduction)
        ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
            logits, target, None, -100, 0.1, reduction
        )
        assert torch.equal(loss.isnan(), ref_loss.isnan()), (reduction, loss, ref_loss)
        assert torch.equal(grad.isnan(), ref_grad.isnan()), reduction
        assert bool(grad[:2].isnan().all()) and not bool(grad[2].isnan().any())
        assert torch.equal(stats[:, :2], ref_stats[:, :2])


@pytest.mark.parametrize("classes", [7, 100, 513, 5000, 9000])  # every kernel path
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_cross_entropy_ignored_non_finite_rows(emu, classes, dtype):
    """An ignored row's gradient is NaN where F.cross_entropy's is (log_softmax's backward
    forms 0 - softmax(z) * 0: a NaN or +inf logit, or all -inf) and 0 otherwise, in place
    too; the loss and statistics ignore it. The kernels wrote 0 for every ignored row."""
    logits = torch.randn(7, classes).to(dtype)
    logits[1, classes - 1] = math.nan  # the row's last column: read by its last thread
    logits[2, 1] = math.inf
    logits[3] = -math.inf
    logits[4, 2] = -math.inf  # p = 0 there: a zero gradient
    target = torch.randint(0, classes, (7,))
    target[1:6] = -100
    for red, inplace in [(0, False), (1, False), (1, True)]:
        loss, grad, stats, flag = _emu_cross_entropy(emu, logits, target, None, -100, 0.1, red,
                                                     inplace=inplace)  # fmt: skip
        ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
            logits, target, None, -100, 0.1, red
        )
        what = f"reduction {red} in place {inplace}"
        assert flag == 0
        assert grad.isnan().all(1).tolist() == [False, True, True, True, False, False, False], what
        assert torch.equal(grad.isnan(), ref_grad.isnan()), what
        assert bool((grad[4:6] == 0).all()), what
        torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=1e-5, msg=what)
        assert torch.equal(stats[Stat.VALID], ref_stats[Stat.VALID]), what


@pytest.mark.parametrize("classes", [10, 600, 9000])
def test_emulated_cross_entropy_confident_rows(emu, classes):
    """As p_y -> 1 the loss log(1 + s1), s1 = sum_{j != y} exp(z_j - z_y), keeps its relative
    precision (log(1 + s1) rounds to 0 once s1 < 6e-8 in float32) on every kernel path, as
    on the CPU (tests/test_accumulate.py on a GPU)."""
    logits = torch.zeros(4, classes)
    logits[:, 3] = torch.tensor([15.0, 20.0, 30.0, 40.0])
    target = torch.full((4,), 3)
    _, grad, stats, flag = _emu_cross_entropy(emu, logits, target, None, -100, 0.0, 2)
    assert flag == 0
    z = logits.double()
    s1 = (z[:, torch.arange(classes) != 3] - z[:, 3:4]).exp().sum(1)  # sum_{j != y} e^(z_j - z_y)
    torch.testing.assert_close(stats[Stat.LOSS].double(), s1.log1p(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad[:, 3].double(), -s1 / (1 + s1), rtol=1e-5, atol=0)


# Rows (target logit, largest other logit) whose float32 loss is finite but rounds to inf in
# the logits dtype (not recorded), and rows just below that bound (recorded).
_LOSS_OVERFLOW = {
    torch.float16: [(-6e4, 6e4, False), (-16.0, 65504.0, False), (-8.0, 65504.0, True)],
    torch.bfloat16: [(-1e36, 3.3895e38, False), (-1e35, 3.3895e38, True)],
    # finite in float64, past float32's range (the statistics' dtype) or within it
    torch.float64: [(-1e39, 1e39, False), (0.0, 5e38, False), (-1e38, 2e38, True)],
}


@pytest.mark.parametrize("classes", [7, 513, 9000])
@pytest.mark.parametrize("dtype", list(_LOSS_OVERFLOW))
def test_emulated_cross_entropy_loss_overflow(emu, classes, dtype):
    """A row is recorded only if its loss is finite in the logits dtype (the returned loss)
    and in float32 (the statistics')."""
    cases = _LOSS_OVERFLOW[dtype]
    # the last row is ordinary; float64 first: float64 cases lie past float32's range
    logits = torch.randn(len(cases) + 1, classes, dtype=torch.float64)
    for i, (z_y, z_max, _) in enumerate(cases):
        logits[i] = 0.0
        logits[i, 0], logits[i, 1] = z_y, z_max
    logits = logits.to(dtype)
    target = torch.zeros(len(cases) + 1, dtype=torch.long)
    loss, _, stats, flag = _emu_cross_entropy(emu, logits, target, None, -100, 0.0, 0)
    assert flag == 0
    recorded = [ok for *_, ok in cases] + [True]
    assert torch.isfinite(loss.float()).tolist() == recorded
    assert stats[Stat.VALID].tolist() == [float(ok) for ok in recorded]
    _, _, ref_stats = reference.cross_entropy_fwd(logits, target, None, -100, 0.0, 0)
    for k in (Stat.CORRECT, Stat.VALID, Stat.OTHER_ARGMAX):
        assert torch.equal(stats[k], ref_stats[k]), Stat(k).name
    torch.testing.assert_close(stats[Stat.LOSS], ref_stats[Stat.LOSS], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cols", [1, 37, 5000, 40_000])
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES))
def test_emulated_input_grad_norms(emu, cols, dtype):
    rows, code = 3, _DTYPE_CODES[dtype]
    aligned = torch.randn(rows, cols).to(dtype)
    shifted = torch.randn(rows * cols + 1).to(dtype)[1:].view(rows, cols)  # not 16-byte aligned
    for grad in (aligned, shifted):
        out = torch.full((rows,), math.nan)
        ws_bytes = emu.emu_input_grad_norms_workspace(code, rows, cols)
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8)
        rc = emu.emu_input_grad_norms(
            grad.data_ptr(), code, rows, cols, 0.25, out.data_ptr(), ws.data_ptr(), ws_bytes
        )
        assert rc == 0
        exact = reference.input_grad_norms(grad.double(), 0.25)
        assert_close_f32(out, exact, "input_grad_norms", rtol=1e-7 if code == 3 else 1e-5)


@pytest.mark.parametrize("classes", [10, 600, 9000])
@pytest.mark.parametrize("inplace", [False, True])
def test_emulated_cross_entropy_writes_only_its_buffers(emu, classes, inplace):
    """Bad targets (past C, -1 as padding), ignored rows and an empty batch: the kernels
    write the gradient, objective and statistics buffers and nothing around them (each is
    a slice of a larger tensor whose outside must stay bit-identical)."""
    pad, batch = 7, 4
    target = torch.tensor([classes, 1, -100, -1])
    for rows in (batch, 0):
        logits_big = torch.randn(batch + 2, classes)
        logits = logits_big[1 : 1 + rows]
        grad_big = logits_big if inplace else torch.randn(batch + 2, classes)
        grad = grad_big[1 : 1 + rows]
        obj_big, stats_big = torch.randn(rows + 2 * pad), torch.randn(NUM_STATS * rows + 2 * pad)
        n_prep = emu.emu_ce_prep_size(rows, 1, 0, 0.0)
        prep_big = torch.randn(max(n_prep, 1) + 2 * pad)
        bigs = (logits_big, grad_big, obj_big, stats_big, prep_big)
        before = [b.clone() for b in bigs]
        rc = emu.emu_cross_entropy_fwd(
            logits.data_ptr(), 0, rows, classes, logits.stride(0), target[:rows].data_ptr(),
            -100, None, 0.0, 1, prep_big[pad:].data_ptr(), obj_big[pad:].data_ptr(),
            grad.data_ptr(), stats_big[pad:].data_ptr(), None,
        )  # fmt: skip
        assert rc == 0
        for big, old in zip(bigs, before, strict=True):
            edge = [0, -1] if big.dim() == 2 else [*range(pad), *range(-pad, 0)]
            assert torch.equal(big[edge], old[edge])  # the canaries
        if rows:
            obj = obj_big[pad : pad + rows]
            assert torch.isnan(obj[[0, 3]]).all() and obj[2] == 0 and torch.isfinite(obj[1])
            assert torch.isnan(grad[[0, 3]]).all() and not grad[2].any()
            stats = stats_big[pad : pad + NUM_STATS * rows].view(NUM_STATS, rows)
            assert stats[Stat.VALID].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_emulated_vote_matches_the_reference(emu):
    """The GPU vote kernel (stable sort in the glue, one walk per run of equal indices)
    against csl_fast.reference.record_last's vote, over batches with many duplicates."""
    n, batch = 9, 64
    g = torch.Generator().manual_seed(7)
    label = torch.full((n,), -1, dtype=torch.int32)
    votes = torch.zeros(n, dtype=torch.int32)
    hits = torch.zeros(n, dtype=torch.int32)
    want = [label.clone(), votes.clone(), hits.clone()]
    state = [torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)]
    for _ in range(6):
        index = torch.randint(0, n, (batch,), generator=g)
        stats = torch.zeros(NUM_STATS, batch)
        stats[Stat.VALID] = (torch.rand(batch, generator=g) > 0.2).float()
        r = torch.randint(0, 3, (batch,), generator=g).float()
        stats[Stat.OTHER_ARGMAX] = torch.where(stats[Stat.VALID] > 0, r, -1.0)
        stats[Stat.CORRECT] = (torch.rand(batch, generator=g) > 0.7).float() * stats[Stat.VALID]
        index[0] = n  # outside [0, n): skipped
        stats[Stat.VALID, 0] = 0.0
        sorted_index, perm = torch.sort(index, stable=True)
        rc = emu.emu_vote_sorted(
            stats.data_ptr(), batch, sorted_index.data_ptr(), perm.data_ptr(),
            label.data_ptr(), votes.data_ptr(), hits.data_ptr(), n,
        )  # fmt: skip
        assert rc == 0
        reference.record_last(stats[:, 1:], index[1:], None, 0, *state, *[None] * 6, *want)
    assert torch.equal(label, want[0]) and torch.equal(votes, want[1])
    assert torch.equal(hits, want[2])
    assert (want[0] >= 0).all() and want[1].sum() > 0


_BUF_CODES = {torch.float32: 0, torch.float64: 3, torch.int32: 4, torch.int64: 5}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_emulated_scatter_skips_out_of_range_indices(emu, deterministic, index_dtype):
    """Indices at N, past N and negative are skipped (error bit 2 set, nothing written
    outside the buffers: canaries around each), the others added as index_add_ in row
    order; N = 0 and an empty batch write nothing. Atomic and sort-based modes."""
    pad, n = 5, 8
    index = torch.tensor([0, n, 3, n + 1, -1, 3, 7, 100, -9, 7, 2], dtype=index_dtype)
    rows = len(index)
    stats = torch.zeros(NUM_STATS, rows)
    stats[Stat.LOSS] = torch.rand(rows) * 5
    stats[Stat.VALID] = (torch.rand(rows) > 0.3).float()
    ok = (index >= 0) & (index < n)
    for csl_t, cnt_t in ((torch.float32, torch.int64), (torch.float64, torch.float32)):
        for size, batch in ((n, rows), (0, rows), (n, 0)):
            csl_big = torch.randn(size + 2 * pad).to(csl_t)
            cnt_big = torch.randint(-5, 5, (size + 2 * pad,)).to(cnt_t)
            before = csl_big.clone(), cnt_big.clone()
            csl, cnt = csl_big[pad : pad + size], cnt_big[pad : pad + size]
            want_csl, want_cnt = csl.clone(), cnt.clone()
            if size and batch:
                reference.scatter_stats(stats[:, ok], index[ok], True, want_csl, want_cnt)
            ws_bytes = emu.emu_scatter_workspace(batch, size)
            ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8)
            flag = torch.zeros(1, dtype=torch.int32)
            st = stats[:, :batch].contiguous()
            rc = emu.emu_scatter_stats(
                st.data_ptr(), batch, index.data_ptr(), _BUF_CODES[index_dtype],
                csl.data_ptr(), _BUF_CODES[csl_t], size, cnt.data_ptr(), _BUF_CODES[cnt_t],
                size, int(deterministic), ws.data_ptr(), ws_bytes, flag.data_ptr(),
            )  # fmt: skip
            assert rc == 0
            # kErrIndexOutOfRange; an empty buffer's data pointer is null: no buffer, no flag
            assert int(flag) == (2 if batch and size else 0)
            for big, old in zip((csl_big, cnt_big), before, strict=True):
                assert torch.equal(big[:pad], old[:pad]) and torch.equal(big[-pad:], old[-pad:])
            if deterministic:  # the same additions in the same order
                assert torch.equal(csl, want_csl)
            else:
                torch.testing.assert_close(csl, want_csl)
            assert torch.equal(cnt, want_cnt)
