"""PyTorch Lightning: a callback that owns a :class:`~csl_fast.CSLTracker` for ``Trainer.fit``.

Needs ``lightning`` (``lightning.pytorch``) or ``pytorch-lightning`` (optional dependency)::

    from csl_fast.data import IndexedDataset
    from csl_fast.integrations.lightning import CSLCallback

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, index = batch                      # IndexedDataset adds the index
            return csl_fast.accumulate(self(x), y, index, self.csl_tracker)

    callback = CSLCallback(num_samples=len(train_set), num_classes=10)
    L.Trainer(max_epochs=30, callbacks=[callback]).fit(model, DataLoader(IndexedDataset(train_set)))
    callback.tracker.csl    # or load the tracker file written with save_path=

With a spawn launcher (``strategy="ddp_spawn"``, ``"ddp_notebook"``, ``"ddp_fork"``) the
training runs in other processes: pass ``save_path=``, and ``callback.tracker`` in the
launching process reads that file after ``fit``.

The callback creates the tracker on the module's device at ``setup`` and attaches it as
``pl_module.csl_tracker``, closes each training epoch (``end_epoch``, which under DDP/FSDP
combines the ranks; Lightning's ``DistributedSampler`` padding is handled through counts),
syncs at the end of training, and keeps the tracker in Lightning checkpoints (global state:
it syncs before saving; restored on every rank and marked synced on resume; a checkpoint
saved at an epoch's last batch resumes with that epoch closed; an epoch that training stops
part-way through, by ``max_steps`` or ``should_stop``, is closed at the end of training,
after the checkpoints, which hold it open: a resume goes on with it or closes it, as
Lightning does). Lightning
puts the ``DistributedSampler`` in itself; wrap the training set in
:class:`csl_fast.data.IndexedDataset` so batches carry dataset indices. Validation, test
and predict loops (and the sanity check) compute their loss without the tracker: the
callback raises ``RuntimeError`` at the end of a loop that recorded into it (its batches
would count as training presentations of the samples at their indices).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
import weakref
from typing import Any

from ..atomic_file import target_of
from ..distributed import loaded_unmarked, mark_synced, recorded_since, training_mark
from ..tracker import CSLTracker
from ._options import check_tracker_options, refuse_tensor_parallel

try:  # the unified package first, then the standalone one
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as exc:
        raise ImportError(
            "csl_fast.integrations.lightning needs PyTorch Lightning: "
            "pip install lightning (or pytorch-lightning)"
        ) from exc

__all__ = ["CSLCallback"]

# The callback's own entry in its checkpoint state, beside the tracker's state_dict.
_EPOCHS_CLOSED = "lightning_epochs_closed"


class CSLCallback(Callback):
    """Keeps a :class:`~csl_fast.CSLTracker` through ``Trainer.fit``.

    Args:
        num_samples: ``N``, the size of the (indexed) training set. Not needed when
            ``tracker`` is given.
        num_classes: passed to the tracker.
        tracker: an existing tracker to use instead of creating one (it must live on the
            device the module's logits are on). One loaded from a file (to continue a
            run) is marked synced when training starts: under DDP every rank must have
            loaded the same state (checked then, :func:`csl_fast.distributed.mark_synced`).
        attr: name of the ``pl_module`` attribute the tracker is attached as.
        save_path: when set, the global rank 0 writes the tracker there
            (:meth:`CSLTracker.save`) at the end of training.
        **tracker_kwargs: further :class:`~csl_fast.CSLTracker` arguments (``dtype``,
            ``history``, ``backend``, ``deterministic``, ``num_labels``).

    Raises:
        TypeError, ValueError: at construction, for an argument the tracker would refuse or
            that would be ignored: an unknown or ill-typed tracker argument, ``device``
            (the tracker goes on the module's device), neither ``num_samples`` nor
            ``tracker``, or ``tracker`` with ``num_samples``, ``num_classes`` or tracker
            arguments.
    """

    def __init__(
        self,
        num_samples: int | None = None,
        num_classes: int | None = None,
        *,
        tracker: CSLTracker | None = None,
        attr: str = "csl_tracker",
        save_path: str | os.PathLike | None = None,
        **tracker_kwargs: Any,
    ) -> None:
        given = {"num_samples": num_samples, "num_classes": num_classes}
        tracker_kwargs = check_tracker_options(
            "CSLCallback", tracker, tracker_kwargs, "tracker_kwargs", given
        )
        if tracker is None and num_samples is None:
            raise ValueError("CSLCallback: pass num_samples (the training set size) or tracker")
        if not (isinstance(attr, str) and attr.isidentifier()):
            raise ValueError(
                "CSLCallback: attr must be a Python identifier (the LightningModule attribute "
                f"the tracker is attached as), got {attr!r}"
            )
        if save_path is not None and not isinstance(save_path, str | os.PathLike):
            raise TypeError(
                "CSLCallback: save_path must be a str or os.PathLike, got "
                f"{type(save_path).__name__}"
            )
        if save_path is not None:  # a folder, "runs/" or a FIFO failed only after training
            target_of(os.fspath(save_path), "save the tracker", "run.csl")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self._tracker = tracker
        self.attr = attr
        self.save_path = save_path
        self.tracker_kwargs = tracker_kwargs
        self._pending: dict[str, Any] | None = None
        self._made_at = time.time()
        # Lightning epochs whose end_epoch ran (kept in checkpoints); None: not known yet.
        self._epochs_closed: int | None = None
        self._cut_short = False  # the last epoch stopped part-way (see on_train_epoch_end)
        self._scale_warned = False
        self._restored = False  # a checkpoint gave the tracker its state in this fit
        # the LightningModule the tracker last trained (weakly: a finished model is freed)
        self._trained_module: weakref.ref | None = None
        # setup ran in this process: False here in the launching process of a spawn or
        # fork launcher, whose callback is a copy the training never touches
        self._set_up_here = False
        # (mtime, size, inode) of the save_path file last read back: a later fit with
        # this callback writes a newer one
        self._read_back: tuple[int, int, int] | None = None
        # the training buffers' version counters when an eval loop started
        self._versions_at_eval: tuple[int, int] | None = None

    @property
    def tracker(self) -> CSLTracker | None:
        """The tracker: None before ``fit``'s setup creates it (or the one passed in).

        Lightning's spawn launchers (``strategy="ddp_spawn"``, ``"ddp_notebook"``,
        ``"ddp_fork"``) train in other processes, so this process's callback never sees
        their tracker: with ``save_path``, reading ``tracker`` here after ``fit`` loads the
        file rank 0 wrote at the end of training (a file older than this callback is not
        taken; after another ``fit`` with this callback, the newer file), also in place of
        a ``tracker=`` passed in, which those processes trained a copy of; without it, the
        tracker stays None (or the one passed in, untouched) here."""
        if not self._set_up_here and self.save_path is not None:
            try:
                st = os.stat(self.save_path)
            except OSError:
                st = None
            if st is not None and st.st_mtime >= self._made_at:
                seen = (st.st_mtime_ns, st.st_size, st.st_ino)
                if seen != self._read_back:
                    self._tracker = CSLTracker.from_file(self.save_path)
                    self._read_back = seen
        return self._tracker

    @tracker.setter
    def tracker(self, value: CSLTracker | None) -> None:
        self._tracker = value
        self._trained_module = None  # another tracker: what the old one trained is no matter

    def __getstate__(self) -> dict[str, Any]:
        # A spawn launcher pickles the callback, and a weak reference cannot be; the module a
        # child process trains is a copy anyway.
        state = self.__dict__.copy()
        state["_trained_module"] = None
        return state

    @property
    def state_key(self) -> str:
        return f"CSLCallback[{self.attr}]"

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_tensor_parallel("CSLCallback", _tensor_parallel_size(trainer))
        self._set_up_here = True
        self._restored = False  # (a checkpoint is restored after setup)
        # (a fit that failed before on_train_end left it set: the next fit closed an epoch
        # it never trained)
        self._cut_short = False
        if self._tracker is not None and any(
            b.is_shared() for b in self._tracker.buffers().values() if b.device.type == "cpu"
        ):
            # A tracker passed in reaches a spawn launcher's processes through
            # torch.multiprocessing, which moves CPU tensors to shared memory: every rank
            # would add into the same buffers, and end_epoch's all-reduce would count each
            # presentation once per rank again (2 ranks: every count doubled)
            self._tracker = copy.deepcopy(self._tracker)
        if self._tracker is None:
            self._tracker = CSLTracker(
                self.num_samples,
                self.num_classes,
                device=pl_module.device,
                **self.tracker_kwargs,
            )
        setattr(pl_module, self.attr, self._tracker)
        self._apply_pending()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if loaded_unmarked(self._tracker):
            # A tracker passed in from a file (csl_fast.load in every process): its state is
            # global. Unmarked, the first end_epoch under DDP refused it, after a whole
            # epoch of training; marking checks now that every rank loaded the same.
            mark_synced(self._tracker)
        resumed = trainer.ckpt_path is not None
        if resumed and not self._restored and self._tracker.epoch != trainer.current_epoch:
            warnings.warn(
                f"CSLCallback: the checkpoint {trainer.ckpt_path!r} holds no "
                f"{self.state_key} state: the tracker records only from epoch "
                f"{trainer.current_epoch} on (its CSL misses the steps before, and its epoch "
                f"count is {self._tracker.epoch} where Lightning's is {trainer.current_epoch}); "
                f"resume from a checkpoint saved with CSLCallback(attr={self.attr!r}) to keep "
                "them",
                RuntimeWarning,
                stacklevel=2,
            )
        self._warn_other_module(pl_module)
        if self._epochs_closed is None:  # no checkpoint, or one from before the entry
            self._epochs_closed = trainer.current_epoch
        self._close_missed_epochs(trainer)

    def _warn_other_module(self, pl_module: LightningModule) -> None:
        # One callback reused for the fit of a new model (a k-fold or seed loop that builds
        # its callbacks once) summed the models' CSL, silently. Warned, not refused: a model
        # continued in a new object (its weights loaded) may mean to go on. A refit of the
        # same module, or a resume whose checkpoint restored the tracker, is silent.
        last = self._trained_module
        if last is not None and not self._restored and last() is not pl_module:
            warnings.warn(
                f"CSLCallback: this fit trains another {type(pl_module).__name__} object than "
                f"the one this callback's tracker recorded, which keeps its CSL (epoch "
                f"{self._tracker.epoch}): the new model's is added to it. Use a new "
                "CSLCallback for each model (in a k-fold or seed loop, make the callbacks "
                "inside the loop); to continue a model in a new object, resume with "
                "fit(ckpt_path=...), which restores the tracker with it",
                RuntimeWarning,
                stacklevel=3,
            )
        self._trained_module = weakref.ref(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close_missed_epochs(trainer)

    def _close_missed_epochs(self, trainer: Trainer) -> None:
        # A checkpoint saved at an epoch's last batch (every_n_train_steps) precedes
        # on_train_epoch_end; resumed from it, Lightning goes on with the next epoch without
        # that hook. Close the epoch before anything of the next one is recorded.
        while self._epochs_closed is not None and self._epochs_closed < trainer.current_epoch:
            self._tracker.end_epoch()
            self._epochs_closed += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._warn_input_grad_scale(trainer)
        closed = self._epochs_closed
        if self._restored and closed is not None and closed > trainer.current_epoch:
            # this epoch was closed before the checkpoint this fit resumed from was saved:
            # resumed with max_steps, Lightning 2.6 restarts at that epoch's end, runs a
            # stray batch and ends the epoch again (the tracker went one epoch ahead). Only
            # after a restore: a new Trainer's epochs count from 0 again
            return
        if not _epoch_finished(trainer):
            # Training stops part-way through the epoch (max_steps, should_stop): the
            # ModelCheckpoint saves that follow must hold it open. Resumed with max_steps,
            # Lightning goes on with that epoch (closed here, the resumed run closed it
            # again, one epoch ahead); resumed by epochs, it starts the next one and
            # _close_missed_epochs closes it then. on_train_end closes it, after the saves.
            self._cut_short = True
            return
        self._tracker.end_epoch()  # combines the ranks under torch.distributed
        self._epochs_closed = trainer.current_epoch + 1

    # An eval loop (the sanity check is one) must not record into the training buffers: a
    # validation_step that reuses the training step's accumulate(..., self.csl_tracker)
    # added every validation batch to the CSL of the training samples at those indices.
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._note_versions()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._note_versions()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._note_versions()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_eval_records("validation (or the sanity check before training)")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_eval_records("test")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._refuse_eval_records("predict")

    def _note_versions(self) -> None:
        t = self._tracker
        self._versions_at_eval = None if t is None else training_mark(t)

    def _refuse_eval_records(self, loop: str) -> None:
        # (not the version counters alone: a tracker.sync() in the loop, as after an eval
        # pass under DDP, rewrites the buffers and read as a recording)
        before, self._versions_at_eval = self._versions_at_eval, None
        t = self._tracker
        if before is None or t is None or not recorded_since(t, before):
            return
        raise RuntimeError(
            f"CSLCallback: the {loop} loop recorded into pl_module.{self.attr}, the training "
            "tracker: its batches were added to the CSL of the training samples at their "
            "indices. Compute the loss there with F.cross_entropy (or score the training set "
            "with csl_fast.score_epoch, which fills the tracker's eval buffers), not "
            f"csl_fast.accumulate(..., self.{self.attr})"
        )

    def _warn_input_grad_scale(self, trainer: Trainer) -> None:
        # Lightning divides the loss by accumulate_grad_batches and, in 16-bit mixed
        # precision, multiplies it by the GradScaler's scale before backward: watch's hook
        # sees that gradient, and only the user's reduction_scale can undo it.
        k = trainer.accumulate_grad_batches
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self._scale_warned or (k == 1 and scaler is None):
            return
        if not self._tracker._watched_at_default_scale:  # a reduction_scale of the user's
            return
        self._scale_warned = True
        scaled = [f"divides the loss by accumulate_grad_batches = {k}"] if k > 1 else []
        if scaler is not None:
            scaled.append("multiplies it by the GradScaler's scale")
        warnings.warn(
            f"CSLCallback: input-gradient norms were recorded (tracker.watch) at its default "
            f"scale B while Lightning {' and '.join(scaled)} before backward, which reaches "
            f"the watched gradient: pass reduction_scale=B * {k}"
            + (" / self.trainer.precision_plugin.scaler.get_scale()" if scaler else "")
            + " to watch",
            RuntimeWarning,
            stacklevel=2,
        )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._cut_short:  # the epoch training stopped in: this fit is over
            self._cut_short = False
            self._tracker.end_epoch()  # (syncs the ranks first)
            self._epochs_closed += 1
        self._tracker.sync()  # eval-pass state recorded after the last end_epoch
        if self.save_path is not None and trainer.is_global_zero:
            # a missing folder failed only here, after training, losing a spawned run's tracker
            os.makedirs(os.path.dirname(os.path.abspath(self.save_path)), exist_ok=True)
            self._tracker.save(self.save_path)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank: sync first so the saved state is
        # global (a no-op in one process), then store CPU copies.
        if self._tracker is None:
            return {}
        self._tracker.sync()
        state = self._tracker.state_dict()
        state["buffers"] = {k: v.detach().cpu().clone() for k, v in state["buffers"].items()}
        state["histories"] = {k: v.detach().cpu() for k, v in state["histories"].items()}
        state[_EPOCHS_CLOSED] = self._epochs_closed
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._pending = dict(state_dict)
        self._epochs_closed = self._pending.pop(_EPOCHS_CLOSED, None)
        self._restored = True
        self._apply_pending()

    def _apply_pending(self) -> None:
        if self._pending is None or self._tracker is None:
            return
        self._tracker.load_state_dict(self._pending)
        mark_synced(self._tracker)  # every rank loaded the same global state
        self._pending = None

    def __repr__(self) -> str:
        return f"CSLCallback(attr={self.attr!r}, tracker={self._tracker!r})"


def _epoch_finished(trainer: Trainer) -> bool:
    """Whether the training epoch ran to its last batch (the test of Lightning's epoch
    loop, ``_num_ready_batches_reached``, on its public progress counters)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready == trainer.num_training_batches


def _tensor_parallel_size(trainer: Trainer) -> int:
    """The size of the ``tensor_parallel`` dimension of the strategy's device mesh
    (``ModelParallelStrategy``), 1 for strategies without one."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)  # (the property raises before set-up)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return int(mesh["tensor_parallel"].size()) if "tensor_parallel" in names else 1
