"""How the Triton ops are registered.

On a GPU every op is a :func:`torch.library.triton_op` whose launches go through
:func:`torch.library.wrap_triton`, so ``torch.compile(fullgraph=True)`` traces into the
kernels (Inductor sees them as user-defined Triton kernels; no fake kernel is needed).

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` returns an interpreted function that
``wrap_triton`` cannot trace, so there the same implementation is registered as an opaque
:func:`torch.library.custom_op` with a fake kernel instead. Same name, same schema, same
numerics; only the tracing strategy differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - very old triton
    InterpretedFunction = ()  # type: ignore[assignment,misc]


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


def register(
    qualname: str,
    *,
    kernel: Any,
    mutates_args: Iterable[str] | str,
    fake: Callable[..., Any] | None,
) -> Callable[[Callable[..., Any]], Any]:
    """Register ``fn`` as ``qualname``: a ``triton_op`` for compiled Triton, or a
    ``custom_op`` plus ``fake`` when ``kernel`` is interpreted."""

    def decorate(fn: Callable[..., Any]) -> Any:
        if is_interpreted(kernel):
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            if fake is not None:
                op.register_fake(fake)
            return op
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)

    return decorate
