"""Tolerance helpers shared by the kernel tests."""

import torch

# Floor under which differences are rounding noise of the output format itself.
_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_no_worse_than_torch(ours, torch_same_dtype, exact, what: str, factor: float = 2.0):
    """Our error against a float64 computation is at most ``factor`` times PyTorch's own
    same-dtype error, plus a floor scaled to the output dtype (flash-attention's rule)."""
    if exact.numel() == 0:
        assert ours.numel() == 0
        return
    both_nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(ours.double()), both_nan), f"{what}: NaN pattern differs"
    ours, theirs, exact = (t.double()[~both_nan] for t in (ours, torch_same_dtype, exact))
    if exact.numel() == 0:
        return
    scale = exact.abs().max().clamp_min(1.0)
    err_ours = (ours - exact).abs().max()
    err_torch = (theirs - exact).abs().max()
    limit = factor * err_torch + _ATOL[torch_same_dtype.dtype] * scale
    assert err_ours <= limit, (
        f"{what}: error {err_ours:.3g} > {limit:.3g} (torch's {err_torch:.3g})"
    )


def assert_close_f32(ours, exact, what: str, rtol: float = 2e-6):
    """Float32 buffers against a float64 computation."""
    scale = exact.double().abs().max().clamp_min(1.0) if exact.numel() else 1.0
    err = (ours.double() - exact.double()).abs().max() if exact.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {float(err):.3g} > {rtol * float(scale):.3g}"
