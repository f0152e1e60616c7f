"""The binary-cross-entropy CUDA backend without a GPU: the torch glue
(csrc/cuda/bce_ops_cuda.cpp) passes ``g++ -fsyntax-only -Wall -Wextra -Werror``, and the
kernels of csrc/cuda/bce_kernels.cu, compiled for the host with
csrc/cuda/testing/host_emulation.h (as tests/test_cuda_compile.py does for the others),
match csl_fast.reference: loss and gradient no worse than 2x PyTorch's own error, the
per-sample statistics, and the recorded buffers (atomic and deterministic modes, duplicate
and out-of-range indices). ``nvcc`` for sm_80/sm_90 is test_cuda_compile's (every .cu)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import test_cuda_compile as tcc
import torch
from test_accumulate_bce import _float64_overflow_case, _infinite_pos_weight_case
from tolerances import assert_close_f32, assert_no_worse_than_torch

from csl_fast import reference
from csl_fast.reference import BceStat

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
          torch.int32: 4, torch.int64: 5}  # fmt: skip
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _compiler_or_skip() -> tuple[str, Path]:
    cxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc = tcc._cuda_include()
    if cxx is None or cuda_inc is None or sys.platform != "linux":
        pytest.skip("needs g++, the CUDA headers and Linux")
    return cxx, cuda_inc


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx, cuda_inc = _compiler_or_skip()
    work = tmp_path_factory.mktemp("bce_emu")
    src = work / "bce_kernels.cu.cc"
    src.write_text(tcc._emulated_source("bce_kernels.cu"))
    lib = work / "libbce_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Werror"]
    cmd += ["-Wno-attributes", "-Wno-unknown-pragmas", "-include", "host_emulation.h"]
    cmd += ["-I", str(tcc.CUDA_DIR), "-I", str(tcc.CUDA_DIR / "testing")]
    cmd += ["-isystem", str(cuda_inc), str(src), str(tcc.CUDA_DIR / "testing" / "bce_harness.cpp")]
    proc = subprocess.run([*cmd, "-o", str(lib)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    so = ctypes.CDLL(str(lib))
    common = [_P, _P, _I, _I64, _I64, _P, _P, _P, _P, _P, _P, _I]
    so.emu_bce_fwd.argtypes = [*common, _P, _P, _P]
    so.emu_bce_bwd.argtypes = [*common, _P, _P, _P]
    so.emu_bce_record.argtypes = [_P, _P, _I, _I64, _I64, _P, _P, _P, _P, _I, _I64, _P, _P, _P, _P]
    return so


def test_glue_syntax():
    _, cuda_inc = _compiler_or_skip()
    torch_inc = tcc._torch_include()
    if torch_inc is None:
        pytest.skip("the installed torch has no c10/cuda headers")
    stub = Path(tempfile.mkdtemp())
    macros = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not (torch_inc / macros.relative_to(stub)).is_file():
        macros.parent.mkdir(parents=True)
        macros.write_text("#pragma once\n")
    cmd = tcc._glue_cmd(stub, torch_inc, cuda_inc)
    cmd[-1] = str(tcc.CUDA_DIR / "bce_ops_cuda.cpp")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strides(t: torch.Tensor | None) -> ctypes.Array:
    return (ctypes.c_int64 * 2)(*(t.stride() if t is not None else (0, 0)))


def _ptr(t):
    return None if t is None else t.data_ptr()


def _weights(weight, pos_weight, logits):
    """As the glue: converted to the acc type, then broadcast to [B, L] (strides 0)."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return [None if t is None else t.to(acc).expand(logits.shape) for t in (weight, pos_weight)]


def _fwd(lib, logits, target, weight, pos_weight, reduction):
    batch, labels = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w, pw = _weights(weight, pos_weight, logits)
    loss = torch.full((batch, labels), float("nan"), dtype=logits.dtype)
    rows = torch.full((batch,), float("nan"), dtype=acc)
    stats = torch.full((4, batch), float("nan"))
    rc = lib.emu_bce_fwd(
        logits.data_ptr(), target.data_ptr(), _CODES[logits.dtype], batch, labels,
        _strides(logits), _strides(target), _ptr(w), _strides(w), _ptr(pw), _strides(pw),
        reduction, loss.data_ptr(), rows.data_ptr(), stats.data_ptr(),
    )  # fmt: skip
    assert rc == 0
    if reduction != 0:  # as the glue: a float64 sum of the row sums
        total = rows.double().sum()
        loss = (total / (batch * labels) if reduction == 1 else total).to(logits.dtype)
    return loss, stats


def _bwd(lib, grad, logits, target, weight, pos_weight, reduction):
    w, pw = _weights(weight, pos_weight, logits)
    out = torch.full(logits.shape, float("nan"), dtype=logits.dtype)
    rc = lib.emu_bce_bwd(
        logits.data_ptr(), target.data_ptr(), _CODES[logits.dtype], *logits.shape,
        _strides(logits), _strides(target), _ptr(w), _strides(w), _ptr(pw), _strides(pw),
        reduction, grad.data_ptr(), _strides(grad if reduction == 0 else None), out.data_ptr(),
    )  # fmt: skip
    assert rc == 0
    return out


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 1), (9, 37), (2, 300)])
def test_emulated_forward_and_backward(emu, dtype, reduction, shape):
    logits = (torch.randn(shape) * 4).to(dtype)
    target = torch.rand(shape).to(dtype)
    target[0] = (target[0] > 0.5).to(dtype)
    weight = torch.rand(shape[1]) + 0.5
    pos_weight = torch.rand(shape[0], 1) * 2 + 0.2
    wide = torch.zeros(shape[0], 2 * shape[1], dtype=dtype)
    wide[:, ::2] = logits
    z = wide[:, ::2]  # strided logits
    loss, stats = _fwd(emu, z, target, weight, pos_weight, reduction)
    ref_loss, ref_stats = reference.bce_fwd(logits, target, weight, pos_weight, reduction)
    exact = reference.bce_fwd(logits.double(), target.double(), weight, pos_weight, reduction)
    one = (lambda t: t[None]) if ref_loss.dim() == 0 else (lambda t: t)
    assert_no_worse_than_torch(one(loss), one(ref_loss), one(exact[0]), "loss")
    for k in (BceStat.VALID, BceStat.WRONG):
        assert torch.equal(stats[k], ref_stats[k]), BceStat(k).name
    for k in (BceStat.LOSS, BceStat.MIN_MARGIN):
        assert_close_f32(stats[k], exact[1][k], BceStat(k).name, rtol=4e-6)
    upstream = (torch.randn(shape) * 1.7 if reduction == 0 else torch.tensor(1.7)).to(dtype)
    if reduction == 0:
        upstream = upstream.t().contiguous().t()  # column-major
    grad = _bwd(emu, upstream, z, target, weight, pos_weight, reduction)
    ref_grad = reference.bce_bwd(upstream, logits, target, weight, pos_weight, reduction)
    exact_grad = reference.bce_bwd(
        upstream.double(), logits.double(), target.double(), weight, pos_weight, reduction
    )
    assert_no_worse_than_torch(grad, ref_grad, exact_grad, "grad")


def test_emulated_non_finite_rows_are_invalid(emu):
    logits = torch.randn(4, 6)
    target = torch.rand(4, 6)
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    target[2, 0] = 0.0
    _, stats = _fwd(emu, logits, target, None, None, 0)
    assert stats[BceStat.VALID].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert stats[:, 1:3].eq(0).all()
    # float64 losses finite in float64 but past float32's range, the statistics' dtype
    logits, target = _float64_overflow_case()
    _, stats = _fwd(emu, logits, target, None, None, 0)
    assert stats[BceStat.VALID].tolist() == [0.0, 0.0, 1.0]
    assert stats[:, :2].eq(0).all() and torch.isfinite(stats).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_infinite_pos_weight_gives_nan(emu, dtype):
    """An infinite pos_weight gives NaN gradient entries whatever the target, as PyTorch's
    (tests/test_accumulate_bce.py: test_infinite_pos_weight_as_pytorch); -inf before."""
    logits, target, weight, pos_weight = _infinite_pos_weight_case(dtype)
    upstream = torch.tensor(1.7, dtype=dtype)
    grad = _bwd(emu, upstream, logits, target, weight, pos_weight, 2)
    ref = reference.bce_bwd(upstream, logits, target, weight, pos_weight, 2)
    assert ref[:, [0, 1, 3]].isnan().all() and torch.equal(grad.isnan(), ref.isnan())
    torch.testing.assert_close(grad, ref, equal_nan=True, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("labels", [1, 5, 70])
def test_emulated_record(emu, deterministic, dtype, labels):
    batch, n = 11, 4
    logits = (torch.randn(batch, labels) * 3).to(dtype)
    target = torch.rand(batch, labels).to(dtype)
    logits[4, 0] = float("nan")  # not recorded
    index = torch.randint(0, n, (batch,), dtype=torch.int32)
    index[-1] = n  # out of range: skipped
    stats = reference.bce_row_statistics(logits, target)
    bufs = [
        torch.rand(n), torch.randint(0, 3, (n,)), torch.randint(0, 3, (n,), dtype=torch.int32),
        torch.rand(n, dtype=torch.float64), torch.rand(n, labels),
        torch.rand(n, labels, dtype=torch.float64), torch.rand(n, labels),
    ]  # fmt: skip
    for given in ([0, 1, 2, 3, 4, 5, 6], [4], [6], [0, 1]):
        got = [b.clone() if k in given else None for k, b in enumerate(bufs)]
        want = [None if b is None else b.clone() for b in got]
        ptrs = (ctypes.c_void_p * 7)(*(_ptr(b) for b in got))
        codes = (ctypes.c_int * 7)(*(_CODES[b.dtype] if b is not None else 0 for b in got))
        sorted_index, perm = torch.sort(index.long(), stable=True)
        rc = emu.emu_bce_record(
            logits.data_ptr(), target.data_ptr(), _CODES[dtype], batch, labels,
            _strides(logits), _strides(target), stats.data_ptr(), index.data_ptr(),
            _CODES[torch.int32], n, ptrs, codes,
            sorted_index.data_ptr() if deterministic else None,
            perm.data_ptr() if deterministic else None,
        )  # fmt: skip
        assert rc == 0
        keep = index < n
        reference.bce_record(logits[keep], target[keep], stats[:, keep], index[keep], True, *want)
        for k, (a, b) in enumerate(zip(got, want, strict=True)):
            if a is None:
                continue
            if deterministic and k not in (4, 6):  # the same additions in the same order
                assert torch.equal(a, b), k
            else:  # atomics in another order, or libm's log1p against PyTorch's
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=str(k))
