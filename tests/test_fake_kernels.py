"""The fake kernels refuse a call that mixes devices, as the real kernels and PyTorch do.

A ``meta`` tensor among CPU tensors dispatches to the fake kernel; before the check it
returned uninitialised memory as the loss, gradient and statistics.
"""

from __future__ import annotations

import pytest
import torch

import csl_fast  # noqa: F401  (registers the ops and their fake kernels)
from csl_fast.stats import NUM_STATS

ops = torch.ops.csl_fast


def _inputs():
    return torch.randn(4, 5), torch.randint(0, 5, (4,))


@pytest.mark.parametrize("meta", ["logits", "target", "weight"])
def test_cross_entropy_with_one_meta_tensor_is_refused(meta: str) -> None:
    logits, target = _inputs()
    args = {"logits": logits, "target": target, "weight": torch.ones(5)}
    args[meta] = args[meta].to("meta")
    expected = (
        "target is on cpu but logits is on meta"
        if meta == "logits"
        else f"{meta} is on meta but logits is on cpu"
    )
    with pytest.raises(RuntimeError, match=expected):
        ops.cross_entropy_fwd(args["logits"], args["target"], args["weight"], -100, 0.0, 1)


def test_the_message_names_both_devices_and_the_fix() -> None:
    logits, target = _inputs()
    with pytest.raises(RuntimeError) as info:
        ops.cross_entropy_fwd_stats(logits, target.to("meta"), None, -100, 0.0, 0)
    assert str(info.value) == (
        "csl_fast: target is on meta but logits is on cpu; move it with .to('cpu')"
    )


def test_a_meta_buffer_of_a_cpu_scatter_is_refused() -> None:
    stats = torch.zeros(NUM_STATS, 3)
    index = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="csl is on meta but stats is on cpu"):
        ops.scatter_stats(stats, index, False, torch.zeros(3, device="meta"), None)


def test_other_fake_kernels_check_too() -> None:
    loss = torch.rand(3)
    index = torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match="csl is on meta but loss is on cpu"):
        ops.record_loss(loss, index, torch.zeros(3, device="meta"), None, None, None, None)
    logits = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="target is on meta but logits is on cpu"):
        ops.bce_fwd(logits, torch.rand(3, 2, device="meta"), None, None, 1)


def test_an_all_meta_call_still_gives_shapes() -> None:
    logits, target = (t.to("meta") for t in _inputs())
    loss, grad, stats = ops.cross_entropy_fwd(logits, target, None, -100, 0.0, 0)
    assert loss.shape == (4,) and grad.shape == (4, 5) and stats.shape == (NUM_STATS, 4)
    assert {loss.device.type, grad.device.type, stats.device.type} == {"meta"}


def test_the_interpreted_triton_op_checks_too() -> None:
    pytest.importorskip("triton")
    from csl_fast._triton import cross_entropy
    from csl_fast._triton._registry import is_interpreted

    if not is_interpreted(cross_entropy._ce_fwd_kernel):
        pytest.skip("compiled Triton ops are triton_op, traced without a fake kernel")
    logits, target = _inputs()
    with pytest.raises(RuntimeError, match="target is on meta but logits is on cpu"):
        ops.cross_entropy_fwd_triton(logits, target.to("meta"), None, -100, 0.0, 1)
