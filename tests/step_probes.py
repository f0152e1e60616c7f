"""Probes for the one-call C++ steps (``csl_fast._C.step``, ``bce_step``): count the calls
a step completed, make it fail, and see which functions a call shows to a tensor subclass
or a torch function mode (the op-by-op path goes through torch.ops, where both see every
op; a step taken skips them)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.overrides import TorchFunctionMode

from csl_fast import _ext
from csl_fast.accumulate import _Fallbacks


def count_steps(monkeypatch, name: str) -> list[int]:
    """The calls that ``csl_fast._C.<name>`` completed (not those it declined, returning
    None, or raised on: a call that then went op by op did not take the fast path)."""
    calls: list[int] = []
    real = getattr(_ext._C, name)

    def counted(*args):
        loss = real(*args)
        if loss is not None:
            calls.append(1)
        return loss

    monkeypatch.setattr(_ext._C, name, counted)
    return calls


def break_step(monkeypatch, name: str) -> None:
    """``csl_fast._C.<name>`` raising on every call, as a bug in it would; the fallback
    counter starts from zero (so the first fallback warns) and is restored afterwards."""

    def broken(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(_ext._C, name, broken)
    monkeypatch.setattr(_Fallbacks, "count", 0)
    monkeypatch.setattr(_Fallbacks, "last_reason", None)


class Logged(torch.Tensor):
    """``Logged.seen``: the names of the functions seen since it was last cleared."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


class Seen(TorchFunctionMode):
    """A torch function mode that records the names of the functions it sees."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
