"""How the Triton ops are registered.

On a GPU every op is a :func:`torch.library.triton_op` whose launches go through
:func:`torch.library.wrap_triton`, so ``torch.compile(fullgraph=True)`` traces into the
kernels (Inductor sees them as user-defined Triton kernels; no fake kernel is needed).

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` returns an interpreted function that
``wrap_triton`` cannot trace, so there the same implementation is registered as an opaque
:func:`torch.library.custom_op` with a fake kernel instead. Same name, same schema, same
numerics; only the tracing strategy differs.

Triton launches on the *current* CUDA device and that device's current stream, not on the
device of the tensors it is given. :func:`register` therefore runs every op's body inside
:func:`device_guard` of its first tensor argument's device (as the C++ glue does with
``CUDAGuard``; the callers put all of an op's tensors on one device), so tensors on
``cuda:1`` while ``cuda:0`` is current (an LM head placed on the last GPU) run on ``cuda:1``
and on the stream the caller made current there.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..fake_kernels import one_device

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    InterpretedFunction = ()  # type: ignore[assignment,misc]


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Makes ``device`` the current CUDA device for the ``with`` block (a no-op for CPU
    tensors, which only the interpreter runs). Triton then launches on ``device`` and on
    ``torch.cuda.current_stream(device)``, the stream the caller set for that device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def register(
    qualname: str,
    *,
    kernel: Any,
    mutates_args: Iterable[str] | str,
    fake: Callable[..., Any] | None,
) -> Callable[[Callable[..., Any]], Any]:
    """Register ``impl`` as ``qualname``: a ``triton_op`` for compiled Triton, or a
    ``custom_op`` plus ``fake`` when ``kernel`` is interpreted. ``impl`` runs under
    :func:`device_guard` of its first tensor argument's device."""

    def decorate(impl: Callable[..., Any]) -> Any:
        @functools.wraps(impl)  # the schema is inferred from impl's signature
        def fn(*args: Any, **kwargs: Any) -> Any:
            tensors = (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
            with device_guard(next(tensors).device):
                return impl(*args, **kwargs)

        if is_interpreted(kernel):
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            if fake is not None:
                op.register_fake(one_device(qualname, fake))
            return op
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)

    return decorate
