"""Every Triton op launches on its tensors' device and that device's current stream.

Triton launches on the *current* CUDA device; ``csl_fast._triton._registry.register`` runs
each op under ``device_guard`` of its first tensor argument. On the CPU the guard's device
choice and its wiring into every op are checked with stand-ins; with two GPUs the real
thing runs (``benchmarks/gpu_check.sh`` runs this file there).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from csl_fast import ops, reference
from csl_fast._triton import _registry, cross_entropy, grad_norms, record, scatter
from csl_fast.stats import NUM_STATS, Stat

INTERPRETED = _registry.is_interpreted(cross_entropy._ce_fwd_kernel)


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with _registry.device_guard(torch.device("cuda", 1)):
        pass
    with _registry.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def _every_op(device):
    """(name, call) for each registered Triton op on tiny inputs."""
    logits = torch.randn(5, 7, device=device)
    target = torch.randint(0, 7, (5,), device=device)
    stats = torch.zeros(NUM_STATS, 5, device=device)
    stats[Stat.VALID] = 1.0
    index = torch.tensor([0, 2, 2, 1, 3], device=device)
    n = 4

    def record_last():
        ops.record_last(
            stats, index, None, 0, torch.zeros(n, device=device), torch.zeros(n, device=device),
            torch.zeros(n, dtype=torch.bool, device=device), None, None, backend="triton",
        )  # fmt: skip

    return [
        ("cross_entropy_fwd_triton",
         lambda: torch.ops.csl_fast.cross_entropy_fwd_triton(logits, target, None, -100, 0.0, 1)),
        ("cross_entropy_fwd_inplace_triton",
         lambda: torch.ops.csl_fast.cross_entropy_fwd_inplace_triton(
             logits.clone(), target, None, -100, 0.0, 0)),
        ("scatter_stats_triton atomic",
         lambda: torch.ops.csl_fast.scatter_stats_triton(
             stats, index, False, torch.zeros(n, device=device), None)),
        ("scatter_stats_triton sorted",
         lambda: torch.ops.csl_fast.scatter_stats_triton(
             stats, index, True, None, torch.zeros(n, device=device))),
        ("mean_denominator_triton",
         lambda: torch.ops.csl_fast.mean_denominator_triton(target, None, -100, 7)),
        ("input_grad_norms_triton",
         lambda: torch.ops.csl_fast.input_grad_norms_triton(logits, 2.0)),
        ("record_last_triton", record_last),
    ]  # fmt: skip


@pytest.mark.skipif(not INTERPRETED, reason="stand-ins for the CPU interpreter")
def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Each op enters the guard once, for its tensors' device, and launches inside it."""
    entered: list[torch.device] = []
    depth = [0]

    @contextlib.contextmanager
    def recording_guard(device):
        entered.append(device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    launches = [0]

    def checked_wrap_triton(kernel):
        assert depth[0] == 1, "a Triton kernel launched outside device_guard"
        launches[0] += 1
        return real_wrap_triton(kernel)

    real_wrap_triton = scatter.wrap_triton
    monkeypatch.setattr(_registry, "device_guard", recording_guard)
    for module in (cross_entropy, grad_norms, record, scatter):
        monkeypatch.setattr(module, "wrap_triton", checked_wrap_triton)
    for name, call in _every_op("cpu"):
        entered.clear()
        launches[0] = 0
        call()
        assert entered == [torch.device("cpu")], name
        # The mean's denominator is a launch of its own, before the fused kernel.
        assert launches[0] == (2 if name == "cross_entropy_fwd_triton" else 1), name


two_gpus = pytest.mark.skipif(
    INTERPRETED or torch.cuda.device_count() < 2, reason="needs two GPUs and compiled Triton"
)


@two_gpus
def test_ops_on_the_second_gpu_match_the_reference():
    """Tensors on cuda:1 while cuda:0 is current, on a side stream of cuda:1."""
    assert torch.cuda.current_device() == 0
    dev = torch.device("cuda", 1)
    side = torch.cuda.Stream(dev)
    logits = torch.randn(33, 97, device=dev)
    target = torch.randint(0, 97, (33,), device=dev)
    index = torch.randint(0, 10, (33,), device=dev)
    with torch.cuda.stream(side):  # current stream of cuda:1; cuda:0 stays current
        torch.cuda.current_stream(dev).wait_stream(torch.cuda.default_stream(dev))
        loss, grad, stats = torch.ops.csl_fast.cross_entropy_fwd_triton(
            logits, target, None, -100, 0.0, 1
        )
        csl = torch.zeros(10, device=dev)
        torch.ops.csl_fast.scatter_stats_triton(stats, index, True, csl, None)
        norms = torch.ops.csl_fast.input_grad_norms_triton(grad, 3.0)
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(dev)
    ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
        logits.cpu(), target.cpu(), None, -100, 0.0, 1
    )
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-5, atol=1e-6)
    ref_csl = torch.zeros(10).index_add_(0, index.cpu(), ref_stats[Stat.LOSS])
    torch.testing.assert_close(csl.cpu(), ref_csl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.cpu(), reference.input_grad_norms(ref_grad, 3.0))


@two_gpus
def test_accumulate_on_the_second_gpu():
    import csl_fast

    dev = torch.device("cuda", 1)
    logits = torch.randn(16, 11, device=dev, requires_grad=True)
    target = torch.randint(0, 11, (16,), device=dev)
    index = torch.arange(16, device=dev)
    tracker = csl_fast.CSLTracker(16, device=dev)
    loss = csl_fast.accumulate(logits, target, index, tracker, backend="triton")
    loss.backward()
    ref = torch.nn.functional.cross_entropy(logits.detach().cpu(), target.cpu(), reduction="none")
    torch.testing.assert_close(tracker.training_buffers()[0].cpu(), ref, rtol=1e-5, atol=1e-5)
