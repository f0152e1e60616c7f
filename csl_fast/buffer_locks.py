"""Writes into one buffer (or tracker) from several Python threads take turns.

The CPU kernels add without atomics, a tracker's state is read and then written, and the
ops release the GIL, so two threads writing into the same buffers at once would lose
updates (``nn.DataParallel`` replicas that compute the loss in ``forward`` do exactly
that). Every writer holds the lock of the buffer that names the write (a CSL buffer, a
tracker's ``csl_sum``) while it writes: the locks of the compiled extension
(csrc/buffer_locks.h), which its one-call C++ step takes itself, so the two paths exclude
each other. They are striped by address (buffers share a lock only by chance, which costs
contention, never correctness) and reentrant (a recorder may call ``accumulate`` from its
own ``record``). Without the extension, Python locks of the same shape.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch

from . import _ext

T = TypeVar("T")


class _Held:
    """The extension's lock of one address, as a context manager."""

    __slots__ = ("_address",)

    def __init__(self, address: int) -> None:
        self._address = address

    def __enter__(self) -> None:
        _ext._C.lock_buffer(self._address)

    def __exit__(self, *exc: object) -> None:
        _ext._C.unlock_buffer(self._address)


_PYTHON_LOCKS = tuple(threading.RLock() for _ in range(61))


def buffer_lock(buf: torch.Tensor) -> AbstractContextManager:
    """The lock of ``buf`` (a context manager; a no-op while torch.compile traces, where a
    graph has no addresses and its writes happen when the compiled code runs)."""
    if torch.compiler.is_compiling():
        return nullcontext()
    if _ext._C is None:
        return _PYTHON_LOCKS[buf.data_ptr() % len(_PYTHON_LOCKS)]
    return _Held(buf.data_ptr())


def locked(method: Callable[..., T]) -> Callable[..., T]:
    """A :class:`csl_fast.CSLTracker` method that writes the tracker, run under its lock
    (that of its ``csl_sum``, which ``accumulate`` and ``record_loss`` take too), so that
    threads that record, watch input gradients, close epochs or load take turns."""

    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        try:
            buffers = self._buffers
        except AttributeError:  # (on 'str': nothing said why) free on the per-step path
            from .tracker import CSLTracker

            if isinstance(self, CSLTracker):
                raise AttributeError(
                    f"csl_fast: this {type(self).__name__} has no buffers: its __init__ did "
                    "not run CSLTracker.__init__ (a subclass must call super().__init__(...))"
                ) from None
            raise TypeError(_not_a_tracker(method.__name__, self)) from None
        with buffer_lock(buffers["csl_sum"]):
            return method(self, *args, **kwargs)

    return under_lock


def _not_a_tracker(name: str, got: object) -> str:
    """What a tracker method called on the class (``CSLTracker.load(path)``) was given."""
    said = (
        f"csl_fast: CSLTracker.{name} is a method of a tracker, but its first argument is a "
        f"{type(got).__name__}, not a CSLTracker (called on the class?): call it on a tracker, "
        f"tracker.{name}(...)"
    )
    if name == "load":  # load fills a tracker; the class-level reader is another name
        said += (
            "; to make a new tracker from a file, use CSLTracker.from_file(path) or "
            "csl_fast.load(path)"
        )
    return said
