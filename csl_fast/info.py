"""``python -m csl_fast.info``: versions, and which kernel backends are built and why not."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
import textwrap
from pathlib import Path

import torch

from . import __version__, _ext


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fast_step_fallbacks() -> tuple[int, str | None]:
    """``(count, last reason)`` of the eager CPU calls to :func:`csl_fast.accumulate` and
    :func:`csl_fast.accumulate_bce` in this process that the one-call C++ step
    (``csl_fast._C.step``, ``bce_step``) failed on and the op-by-op path then completed:
    the same results, slower. Expected to stay
    ``(0, None)``; the first one also raises a ``RuntimeWarning``. Bad input is not
    counted (it raises from the op-by-op path's checks)."""
    from .accumulate import _Fallbacks

    return _Fallbacks.count, _Fallbacks.last_reason


def report() -> str:
    """A human-readable report of versions and backend availability."""
    fallbacks, reason = fast_step_fallbacks()
    lines = [
        f"csl_fast {__version__} (imported from {_ext.PACKAGE_DIR})",
        f"python   {platform.python_version()} ({sys.executable})",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {_version('triton')}",
        "compiled extension csl_fast._C: "
        + (
            f"loaded ({Path(_ext._C.__file__).name})"
            if _ext._C is not None
            else f"NOT loaded - {_ext.EXTENSION_ERROR}"
        ),
        *[textwrap.indent(textwrap.fill(a, 94), "  ") for a in [_ext.EXTENSION_ADVICE] if a],
        *([f"  CUDA kernels (csrc/cuda): {_cuda_kernels()}"] if _ext._C is not None else []),
        f"threads  {torch.get_num_threads()}",
        f"one-call CPU step fallbacks in this process: {fallbacks}"
        + ("" if reason is None else f" (last: {reason})"),
    ]
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        name = (
            torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine()
        )
        lines.append(f"\nbackends for {device} ({name}):")
        status = _ext.backend_status(device)
        default = _ext.resolve_backend("auto", torch.device(device))
        for backend, why in status.items():
            mark = "yes" if why is None else "no "
            tail = " (default)" if backend == default else ""
            lines.append(f"  {mark} {backend:<9}{tail}" + ("" if why is None else f"  - {why}"))
    lines.append(_linear_ce_paths(devices))
    return "\n".join(lines)


def _cuda_kernels() -> str:
    """Whether ``_C`` holds the CUDA C++ kernels, which a machine without a GPU cannot run
    but may have built (``TORCH_CUDA_ARCH_LIST``), and the usual reason it does not."""
    if _ext._has_kernel("cross_entropy_fwd", "CUDA"):
        return "built"
    if torch.version.cuda is None:
        return "not built (this torch has no CUDA)"
    return (
        "not built (at build time: no nvcc of torch's CUDA major version, no GPU visible and "
        "no TORCH_CUDA_ARCH_LIST, or CSL_FAST_NO_CUDA=1; pip install -v shows which)"
    )


def _linear_ce_paths(devices: list[str]) -> str:
    """linear_cross_entropy's weight-gradient accumulation: the path each device type
    would take for bf16 inputs and a float32 accumulator, and the paths taken so far."""
    from .linear_cross_entropy import accumulation_paths, weight_grad_path

    kinds = dict.fromkeys(torch.device(d).type for d in devices)
    would = ", ".join(f"{k}: {weight_grad_path(torch.bfloat16, torch.float32, k)}" for k in kinds)
    taken = accumulation_paths()
    done = "; ".join(f"{k[0]} {str(k[1])[6:]} -> {k[2]}: {p}" for k, p in taken.items())
    return (
        f"\nlinear_cross_entropy weight-gradient accumulation (bf16 inputs, float32 "
        f"accumulator): {would}\n  taken in this process: {done or 'none yet'}"
    )


def main() -> None:
    from .cli import main as cli_main

    # through the CLI, so that `python -m csl_fast.info | head` ends as quietly as the command
    cli_main(["info"])  # always 0


if __name__ == "__main__":
    main()
