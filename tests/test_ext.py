"""Without the compiled extension: csl_fast imports, warns once, runs on the reference."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    sys.modules["csl_fast._C"] = None  # makes `import csl_fast._C` fail, as a broken build would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, torch.nn.functional as F
        import csl_fast, csl_fast.info
    ours = [w for w in caught if "csl_fast._C" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "pip install --no-build-isolation" in str(ours[0].message)
    backends = csl_fast.available_backends("cpu")  # triton too, under TRITON_INTERPRET=1
    assert "cpu" not in backends and "reference" in backends, backends
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, -100])
    csl = torch.zeros(3)
    loss = csl_fast.accumulate(z, y, torch.tensor([0, 1, 1, 2, 0, 2]), csl)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(z, y))
    assert csl[2] > 0 and csl[1] > 0
    report = csl_fast.info.report()
    assert "NOT loaded" in report and "Error" in report, report
    print("ok")
    """
)


def test_falls_back_to_reference_without_extension():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_auto_passes_over_triton_for_float64(monkeypatch):
    """Triton's cross-entropy kernels take no float64: "auto" picks the next backend."""
    import torch

    from csl_fast import _ext

    every = {"triton": None, "cuda": None, "cpu": "takes CPU tensors", "reference": None}
    monkeypatch.setattr(_ext, "backend_status", lambda device: every)
    monkeypatch.setattr(_ext, "_resolved", {})
    gpu = torch.device("cuda")
    assert _ext.resolve_backend("auto", gpu, torch.float32) == "triton"
    assert _ext.resolve_backend("auto", gpu, torch.float64) == "cuda"
    assert _ext.resolve_backend("auto", gpu) == "triton"  # no logits: the record ops
    assert _ext.resolve_backend("triton", gpu, torch.float64) == "triton"  # asked by name
    without_cuda = {**every, "cuda": "no CUDA kernels"}
    monkeypatch.setattr(_ext, "backend_status", lambda device: without_cuda)
    monkeypatch.setattr(_ext, "_resolved", {})
    assert _ext.resolve_backend("auto", gpu, torch.float64) == "reference"
