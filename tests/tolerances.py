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


def assert_rounded_once(ours, exact, what: str, slack: float = 0.125, atol=0.0):
    """``ours`` (float16/bfloat16) is ``exact`` (float64) rounded once: every element within
    half a step of its dtype at the exact value, plus ``slack`` of a step for the float32
    arithmetic before the rounding (~2^-20 relative: 1/500 of a float16 step), plus ``atol``
    (a tensor broadcast to ``exact``: where float32 terms cancel, such as label smoothing's
    ``W p_j - w_j``, their float32 error). Rounding twice (in float32 and again after a
    scale, or to the dtype then scaled) breaks it."""
    assert ours.shape == exact.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    if exact.numel() == 0:
        return
    nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(ours), nan), f"{what}: NaN pattern differs"
    info = torch.finfo(ours.dtype)
    atol = torch.as_tensor(atol, dtype=torch.float64).expand(exact.shape)[~nan]
    v = exact[~nan].double()
    got = ours[~nan].double()
    binade = torch.floor(torch.log2(v.abs().clamp_min(info.tiny)))
    step = info.eps * torch.exp2(binade)
    # float32 intermediates underflow below its own smallest normal, before any rounding.
    floor = max(info.smallest_normal * info.eps, torch.finfo(torch.float32).tiny)
    limit = (0.5 + slack) * step + floor + atol
    err = (got - v).abs()
    worst = int(torch.argmax(err / limit))
    assert bool((err <= limit).all()), (
        f"{what}: {int((err > limit).sum())} element(s) off by more than {0.5 + slack} step; "
        f"worst {float(got[worst])} vs exact {float(v[worst])} (step {float(step[worst]):.3g})"
    )


def assert_tiny_no_worse_than_torch(ours, torch_same_dtype, exact, what: str):
    """Float32 results near and below float32's smallest normal: each element's error
    against a float64 computation is at most twice PyTorch's own error on it, plus a few
    ulp of the value (relative, so subnormal results are compared, not floored away)."""
    ulp = torch.finfo(torch.float32).smallest_normal * 2.0**-23  # a subnormal step
    ours, theirs, exact = (t.double() for t in (ours, torch_same_dtype, exact))
    limit = 2 * (theirs - exact).abs() + 4 * ulp + 4 * 2.0**-24 * exact.abs()
    bad = (ours - exact).abs() > limit
    assert not bad.any(), (
        f"{what}: {ours[bad].tolist()[:4]} where exactly {exact[bad].tolist()[:4]} "
        f"(torch {theirs[bad].tolist()[:4]})"
    )
