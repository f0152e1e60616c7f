"""Fake kernels behind one check: every tensor argument on one device.

A fake kernel (shapes and dtypes only) serves ``torch.compile`` and the ``meta`` device.
PyTorch dispatches a call that mixes a ``meta`` tensor with CPU tensors to it, where the
CPU and CUDA kernels would refuse the mix; unchecked, it would return uninitialised memory
as the op's result. :func:`register_fake` puts PyTorch's own rule (one device per call)
in front of it, naming the argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def one_device(qualname: str, fake: Callable[..., Any]) -> Callable[..., Any]:
    """``fake``, the fake kernel of op ``qualname`` (``"csl_fast::name"``), refusing a call
    whose tensor arguments are not all on one device, with a :class:`RuntimeError` that
    names the first argument off the first tensor's device."""

    @functools.wraps(fake)
    def checked(*args: Any, **kwargs: Any) -> Any:
        names = _argument_names(qualname)
        named = [*zip(names, args, strict=False), *kwargs.items()]
        tensors = [(name, a) for name, a in named if isinstance(a, torch.Tensor)]
        for name, tensor in tensors[1:]:
            if tensor.device != tensors[0][1].device:
                raise RuntimeError(
                    f"csl_fast: {name} is on {tensor.device} but {tensors[0][0]} is on "
                    f"{tensors[0][1].device}; move it with .to({tensors[0][1].device.type!r})"
                )
        return fake(*args, **kwargs)

    return checked


def register_fake(qualname: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """:func:`torch.library.register_fake` of ``qualname`` with :func:`one_device`."""

    def decorate(fake: Callable[..., Any]) -> Callable[..., Any]:
        torch.library.register_fake(qualname)(one_device(qualname, fake))
        return fake

    return decorate


@functools.cache
def _argument_names(qualname: str) -> tuple[str, ...]:
    namespace, name = qualname.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    return tuple(argument.name for argument in schema.arguments)
