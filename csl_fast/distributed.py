r"""Combine the per-rank :class:`~csl_fast.CSLTracker`\ s of a ``torch.distributed`` job.

Under DDP, FSDP or any other data-parallel scheme each rank sees its own shard of every
epoch and updates its own tracker: :func:`csl_fast.accumulate` only sees the logits, so the
model wrapper needs nothing special. :func:`sync` (also :meth:`CSLTracker.sync`, called by
:meth:`CSLTracker.end_epoch` whenever a process group is initialised) combines the ranks so
that afterwards **every rank holds the same tracker, equal to a single-process tracker that
saw every rank's presentations** (up to the order of floating-point additions).

Sync windows and deltas
-----------------------
A *sync window* is the time between two syncs of a tracker. Each sync combines only what
changed in its window: the tracker remembers the synced (global) state of the previous sync
as a *baseline* (allocated on the first sync; 74 bytes per sample in float32, 90 with
``history=True``, 126 in float64, plus 8·L with ``num_labels=L``), each rank contributes
``local - baseline`` and the result is ``baseline + sum over ranks``. Calling :func:`sync`
twice in a row therefore changes nothing the second time, and syncing more often (by hand,
mid-epoch) gives the same sums and counts as syncing once per epoch. The values combined by
ownership (below) follow the order of the windows: with ``DistributedSampler`` they are
unchanged too (but the suggested-label vote of a padding repeat, below); where a custom
sampler shows a sample on two ranks in one epoch, a sync between the two presentations can
change which rank's come last. Buffers that :meth:`~CSLTracker.end_epoch` /
:meth:`~CSLTracker.end_eval_pass` reset (``epoch_*``, ``eval_pass_*``) use a zero baseline
once the epoch (eval pass) they were synced in has been closed.

Combination rules
-----------------
- **Sums and counts** (``csl_sum``, ``csl_count``, every other ``*_sum`` / ``*_count``,
  the ``[N, L]`` per-label sums ``label_csl`` and ``label_prob`` of a tracker with
  ``num_labels`` too):
  ``all_reduce(SUM)`` of the window's deltas. ``DistributedSampler`` pads the last batches
  with repeats of the first samples, and those repeats are real presentations: they are
  added and counted, so every mean (``csl_mean``, ``aum``, ``confidence``, ...) stays the
  mean over the presentations that happened.
- **Per-sample state that does not add** (``last_loss``, ``last_max_prob``,
  ``last_correct``, ``forgetting``, ``learned_epoch`` and the ``eval_last_*`` values) is
  combined by **ownership of the presentation**. Presentations are ordered by
  ``(sync window, rank, batch order on that rank)``: within a window, all of rank 0's
  presentations come before rank 1's, and so on. The *owner* of a sample in a window is the
  highest rank that presented it; its last values win. ``forgetting`` counts the
  correct -> incorrect transitions along that order (each rank's own transitions, plus the
  transitions where one rank's presentations meet the next rank's), and ``learned_epoch``
  is the epoch in which the final correct streak along that order began. The
  suggested-label vote (``suggest_label``, ``suggest_votes``, ``suggest_hits``) is the
  owner's: exact when one rank presented the sample in the window (``DistributedSampler``
  but for its padding repeats); otherwise the other ranks' votes of that window are lost.

  With ``DistributedSampler`` (shuffled or not, any seed and world size) and one sync per
  epoch (the default, through ``end_epoch``) this order *is* the order of a single-process
  run over the global batches ``(epoch, step, rank 0's rows, rank 1's rows, ...)``: a rank
  never gets the same sample twice in one epoch, and a padding repeat always lands on a
  higher rank, at a later (or the same) step, than the sample's regular presentation. So the
  synced tracker equals that single-process run exactly, but for the suggested-label vote
  of the padding repeats (fewer than ``W`` samples per epoch; a repeat shares its epoch's
  window with the regular presentation, whose vote is then lost, so their
  ``suggest_votes`` / ``suggest_hits`` can be off by one presentation's per epoch, either
  way (a lost vote can also be one that would have cancelled another), and, rarely,
  ``suggest_label`` differ).

  The one case the rule cannot reconstruct from per-rank state is a sample presented on
  several ranks in one window *and* several times on one of the later ranks (a custom
  sampler that repeats samples within an epoch; ``end_epoch`` syncs, so a window never
  spans two epochs): the first presentation on that rank is not kept, so a transition at
  the seam may be missed or added. ``sync`` then warns with the number of such samples;
  their ``forgetting`` is off by at most one per rank (checked over every correctness
  sequence of up to 2 + 3 presentations on 2 ranks). A ``sync()`` on every rank between
  the repeats keeps each window to one presentation per rank, which is exact. A tracker of
  sequences does not count presentations (``csl_count`` counts tokens): a window that one
  presentation explains is taken as one, and only the others are warned about.

Checkpoints
-----------
Save a tracker after :meth:`~CSLTracker.end_epoch` (or after a :func:`sync`) on one rank:
it then holds the global state. To resume, load the same file on **every** rank and call
:func:`mark_synced` before training, so that the next sync does not count the loaded state
once per rank. A tracker loaded (:meth:`~CSLTracker.load`,
:meth:`~CSLTracker.load_state_dict`, :meth:`~CSLTracker.from_file`) and not marked since, or
one that has closed epochs but was never synced or marked, makes :func:`sync` raise
rather than guess.

Agreement and timeouts
----------------------
Before any other collective, :func:`sync` and :func:`mark_synced` all-gather a small
fingerprint from every rank: the call, ``num_samples``, ``num_classes`` (a tracker without
it agrees with any), the dtype, ``history``, ``num_labels``, the set of buffers, ``epoch``,
``eval_passes``, whether the tracker was synced before and whether it was loaded and not
marked since (:func:`mark_synced` adds its count totals). When the ranks differ, every
rank raises the same :class:`SyncError` naming the fields and each rank's value, instead
of entering collectives of mismatched sizes (which gloo answers with an abort).

Every collective waits at most :func:`get_timeout` seconds (default
:data:`DEFAULT_TIMEOUT`, 1800: torch's own default, so csl_fast never stops a job that
torch would let wait; set it with :func:`set_timeout`, the environment variable
``CSL_FAST_SYNC_TIMEOUT`` or the ``timeout`` argument), then raises
:class:`SyncTimeoutError`: the usual cause is a rank that skipped ``end_epoch()`` (which
syncs), or one that exited or crashed. The process group cannot be reused after it. Keep
it above the longest time one rank may legitimately spend before its ``end_epoch`` while
the others wait (an evaluation or a checkpoint on rank 0, for instance).

Collectives per sync: one ``all_gather`` of the fingerprint (a few integers), one
``all_gather`` of one byte per sample, and one ``all_reduce(SUM)`` per buffer, in place
(each float buffer's change, the forgetting changes as int64, the owners' learned epochs
and suggested-label votes; a forgetting count past int32 raises :class:`SyncError` on
every rank, the trackers unchanged): the changes are reduced where they were computed,
without a concatenated copy (``benchmarks/results/sync_memory.md``). NCCL and gloo both
work; with NCCL a CPU tracker is moved to the current CUDA device for the collectives. A
tracker on the ``meta`` device, or an NCCL group where torch has no CUDA, raises
:class:`SyncError` on every rank.
"""

from __future__ import annotations

import numbers
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .bits import as_bits

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = [
    "DEFAULT_TIMEOUT",
    "SyncError",
    "SyncTimeoutError",
    "UnsyncedStateWarning",
    "get_timeout",
    "is_distributed",
    "mark_synced",
    "set_timeout",
    "sync",
    "sync_epoch",
]

#: Seconds csl_fast's collectives wait for every rank before raising
#: :class:`SyncTimeoutError`, unless :func:`set_timeout` or the environment variable
#: ``CSL_FAST_SYNC_TIMEOUT`` (seconds) says otherwise. torch's default process-group
#: timeout: a slow but healthy rank is never cut short earlier than torch would.
DEFAULT_TIMEOUT = 1800.0
_timeout: float | None = None


class SyncError(RuntimeError):
    """The ranks cannot be combined: their trackers or their calls differ. Every rank
    raises the same error."""


class SyncTimeoutError(SyncError, TimeoutError):
    """A collective of :func:`sync` / :func:`mark_synced` did not complete in time: some
    rank did not make the same call (most often it skipped ``end_epoch``) or died."""


class UnsyncedStateWarning(RuntimeWarning):
    """:meth:`CSLTracker.save` or :meth:`CSLTracker.state_dict` under a process group of
    more than one rank, of a tracker that recorded training or eval presentations since
    its last :func:`sync`: the state holds this rank's part of them only. Call
    ``tracker.sync()`` on every rank before saving."""


def set_timeout(seconds: float | None) -> None:
    """Set how long :func:`sync` and :func:`mark_synced` wait for the other ranks
    (``None``: back to ``CSL_FAST_SYNC_TIMEOUT`` or :data:`DEFAULT_TIMEOUT`)."""
    global _timeout
    _timeout = None if seconds is None else _seconds("set_timeout", "seconds", seconds)


def _seconds(fn: str, name: str, seconds: Any) -> float:
    """A wait in seconds, checked before any collective: True is an int (it set a
    1-second wait), NaN never timed out, and 0 raised SyncTimeoutError on every rank as
    if one had not joined."""
    if isinstance(seconds, bool) or not (isinstance(seconds, numbers.Real) and seconds > 0):
        raise ValueError(
            f"csl_fast.distributed.{fn}: {name} must be > 0, got {seconds!r} (a number of seconds)"
        )
    return float(seconds)


def get_timeout() -> float:
    """The wait of csl_fast's collectives in seconds (see :func:`set_timeout`)."""
    if _timeout is not None:
        return _timeout
    env = os.environ.get("CSL_FAST_SYNC_TIMEOUT")
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"CSL_FAST_SYNC_TIMEOUT must be a number of seconds > 0, got {env!r}")
        return value
    return DEFAULT_TIMEOUT


_STATE_ATTR = "_csl_sync_state"
# Set by a load (csl_fast/tracker_state.py), cleared by mark_synced: the loaded state is
# already global, and only mark_synced can say so on every rank.
_LOADED_ATTR = "_csl_loaded"
# Per-epoch / per-eval-pass scratch buffers that end_epoch / end_eval_pass reset to zero.
_RESET_BY_EPOCH = ("epoch_input_grad_sq_sum", "epoch_input_grad_count", "epoch_loss_sum",
                   "epoch_count")  # fmt: skip
_RESET_BY_EVAL = ("eval_pass_loss_sum", "eval_pass_count")
_LAST_FLOATS = ("last_loss", "last_max_prob", "eval_last_loss", "eval_last_max_prob")
# The suggested-label vote (CSLTracker.suggestions): the owner's state wins, like a last value.
_OWNED_INTS = ("suggest_label", "suggest_votes", "suggest_hits")
_OWNED = (
    *_LAST_FLOATS, *_OWNED_INTS, "last_correct", "eval_last_correct", "forgetting",
    "learned_epoch",
)  # fmt: skip

# Bits of the one-byte-per-sample code every rank all-gathers.
_TRAIN_SEEN, _TRAIN_LAST, _TRAIN_FIRST, _TRAIN_UNSURE, _EVAL_SEEN, _EVAL_LAST = (
    1 << k for k in range(6)
)


@dataclass
class _SyncState:
    """The global state at the last sync (identical on every rank)."""

    epoch: int
    eval_passes: int
    base: dict[str, torch.Tensor] = field(default_factory=dict)


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is available, initialised and the group spans more
    than one process (this rank among them: torch gives a rank outside ``group`` a size
    of -1). ``group`` must be a process group or None (TypeError otherwise)."""
    check_group("csl_fast.distributed", group)
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def _additive(name: str) -> bool:
    return name.endswith(("_sum", "_count"))


def _classify(tracker: CSLTracker) -> list[str]:
    names = list(tracker.buffers())
    unknown = [n for n in names if not _additive(n) and n not in _OWNED]
    if unknown:  # a buffer added to CSLTracker without a combination rule here
        raise NotImplementedError(
            f"csl_fast.distributed.sync: no combination rule for tracker buffers {unknown}; "
            "add one to csl_fast/distributed.py"
        )
    return [n for n in names if _additive(n)]


def _comm_device(tracker: CSLTracker, group: Any) -> torch.device:
    """Where the collectives' tensors live: the tracker's device, but a CUDA device for a
    CPU tracker under NCCL, and the CPU (gloo) for a meta tracker, whose fingerprint must
    still reach the other ranks for the same error to be raised on all of them."""
    host = tracker.device.type in ("cpu", "meta")
    if host and dist.get_backend(group) == "nccl":
        if not torch.cuda.is_available():
            raise SyncError(
                "csl_fast.distributed: the process group uses NCCL, which needs CUDA, but "
                "torch.cuda.is_available() is False (a CPU-only torch build or no visible "
                "GPU); initialise the process group with backend 'gloo' to sync CPU trackers"
            )
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if tracker.device.type == "meta" else tracker.device


def _baseline(tracker: CSLTracker, state: _SyncState | None, name: str) -> torch.Tensor | None:
    """The synced value of ``name`` at the start of this window (None: the initial value)."""
    if state is None:
        return None
    if name in _RESET_BY_EPOCH and state.epoch != tracker.epoch:
        return None
    if name in _RESET_BY_EVAL and state.eval_passes != tracker.eval_passes:
        return None
    return state.base[name]


def _initial(buf: torch.Tensor, name: str) -> torch.Tensor:
    return torch.full_like(buf, -1) if name == "learned_epoch" else torch.zeros_like(buf)


# The fingerprint every rank all-gathers before any other collective: what shapes the
# collectives (and the calls) must agree, or the later collectives would mismatch.
_FIELDS = (
    "call",
    "num_samples",
    "dtype",
    "history",
    "num_classes",
    "num_labels",
    "buffer set",
    "epoch",
    "eval_passes",
    "synced before",
    "loaded, not marked",
    "meta device",
    "csl_count total",
    "eval_count total",
    "state checksum",
)
# end_epoch's sync has a code of its own: sync() on one rank and end_epoch() on another
# combined the same windows but left the ranks at different epochs, with no error
_CALLS = {1: "sync()", 2: "mark_synced()", 3: "end_epoch()"}
_IGFE = len(_FIELDS)  # input_grad_first_epoch rides along: it may differ (the minimum wins)
_SEQUENCES = _IGFE + 1  # so does the sequences flag (a rank that saw a sequence sets it)
# and whether the rank trained after its last eval pass (_eval_code: any rank that did wins)
_EVAL_LATEST = _SEQUENCES + 1
_EVAL_UNKNOWN, _EVAL_CURRENT, _EVAL_STALE = 0, 1, 2


def _fingerprint(tracker: CSLTracker, call: int, has_state: bool) -> list[int]:
    # mark_synced is what clears a load's flag: ranks that differ in it may still mark.
    loaded = call != 2 and tracker.__dict__.get(_LOADED_ATTR, False)
    names = ",".join(f"{k}:{b.dtype}:{b.shape[1:]}" for k, b in sorted(tracker.buffers().items()))
    totals = [0, 0, 0]
    meta = tracker.device.type == "meta"
    if call == 2 and not meta:  # mark_synced: the loaded states must be the same checkpoint
        t = torch.stack([tracker.csl_count.double().sum(), tracker.eval_count.double().sum()])
        totals = [*t.cpu().view(torch.int64).tolist(), state_checksum(tracker)]
    return [
        call,
        tracker.num_samples,
        torch.finfo(tracker.dtype).bits,
        int(tracker.history),
        tracker.num_classes or 0,
        tracker.num_labels or 0,
        zlib.crc32(names.encode()),
        tracker.epoch,
        tracker.eval_passes,
        int(has_state),
        int(loaded),
        int(meta),
        *totals,
        tracker.input_grad_first_epoch,
        int(tracker.sequences),
        _EVAL_UNKNOWN if meta else _eval_code(tracker),
    ]


def _eval_code(tracker: CSLTracker) -> int:
    """Whether this rank recorded training after its last eval pass (one host read)."""
    from .scores import eval_is_latest

    if not tracker.eval_passes or tracker.eval_pass_presentations is None:
        return _EVAL_UNKNOWN
    return _EVAL_CURRENT if eval_is_latest(tracker) else _EVAL_STALE


def _set_eval_presentations(tracker: CSLTracker, codes: list[int]) -> None:
    """``eval_pass_presentations`` after a sync (each rank's counted only its own
    presentations): the global total where every rank's last eval pass came after its
    training, 0 where a rank trained after its pass (the model every rank shares moved
    since), None where a rank does not know."""
    if _EVAL_STALE in codes:
        tracker.eval_pass_presentations = 0.0
    elif _EVAL_UNKNOWN in codes:
        tracker.eval_pass_presentations = None
    else:
        tracker.eval_pass_presentations = tracker.presentations()


def state_checksum(tracker: CSLTracker) -> int:
    """A CRC of every buffer's wrapping integer sum of bits: equal for equal states on any
    device and thread count (no float rounding order), and it tells two checkpoints apart
    where the count totals agree (any two runs of one setup at one epoch: one run's file
    loaded on one rank, another's on the other, had passed mark_synced)."""
    sums = [as_bits(b).sum(dtype=torch.int64) for _, b in sorted(tracker.buffers().items())]
    return zlib.crc32(torch.stack(sums).cpu().numpy().tobytes())


def _show(name: str, value: int) -> str:
    if name == "call":
        return _CALLS.get(value, str(value))
    if name == "dtype":
        return f"float{value}"
    if name in ("history", "synced before", "loaded, not marked", "meta device"):
        return str(bool(value))
    if name in ("num_classes", "num_labels"):
        return str(value or None)
    if name in ("buffer set", "state checksum"):
        return f"hash {value:08x}"
    if name.endswith("total"):
        return repr(torch.tensor([value]).view(torch.float64).item())
    return str(value)


def _agree(tracker: CSLTracker, group: Any, call: int, has_state: bool, timeout: float) -> Any:
    """All-gather the fingerprint (one small collective) and raise the same
    :class:`SyncError` on every rank when the ranks differ; returns the ``[W, K]`` table."""
    mine = torch.tensor(_fingerprint(tracker, call, has_state), dtype=torch.int64)
    dev = _comm_device(tracker, group)
    world = dist.get_world_size(group)
    parts = [torch.empty_like(mine, device=dev) for _ in range(world)]
    what = _CALLS[call].removesuffix("()")
    _wait(dist.all_gather(parts, mine.to(dev), group=group, async_op=True), timeout, what)
    table = torch.stack(parts).cpu()
    differ = [
        f"{name} ("
        + ", ".join(f"rank {r}: {_show(name, int(table[r, k]))}" for r in range(world))
        + ")"
        for k, name in enumerate(_FIELDS)
        if len(_values(name, table[:, k])) > 1
    ]
    if len(differ) > 1:
        # the buffer set follows from dtype and num_labels: beside them its hash said nothing
        differ = [d for d in differ if not d.startswith("buffer set")]
    elif differ and differ[0].startswith("buffer set"):
        differ[0] += (
            ": the buffers' names, dtypes or shapes differ although every listed setting "
            "agrees (a different csl_fast version on some rank?)"
        )
    if differ:
        raise SyncError(
            "csl_fast.distributed: the ranks' trackers or calls differ in "
            + "; ".join(differ)
            + ". Every rank must create its tracker with the same num_samples, num_classes, "
            "dtype, history and num_labels, call end_epoch() and score_epoch() the same number "
            "of times, and make the same sync()/mark_synced() calls together (after loading "
            "the same checkpoint)"
        )
    if tracker.device.type == "meta":  # the same on every rank (fingerprint)
        raise SyncError(
            f"csl_fast.distributed.{what}: the tracker lives on the 'meta' device, which "
            "holds shapes but no values, so there is nothing to combine; create it with "
            "device='cpu' or a CUDA device to record and sync"
        )
    if tracker.num_classes is None:  # every rank ends up with the same metadata
        tracker.num_classes = max(
            _values("num_classes", table[:, _FIELDS.index("num_classes")]), default=None
        )
    return table


def _values(name: str, column: torch.Tensor) -> set[int]:
    """The distinct values of a fingerprint field over the ranks. A tracker without
    ``num_classes`` (None, sent as 0) agrees with any, as :meth:`CSLTracker.load` and
    :func:`csl_fast.merge` have it."""
    values = set(column.tolist())
    return values - {0} if name == "num_classes" else values


def _wait(work: Any, timeout: float, what: str) -> None:
    """Wait for an async collective for at most ``timeout`` seconds. Polling
    ``is_completed`` works alike for gloo and NCCL (whose ``wait`` does not block the host)."""
    deadline = time.monotonic() + timeout
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise SyncTimeoutError(
                f"csl_fast.distributed.{what}: the other ranks did not join within "
                f"{timeout:g} s. Most likely a rank skipped tracker.end_epoch() (or sync(), "
                "mark_synced()), or exited or crashed: every rank must make the same calls. "
                "Change the wait with csl_fast.distributed.set_timeout(seconds) or "
                "CSL_FAST_SYNC_TIMEOUT; the process group is unusable after this error"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    try:
        work.wait()
    except RuntimeError as exc:
        raise SyncError(
            f"csl_fast.distributed.{what}: a collective failed ({' '.join(str(exc).split())}). "
            "Most likely another rank exited or crashed, or skipped tracker.end_epoch()"
        ) from exc


def check_group(fn: str, group: Any) -> None:
    """Refuse a ``group`` that is not a process group: an int or a string gave "'int'
    object has no attribute 'size'" from inside torch, or passed silently where
    torch.distributed was not initialised."""
    if group is None or (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        return
    if _outside(group):
        return
    raise TypeError(
        f"{fn}: group must be a torch.distributed process group (dist.new_group(ranks)) or "
        f"None for every rank, got {type(group).__name__} {group!r}"
    )


def _outside(group: Any) -> bool:
    """Whether ``group`` is what ``dist.new_group(ranks)`` returns on a rank outside
    ``ranks`` (the int ``GroupMember.NON_GROUP_MEMBER``, -100): that rank closes its epoch
    alone, as documented, where it was refused as "not a process group"."""
    return (
        type(group) is int
        and dist.is_available()
        and dist.is_initialized()
        and group == dist.GroupMember.NON_GROUP_MEMBER
    )


def _all_reduce(t: torch.Tensor, group: Any, timeout: float, what: str = "sync") -> None:
    _wait(dist.all_reduce(t, group=group, async_op=True), timeout, what)


def mark_synced(tracker: CSLTracker, group: Any = None, *, timeout: float | None = None) -> None:
    """Declare the tracker's current state global: the baseline of the next :func:`sync`.

    Call it on every rank after loading the same checkpoint (saved after ``end_epoch`` or
    ``sync``) into each rank's tracker, before training resumes. Under an initialised
    process group it checks (one small all-gather, waiting at most ``timeout`` seconds,
    default :func:`get_timeout`) that all ranks hold trackers of the same shape, ``epoch``
    and counts, and raises :class:`SyncError` on every rank otherwise. Works (and is
    cheap) without ``torch.distributed`` too.
    """
    wait = _checked("mark_synced", tracker, timeout)
    if is_distributed(group):
        _agree(tracker, group, 2, False, get_timeout() if wait is None else wait)
    _set_baseline(tracker)


def note_loaded(tracker: CSLTracker) -> None:
    """Record that a load replaced ``tracker``'s state (:meth:`CSLTracker.load`,
    :meth:`~CSLTracker.load_state_dict`, :meth:`~CSLTracker.from_file`): its baseline, if
    any, no longer describes it, so :func:`sync` refuses until :func:`mark_synced`."""
    tracker.__dict__.pop(_STATE_ATTR, None)
    tracker.__dict__[_LOADED_ATTR] = True
    note_global(tracker)


def loaded_unmarked(tracker: CSLTracker) -> bool:
    """Whether a load replaced ``tracker``'s state and :func:`mark_synced` has not run since
    (:func:`sync` refuses such a tracker under a process group)."""
    return bool(tracker.__dict__.get(_LOADED_ATTR, False))


def _set_baseline(tracker: CSLTracker) -> None:
    # The last-value floats need no baseline: a rank that did not present a sample in the
    # window still holds the synced value. An earlier baseline's tensors are overwritten in
    # place: new ones would double it for a moment at every sync.
    old = tracker.__dict__.get(_STATE_ATTR)
    keep = {}
    for name, b in tracker.buffers().items():
        if name in _LAST_FLOATS:
            continue
        prev = None if old is None else old.base.get(name)
        same = prev is not None and (prev.shape, prev.dtype, prev.device) == (
            b.shape,
            b.dtype,
            b.device,
        )
        keep[name] = prev.copy_(b) if same else b.clone()
    setattr(tracker, _STATE_ATTR, _SyncState(tracker.epoch, tracker.eval_passes, keep))
    tracker.__dict__.pop(_LOADED_ATTR, None)
    note_global(tracker)


def _versions(tracker: CSLTracker) -> tuple[int, int]:
    return tracker.csl_sum._version, tracker.csl_count._version


# The version bumps of csl_sum and csl_count that syncs made, summed over the tracker's
# syncs (see recorded_since).
_SYNC_BUMPS_ATTR = "_csl_sync_bumps"


def training_mark(tracker: CSLTracker) -> tuple[tuple[int, int], tuple[int, int]]:
    """A mark of the training buffers' state, for :func:`recorded_since`."""
    return tracker.__dict__.get(_SYNC_BUMPS_ATTR, (0, 0)), _versions(tracker)


def recorded_since(tracker: CSLTracker, mark: tuple[tuple[int, int], tuple[int, int]]) -> bool:
    """Whether this rank wrote into ``csl_sum`` or ``csl_count`` since
    :func:`training_mark` gave ``mark``: their version counters moved by more than the
    syncs since moved them (a sync rewrites every buffer, combining the ranks: a version
    change that is no recording of this rank's)."""
    (sum_bumps, count_bumps), (sum_v, count_v) = mark
    now_sum_bumps, now_count_bumps = tracker.__dict__.get(_SYNC_BUMPS_ATTR, (0, 0))
    now_sum_v, now_count_v = _versions(tracker)
    return (now_sum_v - sum_v, now_count_v - count_v) != (
        now_sum_bumps - sum_bumps,
        now_count_bumps - count_bumps,
    )


# The version counters of the buffers that every training and eval recording writes, as
# they were when the tracker's state was last global: created, synced, marked or loaded.
# (Absent in a tracker unpickled or deep-copied, whose counters restart: not checked.)
_GLOBAL_VERSIONS_ATTR = "_csl_global_versions"
_RECORDED = {"training": ("csl_sum", "csl_count"), "eval": ("eval_csl_sum", "eval_count")}


def _recording_versions(tracker: CSLTracker) -> dict[str, tuple[int, ...]]:
    bufs = tracker.buffers()
    return {kind: tuple(bufs[k]._version for k in names) for kind, names in _RECORDED.items()}


def note_global(tracker: CSLTracker) -> None:
    """Record that ``tracker``'s state is global now (see :func:`warn_if_unsynced`)."""
    tracker.__dict__[_GLOBAL_VERSIONS_ATTR] = _recording_versions(tracker)


def forget_global(state: dict[str, Any]) -> None:
    """Drop the mark from an unpickled (or deep-copied) tracker's ``state``: its version
    counters restart, so the mark would call every copy unsynced."""
    state.pop(_GLOBAL_VERSIONS_ATTR, None)


def warn_if_unsynced(tracker: CSLTracker, fn: str) -> None:
    """Warn (:class:`UnsyncedStateWarning`) where ``fn`` is about to save a tracker that
    recorded since its state was last global, under a process group of several ranks: it
    would save this rank's part of those records only. Reads version counters alone (no
    device synchronisation)."""
    mark = tracker.__dict__.get(_GLOBAL_VERSIONS_ATTR)
    if mark is None or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() < 2:
        return
    now = _recording_versions(tracker)
    kinds = [kind for kind in _RECORDED if now[kind] != mark[kind]]
    if not kinds:
        return
    warnings.warn(
        f"csl_fast: {fn} on rank {dist.get_rank()} of {dist.get_world_size()}, but this "
        f"tracker recorded {' and '.join(kinds)} presentations since its last sync, so the "
        "saved state holds this rank's part of them only (the other ranks' are missing, and "
        "a resume from it loses them). Call tracker.sync() on every rank (a "
        "collective) before saving, as in: tracker.sync(); if rank == 0: tracker.save(path). "
        "A tracker that only this rank records into (all its samples seen here) is whole: "
        "filter this warning there (warnings.filterwarnings('ignore', "
        "category=csl_fast.distributed.UnsyncedStateWarning))",
        UnsyncedStateWarning,
        stacklevel=3,
    )


def sync_epoch(tracker: CSLTracker, group: Any = None, *, timeout: float | None = None) -> bool:
    """:func:`sync` as :meth:`csl_fast.CSLTracker.end_epoch` runs it: the same, but the
    ranks' fingerprints name the call ``end_epoch()``, so a rank that calls :func:`sync`
    while another closes its epoch gets a :class:`SyncError` instead of a silent split."""
    return _sync(tracker, group, timeout, 3)


def sync(tracker: CSLTracker, group: Any = None, *, timeout: float | None = None) -> bool:
    """Combine this rank's tracker with the other ranks' (a collective: every rank of
    ``group`` must call it). See the module docstring for the rules.

    Returns True when it synced, False (doing nothing) when ``torch.distributed`` is not
    initialised or the group has a single process. Reads a few values on the host.

    Before any other collective the ranks all-gather a fingerprint of their trackers and
    calls (``num_samples``, ``num_classes``, dtype, ``history``, ``num_labels``, the buffer
    set, ``epoch``, ``eval_passes``, synced before, loaded and not marked since), so
    trackers that differ raise a clear error instead of mismatched collectives. Each
    collective waits at most ``timeout`` seconds (default :func:`get_timeout`).

    Raises:
        SyncError: the ranks' fingerprints differ (the same error on every rank), or the
            tracker was loaded and not marked with :func:`mark_synced` since, or it has
            closed epochs without ever being synced or marked, or its ``epoch`` moved by
            more than one since its last sync.
        SyncTimeoutError: a rank did not join in time (it skipped ``end_epoch``, exited
            or crashed).
    """
    return _sync(tracker, group, timeout, 1)


def _checked(fn: str, tracker: Any, timeout: Any) -> float | None:
    """``tracker`` and a given ``timeout`` (in seconds; None: not given) checked before
    anything else, also in a single process: there ``sync(None)`` returned False and a
    timeout of '30', -1 or NaN passed, to fail only once the job ran distributed (and
    ``mark_synced(None)`` raised "'NoneType' object has no attribute '__dict__'"). The
    default, :func:`get_timeout`, is read where a collective waits: read here, a bad
    CSL_FAST_SYNC_TIMEOUT failed every single-process end_epoch."""
    from .tracker import CSLTracker

    if not isinstance(tracker, CSLTracker):
        raise TypeError(
            f"csl_fast.distributed.{fn}: tracker must be a csl_fast.CSLTracker, got "
            f"{type(tracker).__name__}"
        )
    return None if timeout is None else _seconds(fn, "timeout", timeout)


def _sync(tracker: CSLTracker, group: Any, timeout: float | None, call: int) -> bool:
    wait = _checked("sync" if call == 1 else "sync_epoch", tracker, timeout)
    if not is_distributed(group):
        note_global(tracker)  # a group of one (or a rank outside it) holds all its group has
        return False
    before = _versions(tracker)
    try:
        return _combine(tracker, group, get_timeout() if wait is None else wait, call)
    finally:  # (a refused sync may have written nothing: its bumps are 0)
        bumps = tracker.__dict__.get(_SYNC_BUMPS_ATTR, (0, 0))
        after = _versions(tracker)
        tracker.__dict__[_SYNC_BUMPS_ATTR] = tuple(
            b + a - c for b, a, c in zip(bumps, after, before, strict=True)
        )


def _combine(tracker: CSLTracker, group: Any, timeout: float, call: int) -> bool:
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = _comm_device(tracker, group)
    state: _SyncState | None = tracker.__dict__.get(_STATE_ATTR)
    additive = _classify(tracker)
    bufs = tracker.buffers()
    n = tracker.num_samples

    # --- 1. every rank must be at the same point (one tiny collective) -----------------
    table = _agree(tracker, group, call, state is not None, timeout)
    igfes = [v for v in table[:, _IGFE].tolist() if v >= 0]
    sequences = bool(table[:, _SEQUENCES].any())
    eval_codes = table[:, _EVAL_LATEST].tolist()
    if tracker.__dict__.get(_LOADED_ATTR, False):  # the same on every rank (fingerprint)
        raise SyncError(
            "csl_fast.distributed.sync: this tracker was loaded (load, load_state_dict or "
            "from_file) and not marked since, so sync cannot tell the loaded, already global "
            "state from this rank's new presentations and would add it once per rank. After "
            "loading the same checkpoint on every rank, call "
            "csl_fast.distributed.mark_synced(tracker) on every rank before training"
        )
    if state is None and tracker.epoch > 0:
        raise SyncError(
            f"csl_fast.distributed.sync: this tracker has {tracker.epoch} closed epochs but was "
            "never synced, so sync cannot tell its already-global part from this rank's new "
            "presentations. After loading a checkpoint on every rank, call "
            "csl_fast.distributed.mark_synced(tracker) before training"
        )
    if state is not None and not (
        0 <= tracker.epoch - state.epoch <= 1 and tracker.eval_passes >= state.eval_passes
    ):
        raise SyncError(
            "csl_fast.distributed.sync: the tracker was reloaded since its last sync (epoch "
            f"{state.epoch} -> {tracker.epoch}); call csl_fast.distributed.mark_synced(tracker) "
            "on every rank after loading a checkpoint"
        )

    def base(name: str) -> torch.Tensor:
        b = _baseline(tracker, state, name)
        return _initial(bufs[name], name) if b is None else b

    # --- 2. this rank's window: presence, last values, transitions ----------------------
    seen = (bufs["csl_count"] - base("csl_count")) > 0
    eval_seen = (bufs["eval_count"] - base("eval_count")) > 0
    s0 = base("last_correct")
    last = bufs["last_correct"]
    d_forget = bufs["forgetting"] - base("forgetting")
    quiet = d_forget == 0
    if sequences:
        # csl_count counts a sequence's tokens, not its presentations: a window that one
        # presentation explains is taken as one (a DistributedSampler never repeats a
        # sample on one rank within an epoch; read as "several", every padding repeat
        # of a sequence was warned about)
        multi = ~((quiet & ~(s0 & ~last)) | ((d_forget == 1) & s0 & ~last))
    else:
        multi = (bufs["csl_count"] - base("csl_count")) > 1
    # Correctness at this rank's first presentation in the window: known when it presented
    # the sample once, or when no forgetting event shows that it stayed in one state.
    first_known = ~multi | (s0 & quiet) | (~s0 & quiet & ~last)
    # (Unknown: fall back to the last value; the seam fix below may then be off by one.)
    first = torch.where(multi & s0 & quiet, True, torch.where(multi & first_known, False, last))
    code = (
        seen.to(torch.uint8) * _TRAIN_SEEN
        + (seen & last).to(torch.uint8) * _TRAIN_LAST
        + (seen & first).to(torch.uint8) * _TRAIN_FIRST
        + (seen & ~first_known).to(torch.uint8) * _TRAIN_UNSURE
        + eval_seen.to(torch.uint8) * _EVAL_SEEN
        + (eval_seen & bufs["eval_last_correct"]).to(torch.uint8) * _EVAL_LAST
    ).to(dev)
    codes = [torch.empty_like(code) for _ in range(world)]
    _wait(dist.all_gather(codes, code, group=group, async_op=True), timeout, "sync")
    # (Rank by rank, here and below: no [W, N] temporaries, whose memory grows with W.)

    def owner_of(bit: int) -> torch.Tensor:
        """The highest rank whose code has ``bit``, -1 where none has it."""
        out = torch.full((n,), -1, dtype=torch.int64, device=dev)
        for r, c in enumerate(codes):
            out.masked_fill_((c & bit) > 0, r)
        return out

    def owner_has(owner: torch.Tensor, bit: int) -> torch.Tensor:
        """Whether the owner's code has ``bit`` (False where there is no owner)."""
        out = torch.zeros(n, dtype=torch.bool, device=dev)
        for r, c in enumerate(codes):
            out |= (owner == r) & ((c & bit) > 0)
        return out

    owner = owner_of(_TRAIN_SEEN)
    eval_owner = owner_of(_EVAL_SEEN)
    mine, eval_mine = owner == rank, eval_owner == rank

    # --- 3. sums of deltas and the owners' values ---------------------------------------
    # One all-reduce per buffer, in place: a concatenation into one message would hold
    # every delta twice at the peak (the sync's transient memory is documented).
    sums: dict[str, torch.Tensor] = {}
    for k in additive:
        sums[k] = (bufs[k] - base(k)).to(dev)
        _all_reduce(sums[k], group, timeout)
    for k in _LAST_FLOATS:
        m = eval_mine if k.startswith("eval_") else mine
        sums[k] = torch.where(m, bufs[k].to(dev), 0)
        _all_reduce(sums[k], group, timeout)
    owned_ints = [k for k in _OWNED_INTS if k in bufs]
    # int64: the ranks' forgetting deltas could add past int32 (checked below, exactly).
    d_total = d_forget.to(dev, torch.int64)
    _all_reduce(d_total, group, timeout)
    owned = {}
    for k in ("learned_epoch", *owned_ints):
        owned[k] = torch.where(mine, bufs[k].to(dev), 0)  # int32: one rank's value each
        _all_reduce(owned[k], group, timeout)
    owner_le = owned.pop("learned_epoch")

    # forgetting: each rank counted from the baseline state; fix the seams between ranks.
    # (Before anything is written: a count past int32 leaves the tracker as it was.)
    s0d = s0.to(dev)
    prev = s0d.clone()
    seam = torch.zeros(n, dtype=torch.int64, device=dev)
    unsure = torch.zeros(n, dtype=torch.bool, device=dev)
    for c in codes:
        p = (c & _TRAIN_SEEN) > 0
        f = (c & _TRAIN_FIRST) > 0
        fix = (prev & ~f).to(torch.int64) - (s0d & ~f).to(torch.int64)
        seam += torch.where(p, fix, 0)
        unsure |= p & ((c & _TRAIN_UNSURE) > 0) & (prev != s0d)
        prev = torch.where(p, (c & _TRAIN_LAST) > 0, prev)
    forgetting = base("forgetting").to(dev) + d_total + seam
    over = forgetting > torch.iinfo(torch.int32).max
    if over.any():  # the same on every rank: every rank raises
        i = int(over.nonzero()[0, 0])
        raise SyncError(
            f"csl_fast.distributed.sync: sample {i}'s forgetting count over the ranks is "
            f"{int(forgetting[i])}, past 2**31 - 1 = {torch.iinfo(torch.int32).max}, the most "
            "a tracker's int32 forgetting counter holds; this tracker is left as it was"
        )

    # --- 4. combine (identical on every rank) --------------------------------------------
    def put(name: str, value: torch.Tensor) -> None:
        bufs[name].copy_(value.to(bufs[name].device))

    for k in additive:
        put(k, base(k).to(dev) + sums.pop(k))
    for k in _LAST_FLOATS:
        o = eval_owner if k.startswith("eval_") else owner
        put(k, torch.where(o >= 0, sums.pop(k), bufs[k].to(dev)))
    for k in owned_ints:
        put(k, torch.where(owner >= 0, owned.pop(k), bufs[k].to(dev)))
    owner_last = owner_has(owner, _TRAIN_LAST)
    put("last_correct", torch.where(owner >= 0, owner_last, s0d))
    eval_last = owner_has(eval_owner, _EVAL_LAST)
    put(
        "eval_last_correct",
        torch.where(eval_owner >= 0, eval_last, bufs["eval_last_correct"].to(dev)),
    )

    put("forgetting", forgetting)

    presenters = sum(((c & _TRAIN_SEEN) > 0).to(torch.int32) for c in codes)
    le0 = base("learned_epoch").to(dev)
    streak_kept = s0d & (d_total == 0)
    le_multi = torch.where(
        owner_last, torch.where(streak_kept, le0, torch.full_like(le0, tracker.epoch)), -1
    )
    le = torch.where(presenters == 1, owner_le, torch.where(presenters > 1, le_multi, le0))
    put("learned_epoch", le)
    if igfes:
        tracker.input_grad_first_epoch = min(igfes)
    tracker.sequences = sequences
    _set_eval_presentations(tracker, eval_codes)

    n_unsure = int(unsure.sum())
    if n_unsure:
        warnings.warn(
            f"csl_fast.distributed.sync: {n_unsure} samples were presented on several ranks "
            "and several times on one rank within one sync window; their forgetting counts "
            "may be off by one per rank (a sync() on every rank between the repeats avoids "
            "this)",
            RuntimeWarning,
            stacklevel=2,
        )
    _set_baseline(tracker)
    return True
