"""CSLTrainer end to end with a tiny randomly initialised model on the CPU (no downloads;
skipped without transformers/accelerate)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers not installed: pip install transformers accelerate"
)
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate: pip install accelerate")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
    from csl_fast import CSLTracker
    from csl_fast.distributed import loaded_unmarked
    from csl_fast.integrations.huggingface import TRACKER_FILE, CSLTrainer, with_index

N, C, VOCAB, LEN = 20, 3, 30, 6


class Examples(torch.utils.data.Dataset):
    """Dict examples with an extra column the model does not take (removed by the Trainer)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (N, LEN), generator=g)
        self.labels = torch.randint(0, C, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "text": f"example {i}"}


def _model():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LEN,
        num_labels=C,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def _args(tmp_path, epochs: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,  # 20 = 8 + 8 + 4: an uneven last batch
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        **kw,
    )


def test_trainer_records_every_example_and_resumes(tmp_path):
    train = with_index(Examples())
    args = _args(tmp_path, 2, save_strategy="epoch")
    trainer = CSLTrainer(model=_model(), args=args, train_dataset=train, eval_dataset=train)
    trainer.train()
    tracker = trainer.csl_tracker
    assert tracker.epoch == 2
    assert torch.equal(tracker.csl_count, torch.full((N,), 2.0))
    assert bool((tracker.csl_sum > 0).all())
    count = tracker.csl_count.clone()
    trainer.evaluate()  # evaluation is not recorded
    assert torch.equal(tracker.csl_count, count)

    ckpt = os.path.join(tmp_path, "checkpoint-3")  # 3 steps per epoch
    assert os.path.exists(os.path.join(ckpt, TRACKER_FILE))
    assert CSLTracker.from_file(os.path.join(ckpt, TRACKER_FILE)).epoch == 1
    resumed = CSLTrainer(
        model=_model(), args=_args(tmp_path, 2, save_strategy="no"), train_dataset=train
    )
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.csl_tracker.epoch == 2
    assert torch.equal(resumed.csl_tracker.csl_count, torch.full((N,), 2.0))


def test_resume_restores_the_tracker_where_the_trainer_skips_load_from_checkpoint(tmp_path):
    """DeepSpeed resumes load through deepspeed_load_checkpoint, never through
    Trainer._load_from_checkpoint, where the tracker was restored: it restarted empty."""
    train = with_index(Examples())
    CSLTrainer(
        model=_model(), args=_args(tmp_path, 1, save_strategy="epoch"), train_dataset=train
    ).train()
    resumed = CSLTrainer(
        model=_model(), args=_args(tmp_path, 2, save_strategy="no"), train_dataset=train
    )
    resumed._load_from_checkpoint = lambda *args, **kwargs: None  # as under DeepSpeed
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir
    assert resumed.csl_tracker.epoch == 2
    assert torch.equal(resumed.csl_tracker.csl_count, torch.full((N,), 2.0))


def test_a_tracker_loaded_from_a_file_is_marked_synced_when_training_starts(tmp_path):
    """Unmarked, the first end_epoch under DDP refused it (SyncError), after a whole epoch
    of training (the refusal itself: tests/test_distributed.py)."""
    train = with_index(Examples())
    args = _args(tmp_path, 1, save_strategy="no")
    first = CSLTrainer(model=_model(), args=args, train_dataset=train)
    first.train()
    first.csl_tracker.save(tmp_path / "run.csl")
    loaded = csl_fast.load(tmp_path / "run.csl")
    assert loaded_unmarked(loaded)
    more = CSLTrainer(model=_model(), args=args, train_dataset=train, csl_tracker=loaded)
    more.train()
    assert not loaded_unmarked(loaded)
    assert loaded.epoch == 2 and torch.equal(loaded.csl_count, torch.full((N,), 2.0))


def test_resume_from_a_step_checkpoint_at_an_epoch_end_keeps_the_epochs(tmp_path):
    """save_steps at an epoch's last step saved the tracker before its end_epoch; resumed,
    the Trainer started the next epoch and the tracker ended one epoch behind (epoch 1
    of 2, one loss-curve row pooling both epochs)."""
    train = with_index(Examples())
    kw = {"csl_tracker_kwargs": {"history": True}, "train_dataset": train}
    args = _args(tmp_path, 2, save_strategy="steps", save_steps=3)  # 3 steps per epoch
    full = CSLTrainer(model=_model(), args=args, **kw)
    full.train()
    saved = CSLTracker.from_file(os.path.join(tmp_path, "checkpoint-3", TRACKER_FILE))
    assert (saved.epoch, saved.loss_history.shape[0]) == (1, 1)
    assert full.csl_tracker.epoch == 2  # not closed twice
    resumed = CSLTrainer(model=_model(), args=_args(tmp_path, 2, save_strategy="no"), **kw)
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))
    got, want = resumed.csl_tracker, full.csl_tracker
    assert got.epoch == 2 and torch.equal(got.csl_count, want.csl_count)
    torch.testing.assert_close(got.loss_history, want.loss_history)


def test_a_run_stopped_part_way_through_an_epoch_resumes_on_the_same_epoch(tmp_path):
    """max_steps inside an epoch: on_epoch_end closed the partial epoch before the epoch
    save, and the resumed run (which goes on with that epoch) closed it again, one epoch
    ahead (learned_epoch shifted, a loss-curve row split in two)."""
    kw = {"csl_tracker_kwargs": {"history": True}, "train_dataset": with_index(Examples())}
    steady = {"lr_scheduler_type": "constant"}  # (the resumed run's schedule as the full one's)
    full = CSLTrainer(
        model=_model(), args=_args(tmp_path / "full", 3, save_strategy="no", **steady), **kw
    )
    full.train()
    first = CSLTrainer(
        model=_model(),
        args=_args(tmp_path, 3, max_steps=4, save_strategy="epoch", **steady),  # 3 a epoch
        **kw,
    )
    first.train()
    assert first.csl_tracker.epoch == 2  # the run is over: its last epoch closed
    saved = CSLTracker.from_file(os.path.join(tmp_path, "checkpoint-4", TRACKER_FILE))
    assert saved.epoch == 1  # held open for a resume
    resumed = CSLTrainer(
        model=_model(), args=_args(tmp_path, 3, max_steps=9, save_strategy="no", **steady), **kw
    )
    resumed.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-4"))
    got, want = resumed.csl_tracker, full.csl_tracker
    assert got.epoch == want.epoch == 3
    assert torch.equal(got.learned_epoch, want.learned_epoch)
    assert torch.equal(got.csl_count, want.csl_count)
    torch.testing.assert_close(got.loss_history, want.loss_history)


def test_tensor_parallelism_is_refused_before_training(tmp_path):
    # the ranks of a tensor-parallel group train on the same batch: the epoch's sync over
    # every rank counted each presentation tp times, silently
    trainer = CSLTrainer(
        model=_model(),
        args=_args(tmp_path, 1, save_strategy="no"),
        train_dataset=with_index(Examples()),
    )
    trainer.get_tp_size = lambda: 2
    with pytest.raises(RuntimeError, match=r"CSLTrainer: tensor parallelism \(tp_size=2\)"):
        trainer.train()
    assert trainer.csl_tracker is None or not trainer.csl_tracker.csl_count.any()


def test_a_second_train_call_closes_its_epochs_too(tmp_path):
    """train() twice on one trainer, with a save at each epoch's last step: the second run
    counts its steps from 0 again, met the first run's marks, and left its epoch open (the
    next end_epoch pooled two epochs)."""
    kw = {"csl_tracker_kwargs": {"history": True}, "train_dataset": with_index(Examples())}
    trainer = CSLTrainer(
        model=_model(), args=_args(tmp_path, 1, save_strategy="steps", save_steps=3), **kw
    )
    trainer.train()
    trainer.train()
    tracker = trainer.csl_tracker
    assert tracker.epoch == 2 and tracker.loss_history.shape[0] == 2
    assert tracker.csl_count.tolist() == [2.0] * N


def test_hyperparameter_search_is_refused_with_the_way_out(tmp_path):
    # every trial recorded into the one tracker, and its tracker files went to output_dir
    trainer = CSLTrainer(
        model=_model(), args=_args(tmp_path, 1), train_dataset=with_index(Examples())
    )
    with pytest.raises(NotImplementedError, match=r"run the search with transformers\.Trainer"):
        trainer.hyperparameter_search(n_trials=2)


def test_resume_keeps_the_tracker_options_and_warns_without_a_tracker_file(tmp_path):
    """A resumed CSLTrainer built its tracker from the file alone (csl_tracker_kwargs's
    backend and deterministic were dropped, a different history ignored), and a
    checkpoint without a tracker file started an empty tracker without a word."""
    train = with_index(Examples())
    opts = {"history": True, "deterministic": True, "backend": "reference"}
    args = _args(tmp_path, 1, save_strategy="epoch")
    CSLTrainer(model=_model(), args=args, train_dataset=train, csl_tracker_kwargs=opts).train()
    ckpt = os.path.join(tmp_path, "checkpoint-3")
    more = _args(tmp_path, 2, save_strategy="no")
    resumed = CSLTrainer(model=_model(), args=more, train_dataset=train, csl_tracker_kwargs=opts)
    resumed.train(resume_from_checkpoint=ckpt)
    got = resumed.csl_tracker
    assert (got.epoch, got.history, got.deterministic, got.backend) == (2, True, True, "reference")
    other = {**opts, "history": False}
    wrong = CSLTrainer(model=_model(), args=more, train_dataset=train, csl_tracker_kwargs=other)
    with pytest.raises(
        ValueError, match=r"history=False but the checkpoint's tracker .* history=True"
    ):
        wrong.train(resume_from_checkpoint=ckpt)
    os.remove(os.path.join(ckpt, TRACKER_FILE))
    bare = CSLTrainer(model=_model(), args=more, train_dataset=train)
    with pytest.warns(RuntimeWarning, match="holds no csl_tracker.csl: the tracker records only"):
        bare.train(resume_from_checkpoint=ckpt)
    assert torch.equal(bare.csl_tracker.csl_count, torch.ones(N))  # the resumed epoch only
    # a tracker passed in from a file is kept, and marked synced (SyncError under DDP)
    bare.csl_tracker.save(tmp_path / "run.csl")
    loaded = csl_fast.load(tmp_path / "run.csl")
    given = CSLTrainer(model=_model(), args=more, train_dataset=train, csl_tracker=loaded)
    with pytest.warns(RuntimeWarning, match="the tracker passed in keeps the state it had"):
        given.train(resume_from_checkpoint=ckpt)
    assert not loaded_unmarked(loaded) and torch.equal(loaded.csl_count, torch.full((N,), 2.0))


def test_trainer_without_index_says_how_to_add_it(tmp_path):
    trainer = CSLTrainer(model=_model(), args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=Examples())  # fmt: skip
    with pytest.raises(KeyError, match="with_index"):
        trainer.train()


class WithIdx(Examples):
    """GLUE's index column: "idx"."""

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "idx": i}


@pytest.mark.parametrize("remove", [True, False])
def test_an_idx_column_is_offered_as_the_index_column(tmp_path, remove):
    """The default csl_index_column is "index"; a dataset's "idx" got a hint about the
    collator and with_index, and remove_unused_columns had dropped it before the check."""
    args = _args(tmp_path, 1, save_strategy="no", remove_unused_columns=remove)
    trainer = CSLTrainer(model=_model(), args=args, train_dataset=WithIdx())
    if remove:
        hint = r"The train dataset has a column 'idx' \(remove_unused_columns dropped it: the"
    else:
        hint = "The batches have a column 'idx':"
    with pytest.raises(KeyError, match=hint + r".* pass csl_index_column='idx'"):
        trainer.train()
    args = _args(tmp_path, 1, save_strategy="no")
    trainer = CSLTrainer(model=_model(), args=args, train_dataset=WithIdx(), csl_index_column="idx")
    trainer.train()  # (the way out works)
    assert trainer.csl_tracker.csl_count.tolist() == [1.0] * N


@pytest.mark.parametrize(
    "num_labels, labels",
    [(1, torch.rand(4)), (1, torch.randint(0, 2, (4,))), (C, (torch.rand(4, C) < 0.5).float())],
    ids=["regression", "one class", "multi-label"],
)
def test_regression_and_multi_label_models_are_refused(tmp_path, num_labels, labels):
    # Cross entropy of int64(labels) over one class is 0: nothing would train, CSL all 0.
    config = _model().config
    config.num_labels = num_labels
    model = transformers.BertForSequenceClassification(config)
    trainer = CSLTrainer(model=model, args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=with_index(Examples()))  # fmt: skip
    batch = {"input_ids": torch.randint(1, VOCAB, (4, LEN)), "labels": labels,
             "index": torch.arange(4)}  # fmt: skip
    with pytest.raises(ValueError, match=r"record_loss \(regression\) or csl_fast\.accumulate_bce"):
        trainer.compute_loss(model.train(), batch)
    assert trainer.csl_tracker is None


def test_compute_loss_func_is_refused(tmp_path):
    # With it, every training step went to the plain Trainer: no CSL, no error.
    args = _args(tmp_path, 1, save_strategy="no")
    train = with_index(Examples())
    with pytest.raises(ValueError, match="compute_loss_func returns a batch loss"):
        CSLTrainer(model=_model(), args=args, train_dataset=train, compute_loss_func=lambda *a: 0)


def test_batches_of_the_wrong_kind_are_refused_by_name(tmp_path):
    # A float index column was cast to int64 (0.7 recorded into sample 0); a list index
    # raised AttributeError 'list' object has no attribute 'to'; a tuple batch raised
    # "dictionary update sequence element #0 has length 4"
    model = _model().train()
    trainer = CSLTrainer(model=model, args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=with_index(Examples()))  # fmt: skip
    ids, labels = torch.randint(1, VOCAB, (4, LEN)), torch.randint(0, C, (4,))
    for index in (torch.tensor([0.7, 1.0, 2.0, 3.0]), torch.ones(4, dtype=torch.bool)):
        with pytest.raises(TypeError, match=r"'index' column must hold integer dataset indices"):
            trainer.compute_loss(model, {"input_ids": ids, "labels": labels, "index": index})
    assert trainer.csl_tracker is None
    with pytest.raises(TypeError, match=r"batches must be dicts .* got tuple"):
        trainer.compute_loss(model, (ids, labels, torch.arange(4)))
    trainer.compute_loss(model, {"input_ids": ids, "labels": labels, "index": [0, 1, 2, 3]})
    assert trainer.csl_tracker.csl_count.tolist() == [1.0] * 4 + [0.0] * (N - 4)


def test_a_dataset_without_len_asks_for_a_tracker(tmp_path):
    # the default tracker's N = len(train_dataset) raised "object of type ... has no len()"
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from with_index(Examples())

    args = _args(tmp_path, 1, save_strategy="no", max_steps=1)
    trainer = CSLTrainer(model=_model(), args=args, train_dataset=Stream())
    with pytest.raises(TypeError, match=r"has no len\(\).*csl_tracker=csl_fast.CSLTracker\(N"):
        trainer.train()
    tracker = CSLTracker(N, C)
    args = _args(tmp_path, 1, save_strategy="no", max_steps=1)
    CSLTrainer(model=_model(), args=args, train_dataset=Stream(), csl_tracker=tracker).train()
    assert tracker.csl_count.sum().item() == 8  # one batch of 8 examples


def test_indices_of_a_larger_dataset_name_the_likely_cause(tmp_path):
    # a Subset of an indexed dataset keeps the full set's indices, and the default tracker
    # has len(Subset) entries: the error advised "pass dataset indices", which it did
    subset = torch.utils.data.Subset(with_index(Examples()), range(5, N))
    trainer = CSLTrainer(model=_model(), args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=subset)  # fmt: skip
    with pytest.raises(IndexError, match=r"len\(train_dataset\) = 15; if the indices were added"):
        trainer.train()
    trainer = CSLTrainer(model=_model(), args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=subset, csl_tracker=CSLTracker(N, C))  # fmt: skip
    trainer.train()
    assert trainer.csl_tracker.csl_count.tolist() == [0.0] * 5 + [1.0] * (N - 5)


def test_labels_of_shape_batch_by_one_train_as_with_the_plain_trainer(tmp_path):
    # BertForSequenceClassification's own loss takes labels.view(-1); CSLTrainer refused
    # [B, 1] labels with "target must be 1-D"
    model = _model().train()
    trainer = CSLTrainer(model=model, args=_args(tmp_path, 1, save_strategy="no"),
                         train_dataset=with_index(Examples()))  # fmt: skip
    ids, labels = torch.randint(1, VOCAB, (4, LEN)), torch.randint(0, C, (4,))
    torch.manual_seed(1)  # the same dropout masks in both calls
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels[:, None],
                                        "index": torch.arange(4)})  # fmt: skip
    torch.manual_seed(1)
    torch.testing.assert_close(loss, model(input_ids=ids, labels=labels[:, None]).loss)
    assert trainer.csl_tracker.csl_count.tolist() == [1.0] * 4 + [0.0] * (N - 4)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"csl_tracker_kwargs": {"histroy": True}}, TypeError, r"\['histroy'\] are not CSLTracker"),
        ({"csl_tracker_kwargs": {"num_classes": 3}}, TypeError, r"\['num_classes'\] are set by"),
        ({"csl_tracker_kwargs": {"dtype": torch.half}}, TypeError, "dtype must be torch.float32"),
        ({"csl_tracker_kwargs": ["history"]}, TypeError, "must be a dict of CSLTracker keyword"),
        ({"csl_tracker": CSLTracker(N), "csl_tracker_kwargs": {"history": True}}, ValueError,
         "history would be ignored with a tracker passed in"),
        ({"csl_tracker": "run.csl"}, TypeError, "must be a csl_fast.CSLTracker, got str"),
        # "got dict" of a dict
        ({"csl_tracker_kwargs": {1: 2}}, TypeError, "whose keys are argument names.*got the key 1"),
        # "no" from a config was truthy: the decoder was called for a classifier
        ({"csl_linear_cross_entropy": "no"}, TypeError, "csl_linear_cross_entropy must be True or"),
        ({"csl_shift_labels": "no"}, TypeError, "csl_shift_labels must be True, False or None"),
        # a KeyError at the first training step
        ({"csl_index_column": 3}, TypeError, "csl_index_column must be the name"),
    ],
)  # fmt: skip
def test_bad_tracker_options_are_refused_at_construction(tmp_path, options, error, match):
    """csl_tracker_kwargs={'histroy': True} constructed, and training failed at its first
    step; with csl_tracker= the options were ignored."""
    with pytest.raises(error, match="CSLTrainer: .*" + match):
        CSLTrainer(model=_model(), args=_args(tmp_path, 1), train_dataset=Examples(), **options)


def test_classification_under_gradient_accumulation_is_one_large_batch(tmp_path):
    """BertForSequenceClassification takes loss kwargs in transformers 5, so the Trainer
    passes num_items_in_batch (the step's labels) and does not divide by the steps: one
    SGD step over 2 x 3 + 1 x 2 examples equals one over a batch of 8 (the mean over all).
    The plain Trainer's does not there: Bert's own loss is a mean that ignores the count,
    so its accumulated step is the sum of three micro-batch means."""

    def step(out, batch, accumulation):
        model = _model()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0  # the same function in both runs
        args = _args(
            out,
            1,
            save_strategy="no",
            max_steps=1,
            optim="sgd",
            lr_scheduler_type="constant",
            gradient_accumulation_steps=accumulation,
        )
        args.per_device_train_batch_size, args.learning_rate = batch, 1.0
        data = torch.utils.data.Subset(with_index(Examples()), range(8))
        CSLTrainer(model=model, args=args, train_dataset=data, csl_tracker=CSLTracker(N)).train()
        return model

    large, accumulated = step(tmp_path / "a", 8, 1), step(tmp_path / "b", 3, 3)
    for a, b in zip(large.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class OutOfMemoryOnce(CSLTrainer):
    """Runs out of memory (as accelerate recognises it) once, at the step ``fail_at``,
    after the batch was recorded."""

    fail_at = 4  # the second epoch's second step: one epoch closed, one batch recorded

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        if self.fail_at is not None and self.state.global_step == self.fail_at:
            self.fail_at = None
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss


@pytest.mark.parametrize("given", [False, True], ids=["default tracker", "tracker passed in"])
def test_auto_find_batch_size_forgets_the_attempt_that_ran_out_of_memory(tmp_path, given):
    """The Trainer reruns the training loop from step 0 at a smaller batch size: the failed
    attempt's batches stayed in the tracker (its first epoch and a batch of its second
    counted twice, an epoch too many)."""
    kw = {"csl_tracker": CSLTracker(N, C, history=True)} if given else {}
    trainer = OutOfMemoryOnce(
        model=_model(),
        args=_args(tmp_path, 2, save_strategy="no", auto_find_batch_size=True),
        train_dataset=with_index(Examples()),
        csl_tracker_kwargs=None if given else {"history": True},
        **kw,
    )
    trainer.train()
    assert trainer.fail_at is None and trainer._train_batch_size < 8  # it did run out
    tracker = trainer.csl_tracker
    assert tracker is kw.get("csl_tracker", tracker)
    assert (tracker.epoch, tracker.loss_history.shape[0]) == (2, 2)
    assert tracker.csl_count.tolist() == [2.0] * N
    assert trainer._csl_start is None  # the copy is not kept past train()


def test_a_new_model_for_the_same_tracker_warns_and_a_continued_one_does_not(tmp_path):
    """model_init builds a new model at each train() and the tracker went on, summing the
    models' CSL, silently. Training the same model further, or resuming (the checkpoint's
    tracker goes with its model), is silent."""
    train = with_index(Examples())
    args = _args(tmp_path, 1, save_strategy="epoch")
    trainer = CSLTrainer(model_init=_model, args=args, train_dataset=train)
    same = CSLTrainer(model=_model(), args=args, train_dataset=train)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        same.train()
        same.train()  # the same model, further
        trainer.train()
        trainer.train(resume_from_checkpoint=os.path.join(tmp_path, "checkpoint-3"))
        trainer.csl_tracker = None  # a new tracker for the next model
        trainer.train()
    assert not [w for w in seen if "trains another" in str(w.message)]
    assert same.csl_tracker.epoch == 2 and trainer.csl_tracker.epoch == 1
    with pytest.warns(RuntimeWarning, match=r"trains another BertForSequenceClassification .*"
                      r"model_init builds a new model"):  # fmt: skip
        trainer.train()
    assert trainer.csl_tracker.epoch == 2  # (warned, not refused)


def test_a_tracker_on_another_device_is_named_with_the_way_out(tmp_path):
    """CSLTrainer moves the index to the tracker's device, so the error blamed the index
    ("index is on meta but logits are on cpu"). meta stands in for "a CPU tracker, a CUDA
    model" on a machine without a GPU."""
    trainer = CSLTrainer(
        model=_model(),
        args=_args(tmp_path, 1, save_strategy="no", max_steps=1),
        train_dataset=with_index(Examples()),
        csl_tracker=CSLTracker(N, C, device="meta"),
    )
    with pytest.raises(ValueError, match=r"csl_tracker is on meta but the model's logits are on "
                       r"cpu.*CSLTracker\(N, C, device='cpu'\)"):  # fmt: skip
        trainer.train()


def test_with_index_refuses_examples_that_are_not_dicts():
    # tuples failed inside the Trainer's collator: "vars() argument must have __dict__"
    pairs = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(TypeError, match=r"data collators take examples that are dicts.*tuple"):
        with_index(pairs)
    assert with_index(Examples())[3]["index"] == 3

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    # (it has no len(): "object of type 'Stream' has no len()" hid IndexedDataset's why)
    with pytest.raises(TypeError, match="an IterableDataset has no stable sample indices"):
        with_index(Stream())

    class NoLen:
        def __getitem__(self, i):
            return {"a": i}

    # (len() raised a bare "object of type 'NoLen' has no len()")
    with pytest.raises(TypeError, match="NoLen has no __len__; csl_fast needs the dataset size"):
        with_index(NoLen())


def test_the_index_hint_names_index_columns_only():
    # 'label_idx' and 'token_index' were offered as csl_index_column: indices of other things
    from csl_fast.integrations.huggingface import _INDEX_NAME

    offered = ("idx", "index", "sample_idx", "label_idx", "token_index", "indexes")
    assert [n for n in offered if _INDEX_NAME.fullmatch(n)] == ["idx", "index", "sample_idx"]
