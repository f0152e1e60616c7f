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
as a *baseline* (allocated on the first sync; about 70 bytes per sample in float32), each
rank contributes ``local - baseline`` and the result is ``baseline + sum over ranks``.
Calling :func:`sync` twice in a row therefore changes nothing the second time, and syncing
more often (by hand, mid-epoch) gives the same result as syncing once per epoch. Buffers
that :meth:`~CSLTracker.end_epoch` / :meth:`~CSLTracker.end_eval_pass` reset
(``epoch_*``, ``eval_pass_*``) use a zero baseline once the epoch (eval pass) they were
synced in has been closed.

Combination rules
-----------------
- **Sums and counts** (``csl_sum``, ``csl_count``, every other ``*_sum`` / ``*_count``):
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
  is the epoch in which the final correct streak along that order began.

  With ``DistributedSampler`` (shuffled or not, any seed and world size) and one sync per
  epoch (the default, through ``end_epoch``) this order *is* the order of a single-process
  run over the global batches ``(epoch, step, rank 0's rows, rank 1's rows, ...)``: a rank
  never gets the same sample twice in one epoch, and a padding repeat always lands on a
  higher rank, at a later (or the same) step, than the sample's regular presentation. So the
  synced tracker equals that single-process run exactly.

  The one case the rule cannot reconstruct from per-rank state is a sample presented on
  several ranks in one window *and* several times on one of the later ranks (a custom
  sampler with repeats, or syncing less often than once per epoch): the first presentation
  on that rank is not kept, so a transition at the seam may be missed or added. ``sync``
  then warns with the number of such samples; their ``forgetting`` is off by at most one
  per rank.

Checkpoints
-----------
Save a tracker after :meth:`~CSLTracker.end_epoch` (or after a :func:`sync`) on one rank:
it then holds the global state. To resume, load the same file on **every** rank and call
:func:`mark_synced` before training, so that the next sync does not count the loaded state
once per rank. A tracker that has closed epochs but was never synced or marked makes
:func:`sync` raise rather than guess.

Collectives per sync: one ``all_reduce(MAX)`` of a few integers (every rank must agree on
``num_samples``, ``epoch`` and ``eval_passes``), one ``all_reduce(SUM)`` over the float
buffers, one over two int32 buffers and one ``all_gather`` of one byte per sample. NCCL and
gloo both work; with NCCL a CPU tracker is moved to the current CUDA device for the
collectives.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = ["is_distributed", "mark_synced", "sync"]

_STATE_ATTR = "_csl_sync_state"
# Per-epoch / per-eval-pass scratch buffers that end_epoch / end_eval_pass reset to zero.
_RESET_BY_EPOCH = ("epoch_input_grad_sq_sum", "epoch_input_grad_count", "epoch_loss_sum",
                   "epoch_count")  # fmt: skip
_RESET_BY_EVAL = ("eval_pass_loss_sum", "eval_pass_count")
_LAST_FLOATS = ("last_loss", "last_max_prob", "eval_last_loss", "eval_last_max_prob")
_OWNED = (*_LAST_FLOATS, "last_correct", "eval_last_correct", "forgetting", "learned_epoch")

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
    than one process."""
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
    if tracker.device.type == "cpu" and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tracker.device


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


def mark_synced(tracker: CSLTracker, group: Any = None) -> None:
    """Declare the tracker's current state global: the baseline of the next :func:`sync`.

    Call it on every rank after loading the same checkpoint (saved after ``end_epoch`` or
    ``sync``) into each rank's tracker, before training resumes. Under an initialised
    process group it checks that all ranks hold the same ``epoch`` and counts and raises
    ``RuntimeError`` otherwise. Works (and is cheap) without ``torch.distributed`` too.
    """
    if is_distributed(group):
        dev = _comm_device(tracker, group)
        fp = torch.stack(
            [
                torch.tensor(float(tracker.epoch), dtype=torch.float64, device=dev),
                torch.tensor(float(tracker.num_samples), dtype=torch.float64, device=dev),
                tracker.csl_count.to(dev, torch.float64).sum(),
                tracker.eval_count.to(dev, torch.float64).sum(),
            ]
        )
        both = torch.cat([fp, -fp])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(both[:4], -both[4:]):
            raise RuntimeError(
                "csl_fast.distributed.mark_synced: the ranks hold different tracker states "
                "(epoch, num_samples or counts differ); load the same checkpoint on every rank"
            )
    _set_baseline(tracker)


def _set_baseline(tracker: CSLTracker) -> None:
    # The last-value floats need no baseline: a rank that did not present a sample in the
    # window still holds the synced value.
    keep = {n: b.clone() for n, b in tracker.buffers().items() if n not in _LAST_FLOATS}
    setattr(tracker, _STATE_ATTR, _SyncState(tracker.epoch, tracker.eval_passes, keep))


def sync(tracker: CSLTracker, group: Any = None) -> bool:
    """Combine this rank's tracker with the other ranks' (a collective: every rank of
    ``group`` must call it). See the module docstring for the rules.

    Returns True when it synced, False (doing nothing) when ``torch.distributed`` is not
    initialised or the group has a single process. Reads a few values on the host.

    Raises:
        RuntimeError: the ranks disagree on ``num_samples``, ``epoch`` or ``eval_passes``,
            or the tracker has closed epochs without ever being synced or marked (a
            checkpoint loaded without :func:`mark_synced`), or it was reloaded since its
            last sync.
    """
    if not is_distributed(group):
        return False
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = _comm_device(tracker, group)
    state: _SyncState | None = tracker.__dict__.get(_STATE_ATTR)
    additive = _classify(tracker)
    bufs = tracker.buffers()
    n = tracker.num_samples

    # --- 1. every rank must be at the same point (one tiny collective) -----------------
    big = 1 << 40
    igfe = tracker.input_grad_first_epoch
    has_state = int(state is not None)
    meta = [tracker.epoch, tracker.eval_passes, n, has_state]
    packed = torch.tensor(
        [*meta, *(-v for v in meta), -(igfe if igfe >= 0 else big)], dtype=torch.int64, device=dev
    )
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    hi, lo, neg_min_igfe = packed[:4].tolist(), [-v for v in packed[4:8].tolist()], packed[8]
    if hi != lo:
        raise RuntimeError(
            "csl_fast.distributed.sync: the ranks' trackers disagree on (epoch, eval_passes, "
            f"num_samples, synced before): max {hi}, min {lo}. Every rank must create the "
            "tracker with the same N, call end_epoch()/score_epoch() the same number of times "
            "and call sync() together"
        )
    if state is None and tracker.epoch > 0:
        raise RuntimeError(
            f"csl_fast.distributed.sync: this tracker has {tracker.epoch} closed epochs but was "
            "never synced, so sync cannot tell its already-global part from this rank's new "
            "presentations. After loading a checkpoint on every rank, call "
            "csl_fast.distributed.mark_synced(tracker) before training"
        )
    if state is not None and not (
        0 <= tracker.epoch - state.epoch <= 1 and tracker.eval_passes >= state.eval_passes
    ):
        raise RuntimeError(
            "csl_fast.distributed.sync: the tracker was reloaded since its last sync (epoch "
            f"{state.epoch} -> {tracker.epoch}); call csl_fast.distributed.mark_synced(tracker) "
            "on every rank after loading a checkpoint"
        )
    min_igfe = -int(neg_min_igfe)

    def base(name: str) -> torch.Tensor:
        b = _baseline(tracker, state, name)
        return _initial(bufs[name], name) if b is None else b

    # --- 2. this rank's window: presence, last values, transitions ----------------------
    seen = (bufs["csl_count"] - base("csl_count")) > 0
    multi = (bufs["csl_count"] - base("csl_count")) > 1
    eval_seen = (bufs["eval_count"] - base("eval_count")) > 0
    s0 = base("last_correct")
    last = bufs["last_correct"]
    d_forget = bufs["forgetting"] - base("forgetting")
    quiet = d_forget == 0
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
    dist.all_gather(codes, code, group=group)
    allc = torch.stack(codes)  # [W, N]
    ranks = torch.arange(world, device=dev)[:, None]

    def owner_of(bit: int) -> torch.Tensor:
        return torch.where((allc & bit) > 0, ranks, -1).amax(0)

    owner = owner_of(_TRAIN_SEEN)
    eval_owner = owner_of(_EVAL_SEEN)
    mine, eval_mine = owner == rank, eval_owner == rank

    # --- 3. sums of deltas and the owners' values ---------------------------------------
    floats = [(bufs[k] - base(k)).to(dev) for k in additive]
    for k in _LAST_FLOATS:
        m = eval_mine if k.startswith("eval_") else mine
        floats.append(torch.where(m, bufs[k].to(dev), 0))
    flat = torch.cat(floats) if floats else torch.empty(0, dtype=tracker.dtype, device=dev)
    ints = torch.cat([d_forget.to(dev), torch.where(mine, bufs["learned_epoch"].to(dev), 0)])
    dist.all_reduce(flat, group=group)
    dist.all_reduce(ints, group=group)
    sums = dict(zip([*additive, *_LAST_FLOATS], flat.view(-1, n).unbind(0), strict=True))
    d_total, owner_le = ints[:n], ints[n:]

    # --- 4. combine (identical on every rank) --------------------------------------------
    def put(name: str, value: torch.Tensor) -> None:
        bufs[name].copy_(value.to(bufs[name].device))

    for k in additive:
        put(k, base(k).to(dev) + sums[k])
    for k in _LAST_FLOATS:
        o = eval_owner if k.startswith("eval_") else owner
        put(k, torch.where(o >= 0, sums[k], bufs[k].to(dev)))
    idx = owner.clamp(min=0)[None]
    owner_last = (allc.gather(0, idx)[0] & _TRAIN_LAST) > 0
    s0d = s0.to(dev)
    put("last_correct", torch.where(owner >= 0, owner_last, s0d))
    eidx = eval_owner.clamp(min=0)[None]
    eval_last = (allc.gather(0, eidx)[0] & _EVAL_LAST) > 0
    put(
        "eval_last_correct",
        torch.where(eval_owner >= 0, eval_last, bufs["eval_last_correct"].to(dev)),
    )

    # forgetting: each rank counted from the baseline state; fix the seams between ranks.
    prev = s0d.clone()
    seam = torch.zeros(n, dtype=torch.int32, device=dev)
    unsure = torch.zeros(n, dtype=torch.bool, device=dev)
    for r in range(world):
        c = allc[r]
        p = (c & _TRAIN_SEEN) > 0
        f = (c & _TRAIN_FIRST) > 0
        fix = (prev & ~f).to(torch.int32) - (s0d & ~f).to(torch.int32)
        seam += torch.where(p, fix, 0)
        unsure |= p & ((c & _TRAIN_UNSURE) > 0) & (prev != s0d)
        prev = torch.where(p, (c & _TRAIN_LAST) > 0, prev)
    put("forgetting", base("forgetting").to(dev) + d_total + seam)

    presenters = ((allc & _TRAIN_SEEN) > 0).sum(0)
    le0 = base("learned_epoch").to(dev)
    streak_kept = s0d & (d_total == 0)
    le_multi = torch.where(
        owner_last, torch.where(streak_kept, le0, torch.full_like(le0, tracker.epoch)), -1
    )
    le = torch.where(presenters == 1, owner_le, torch.where(presenters > 1, le_multi, le0))
    put("learned_epoch", le)
    if min_igfe < big:
        tracker.input_grad_first_epoch = min_igfe

    n_unsure = int(unsure.sum())
    if n_unsure:
        warnings.warn(
            f"csl_fast.distributed.sync: {n_unsure} samples were presented on several ranks "
            "and several times on one rank within one sync window; their forgetting counts "
            "may be off by one per rank (sync at least once per epoch to avoid this)",
            RuntimeWarning,
            stacklevel=2,
        )
    _set_baseline(tracker)
    return True
