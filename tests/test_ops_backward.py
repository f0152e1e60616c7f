"""csl_fast::cross_entropy_bwd (the float16/bfloat16 backward in one elementwise pass) on the
C++ kernels: against float64 (rounded once) and the reference, on every option and row kind
(the Triton kernel: tests/_triton/test_triton_cross_entropy_bwd.py; the CUDA kernel through
host emulation: tests/test_cuda_bwd_emulated.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_rounded_once

from csl_fast import _ext, ops_backward, reference
from csl_fast.stats import Stat

pytestmark = pytest.mark.skipif(_ext._C is None, reason="compiled extension not built")

LOW = [torch.float16, torch.bfloat16]
IGNORE = -100


@pytest.fixture
def cxx(device):
    if _ext.backend_status(device).get("cpu" if device == "cpu" else "cuda") is not None:
        pytest.skip(f"no C++ kernels for {device}")
    return "cpu" if device == "cpu" else "cuda"


def exact_grad(logits, target, weight, scale, eps, ignore_index=IGNORE):
    """float64 ``scale_i * d loss_i / d logits`` of F.cross_entropy (reduction 'none')."""
    z = logits.detach().double().requires_grad_(True)
    loss = F.cross_entropy(
        z,
        target.long(),
        weight=None if weight is None else weight.double(),
        ignore_index=ignore_index,
        label_smoothing=eps,
        reduction="none",
    )
    (g,) = torch.autograd.grad(loss, z, scale.double().reshape(-1).expand(logits.shape[0]))
    return g


def cancelling(scale, weight, eps, b, c, ulps=16):
    """``[B, C]`` float32 error of gradients whose terms cancel: label smoothing's
    ``eps / C (W p_j - w_j)`` against ``(1 - eps) w_y p_j`` leaves ~``ulps`` float32 steps of
    ``eps / C (w_j + W)`` (0 without smoothing: there every element keeps its relative
    precision)."""
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.cpu().double()
    s = scale.cpu().double().reshape(-1, 1).expand(b, 1).abs()
    return ulps * 2.0**-24 * s * (eps / max(c, 1)) * (w + w.sum())[None, :]


def exact_extra(logits, target, scale, eps, softcap, zs):
    """float64 gradient of the extras' per-row objective (cross entropy of
    ``z' = softcap tanh(z / softcap)`` plus ``zs lse(z')^2``) times ``scale``, and the float32
    error of terms that cancel there: the z-loss's ``2 zs lse p_j`` against the rest, and
    ``1 - tanh^2`` near ``|tanh| = 1`` (~``2^-20`` of the gradient before that factor)."""
    z = logits.detach().double().cpu()
    t = torch.tanh(z / softcap) if softcap else torch.zeros_like(z)
    zc = (softcap * t if softcap else z).requires_grad_(True)
    target = target.cpu()
    loss = F.cross_entropy(zc, target, ignore_index=IGNORE, label_smoothing=eps, reduction="none")
    if zs:
        loss = loss + reference.z_loss(zc, target, IGNORE, 0, zs)
    up = scale.double().cpu().reshape(-1).expand(z.shape[0])
    (g,) = torch.autograd.grad(loss, zc, up)
    lse = torch.logsumexp(zc.detach(), 1, keepdim=True)
    atol = 16 * 2.0**-24 * (up[:, None].abs() * 2 * zs * lse.abs() + g.abs())
    atol = atol + cancelling(scale, None, eps, *z.shape)
    return g * (1 - t * t), atol


def run(backend, logits, target, weight, scale, eps, ignore_index=IGNORE):
    """The forward's statistics, then the backward: (ours, reference)."""
    _, _, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, target, weight, ignore_index, eps, 0)
    args = (logits, target, weight, stats, scale, ignore_index, eps)
    ours = ops_backward.cross_entropy_bwd(*args, backend=backend)
    return ours, reference.cross_entropy_bwd(*args), stats


def _case(b, c, dtype, device, spread=3.0, weighted=False, ignore=True, per_row=True):
    logits = (torch.randn(b, c, dtype=torch.float64) * spread).to(dtype).to(device)
    target = torch.randint(0, max(c, 1), (b,)).to(device)
    if ignore and b > 2:
        target[1::3] = IGNORE
    weight = (torch.rand(c) + 0.5).to(device) if weighted else None
    scale = (torch.randn(b if per_row else 1) * 2).to(device)
    return logits, target, weight, scale


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    ("b", "c"), [(1, 1), (7, 3), (13, 10), (9, 33), (5, 100), (3, 2047), (2, 2049), (2, 5000)]
)
@pytest.mark.parametrize(("eps", "weighted"), [(0.0, False), (0.1, False), (0.2, True)])
@pytest.mark.parametrize("per_row", [True, False])
def test_rounded_once(cxx, device, dtype, b, c, eps, weighted, per_row):
    logits, target, weight, scale = _case(b, c, dtype, device, weighted=weighted, per_row=per_row)
    ours, ref, _ = run(cxx, logits, target, weight, scale, eps)
    assert ours.dtype == dtype and ours.shape == (b, c) and ours.is_contiguous()
    what = f"{dtype} B={b} C={c} eps={eps} weighted={weighted}"
    exact = exact_grad(logits, target, weight, scale, eps).cpu()
    atol = cancelling(scale, weight, eps, b, c)
    assert_rounded_once(ours.cpu(), exact, what, atol=atol)
    # The reference rounds once too, from PyTorch's float32 softmax (exp of log_softmax:
    # ~|log p| float32 steps of p before cancelling terms).
    info = torch.finfo(dtype)  # one step apart at most (subnormals: one subnormal step)
    step = info.eps * ref.double().abs().clamp_min(info.smallest_normal)
    assert bool(((ours.double() - ref.double()).abs().cpu() <= step.cpu() + 64 * atol).all())
    assert bool((ours[target == IGNORE] == 0).all())


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("b", "c"), [(7, 3), (9, 33), (3, 2049)])
@pytest.mark.parametrize(
    ("softcap", "zs", "eps"), [(5.0, 0.0, 0.1), (0.0, 0.1, 0.0), (3.0, 0.01, 0.0)]
)
def test_extras_rounded_once(cxx, device, dtype, b, c, softcap, zs, eps):
    """Soft-capping and the z-loss (csl_fast.ops_extras), on the extra forward's statistics;
    rows past the loss bound (spread 30) among them."""
    logits, target, _, scale = _case(b, c, dtype, device, spread=10.0)
    fwd = torch.ops.csl_fast.cross_entropy_fwd_extra
    stats = fwd(logits, target, None, IGNORE, eps, 0, softcap, zs)[2]
    args = (logits, target, None, stats, scale, IGNORE, eps, softcap, zs)
    ours = ops_backward.cross_entropy_bwd(*args, backend=cxx)
    exact, atol = exact_extra(logits, target, scale, eps, softcap, zs)
    what = f"{dtype} B={b} C={c} softcap={softcap} zs={zs}"
    assert_rounded_once(ours.cpu(), exact, what, atol=atol)
    ref = reference.cross_entropy_bwd(*args)
    step = torch.finfo(dtype).eps * ref.double().abs().clamp_min(torch.finfo(dtype).smallest_normal)
    assert bool(((ours.double() - ref.double()).abs().cpu() <= step.cpu() + 64 * atol).all())


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_rows_past_the_loss_bound(cxx, device, dtype, spread):
    """Losses above 64 (lse from the row instead of the statistics) mixed with small ones."""
    logits, target, weight, scale = _case(40, 50, dtype, device, spread=spread)
    logits[::2] = logits[::2] / spread
    ours, _, stats = run(cxx, logits, target, weight, scale, 0.05)
    assert bool((stats[Stat.LOSS] > 64).any()) and bool((stats[Stat.LOSS] < 64).any())
    exact = exact_grad(logits, target, weight, scale, 0.05)
    atol = cancelling(scale, weight, 0.05, 40, 50)
    assert_rounded_once(ours.cpu(), exact.cpu(), f"{dtype} spread {spread}", atol=atol)


def test_unrecorded_and_nonfinite_rows(cxx, device):
    """float16 rows whose loss overflows float16 (not recorded: VALID 0, LOSS 0), rows with
    NaN or infinite logits: the gradient of F.cross_entropy computed in float64."""
    logits = (torch.randn(6, 8, dtype=torch.float64) * 2).half().to(device)
    target = torch.tensor([0, 1, 2, 3, 4, 5], device=device)
    logits[0, 3] = 60000.0
    logits[0, 0] = -60000.0  # loss 120000: inf in float16
    logits[1, 5] = float("nan")
    logits[2, 6] = float("inf")
    logits[3, 3] = float("-inf")  # z_y = -inf: infinite loss
    logits[4, 1] = float("-inf")  # another class at -inf: p = 0 there
    scale = torch.tensor([1.5], device=device)
    ours, ref, stats = run(cxx, logits, target, None, scale, 0.0)
    assert stats[Stat.VALID, 0] == 0 and stats[Stat.VALID, 5] == 1
    exact = exact_grad(logits, target, None, scale, 0.0)
    assert_rounded_once(ours.cpu(), exact.cpu(), "unrecorded rows")
    assert torch.equal(ours.isnan(), ref.isnan())


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("c", [10, 2049])  # several rows per tile; a row over column tiles
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_ignored_rows_with_non_finite_logits(cxx, device, dtype, c, softcap):
    """An ignored row's gradient is NaN where F.cross_entropy's is (log_softmax's backward
    forms 0 - softmax(z) * 0: a NaN or +inf logit, or all -inf; soft-capped logits are
    finite, so a NaN only, reference.cross_entropy_bwd) and 0 otherwise; it was always 0."""
    logits, target, _, scale = _case(7, c, dtype, device, ignore=False)
    logits[1, 3] = float("nan")
    logits[2, 1] = float("inf")
    logits[3] = float("-inf")
    logits[4, 2] = float("-inf")  # p = 0 there: a zero gradient
    target[1:6] = IGNORE
    fwd = torch.ops.csl_fast.cross_entropy_fwd_extra
    stats = fwd(logits, target, None, IGNORE, 0.1, 0, softcap, 0.0)[2]
    args = (logits, target, None, stats, scale, IGNORE, 0.1, softcap, 0.0)
    ours = ops_backward.cross_entropy_bwd(*args, backend=cxx).cpu()
    ref = reference.cross_entropy_bwd(*args).cpu()
    nan_rows = [1] if softcap else [1, 2, 3]
    assert ours.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert torch.equal(ours.isnan(), ref.isnan())
    assert bool((ours[[r for r in range(1, 6) if r not in nan_rows]] == 0).all())
    assert not ours[[0, 6]].isnan().any()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_non_contiguous_logits(cxx, device, dtype):
    base = (torch.randn(12, 40, dtype=torch.float64) * 3).to(dtype).to(device)
    target = torch.randint(0, 20, (12,), device=device)
    scale = torch.rand(12, device=device) + 0.5
    for logits in (base[:, :20], base[:, ::2], base.t().contiguous().t()[:, 5:25], base[::2, :20]):
        t = target[: logits.shape[0]]
        s = scale[: logits.shape[0]]
        ours, _, _ = run(cxx, logits, t, None, s, 0.1)
        dense, _, _ = run(cxx, logits.contiguous(), t, None, s, 0.1)
        assert torch.equal(ours, dense)
        exact = exact_grad(logits, t, None, s, 0.1).cpu()
        atol = cancelling(s, None, 0.1, *logits.shape)
        assert_rounded_once(ours.cpu(), exact, "strided", atol=atol)


@pytest.mark.parametrize("shape", [(0, 5), (0, 0)])
def test_empty(cxx, device, shape):
    logits = torch.empty(shape, dtype=torch.float16, device=device)
    target = torch.empty(0, dtype=torch.long, device=device)
    stats = torch.empty(len(Stat), 0, device=device)
    out = torch.ops.csl_fast.cross_entropy_bwd(
        logits, target, None, stats, torch.ones(1, device=device), IGNORE, 0.0
    )
    assert out.shape == shape and out.dtype == torch.float16


def test_ignore_index_other_than_default(cxx, device):
    logits, target, _, scale = _case(9, 6, torch.bfloat16, device, ignore=False)
    target[::2] = 3  # class 3 is ignored: those rows are zero, the others use it
    ours, _, _ = run(cxx, logits, target, None, scale, 0.1, ignore_index=3)
    assert bool((ours[::2] == 0).all())
    exact = exact_grad(logits, target, None, scale, 0.1, 3).cpu()
    assert_rounded_once(
        ours.cpu(), exact, "ignore_index=3", atol=cancelling(scale, None, 0.1, 9, 6)
    )


def test_bad_arguments_raise_before_writing(cxx, device):
    logits, target, _, scale = _case(4, 5, torch.float16, device, ignore=False)
    _, _, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, target, None, IGNORE, 0.0, 0)
    op = torch.ops.csl_fast.cross_entropy_bwd
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        op(logits.float(), target, None, stats, scale, IGNORE, 0.0)
    with pytest.raises(ValueError, match="stats must be"):
        op(logits, target, None, stats[:, :3], scale, IGNORE, 0.0)
    with pytest.raises(ValueError, match="scale must be float32"):
        op(logits, target, None, stats, scale[:3], IGNORE, 0.0)
    with pytest.raises(ValueError, match="scale must be float32"):
        op(logits, target, None, stats, scale.double(), IGNORE, 0.0)
    with pytest.raises(ValueError, match="weight must be"):
        op(logits, target, torch.ones(4, device=device), stats, scale, IGNORE, 0.0)
    with pytest.raises(ValueError, match="z-loss is not supported with class weights"):
        op(logits, target, torch.ones(5, device=device), stats, scale, IGNORE, 0.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="softcap must be"):
        op(logits, target, None, stats, scale, IGNORE, 0.0, -1.0, 0.0)
    if device == "cpu":  # the CUDA kernel gives such a row NaN (as its forward)
        with pytest.raises(IndexError, match="outside"):
            op(logits, torch.tensor([0, 1, 9, 2]), None, stats, scale, IGNORE, 0.0)


@pytest.mark.parametrize(
    ("weighted", "softcap", "zs"), [(False, 0.0, 0.0), (True, 0.0, 0.0), (False, 4.0, 0.1)]
)
def test_opcheck(cxx, device, weighted, softcap, zs):
    logits, target, weight, scale = _case(6, 7, torch.bfloat16, device, weighted=weighted)
    _, _, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, target, weight, IGNORE, 0.1, 0)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_bwd.default,
        (logits, target, weight, stats, scale, IGNORE, 0.1, softcap, zs),
    )


def test_the_checker_catches_a_second_rounding():
    """assert_rounded_once fails on the old error: the gradient rounded to float16, then
    scaled and rounded again."""
    logits, target, _, _ = _case(64, 100, torch.float16, "cpu", ignore=False)
    scale = torch.tensor([1.7])
    exact = exact_grad(logits, target, None, scale, 0.0)
    unit = exact_grad(logits, target, None, torch.ones(1), 0.0).half()
    with pytest.raises(AssertionError, match="off by more than"):
        assert_rounded_once((unit.float() * 1.7).half(), exact, "twice")
    assert_rounded_once(exact.half(), exact, "once")


def test_portable_loops(cxx, device, tmp_path):
    """CSL_FAST_CPU_PORTABLE=1 (a child process): the loads and stores a CPU without
    AVX2/F16C runs, on every row kind and both dtypes, rounded once as above."""
    if device != "cpu":
        pytest.skip("the portable loops are the CPU kernel's")
    script = tmp_path / "portable.py"
    script.write_text(
        "import torch\n"
        "from test_ops_backward import _case, cancelling, exact_extra, exact_grad, run\n"
        "from tolerances import assert_rounded_once\n"
        "import csl_fast.ops_backward as ob\n"
        "torch.manual_seed(0)\n"
        "for dtype in (torch.float16, torch.bfloat16):\n"
        "    for b, c in ((13, 10), (3, 2049)):\n"
        "        x, t, w, s = _case(b, c, dtype, 'cpu', weighted=True)\n"
        "        ours, _, _ = run('cpu', x, t, w, s, 0.1)\n"
        "        want = exact_grad(x, t, w, s, 0.1)\n"
        "        assert_rounded_once(ours, want, 'portable', atol=cancelling(s, w, 0.1, b, c))\n"
        "        x, t, _, s = _case(b, c, dtype, 'cpu', spread=10.0)\n"
        "        fwd = torch.ops.csl_fast.cross_entropy_fwd_extra\n"
        "        st = fwd(x, t, None, -100, 0.0, 0, 5.0, 0.1)[2]\n"
        "        args = (x, t, None, st, s, -100, 0.0, 5.0, 0.1)\n"
        "        ours = ob.cross_entropy_bwd(*args, backend='cpu')\n"
        "        want, atol = exact_extra(x, t, s, 0.0, 5.0, 0.1)\n"
        "        assert_rounded_once(ours, want, 'portable extras', atol=atol)\n"
        "print('portable ok')\n"
    )
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, CSL_FAST_CPU_PORTABLE="1", PYTHONPATH=path)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0 and "portable ok" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("extras", [{}, {"softcap": 5.0, "z_loss_scale": 1e-2}])
def test_compiled_backward(extras):
    """torch.compile(fullgraph=True) of a bfloat16 accumulate and its backward: the op's
    schema and fake kernel trace, and the gradient is eager's, bit for bit."""
    import csl_fast

    torch._dynamo.reset()
    x = (torch.randn(9, 11) * 3).bfloat16()
    y = torch.randint(0, 11, (9,))
    y[4] = IGNORE
    idx = torch.arange(9)

    def step(z):
        return csl_fast.accumulate(z, y, idx, torch.zeros(9), backend="cpu", **extras)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (step, compiled):
        z = x.clone().requires_grad_(True)
        (fn(z) * 1.7).backward()
        grads.append(z.grad)
    assert torch.equal(grads[0], grads[1])
    if extras:  # 'mean' over the 8 rows that are not ignored; 1.7 as a bfloat16 upstream
        scale = torch.tensor([1.7]).bfloat16().float() / 8
        exact, atol = exact_extra(x, y, scale, 0.0, *extras.values())
        assert_rounded_once(grads[1], exact, "compiled extras", atol=atol)
