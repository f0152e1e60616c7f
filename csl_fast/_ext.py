"""Which kernel backends this installation has, and why one is missing.

Backends, in the order ``backend="auto"`` prefers them:

- ``"triton"``: Triton kernels; the default for CUDA tensors.
- ``"cuda"``: CUDA C++ kernels from ``csrc/cuda`` (built when torch has CUDA and nvcc exists).
- ``"cpu"``: fused C++ kernels from ``csrc/cpu``; the default for CPU tensors.
- ``"reference"``: pure PyTorch (``csl_fast/reference.py``); always available.

Triton also runs on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests only), so it is
offered for CPU tensors only when asked for by name.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")

_C = None
#: Why ``csl_fast._C`` could not be loaded, or None when it loaded.
EXTENSION_ERROR: str | None = None
try:
    _C = importlib.import_module("csl_fast._C")
except Exception as exc:
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"csl_fast: the compiled extension csl_fast._C is not available ({EXTENSION_ERROR}); "
        "falling back to the pure-PyTorch reference, which is slower. Rebuild it with "
        "`pip install --no-build-isolation .`; `python -m csl_fast.info` says more.",
        RuntimeWarning,
        stacklevel=2,
    )

_TRITON_ERROR: str | None = None
_triton_checked = False


def _has_kernel(op: str, key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"csl_fast::{op}", key)


def triton_error() -> str | None:
    """Why the Triton backend is unavailable, or None when it can be used."""
    global _TRITON_ERROR, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("csl_fast._triton")
            importlib.import_module("csl_fast.ops").register_triton_autograd()
        except Exception as exc:
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON_ERROR


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """For each backend, None if it can run on ``device``, else the reason it cannot."""
    dev = torch.device(device)
    status: dict[str, str | None] = {"reference": None}
    ext = None if _C is not None else f"compiled extension not loaded ({EXTENSION_ERROR})"
    if dev.type == "cuda":
        status["cuda"] = ext or (
            None
            if _has_kernel("cross_entropy_fwd", "CUDA")
            else "csl_fast._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
        )
        status["triton"] = triton_error()
        status["cpu"] = "the cpu backend takes CPU tensors"
    else:
        status["cpu"] = ext or (
            None if _has_kernel("cross_entropy_fwd", "CPU") else "no CPU kernel registered"
        )
        status["cuda"] = "the cuda backend takes CUDA tensors"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        status["triton"] = (
            triton_error() if interp else "Triton runs on CPU tensors only with TRITON_INTERPRET=1"
        )
    return {name: status[name] for name in BACKENDS}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device``, in the order ``backend="auto"`` tries them."""
    return [name for name, why in backend_status(device).items() if why is None]


_resolved: dict[tuple[str, str], str] = {}


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (a name or ``"auto"``) on ``device``.

    Cached, and a constant to torch.compile, so it costs nothing per step.
    """
    key = (backend, device.type)
    name = _resolved.get(key)
    if name is None:
        name = _resolve(backend, device)
        # Only Triton on CPU tensors depends on the environment (TRITON_INTERPRET), which
        # may change at run time; "auto" never picks it there.
        if not (backend == "triton" and device.type != "cuda"):
            _resolved[key] = name
    return name


# What torch.compiler.assume_constant_result sets; the decorator itself would import
# torch._dynamo (seconds) on every `import csl_fast`. tests/test_ops.py compiles with
# fullgraph=True, which fails if this stops working.
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        for name in BACKENDS:
            # The Triton interpreter is far too slow to be chosen for CPU tensors.
            if name == "triton" and device.type != "cuda":
                continue
            if backend_status(device)[name] is None:
                return name
    if backend not in BACKENDS:
        raise ValueError(f"csl_fast: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    why = backend_status(device)[backend]
    if why is not None:
        raise RuntimeError(
            f"csl_fast: backend {backend!r} cannot run on {device.type} tensors: {why}. "
            f"Available here: {available_backends(device)}; backend='auto' picks the fastest."
        )
    return backend
