"""A tensor subclass that records the functions it sees (tests that a call goes through
torch.ops, where a subclass's ``__torch_function__`` sees every op)."""

from __future__ import annotations

from typing import ClassVar

import torch


class Logged(torch.Tensor):
    """``Logged.seen``: the names of the functions seen since it was last cleared."""

    seen: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})
