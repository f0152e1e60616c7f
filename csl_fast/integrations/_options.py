"""The checks the training-framework integrations run before training: on their tracker
options at construction, so that a typo fails before training starts, not at the first
step, and on the parallelism they are given."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..tracker import CSLTracker

#: What each integration sets itself when it creates the tracker.
_SET_BY_OWNER = ("num_samples", "num_classes", "device")


def check_tracker_options(
    owner: str, tracker: Any, kwargs: Any, name: str, given: dict[str, Any]
) -> dict[str, Any]:
    """``kwargs`` (the options, under the argument ``name``, of the tracker ``owner``
    creates), checked whole: a dict of :class:`~csl_fast.CSLTracker` keyword arguments
    other than the ones the owner sets, whose values the tracker accepts. ``tracker``: a
    tracker passed instead, with which neither ``kwargs`` nor ``given`` (the owner's
    other arguments that size the tracker, by name; None when not given, else checked
    too) may come, since they would be ignored."""
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(
            f"{owner}: {name} must be a dict of CSLTracker keyword arguments, got "
            f"{type(kwargs).__name__}"
        )
    keys = [k for k in kwargs if not isinstance(k, str)]
    if keys:  # (it said "got dict" of a dict)
        raise TypeError(
            f"{owner}: {name} must be a dict of CSLTracker keyword arguments, whose keys are "
            f"argument names (str), got the key {keys[0]!r}"
        )
    kwargs = dict(kwargs)
    if tracker is not None:
        if not isinstance(tracker, CSLTracker):
            raise TypeError(
                f"{owner}: the tracker must be a csl_fast.CSLTracker, got {type(tracker).__name__}"
            )
        ignored = [k for k, v in given.items() if v is not None] + sorted(kwargs)
        if ignored:
            raise ValueError(
                f"{owner}: {', '.join(ignored)} would be ignored with a tracker passed in "
                "(it is used as it is); pass either the tracker or the arguments to create one"
            )
        return kwargs
    params = set(inspect.signature(CSLTracker).parameters)
    fixed = sorted(set(kwargs) & set(_SET_BY_OWNER))
    unknown = sorted(set(kwargs) - params)
    if fixed or unknown:
        what = (
            f"{fixed} are set by {owner} (pass a tracker created with them to choose them)"
            if fixed
            else f"{unknown} are not CSLTracker arguments"
        )
        raise TypeError(
            f"{owner}: in {name}, {what}; the options are {sorted(params - set(_SET_BY_OWNER))}"
        )
    sizes = {"num_samples": 0, **{k: v for k, v in given.items() if v is not None}}
    try:  # every value, as the tracker checks it; on the meta device nothing is allocated
        CSLTracker(**sizes, device="meta", **kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{owner}: {exc}") from None
    return kwargs


def refuse_tensor_parallel(owner: str, tp_size: int) -> None:
    """Tensor parallelism gives the ``tp_size`` ranks of a group the same batch, which the
    tracker's sync over every rank would count ``tp_size`` times; the integrations sync
    over the whole world, as they take no data-parallel group."""
    if tp_size > 1:
        raise RuntimeError(
            f"{owner}: tensor parallelism (tp_size={tp_size}) gives the {tp_size} ranks of "
            "a tensor-parallel group the same batch, and the tracker's sync over every rank "
            f"would count each presentation {tp_size} times. Train data-parallel only "
            "(DDP, FSDP), or record with csl_fast.accumulate in your own loop and close "
            "epochs with tracker.end_epoch(group) over the data-parallel group"
        )
