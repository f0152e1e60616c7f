"""The :class:`~csl_fast.CSLTracker` state: :meth:`~CSLTracker.state_dict`, its complete
validation, and :meth:`~CSLTracker.load_state_dict`.

A state is checked whole before a tracker changes: every field's type and range, the set
of buffers its format version holds (:data:`VERSION_BUFFERS`; buffers introduced later get
their initial values, or NaN where the sum so far is unknown), every tensor's layout, dtype
kind and shape, the values no tracker holds (counts that are negative, non-integral or not
finite; integers out of range) and buffers that disagree
(:mod:`csl_fast.tracker_invariants`). Every failure is a :class:`TrackerStateError` naming
the field. Files: :mod:`csl_fast.tracker_file`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .distributed import note_loaded
from .stats import MARGIN_CAP, MAX_TRACKED_CLASSES
from .tracker_buffers import _MINUS_ONE, buffer_kinds, buffer_shape, initial_value
from .tracker_invariants import check_invariants, sample_chunks
from .user_frame import user_stacklevel

if TYPE_CHECKING:
    from .tracker import CSLTracker

#: Version of the :meth:`CSLTracker.state_dict` / :meth:`CSLTracker.save` format.
FORMAT_VERSION = 3
FORMAT_NAME = "csl_fast.CSLTracker"

HISTORIES = ("loss_history", "eval_loss_history", "input_grad_history")
_HISTORY_DTYPE = {
    "loss_history": torch.float16,
    "eval_loss_history": torch.float16,
    "input_grad_history": torch.float32,
}
#: The buffers each older format version holds (a ``history=True`` tracker's names; the
#: others are a subset). A buffer a tracker has but its file's version lacks was
#: introduced later and is filled with its initial value on load (NaN for those of
#: :data:`_UNKNOWN_WHEN_ADDED`). The current version
#: holds every buffer of the tracker.
VERSION_BUFFERS: dict[int, frozenset[str]] = {
    1: frozenset(
        {
            "csl_sum", "csl_count", "last_loss", "last_max_prob", "grad_norm_sum",
            "margin_sum", "p_true_sum", "p_true_sq_sum", "last_correct", "forgetting",
            "learned_epoch", "input_grad_sq_sum", "input_grad_norm_sum", "input_grad_count",
            "epoch_input_grad_sq_sum", "epoch_input_grad_count", "eval_csl_sum", "eval_count",
            "eval_last_loss", "eval_last_max_prob", "eval_last_correct", "epoch_loss_sum",
            "epoch_count", "eval_pass_loss_sum", "eval_pass_count",
        }
    ),
}  # fmt: skip
VERSION_BUFFERS[2] = VERSION_BUFFERS[1] | {
    "suggest_label", "suggest_votes", "suggest_hits", "label_csl_sum",
}  # fmt: skip


#: Buffers a later version added whose sum over the presentations already made is unknown:
#: NaN on load instead of their initial value, so that what is added later does not pass
#: for the whole run (NaN stays NaN; multi-label detection then says "not recorded").
_UNKNOWN_WHEN_ADDED = frozenset({"label_prob_sum"})
# Buffers finite at every sample: each presentation adds a bounded amount to them (a
# probability, its square, or the squared logit gradient norm of plain cross entropy, at
# most 2) or sets them to one (the top probability), so no sum over a tracker's counts, no
# merge and no sync overflows them, and a row is recorded only where it is finite. The
# other sums can overflow: a diverging run's finite losses near 3.4e38 sum to inf in
# float32, a margin of logits +-3e38 is inf itself, a merge's mean last loss overflows,
# and a sync's base + deltas turns inf into NaN.
_FINITE = frozenset({"p_true_sum", "p_true_sq_sum", "grad_norm_sum", "last_max_prob"})


class TrackerStateError(ValueError):
    """A tracker state dict does not fit this tracker (different N, newer format, ...)."""


class TrackerFileError(TrackerStateError):
    """A tracker file cannot be loaded: truncated, corrupted (checksum), not a csl_fast
    tracker file, newer format, inconsistent, or written for a different tracker."""


class TrackerFileNotFoundError(TrackerFileError, FileNotFoundError):
    """No file at the path (also a ``FileNotFoundError``)."""


class UnverifiedTrackerFileWarning(UserWarning):
    """A tracker file of format version 1 was loaded: it has no checksum to verify."""


# ============================================================================ validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(state: Mapping[str, Any], key: str, ok: Any, expected: str) -> Any:
    if key not in state:
        raise TrackerStateError(f"the state lacks the field {key!r} ({expected})")
    v = state[key]
    if not ok(v):
        raise TrackerStateError(
            f"the state's field {key!r} must be {expected}, got {type(v).__name__} {v!r:.60}"
        )
    return v


#: The state's ``num_classes``: what the constructor accepts (a number past 2**24 made a
#: tracker that ``load_state_dict`` took and saved, and that no file reader reopened).
_NUM_CLASSES = (
    "num_classes",
    lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_TRACKED_CLASSES),
    f"None or an int from 1 to 2**24 = {MAX_TRACKED_CLASSES}",
)


def _a_kind(kind: str) -> str:
    """``"an int dtype"``, ``"a float dtype (...)"``: a buffer's dtype kind in a sentence."""
    which = " (float16, bfloat16, float32 or float64)" if kind == "float" else ""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} dtype{which}"


def _not_a_state(state: Any) -> TrackerStateError:
    """The error for a ``state`` without the format tag, with what it is and the fix for
    the usual mix-ups."""
    if isinstance(state, (str, os.PathLike)):
        return TrackerStateError(
            f"got a path ({os.fspath(state)!r}), not a tracker state: load a file written by "
            "tracker.save() with tracker.load(path) (csl_fast.load(path) for a new tracker), "
            "a torch.save'd state_dict with tracker.load_state_dict(torch.load(path))"
        )
    from .tracker import CSLTracker  # (tracker imports this module)

    if isinstance(state, CSLTracker):
        return TrackerStateError(
            f"got a {type(state).__name__} object, not a tracker state: pass its state, "
            "tracker.load_state_dict(other.state_dict())"
        )
    if isinstance(state, Mapping):
        path = tracker_path(state)
        if path is not None:
            return TrackerStateError(
                f"got a dict (a training checkpoint?) that holds a tracker state at "
                f"ckpt{path}, not the state itself: pass ckpt{path}"
            )
        return TrackerStateError(
            f"not a csl_fast tracker state (no format tag; a dict with keys "
            f"{keys_text(state)}): pass what tracker.state_dict() returned"
        )
    return TrackerStateError(
        f"not a csl_fast tracker state (got a {type(state).__name__}): pass what "
        "tracker.state_dict() returned"
    )


def tracker_path(holder: Mapping[Any, Any]) -> str | None:
    """Where in ``holder`` a tracker state is, as the subscripts to reach it:
    ``"['tracker']"`` in a training checkpoint, ``"['callbacks']['CSLCallback[csl_tracker]']"``
    in a Lightning one (one level down); None when there is none."""
    for key, value in holder.items():
        if is_state(value):
            return f"[{key!r}]"
    for key, value in holder.items():
        if isinstance(value, Mapping):
            for inner, v in value.items():
                if is_state(v):
                    return f"[{key!r}][{inner!r}]"
    return None


def is_state(value: Any) -> bool:
    """Whether ``value`` is a tracker state (a mapping with the format tag)."""
    return isinstance(value, Mapping) and value.get("format") == FORMAT_NAME


def keys_text(holder: Mapping[Any, Any]) -> str:
    """The first keys of a dict for a message: ``['a', 'b', ...]``."""
    keys = [repr(k)[:40] for k in list(holder)[:8]]
    return f"[{', '.join(keys)}{', ...' if len(holder) > 8 else ''}]"


def _initial_values(names: list[str]) -> dict[str, int]:
    """Each buffer's initial value, as ``CSLTracker.__init__`` fills it
    (:func:`initial_value`). (Read from a new one-sample tracker before: a file's
    num_labels = 2**36 made it allocate 256 GiB, and a subclass whose constructor takes
    other arguments failed with a TypeError.)"""
    return {n: initial_value(n) for n in names}


def _version(state: Mapping[str, Any]) -> int:
    """The state's format version, refused when a newer csl_fast wrote it."""
    version = _field(state, "version", lambda v: _is_int(v) and v >= 1, "an int >= 1")
    if version > FORMAT_VERSION:
        raise TrackerStateError(
            f"the state was written in format version {version} by a newer csl_fast; this "
            f"csl_fast reads versions up to {FORMAT_VERSION}. Upgrade csl_fast to load it."
        )
    return version


def _num_labels(state: Mapping[str, Any], version: int) -> int | None:
    """The state's ``num_labels`` (absent in states written before per-label buffers
    existed: None)."""
    if "num_labels" not in state:
        return None
    labels = _field(
        state, "num_labels", lambda v: v is None or (_is_int(v) and v >= 1), "None or an int >= 1"
    )
    table = VERSION_BUFFERS.get(version)
    if labels is not None and table is not None and "label_csl_sum" not in table:
        # Its [N, L] buffers would be filled, not read: an 85 KB version 1 file with
        # N = 1000 and num_labels = 2**20 made a tracker of 8 GiB (any L: any size).
        raise TrackerStateError(
            f"the state's field 'num_labels' is {labels} in a state of format version "
            f"{version}, written before per-label buffers existed (it must be None); the "
            "state was edited or damaged"
        )
    return labels


def _data_tensor(where: str, v: Any) -> None:
    """Refuse a tensor that copying into a buffer would fail on halfway (after earlier
    buffers were overwritten): sparse and other non-strided layouts, meta tensors."""
    if isinstance(v, torch.Tensor) and (v.layout != torch.strided or v.is_meta):
        what = "is on the meta device (it holds no data)" if v.is_meta else f"has layout {v.layout}"
        raise TrackerStateError(f"{where} {what}; pass dense tensors that hold the values")


#: Samples :func:`_check_values` reduces at a time on the CPU: a few whole-chunk
#: reductions (one parallel region each) per chunk, where elementwise tests of
#: :data:`~csl_fast.tracker_invariants._CHUNK` samples took ~10 tiny parallel regions per
#: 65,536 samples and buffer (tens of thousands at N = 10M, 10-50x slower on busy CPUs).
#: Bounds the one temporary a chunk may need (its copy in the tracker's dtype, or its
#: rounding: 8 MiB at float64).
_VALUE_CHUNK = 1 << 20
_INT32_MAX = torch.iinfo(torch.int32).max


def _values_ok(name: str, s: torch.Tensor, kind: str, lo: int, dtype: torch.dtype) -> bool:
    """Whether the chunk ``s`` of buffer ``name`` holds only what :func:`_check_values`
    accepts, by whole-chunk reductions (False: some sample may be bad; the chunk is then
    walked elementwise to name it)."""
    if kind == "int":
        if s.dtype == torch.int32:
            return int(s.min()) >= lo  # (nothing in an int32 is past the int32 maximum)
        if s.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no min/max for them)
            s = s.to(torch.float64 if s.dtype == torch.uint64 else torch.int64)
        low, high = s.aminmax()
        return low.item() >= lo and high.item() <= _INT32_MAX
    held = s.to(dtype)
    # inf and NaN carry into the sum (a finite sum that overflows only sends the chunk to
    # the elementwise walk, which finds nothing)
    if not bool(held.sum().isfinite()):
        return False
    return name in _FINITE or (bool(held.min() >= 0) and torch.equal(held, held.round()))


def _check_values(name: str, src: torch.Tensor, kind: str, dtype: torch.dtype) -> None:
    """Refuse values no tracker holds: counts that are negative, non-integral or not
    finite once copied into the tracker's float ``dtype`` (a float64 count past float32's
    range would become inf), integers below their floor (-1 for "none yet", else 0) or past
    int32 (a copy would wrap them), and inf or NaN in the buffers of :data:`_FINITE`
    (accepted, such a sample scored NaN and dropped out of the ranking). Other sums may
    hold inf and NaN: adding finite margins can overflow to inf, then inf - inf. (These
    buffers are all [N]; checked by whole-chunk reductions, :data:`_VALUE_CHUNK` samples
    at a time, and only a chunk that fails one elementwise, a chunk of samples at a time,
    see :func:`sample_chunks`, to name its first bad sample.)"""
    if kind == "int":
        lo = -1 if name in _MINUS_ONE else 0
        allowed = f"an int32 >= {lo}"
    elif name.endswith("_count"):
        lo = 0
        allowed = f"a finite integral count >= 0 in the tracker's {dtype}"
    elif name in _FINITE:
        lo = 0
        allowed = (
            f"finite in the tracker's {dtype} (each presentation adds a probability or a "
            "squared gradient norm of at most 2 to it, or sets it to one: no run overflows it)"
        )
    else:
        return
    if name in _FINITE and src.dtype == dtype and bool(src.sum().isfinite()):
        return  # NaN and inf carry into the sum: one pass, no temporaries, rules them out
    for first, whole in sample_chunks(src, _VALUE_CHUNK):
        if _values_ok(name, src[whole], kind, lo, dtype):
            continue
        _name_bad_value(name, src[whole], kind, dtype, lo, first, allowed)


def _name_bad_value(
    name: str, chunk: torch.Tensor, kind: str, dtype: torch.dtype, lo: int, first: int, allowed: str
) -> None:
    """Raise naming the first sample of ``chunk`` (sample ``first`` of buffer ``name``
    onward) that :func:`_check_values` refuses, if any."""
    for start, part in sample_chunks(chunk):
        s = chunk[part]
        if kind == "int":
            # (in int64: against an int16 or int8 buffer the int32 maximum wrapped to -1,
            # against uint8 the -1 of learned_epoch to 255, and uint16 has no comparison)
            # (uint64 in float64: its values past int64's range would wrap to negatives)
            # (an int32 buffer, the common case, is compared as it is: no copy per chunk,
            # and only with its floor: no int32 is past the int32 maximum)
            if s.dtype == torch.int32:
                bad = s < lo
            else:
                wide = s.to(torch.float64 if s.dtype == torch.uint64 else torch.int64)
                bad = (wide < lo) | (wide > _INT32_MAX)
        else:
            held = s.to(dtype)
            bad = ~torch.isfinite(held)
            if name not in _FINITE:  # a count
                bad |= (held < 0) | (held != held.round())
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            shown = s[i].item() if kind == "int" else s[i].to(torch.float64).item()
            raise TrackerStateError(
                f"state buffer {name!r} holds {shown!r} at sample {first + start + i}, not "
                f"{allowed}; no tracker holds that: the state was edited or damaged, restore "
                "it from a copy"
            )


def _check_at_most(name: str, values: torch.Tensor, limit: int, why: str) -> None:
    """Refuse an integer buffer holding more than ``limit`` (``why``: what bounds it)."""
    if values.numel() == 0 or int(values.max()) <= limit:
        return  # (one reduction; the elementwise test below only names the sample)
    bad = values.to(torch.int64) > limit
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise TrackerStateError(
            f"state buffer {name!r} holds {int(values[i])} at sample {i}, past {why}; no "
            "tracker holds that: the state was edited or damaged, restore it from a copy"
        )


def _of_kind(t: torch.Tensor, kind: str) -> bool:
    """Whether ``t``'s dtype is of buffer kind ``kind`` ("float", "int" or "bool")."""
    return {
        # (float8 is refused: its reductions are not implemented, the checks crashed)
        "float": t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "int": not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
        "bool": t.dtype == torch.bool,
    }[kind]


def _dims(shape: tuple[int, ...]) -> str:
    return f"[N = {shape[0]}]" if len(shape) == 1 else f"[N = {shape[0]}, L = {shape[1]}]"


def validate_state(tracker: CSLTracker, state: Any) -> dict[str, Any]:
    """Check ``state`` (a :meth:`CSLTracker.state_dict`) against ``tracker`` completely,
    without changing it; returns what :func:`apply_state` needs.

    Raises :class:`TrackerStateError` naming the first problem found."""
    if not is_state(state):
        raise _not_a_state(state)
    if tracker.device.type == "meta":
        raise TrackerStateError(
            "this tracker is on the meta device, which holds no data: every value of the "
            "state would be dropped; load it into a tracker on 'cpu' or a GPU"
        )
    version = _version(state)
    n = _field(state, "num_samples", lambda v: _is_int(v) and v >= 0, "an int >= 0")
    if n != tracker.num_samples:
        raise TrackerStateError(
            f"the state is for num_samples={n} but this tracker has "
            f"num_samples={tracker.num_samples}; create the tracker with the same dataset size"
        )
    c = _field(state, *_NUM_CLASSES)
    if c is not None and tracker.num_classes is not None and c != tracker.num_classes:
        raise TrackerStateError(
            f"the state is for num_classes={c} but this tracker has "
            f"num_classes={tracker.num_classes}; create the tracker with the same num_classes "
            "(or num_classes=None, which takes the state's)"
        )
    _field(state, "dtype", lambda v: v in ("float32", "float64"), "'float32' or 'float64'")
    history = _field(state, "history", lambda v: isinstance(v, bool), "a bool")
    if history != tracker.history:
        raise TrackerStateError(
            f"the state has history={history} but this tracker has history={tracker.history}; "
            "create the tracker with the same history flag"
        )
    labels = _num_labels(state, version)
    if labels != tracker.num_labels:
        raise TrackerStateError(
            f"the state has num_labels={labels} but this tracker has "
            f"num_labels={tracker.num_labels}; create the tracker with the same num_labels"
        )
    # a tracker with history keeps a row per epoch (eval pass): rows of no values (N = 0,
    # or the NaN rows of epochs without input-gradient records) cost a list entry each, so
    # a few-KB file claiming 2**31 epochs would take ~17 GB to load (3e6: 5 GB before the
    # rows were shared)
    most = epoch_bound(history)
    epoch = _field(state, "epoch", lambda v: _is_int(v) and 0 <= v < most, f"an int in [0, {most})")
    passes = _field(
        state, "eval_passes", lambda v: _is_int(v) and 0 <= v < most, f"an int in [0, {most})"
    )
    igfe = _field(
        state,
        "input_grad_first_epoch",
        lambda v: _is_int(v) and -1 <= v <= epoch,
        f"an int in [-1, epoch = {epoch}]",
    )
    # From input_grad_first_epoch on every epoch keeps an input-gradient row (missing ones
    # are padded with NaN on load), with history=False too, where the epoch bound above is
    # 2**31: a 1.8 KB file claiming 2**24 epochs padded 2**24 rows (2**31: ~17 GB).
    if igfe >= 0 and epoch - igfe >= _MAX_HISTORY_ROWS:
        raise TrackerStateError(
            f"the state's field 'input_grad_first_epoch' = {igfe} is {epoch - igfe} epochs "
            f"before its epoch = {epoch}, which keeps an input-gradient row per epoch from "
            f"it: epoch - input_grad_first_epoch must be below 2**22 = {_MAX_HISTORY_ROWS} "
            "(the bound of a history=True state's epochs); the state was edited or damaged"
        )
    # (absent in states written before the flag existed: rows)
    sequences = "sequences" in state and _field(
        state, "sequences", lambda v: isinstance(v, bool), "a bool"
    )
    # (absent in states written before merges counted their runs: one run)
    runs = (
        _field(state, "runs", lambda v: _is_int(v) and 1 <= v < 2**31, "an int in [1, 2**31)")
        if "runs" in state
        else 1
    )
    # (absent in states written before it was kept, and None where unknown: the last eval
    # pass is then taken as the latest record of the model, as before)
    at_eval = state.get("eval_pass_presentations")
    if at_eval is not None:
        at_eval = _field(
            state,
            "eval_pass_presentations",
            lambda v: isinstance(v, float | int) and not isinstance(v, bool) and 0 <= v < math.inf,
            "a number >= 0 or None",
        )
    buffers, histories = state.get("buffers"), state.get("histories")
    if not isinstance(buffers, Mapping) or not isinstance(histories, Mapping):
        raise TrackerStateError("the state lacks its buffers or histories")
    kinds = tracker._buffer_kinds()
    table = VERSION_BUFFERS.get(version)
    expected = [k for k in kinds if table is None or k in table]
    missing = [k for k in expected if k not in buffers]
    missing += [k for k in HISTORIES if k not in histories]
    if missing:
        raise TrackerStateError(f"the state lacks entries {missing}")
    unknown = [k for k in buffers if k not in expected]
    unknown += [k for k in histories if k not in HISTORIES]
    if unknown:
        raise TrackerStateError(f"the state has unknown entries {unknown}")
    for name in expected:
        src, kind = buffers[name], kinds[name]
        shape = buffer_shape(name, n, labels)
        _data_tensor(f"state buffer {name!r}", src)
        if not isinstance(src, torch.Tensor) or tuple(src.shape) != shape:
            raise TrackerStateError(f"state buffer {name!r} is not a {_dims(shape)} tensor")
        if not _of_kind(src, kind):
            raise TrackerStateError(
                f"state buffer {name!r} has dtype {src.dtype}, not {_a_kind(kind)}"
            )
        _check_values(name, src, kind, tracker.dtype)
    # In range now: the invariants compare integer buffers in int32 (torch compares no
    # uint16/32/64 with another dtype: "Promotion for uint16, uint32, uint64 types")
    buffers = {
        k: v.to(torch.int32) if kinds[k] == "int" and v.dtype != torch.int32 else v
        for k, v in buffers.items()
    }
    for name in HISTORIES:
        h = histories[name]
        _data_tensor(f"state history {name!r}", h)
        if (
            not (isinstance(h, torch.Tensor) and h.is_floating_point() and h.dim() == 2)
            or h.shape[1] != n
        ):
            raise TrackerStateError(
                f"state history {name!r} is not a floating [epochs, N = {n}] tensor"
            )
    # end_epoch / end_eval_pass append one row per closed epoch (eval pass), loss curves
    # only with history=True and input-gradient rows from input_grad_first_epoch on: row k
    # is epoch (pass) k, or epoch input_grad_first_epoch + k. Another number of rows would
    # shift every row the next end_epoch appends. Only trailing input-gradient rows may be
    # missing (merge: a longer run without records); apply_state pads them with NaN.
    loss_rows = (epoch, f"epoch={epoch}") if history else (0, "history=False")
    keeps = {
        "loss_history": loss_rows,
        "eval_loss_history": (passes, f"eval_passes={passes}") if history else loss_rows,
        "input_grad_history": (
            (epoch - igfe, f"epoch={epoch} and input_grad_first_epoch={igfe}")
            if igfe >= 0
            else (0, "input_grad_first_epoch=-1")
        ),
    }
    for name, (rows, why) in keeps.items():
        have = histories[name].shape[0]
        if have > rows or (have < rows and name != "input_grad_history"):
            raise TrackerStateError(
                f"state history {name!r} has {have} rows but the state has {why}, which "
                f"keeps {rows or 'none'} (one per closed epoch or eval pass); the state was edited "
                "or assembled wrongly"
            )
    # Presentations are stamped with the epoch in progress: learning times past it would
    # name epochs that never ran.
    _check_at_most(
        "learned_epoch", buffers["learned_epoch"], epoch, f"the state's epoch={epoch} (in progress)"
    )
    classes = c if c is not None else tracker.num_classes
    if classes is not None and "suggest_label" in buffers:  # (version 1 states lack it)
        # A suggestion is a predicted class: one past C would be relabelled with no class.
        _check_at_most(
            "suggest_label", buffers["suggest_label"], classes - 1, f"num_classes={classes}"
        )
    check_invariants(buffers, histories, igfe)
    fill = _initial_values([k for k in kinds if k not in expected])
    fill.update({k: math.nan for k in fill if k in _UNKNOWN_WHEN_ADDED})
    return {
        "buffers": {k: buffers[k] for k in expected},
        "fill": fill,
        "histories": {k: histories[k] for k in HISTORIES},
        "epoch": epoch,
        "eval_passes": passes,
        "eval_pass_presentations": None if at_eval is None else float(at_eval),
        "input_grad_first_epoch": igfe,
        "sequences": sequences,
        "runs": runs,
        "num_classes": c,
        "version": version,
    }


def load_state_dict(tracker: CSLTracker, state: Any) -> None:
    """:meth:`CSLTracker.load_state_dict`: :func:`checked_state`, then :func:`apply_state`.
    Raises :class:`TrackerStateError`; the tracker is then unchanged."""
    apply_state(tracker, checked_state(tracker, state))


def checked_state(tracker: CSLTracker, state: Any) -> dict[str, Any]:
    """:func:`validate_state`, its error naming :class:`CSLTracker`."""
    try:
        return validate_state(tracker, state)
    except TrackerStateError as exc:
        raise type(exc)(f"CSLTracker: {exc}") from None


#: At most this many epochs (eval passes) in a state with histories (see validate_state).
_MAX_HISTORY_ROWS = 2**22
#: Epochs are below this in every state: presentations are stamped with the epoch as an
#: int32 (learned_epoch, the kernels' epoch argument).
_MAX_EPOCH = 2**31


def epoch_bound(history: bool) -> int:
    """The epochs (eval passes) a state holds are below this (``CSLTracker.epoch``'s
    setter refuses more, which save() would refuse): 2**31, as presentations are stamped
    with the epoch as an int32, and 2**22 with ``history=True`` (a row per epoch)."""
    return _MAX_HISTORY_ROWS if history else _MAX_EPOCH


def _history_rows(h: torch.Tensor) -> list[torch.Tensor]:
    """``[E, N]`` as E rows of their own; for N = 0 one empty row shared by all (rows are
    never written in place): E rows of no values took 1.8 KB each to load."""
    if h.shape[0] and h.shape[1] == 0:
        return [h[0].clone()] * h.shape[0]
    return [r.clone() for r in h]


def apply_state(tracker: CSLTracker, checked: dict[str, Any]) -> None:
    """Load a :func:`validate_state` result: build the new histories (the only
    allocations), then copy into the buffers, which validated layouts, shapes and dtypes
    cannot make fail."""
    live = tracker._buffers
    # no_grad: a state tensor that requires grad must not pull the buffers into autograd
    # (accumulate then refuses them), as in nn.Module.load_state_dict.
    with torch.no_grad():
        histories = {
            k: _history_rows(h.to(tracker.device, _HISTORY_DTYPE[k]))
            for k, h in checked["histories"].items()
        }
        igfe = checked["input_grad_first_epoch"]
        missing = checked["epoch"] - igfe - len(histories["input_grad_history"])
        if igfe >= 0 and missing > 0:  # epochs without any record: NaN, as end_epoch keeps
            # One row shared by them (rows are never written in place): a file of a few KB
            # whose header claimed 20,000 such epochs allocated 20,000 rows while loading.
            # (in the history's float32: the default dtype, float64 under
            # torch.set_default_dtype, made a list of rows of two dtypes)
            nan = torch.full(
                (tracker.num_samples,),
                math.nan,
                dtype=_HISTORY_DTYPE["input_grad_history"],
                device=tracker.device,
            )
            histories["input_grad_history"] += [nan] * missing
        for name, value in checked["buffers"].items():
            live[name].copy_(value)
        for name, value in checked["fill"].items():
            live[name].fill_(value)
            if name in _UNKNOWN_WHEN_ADDED:  # known after all where nothing was presented
                live[name][live["csl_count"] == 0] = 0
    tracker._histories = histories
    tracker.epoch = checked["epoch"]
    tracker.eval_passes = checked["eval_passes"]
    tracker.eval_pass_presentations = checked["eval_pass_presentations"]
    tracker.input_grad_first_epoch = checked["input_grad_first_epoch"]
    tracker.sequences = checked["sequences"]
    tracker.runs = checked["runs"]
    if tracker.num_classes is None:
        tracker.num_classes = checked["num_classes"]
    _warn_uncapped_margins(live.get("margin_sum"))
    note_loaded(tracker)


def _warn_uncapped_margins(margin_sum: torch.Tensor | None) -> None:
    """Warn of +inf margin sums, which no capped margin (``MARGIN_CAP``) adds up to: a
    state recorded before the cap, where a masked row (its label the only finite logit)
    made them infinite for good. One reduction over the buffer."""
    if margin_sum is None or not margin_sum.numel() or not bool(margin_sum.max() == math.inf):
        return
    n = int((margin_sum == math.inf).sum())
    warnings.warn(
        f"csl_fast: {n} samples' margin sums are +inf: a state recorded before csl_fast "
        f"capped each margin at {MARGIN_CAP:g}, where a row whose label held the only finite "
        "logit added +inf. Their AUM stays +inf, and evaluate refuses it; every other score "
        "is unaffected. To rank them as the cap would, as the most confident: "
        f"tracker.margin_sum.clamp_(max={MARGIN_CAP:g} * tracker.csl_count.max().item())",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


def state_dict(tracker: CSLTracker) -> dict[str, Any]:
    """:meth:`CSLTracker.state_dict`: the buffers are the tracker's live tensors (not
    copies), the histories stacked. While another thread records into the tracker, a
    ``torch.save`` of it can catch one step half written, which then loads with the step
    partly counted, or is refused where its buffers disagree; :meth:`CSLTracker.save` holds
    the tracker's lock while it copies and is the way to a consistent copy then."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_samples": tracker.num_samples,
        "num_classes": tracker.num_classes,
        "num_labels": tracker.num_labels,
        "dtype": str(tracker.dtype).removeprefix("torch."),
        "history": tracker.history,
        "epoch": tracker.epoch,
        "eval_passes": tracker.eval_passes,
        "eval_pass_presentations": tracker.eval_pass_presentations,
        "input_grad_first_epoch": tracker.input_grad_first_epoch,
        "sequences": tracker.sequences,
        "runs": tracker.runs,
        "buffers": dict(tracker._buffers),
        "histories": {k: tracker._stack(k, _HISTORY_DTYPE[k]) for k in HISTORIES},
    }


def from_state(cls: type[CSLTracker], state: Any, device: Any = "cpu", **kwargs: Any) -> CSLTracker:
    """A new tracker of the kind ``state`` describes, restored from it. The metadata is
    checked against the state's tensors before the tracker is allocated (a state that
    claims another N costs nothing). Raises :class:`TrackerStateError`."""
    tracker = new_tracker_for(cls, state, device, **kwargs)
    load_state_dict(tracker, state)
    return tracker


def new_tracker_for(
    cls: type[CSLTracker], state: Any, device: Any = "cpu", **kwargs: Any
) -> CSLTracker:
    """A new, empty tracker of the kind ``state`` describes (:func:`from_state` without the
    load). Only the state's metadata and its buffers' shapes are read: they may be tensors
    on the ``meta`` device. Raises :class:`TrackerStateError`."""
    fixed = sorted(set(kwargs) & {"num_samples", "num_classes", "dtype", "history", "num_labels"})
    if fixed:
        # (the constructor's "got multiple values for keyword argument" named no way out)
        raise TypeError(
            f"{', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set by the saved "
            "state, not by the caller: drop "
            f"{', '.join(f'{k}=' for k in fixed)} (the other keyword arguments, backend= and "
            "deterministic=, go to the CSLTracker constructor)"
        )
    if not is_state(state):
        raise _not_a_state(state)
    version = _version(state)
    shape_fields = (
        ("num_samples", lambda v: _is_int(v) and v >= 0, "an int >= 0"),
        ("dtype", lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
        ("history", lambda v: isinstance(v, bool), "a bool"),
        _NUM_CLASSES,
    )
    n, dtype, history, classes = (_field(state, *spec) for spec in shape_fields)
    labels = _num_labels(state, version)
    # The tracker allocates about as much as the state's buffers hold (a file's tensor
    # table: the file's size) only when the state holds every buffer it will restore, of
    # its shape and kind; a state that claims another N, or a large N with few buffers, is
    # refused before that allocation.
    buffers = state.get("buffers")
    if not isinstance(buffers, Mapping):
        raise TrackerStateError("the state lacks its buffers")
    kinds = buffer_kinds(history, labels is not None)
    table = VERSION_BUFFERS.get(version)
    expected = [k for k in kinds if table is None or k in table]
    missing = [k for k in expected if k not in buffers]
    if missing:
        raise TrackerStateError(f"the state lacks entries {missing}")
    for name in expected:
        t, shape = buffers[name], buffer_shape(name, n, labels)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise TrackerStateError(f"state buffer {name!r} is not a {_dims(shape)} tensor")
        if not _of_kind(t, kinds[name]):
            raise TrackerStateError(
                f"state buffer {name!r} has dtype {t.dtype}, not {_a_kind(kinds[name])}"
            )
    return cls(
        n,
        classes,
        device=device,
        dtype=getattr(torch, dtype),
        history=history,
        num_labels=labels,
        **kwargs,
    )
