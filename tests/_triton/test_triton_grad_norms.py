"""csl_fast::input_grad_norms_triton against csl_fast.reference.input_grad_norms."""

from __future__ import annotations

import pytest
import torch

from csl_fast import reference
from csl_fast._triton import grad_norms, input_grad_norms_triton

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-6, atol=1e-7),  # float32 output, float32 scale argument
    torch.float16: dict(rtol=1e-5, atol=1e-6),  # same fp32 accumulation of exact upcasts
    torch.bfloat16: dict(rtol=1e-5, atol=1e-6),
}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", [(0, 3), (7, 1), (5, 3, 4, 5), (3, 0)])
def test_matches_reference(tdevice, dtype, shape):
    grad = torch.randn(shape).to(dtype).to(tdevice)
    out = input_grad_norms_triton(grad, 1.0 / 7)
    ref = reference.input_grad_norms(grad, 1.0 / 7)
    assert out.dtype == torch.float32 and out.shape == (shape[0],)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_noncontiguous_and_long_rows(tdevice, monkeypatch):
    monkeypatch.setattr(grad_norms, "MAX_BLOCK", 64)  # rows of 300: a 5-step loop
    grad = torch.randn(4, 10, 30, device=tdevice).permute(0, 2, 1)
    torch.testing.assert_close(
        input_grad_norms_triton(grad, 3.0), reference.input_grad_norms(grad, 3.0)
    )
    grad = torch.randn(10, 6, device=tdevice)[::2]
    torch.testing.assert_close(
        input_grad_norms_triton(grad, 0.5), reference.input_grad_norms(grad, 0.5)
    )


def test_opcheck_and_compile(tdevice):
    grad = torch.randn(5, 2, 3, device=tdevice)
    op = torch.ops.csl_fast.input_grad_norms_triton.default
    torch.library.opcheck(op, (grad, 2.0), test_utils=("test_schema", "test_faketensor"))
    backend = "aot_eager" if tdevice == "cpu" else "inductor"
    f = torch.compile(
        lambda g: torch.ops.csl_fast.input_grad_norms_triton(g * 2, 0.5).sqrt(),
        fullgraph=True,
        backend=backend,
    )
    torch.testing.assert_close(f(grad), reference.input_grad_norms(grad, 1.0).sqrt())
