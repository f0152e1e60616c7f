"""CSLCallback end to end with a tiny model on the CPU (skipped without Lightning)."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker
from csl_fast.data import IndexedDataset
from csl_fast.distributed import loaded_unmarked

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip(
        "pytorch_lightning", reason="PyTorch Lightning not installed: pip install lightning"
    )
from csl_fast.integrations.lightning import CSLCallback

N, C, D = 24, 3, 5


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(D, C)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        return csl_fast.accumulate(self.net(x), y, index, self.csl_tracker)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return DataLoader(IndexedDataset(TensorDataset(x, y)), batch_size=7, shuffle=True)


def _trainer(epochs: int, callback: CSLCallback, tmp_path, devices=1, **options) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        **options,
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def test_callback_tracks_fit_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    cb = CSLCallback(N, C, save_path=tmp_path / "run.csl")
    trainer = _trainer(2, cb, tmp_path)
    trainer.fit(model, _loader())
    tracker = cb.tracker
    assert model.csl_tracker is tracker
    assert tracker.epoch == 2
    assert torch.equal(tracker.csl_count, torch.full((N,), 2.0))
    assert bool((tracker.csl_sum > 0).all())
    saved = CSLTracker.from_file(tmp_path / "run.csl")
    assert torch.equal(saved.csl_sum, tracker.csl_sum)

    # The tracker travels in Lightning checkpoints and is restored on resume.
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2 = CSLCallback(N, C)
    _trainer(3, cb2, tmp_path).fit(Tiny(), _loader(), ckpt_path=ckpt)
    assert cb2.tracker.epoch == 3
    assert torch.equal(cb2.tracker.csl_count, torch.full((N,), 3.0))
    assert bool((cb2.tracker.csl_sum > tracker.csl_sum).all())


def test_a_tracker_loaded_from_a_file_is_marked_synced_when_training_starts(tmp_path):
    """Unmarked, the first end_epoch under DDP refused it (SyncError), after a whole epoch
    of training (the refusal itself: tests/test_distributed.py)."""
    first = CSLCallback(N, C, save_path=tmp_path / "run.csl")
    _trainer(1, first, tmp_path).fit(Tiny(), _loader())
    cb = CSLCallback(tracker=csl_fast.load(tmp_path / "run.csl"))
    assert loaded_unmarked(cb.tracker)
    _trainer(1, cb, tmp_path).fit(Tiny(), _loader())  # one more epoch
    assert not loaded_unmarked(cb.tracker)
    assert cb.tracker.epoch == 2 and torch.equal(cb.tracker.csl_count, torch.full((N,), 2.0))


def test_resume_from_a_step_checkpoint_at_an_epoch_end_keeps_the_epochs(tmp_path):
    """every_n_train_steps at an epoch's last batch saves before on_train_epoch_end, and
    Lightning resumes with the next epoch without that hook: the tracker ended one epoch
    behind (2 of 3, one loss-curve row pooling two epochs)."""
    every = pl.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=4, save_top_k=-1)  # 4/epoch
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[CSLCallback(N, C, history=True), every],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), _loader())
    cb = CSLCallback(N, C, history=True)
    _trainer(3, cb, tmp_path).fit(Tiny(), _loader(), ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert (cb.tracker.epoch, cb.tracker.loss_history.shape[0]) == (3, 3)
    assert torch.equal(cb.tracker.csl_count, torch.full((N,), 3.0))
    assert not cb.tracker.loss_history.isnan().any()


class StopAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True  # as Timer (max_time) or a user's callback does


@pytest.mark.parametrize("stop", ["max_steps", "should_stop"])
@pytest.mark.parametrize("resume", ["max_steps", "max_epochs"])
def test_a_fit_stopped_part_way_through_an_epoch_resumes_on_the_right_epoch(tmp_path, stop, resume):
    """on_train_epoch_end closed the cut-short epoch before ModelCheckpoint saved it; resumed
    with max_steps, Lightning goes on with that epoch and the tracker closed it again, one
    epoch ahead (a loss-curve row split in two). Resumed by epochs, Lightning starts the
    next one."""
    last = pl.callbacks.ModelCheckpoint(tmp_path, save_last=True)
    first = CSLCallback(N, C, history=True)
    limit = {"max_steps": 6} if stop == "max_steps" else {"max_epochs": 3}  # 4 steps/epoch
    extra = [StopAtStep(6)] if stop == "should_stop" else []
    trainer = pl.Trainer(
        callbacks=[first, last, *extra],
        **limit,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), _loader())
    assert first.tracker.epoch == trainer.current_epoch == 2  # this fit is over
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[first.state_key]["epoch"] == 1  # held open for a resume
    cb = CSLCallback(N, C, history=True)
    by_steps = resume == "max_steps"  # (with max_epochs too, Lightning 2.6 miscounts epochs)
    more = _trainer(-1 if by_steps else 3, cb, tmp_path, **({"max_steps": 10} if by_steps else {}))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        more.fit(Tiny(), _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert cb.tracker.epoch == more.current_epoch == 3
    assert cb.tracker.loss_history.shape[0] == 3


def test_an_epoch_closed_before_its_checkpoint_is_not_closed_again_resumed_by_steps(tmp_path):
    """A checkpoint saved at an epoch's end (ModelCheckpoint without validation) holds the
    epoch closed; resumed with max_steps, Lightning 2.6 restarts at that epoch's end and
    ends it again, and the tracker went one epoch ahead (3 against Lightning's 2)."""
    each = pl.callbacks.ModelCheckpoint(tmp_path, save_last=True)
    first = CSLCallback(N, C)
    trainer = pl.Trainer(
        callbacks=[first, each],
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), _loader())
    cb = CSLCallback(N, C)
    more = _trainer(-1, cb, tmp_path, max_steps=8)  # one more epoch of 4 steps
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        more.fit(Tiny(), _loader(), ckpt_path=tmp_path / "last.ckpt")
    assert cb.tracker.epoch == more.current_epoch == 2


class FailAtSecondEpochEnd(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise OSError("a checkpoint that could not be written")


def test_a_fit_that_failed_after_a_cut_short_epoch_leaves_no_epoch_to_close_twice(tmp_path):
    """A fit stopped part-way by max_steps whose on_train_end never ran (a callback failed
    at the epoch's end) left the epoch marked cut short: the next fit closed an extra,
    empty epoch (a loss-curve row of NaN)."""
    cb = CSLCallback(N, C, history=True)
    model = Tiny()
    failing = pl.Trainer(
        callbacks=[cb, FailAtSecondEpochEnd()],
        max_steps=6,  # 4 steps an epoch: stops in the second
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,  # (its checkpoints went to ./checkpoints)
    )
    with pytest.raises(OSError, match="could not be written"):
        failing.fit(model, _loader())
    epoch = cb.tracker.epoch
    assert epoch == 1  # the second epoch, cut short, is open
    _trainer(1, cb, tmp_path).fit(model, _loader())
    assert cb.tracker.epoch == epoch + 1
    assert not torch.isnan(cb.tracker.loss_history[-1]).all()


def test_a_callback_reused_for_another_model_warns_and_a_continued_one_does_not(tmp_path):
    """A k-fold or seed loop that builds its callbacks once summed the models' CSL,
    silently. A refit of the same module, and a resume whose checkpoint restores the
    tracker into a new module, continue one model: no warning."""
    cb = CSLCallback(N, C)
    model = Tiny()
    trainer = _trainer(1, cb, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer.fit(model, _loader())
        trainer.save_checkpoint(tmp_path / "one.ckpt")
        _trainer(2, cb, tmp_path).fit(model, _loader())  # the same module, further
        _trainer(3, cb, tmp_path).fit(Tiny(), _loader(), ckpt_path=tmp_path / "one.ckpt")
    assert cb.tracker.epoch == 3 and cb.tracker.csl_count.tolist() == [3.0] * N
    with pytest.warns(RuntimeWarning, match="trains another Tiny object than the one this"):
        _trainer(1, cb, tmp_path).fit(Tiny(), _loader())
    pickle.dumps(cb)  # (spawn launchers pickle it: no weak reference in its state)


def test_callback_needs_a_size():
    with pytest.raises(ValueError, match="num_samples"):
        CSLCallback()


_BAD_OPTIONS = {
    "unknown tracker argument": (
        {"num_samples": N, "dtyp": torch.float64},
        TypeError,
        r"CSLCallback: in tracker_kwargs, \['dtyp'\] are not CSLTracker arguments; the options "
        r"are \['backend', 'deterministic', 'dtype', 'history', 'num_labels'\]",
    ),
    "device set by the callback": (
        {"num_samples": N, "device": "cpu"},
        TypeError,
        r"\['device'\] are set by CSLCallback \(pass a tracker created with them",
    ),
    "bad dtype": (
        {"num_samples": N, "dtype": torch.int32},
        TypeError,
        "CSLCallback: CSLTracker: dtype must be torch.float32 or torch.float64",
    ),
    "bad backend": ({"num_samples": N, "backend": "nope"}, ValueError, "backend must be 'auto'"),
    "bad num_labels": ({"num_samples": N, "num_labels": 0}, ValueError, "num_labels must be"),
    "bad num_samples": ({"num_samples": -1}, ValueError, "num_samples must be an int >= 0"),
    "bool num_samples": ({"num_samples": True}, ValueError, "num_samples must be an int >= 0"),
    "bad num_classes": ({"num_samples": N, "num_classes": 0}, ValueError, "num_classes must be"),
    "no size": ({}, ValueError, "pass num_samples"),
    "not a tracker": ({"tracker": "run.csl"}, TypeError, "must be a csl_fast.CSLTracker, got str"),
    "tracker and size": (
        {"tracker": CSLTracker(N), "num_classes": C, "history": True},
        ValueError,
        "num_classes, history would be ignored with a tracker passed in",
    ),
    "bad attr": ({"num_samples": N, "attr": "csl tracker"}, ValueError, "attr must be a Python"),
    "bad save_path": ({"num_samples": N, "save_path": 3}, TypeError, "save_path must be a str"),
    "save_path a folder": (
        {"num_samples": N, "save_path": os.curdir},
        IsADirectoryError,
        "it is a folder; give a file name",
    ),
    "save_path ending with a separator": (
        {"num_samples": N, "save_path": os.path.join("runs", "")},
        IsADirectoryError,
        "it ends with a separator",
    ),
}


@pytest.mark.parametrize("case", list(_BAD_OPTIONS))
def test_bad_arguments_are_refused_at_construction(case):
    """CSLCallback(N, dtyp=...) constructed, and the trainer failed at setup (a typo in a
    tracker option, device=..., a dtype the tracker refuses); tracker=... with sizes or
    options ignored them."""
    kwargs, error, match = _BAD_OPTIONS[case]
    with pytest.raises(error, match=match):
        CSLCallback(**kwargs)


def test_good_arguments_are_kept():
    cb = CSLCallback(N, C, dtype=torch.float64, history=True, num_labels=2, deterministic=True)
    assert cb.tracker is None  # created at setup, on the module's device
    assert cb.tracker_kwargs == {
        "dtype": torch.float64, "history": True, "num_labels": 2, "deterministic": True
    }  # fmt: skip
    tracker = CSLTracker(N)
    assert CSLCallback(tracker=tracker).tracker is tracker


def test_after_a_fit_in_other_processes_the_tracker_is_read_from_save_path(tmp_path):
    """Spawn launchers (ddp_spawn, ddp_notebook, ddp_fork) train in child processes: the
    launching process's callback reads the file rank 0 wrote, never an older one."""
    path = tmp_path / "run.csl"
    old = CSLTracker(N, C)
    old.save(path)
    os.utime(path, (1, 1))  # a file from an earlier run
    cb = CSLCallback(N, C, save_path=path)
    assert cb.tracker is None
    written = CSLTracker(N, C)  # as rank 0 writes it at the end of training
    csl_fast.accumulate(
        torch.randn(N, C), torch.zeros(N, dtype=torch.long), torch.arange(N), written
    )
    written.end_epoch()
    written.save(path)
    assert cb.tracker is not None and cb.tracker.epoch == 1
    assert torch.equal(cb.tracker.csl_sum, written.csl_sum)
    assert CSLCallback(N, C).tracker is None  # no save_path: nothing to read
    # another fit with this callback writes a newer file: read again (it kept the first)
    written.end_epoch()
    written.save(path)
    assert cb.tracker.epoch == 2


class SharedSteps(Tiny):
    """A validation_step (or test_step) that reuses the training step's code."""

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


@pytest.mark.parametrize("loop", ["sanity check", "test"])
def test_an_eval_loop_recording_into_the_training_tracker_is_refused(tmp_path, loop):
    """The sanity check and every validation loop added their batches to the training
    samples' CSL at those indices, without a word."""
    cb = CSLCallback(N, C)
    model = SharedSteps()
    if loop == "sanity check":
        trainer = _trainer(1, cb, tmp_path, num_sanity_val_steps=1)
        with pytest.raises(RuntimeError, match=r"validation \(or the sanity check.*recorded into"):
            trainer.fit(model, _loader(), _loader())
        assert trainer.global_step == 0  # stopped before training
    else:
        trainer = _trainer(1, cb, tmp_path)
        trainer.fit(model, _loader())
        with pytest.raises(RuntimeError, match=r"the test loop recorded into pl_module"):
            trainer.test(model, _loader())
    # a validation loop that does not record passes
    clean = CSLCallback(N, C)
    _trainer(1, clean, tmp_path, num_sanity_val_steps=1).fit(Tiny(), _loader(), _loader())
    assert clean.tracker.csl_count.tolist() == [1.0] * N


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_a_tracker_passed_to_a_spawn_or_fork_launcher_counts_each_presentation_once(
    tmp_path, strategy
):
    """ddp_spawn pickled the callback's tracker into shared memory: both ranks added into
    the same buffers and end_epoch's all-reduce added them again (every count doubled, in
    the file and in the launcher's tracker). ddp_fork left the launcher's callback.tracker
    the untouched tracker passed in, not the file (audit helper-111)."""
    path = tmp_path / "run.csl"
    cb = CSLCallback(tracker=CSLTracker(N, C), save_path=path)
    _trainer(2, cb, tmp_path, devices=2, strategy=strategy).fit(Tiny(), _loader())
    for tracker in (CSLTracker.from_file(path), cb.tracker):
        assert tracker.csl_count.tolist() == [2.0] * N  # 2 epochs, each sample once an epoch


def test_save_path_in_a_missing_folder_is_written(tmp_path):
    """A missing folder failed only after training, and with a spawn launcher the tracker
    was lost with the process."""
    path = tmp_path / "runs" / "a" / "run.csl"
    cb = CSLCallback(N, C, save_path=path)
    _trainer(1, cb, tmp_path).fit(Tiny(), _loader())
    assert CSLTracker.from_file(path).epoch == 1


def test_resuming_from_a_checkpoint_without_the_callbacks_state_warns(tmp_path):
    """The tracker started empty at epoch 0 while Lightning went on at epoch 2, silently."""
    model = Tiny()
    model.csl_tracker = CSLTracker(N, C)
    trainer = _trainer(2, CSLCallback(tracker=CSLTracker(N, C), attr="other"), tmp_path)
    trainer.fit(model, _loader())
    trainer.save_checkpoint(tmp_path / "foreign.ckpt")
    cb = CSLCallback(N, C)
    with pytest.warns(RuntimeWarning, match=r"holds no CSLCallback\[csl_tracker\] state.*epoch 2"):
        _trainer(3, cb, tmp_path).fit(Tiny(), _loader(), ckpt_path=tmp_path / "foreign.ckpt")
    assert cb.tracker.epoch == 1


def test_a_checkpoint_from_before_the_epochs_entry_resumes_without_a_warning(tmp_path):
    """A checkpoint written before the callback kept lightning_epochs_closed holds the
    tracker's state: resuming from it said the state was missing."""
    trainer = _trainer(2, CSLCallback(N, C), tmp_path)
    trainer.fit(Tiny(), _loader())
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=False)
    del ckpt["callbacks"]["CSLCallback[csl_tracker]"]["lightning_epochs_closed"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    cb = CSLCallback(N, C)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(3, cb, tmp_path).fit(Tiny(), _loader(), ckpt_path=tmp_path / "old.ckpt")
    assert not [w for w in caught if "holds no CSLCallback" in str(w.message)]
    assert cb.tracker.epoch == 3 and torch.equal(cb.tracker.csl_count, torch.full((N,), 3.0))


class Watched(Tiny):
    scale = None  # watch's default, B

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        scale = None if self.scale is None else self.scale * len(index)
        x = self.csl_tracker.watch(x, index, scale)
        return csl_fast.accumulate(self.net(x), y, index, self.csl_tracker)


@pytest.mark.parametrize(("accumulate", "scale"), [(1, None), (2, None), (2, 2)])
def test_watch_under_gradient_accumulation_warns_once(tmp_path, accumulate, scale):
    """Lightning divides the loss by accumulate_grad_batches before backward: the watched
    squared norms were accumulate^2 too small, silently. A reduction_scale of the user's
    is taken to include it."""
    model = Watched()
    model.scale = scale
    trainer = _trainer(2, CSLCallback(N, C), tmp_path, accumulate_grad_batches=accumulate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, _loader())
    said = [str(w.message) for w in caught if "input-gradient norms" in str(w.message)]
    if accumulate == 1 or scale is not None:
        assert said == []
    else:
        assert len(said) == 1 and "reduction_scale=B * 2" in said[0]


class _Mesh:
    """A device mesh of ModelParallelStrategy: data_parallel x tensor_parallel."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __getitem__(self, name: str):
        return type("Dim", (), {"size": lambda _: self.tp if name == "tensor_parallel" else 1})()


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallelism_is_refused_before_anything_is_recorded(tp):
    # the ranks of a tensor-parallel group train on the same batch: end_epoch's sync over
    # every rank counted each presentation tp times, silently
    callback = CSLCallback(num_samples=N, num_classes=C)
    strategy = type("Strategy", (), {"_device_mesh": _Mesh(tp)})()
    trainer = type("Trainer", (), {"strategy": strategy})()
    if tp == 1:
        callback.setup(trainer, Tiny(), "fit")
        return
    with pytest.raises(RuntimeError, match=r"CSLCallback: tensor parallelism \(tp_size=2\)"):
        callback.setup(trainer, Tiny(), "fit")
