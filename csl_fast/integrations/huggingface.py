"""Hugging Face ``transformers.Trainer``: CSL for classification and language-model fine-tuning.

Needs ``transformers`` (and the ``accelerate`` it requires for training; optional
dependencies)::

    from csl_fast.integrations.huggingface import CSLTrainer, with_index

    train = with_index(train)          # a datasets.Dataset gets an "index" column
    trainer = CSLTrainer(model=model, args=args, train_dataset=train, ...)
    trainer.train()
    trainer.csl_tracker.csl            # one CSL value per training example

:class:`CSLTrainer` is a ``Trainer`` whose ``compute_loss`` calls
:func:`csl_fast.accumulate` on the model's logits (``[B, C]``; the model is called without
``labels`` so it does not compute its own loss; an encoder-decoder model, BART or T5, gets
the ``decoder_input_ids`` it would build from them), keeps the index column past
``remove_unused_columns`` (and out of the model's inputs), closes each epoch on the tracker
(which under ``torch.distributed`` / ``accelerate`` combines the ranks), writes the tracker
into every checkpoint folder as ``csl_tracker.csl`` (a checkpoint saved at an epoch's
last step holds that epoch closed) and restores it with ``resume_from_checkpoint``.
Evaluation and prediction batches are not recorded.

The returned loss (``label_smoothing_factor`` applies) is one large batch's mean. When the
model takes loss keyword arguments (causal LMs and most models in transformers 5) the
Trainer counts the supervised labels of the whole gradient-accumulation step
(``num_items_in_batch``, over the ranks with ``average_tokens_across_devices``): the loss
is then the micro-batch's summed cross entropy divided by that count (times the ranks), so
micro-batches of different token counts weigh every token alike, and the Trainer does not
divide it again. Otherwise it is the micro-batch mean, which the Trainer divides by the
accumulation steps. For causal LMs the plain ``Trainer`` scales the model's own loss the
same way; a model whose own loss is a plain mean that ignores ``num_items_in_batch``
(``BertForSequenceClassification``, BART, T5) gets a step from the plain ``Trainer`` that
is the world size times larger under DDP, and the accumulation steps times larger under
gradient accumulation (``docs/distributed.md``).

Accelerate fills an epoch's last step with repeats of its first samples
(``even_batches=True``, the default): those presentations are recorded, so rank by
``csl_mean`` or pass ``accelerator_config={"even_batches": False}`` in the
``TrainingArguments`` (``docs/distributed.md``).

Token-level models (logits ``[B, T, V]``, labels ``[B, T]``; causal language models,
encoder-decoder models and token classification) are recorded per example: CSL is the
example's summed token loss over training and ``csl_count`` its number of supervised
tokens (labels ``-100``, the Hugging Face convention for padding and prompt tokens, count
for nothing; see :func:`csl_fast.accumulate`). For causal LMs (``*ForCausalLM``, and
decoder-only ``*ForConditionalGeneration`` models such as Llava, Qwen2-VL, Gemma 3:
transformers' own rule) the labels are shifted as the models' own loss shifts them (token
``t + 1`` is the target of position ``t``), once: pass the unshifted labels, as to the
model; a batch's ``shift_labels`` (targets already aligned with the positions, as
padding-free collators make them) are taken as they are, as the models' loss takes them.
An encoder-decoder model's targets are its labels as they are (its decoder inputs are the
shifted ones). ``csl_linear_cross_entropy=True`` (decoder-only models) computes the LM
head and its loss with :func:`csl_fast.linear_cross_entropy` from the decoder's hidden
states, so the ``[tokens, vocabulary]`` logits are never materialized.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .._args import check_flags
from ..accumulate import accumulate
from ..distributed import loaded_unmarked, mark_synced
from ..tracker import CSLTracker
from ..tracker_file import state_dict
from ._options import check_tracker_options, refuse_tensor_parallel

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "csl_fast.integrations.huggingface needs transformers (and accelerate): "
        "pip install transformers accelerate"
    ) from exc

__all__ = ["TRACKER_FILE", "CSLTrainer", "with_index"]

#: File name of the tracker inside a Trainer checkpoint folder.
TRACKER_FILE = "csl_tracker.csl"


def with_index(dataset: Any, column: str = "index") -> Any:
    """A ``datasets.Dataset`` with a ``column`` of dataset indices ``0..N-1`` added; a
    torch map-style dataset of dicts is wrapped in :class:`csl_fast.data.IndexedDataset`.

    Args:
        dataset: a ``datasets.Dataset``, or a torch map-style dataset whose examples are
            dicts (what the ``Trainer``'s data collators take).
        column: the name of the index column (``CSLTrainer``'s ``csl_index_column``).

    Raises:
        ValueError: the dataset already has ``column``.
        TypeError: a torch dataset whose examples are not dicts (tuples failed later,
            inside the ``Trainer``'s collator, with "vars() argument must have __dict__
            attribute"), or one without ``__len__`` or iterable-style (no dataset size
            ``N``, as :class:`~csl_fast.data.IndexedDataset` says).
    """
    if column in getattr(dataset, "column_names", ()):
        raise ValueError(f"with_index: the dataset already has a {column!r} column")
    if hasattr(dataset, "add_column"):
        return dataset.add_column(column, list(range(len(dataset))))
    from ..data import IndexedDataset

    # (IndexedDataset says why an IterableDataset, or one without __len__, cannot be:
    # len() here raised a bare "object of type 'X' has no len()")
    indexed = IndexedDataset(dataset, index_key=column)
    first = dataset[0] if len(indexed) else {}
    if not isinstance(first, Mapping):
        raise TypeError(
            f"with_index: the Trainer's data collators take examples that are dicts (keys "
            f"such as 'input_ids', 'labels'), got {type(first).__name__} examples; return "
            "dicts from the dataset's __getitem__ (for a plain PyTorch loop, wrap it in "
            "csl_fast.data.IndexedDataset, which adds the index to tuples)"
        )
    return indexed


# Config settings by which models rescale or soft-cap the LM head's logits (Gemma 2/3's
# final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's
# lm_head_multiplier, output_multiplier, ...), in the config or a nested one (text_config).
_LOGIT_TRANSFORM = re.compile(
    r"(final_)?(logits?|lm_head|output)_(scale|scaling|multiplier|softcap\w*)"
)


# Column names that say dataset indices ("idx": GLUE's), offered as csl_index_column; not
# any *_idx ('label_idx', 'token_index' were offered: indices of something else).
_INDEX_NAME = re.compile(r"((sample|example|data|row)_)?(idx|index)", re.IGNORECASE)


def _logit_transforms(config: Any) -> list[str]:
    """``name=value`` for each setting of ``config`` (nested ones included) that changes
    the logits past the output embedding: a scale or multiplier other than 1, any
    soft-cap."""
    try:
        settings = config.to_dict()
    except AttributeError:
        return []
    found = []

    def walk(d: Mapping, where: str) -> None:
        for key, value in d.items():
            if isinstance(value, Mapping):
                walk(value, f"{where}{key}.")
            elif (
                isinstance(key, str)
                and _LOGIT_TRANSFORM.fullmatch(key)
                and value is not None
                and ("softcap" in key or value != 1)
            ):
                found.append(f"{where}{key}={value!r}")

    walk(settings, "")
    return found


def _uncompiled(module: Any) -> Any:
    """``module`` without ``torch.compile``'s wrapper. ``Trainer(torch_compile=True)``
    compiles the whole model, DDP wrapper included (accelerate's ``torch.compile(model)``):
    an ``OptimizedModule``, whose class name hides the model's (GPT-2's labels went
    unshifted) and whose ``get_decoder()`` reads through to the uncompiled decoder.
    ``accelerator.unwrap_model`` keeps that wrapper by default (and then puts the bare model
    in place of a DDP wrapper inside it); it is taken off here first. A regionally compiled
    model (accelerate's ``compile_regions``: a copy of the model's own class whose blocks
    are compiled) is kept as it is."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


class _EpochCallback(TrainerCallback):
    def __init__(self, trainer: CSLTrainer) -> None:
        self.trainer = trainer
        # Global steps at which on_epoch_end ran, and at which on_save closed the epoch
        # ahead of it (see on_save).
        self._epoch_end_step: int | None = None
        self._closed_early_step: int | None = None
        self._cut_short = False  # the last epoch stopped part-way (see on_epoch_end)

    def on_train_begin(self, args, state, control, **kwargs):
        # A second train() counts its steps from 0 again: the first run's marks matched
        # its steps, and the epoch that a save at its last step had to close stayed open.
        self._epoch_end_step = self._closed_early_step = None
        self._cut_short = False
        self.trainer._loop_begins()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._epoch_end_step = state.global_step
        if self.trainer.csl_tracker is None or self._closed_early_step == state.global_step:
            return
        whole = state.epoch is not None and float(state.epoch).is_integer()
        if control.should_training_stop and not whole:
            # Training stops part-way through the epoch (max_steps, a callback): the epoch
            # save that follows must hold it open, as a resume from it goes on with the
            # same epoch; closed here, the resumed run closed it again, one epoch ahead.
            # on_train_end closes it, after the last save.
            self._cut_short = True
            return
        self.trainer.csl_tracker.end_epoch()  # combines the ranks when distributed

    def on_save(self, args, state, control, **kwargs):
        tracker = self.trainer.csl_tracker
        if tracker is None:
            return
        # A step-strategy save at an epoch's last step comes before on_epoch_end. A resume
        # from it starts the next epoch, so on_epoch_end never ran for the saved one: the
        # tracker stayed an epoch behind, its next loss-curve row pooled two epochs. Close
        # the epoch now (state.epoch is whole only at an epoch's last step).
        at_epoch_end = state.epoch is not None and state.epoch > 0 and state.epoch.is_integer()
        if at_epoch_end and state.global_step not in (
            self._epoch_end_step,
            self._closed_early_step,
        ):
            tracker.end_epoch()
            self._closed_early_step = state.global_step
        tracker.sync()  # every rank reaches on_save; the saved state is global
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            tracker.save(os.path.join(folder, TRACKER_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        tracker = self.trainer.csl_tracker
        if tracker is None:
            return
        self.trainer._check_model()  # (a default tracker is made at the first step)
        if self._cut_short:  # the epoch training stopped in: the run is over
            self._cut_short = False
            tracker.end_epoch()  # (syncs the ranks first)
        else:
            tracker.sync()


class CSLTrainer(Trainer):
    """A ``transformers.Trainer`` that records CSL and the other training dynamics.

    Args:
        csl_tracker: the tracker to record into; default: created at the first training
            step with ``N = len(train_dataset)``, ``C`` = the logits' width, on the logits'
            device. Available as :attr:`csl_tracker`. One loaded from a file is marked
            synced when ``train`` starts: under DDP every rank must have loaded the same
            state (checked then, :func:`csl_fast.distributed.mark_synced`).
        csl_index_column: the batch key holding dataset indices (default ``"index"``,
            what :func:`with_index` and :class:`csl_fast.data.IndexedDataset` add).
        csl_tracker_kwargs: further :class:`~csl_fast.CSLTracker` arguments for the
            default tracker (``dtype``, ``history``, ``backend``, ``deterministic``,
            ``num_labels``), checked at construction (``TypeError`` / ``ValueError``: an
            unknown or ill-typed one, one the trainer sets, or any with ``csl_tracker``).
        csl_shift_labels: for token-level logits, whether position ``t`` predicts label
            ``t + 1`` (causal LM). Default: where the model's own loss shifts them, by
            transformers' rule (a ``loss_type`` of causal-LM loss, no encoder-decoder model:
            ``*ForCausalLM`` and decoder-only ``*ForConditionalGeneration`` models such as
            Llava, Qwen2-VL, Gemma 3), or the class name ends with ``ForCausalLM`` /
            ``LMHeadModel``; False otherwise (token classification). Read from the model
            inside its DDP/FSDP and ``torch.compile`` wrappers (``torch_compile=True``).
        csl_linear_cross_entropy: decoder-only causal LMs only: call the decoder
            (``model.get_decoder()``) and apply the output embedding with
            :func:`csl_fast.linear_cross_entropy` (chunked; no full logits). Not for
            models that rescale or soft-cap their logits (``logits_scaling``,
            ``logit_scale``, ``final_logit_softcapping``, ...: refused), nor for batches
            with inputs the decoder does not take (a vision-language model's
            ``pixel_values``: refused), nor under a DDP/FSDP wrapper. With
            ``torch_compile=True`` the decoder is compiled with the Trainer's options (the
            loss itself runs outside the graph); a model passed in already compiled runs
            its decoder uncompiled, with a ``RuntimeWarning``.
        *args, **kwargs: ``transformers.Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        csl_tracker: CSLTracker | None = None,
        csl_index_column: str = "index",
        csl_tracker_kwargs: dict[str, Any] | None = None,
        csl_shift_labels: bool | None = None,
        csl_linear_cross_entropy: bool = False,
        **kwargs: Any,
    ) -> None:
        # Before the Trainer's own set-up: a typo fails now, not at the first training step.
        csl_tracker_kwargs = check_tracker_options(
            "CSLTrainer", csl_tracker, csl_tracker_kwargs, "csl_tracker_kwargs", {}
        )
        # ("no" from a config was truthy: csl_linear_cross_entropy="no" called the decoder)
        check_flags("CSLTrainer", True, csl_shift_labels=csl_shift_labels)
        check_flags("CSLTrainer", False, csl_linear_cross_entropy=csl_linear_cross_entropy)
        if not isinstance(csl_index_column, str):  # (a KeyError at the first step)
            raise TypeError(
                "CSLTrainer: csl_index_column must be the name (a str) of the batch key holding "
                f"dataset indices, got {type(csl_index_column).__name__} {csl_index_column!r}"
            )
        super().__init__(*args, **kwargs)
        if getattr(self, "compute_loss_func", None) is not None:
            # Its loss is a batch scalar: there would be no per-example loss to record, and
            # training would go on with the tracker never created.
            raise ValueError(
                "CSLTrainer: compute_loss_func returns a batch loss, so no example's CSL could be "
                "recorded; override compute_loss instead and record the per-example loss "
                "(reduction='none') with csl_fast.record_loss(loss, inputs['index'], tracker)"
            )
        self.csl_shift_labels = csl_shift_labels
        self.csl_linear_cross_entropy = bool(csl_linear_cross_entropy)  # (np.bool_ too)
        self.csl_tracker = csl_tracker
        self.csl_index_column = csl_index_column
        self.csl_tracker_kwargs = csl_tracker_kwargs
        # (tracker, copy of its state) at train()'s start with auto_find_batch_size, and
        # whether that train()'s training loop began (see _loop_begins)
        self._csl_start: tuple[CSLTracker | None, dict[str, Any] | None] | None = None
        self._csl_loop_began = False
        # (tracker, model) weakly: the tracker and the model it last trained (see _check_model)
        self._csl_trained: tuple[weakref.ref, weakref.ref] | None = None
        # model_accepts_loss_kwargs stays the model's: where it is True the Trainer counts the
        # supervised labels of the whole accumulation step (num_items_in_batch), which
        # _normalize divides by, and it then does not divide by the accumulation steps.
        self.add_callback(_EpochCallback(self))

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: every trial would add its training to the one tracker (CSL summed over
        models of different settings), and its checkpoints' tracker files went to
        ``output_dir`` instead of the trial's folder. Search with ``transformers.Trainer``,
        then train the chosen settings once with :class:`CSLTrainer`."""
        raise NotImplementedError(
            "CSLTrainer.hyperparameter_search: each trial would record into the same tracker, "
            "summing the CSL of models trained with different settings; run the search with "
            "transformers.Trainer, then train the chosen settings once with CSLTrainer"
        )

    # Keep the index column: remove_unused_columns keeps only the model's forward arguments.
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.csl_index_column not in self._signature_columns:
            self._signature_columns.append(self.csl_index_column)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"CSLTrainer: batches must be dicts (what transformers' data collators make) "
                f"with {self.csl_index_column!r} and 'labels' keys, got "
                f"{type(inputs).__name__}; return dicts from the dataset or the data_collator"
            )
        inputs = dict(inputs)
        index = inputs.pop(self.csl_index_column, None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if index is None or "labels" not in inputs:
            raise KeyError(
                f"CSLTrainer: training batches need {self.csl_index_column!r} (dataset indices) "
                f"and 'labels'; got the keys {sorted(inputs)} (index present: "
                f"{index is not None}).{self._index_column_hint(inputs) if index is None else ''}"
                " Add indices with "
                "csl_fast.integrations.huggingface.with_index(train_dataset); if the examples "
                "have them, the data_collator dropped the column (DataCollatorWithFlattening "
                "packs examples into one row and keeps none: CSL needs a row per example, so "
                "use a padding collator such as DataCollatorForSeq2Seq)"
            )
        index = self._index_tensor(index)
        labels = inputs.pop("labels")
        # Targets already aligned with the positions (a padding-free or context-parallel
        # collator's); the models' loss takes them instead of shifting labels.
        shift_labels = inputs.pop("shift_labels", None)
        if self.csl_linear_cross_entropy:
            return self._linear_loss(
                model, inputs, labels, shift_labels, index, return_outputs, num_items_in_batch
            )
        outputs = model(**self._decoder_inputs(model, inputs, labels))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        shifted = False
        if logits.dim() == 3:
            labels, shifted = self._token_targets(model, labels, shift_labels)
        elif logits.dim() != 2:
            raise ValueError(
                f"CSLTrainer: expected [batch, classes] logits (one label per example) or "
                f"[batch, tokens, vocabulary] logits, got shape {tuple(logits.shape)}"
            )
        elif labels.is_floating_point() or logits.shape[1] < 2:
            # The model's own loss is then MSE (num_labels=1) or BCE (float multi-hot
            # labels); cross entropy of int64(labels) would silently be another loss (0 for
            # one class and labels in [0, 1), so nothing would train).
            raise ValueError(
                f"CSLTrainer: records the cross entropy of single-label classification "
                f"(integer labels, at least 2 classes), got {labels.dtype} labels of shape "
                f"{tuple(labels.shape)} for logits {tuple(logits.shape)}: a regression or "
                "multi-label model. Override compute_loss and record the per-example loss with "
                "csl_fast.record_loss (regression) or csl_fast.accumulate_bce (multi-label)"
            )
        elif labels.dim() > 1 and labels.numel() == logits.shape[0]:
            labels = labels.reshape(-1)  # [B, 1]: the models' own loss takes labels.view(-1)
        tracker = self._tracker_for(logits)
        items = self._counted(num_items_in_batch, shifted)
        with self._index_hint():
            loss = accumulate(
                # Token logits as [B, V, T] (a view), read as F.cross_entropy reads them, with
                # the [B, T] labels; not [B*T, V], which refuses one-token sequences.
                logits.transpose(1, 2) if logits.dim() == 3 else logits,
                labels.to(logits.device, torch.int64),
                index.to(tracker.device, torch.int64),
                tracker,
                label_smoothing=float(self.args.label_smoothing_factor),
                reduction="mean" if items is None else "sum",
            )
        loss = self._normalize(loss, items, num_items_in_batch is not None)
        return (loss, outputs) if return_outputs else loss

    def _index_column_hint(self, batch: Mapping[str, Any]) -> str:
        """For a batch without the index: a column of the batch or of the training set
        whose name says dataset indices (GLUE's ``"idx"``), as ``csl_index_column`` to
        pass, and whether ``remove_unused_columns`` dropped it; "" when there is none."""
        data = self.train_dataset
        names = getattr(data, "column_names", None)  # a datasets.Dataset's
        if names is None:  # a torch dataset: its first example's keys
            try:
                first = data[0]
            except Exception:  # (an IterableDataset has no [0]; only a hint is lost)
                first = None
            names = list(first) if isinstance(first, Mapping) else []
        found = [
            n
            for n in [*batch, *names]
            if isinstance(n, str) and n != self.csl_index_column and _INDEX_NAME.fullmatch(n)
        ]
        if not found:
            return ""
        name = found[0]
        dropped = (
            name not in batch
            and self.args.remove_unused_columns
            and name not in (self._signature_columns or ())
        )
        where = "The batches have" if name in batch else "The train dataset has"
        why = " (remove_unused_columns dropped it: the model does not take it)" if dropped else ""
        return (
            f" {where} a column {name!r}{why}: if it holds the dataset "
            f"indices 0..N-1, pass csl_index_column={name!r} (CSLTrainer keeps it)."
        )

    def _counted(self, num_items_in_batch: Any, shifted: bool) -> Any:
        """``num_items_in_batch`` unless the Trainer left out labels this call trains on, then
        None (the loss is a mean). It counts ``labels[..., 1:]`` for models whose
        ``loss_type`` shifts (``_loss_shifts_labels``), so ``csl_shift_labels=False`` there
        would divide by too few (0 for one-token sequences). For other models it counts
        every label, position 0 included, also where their loss shifts (GPT-2, whose
        ``loss_type`` is None): the plain Trainer divides by that count, and so does this."""
        if getattr(self, "_loss_shifts_labels", False) and not shifted:
            return None
        return num_items_in_batch

    def _normalize(
        self, loss: torch.Tensor, num_items_in_batch: Any, counted: bool
    ) -> torch.Tensor:
        """The batch's summed loss over the supervised labels of the whole accumulation step,
        as the models' own loss (``fixed_cross_entropy``) and ``Trainer.compute_loss`` make
        it when the Trainer passes ``num_items_in_batch``: micro-batches of different token
        counts then weigh each token equally, as one large batch would. Without it,
        ``loss`` is the micro-batch mean, which the Trainer divides by the steps unless it
        ``counted`` (passed a count that :meth:`_counted` set aside)."""
        if num_items_in_batch is None:
            if not counted:
                return loss
            steps = getattr(self, "current_gradient_accumulation_steps", None)
            return loss / (steps or self.args.gradient_accumulation_steps)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        average = getattr(self.args, "average_tokens_across_devices", False)
        n_gpu = self.args.n_gpu
        if n_gpu > 1:
            # nn.DataParallel: the Trainer passes the count as [n_gpu, 1] (a row for each
            # replica, the whole step's count, or its n_gpu-th part without
            # average_tokens_across_devices), scales each replica's loss on its share by
            # n_gpu (average) and averages the replicas' losses. Here the logits are the
            # gathered batch's: its summed loss over the whole step's count, once.
            if torch.is_tensor(num_items_in_batch) and num_items_in_batch.dim() > 0:
                num_items_in_batch = num_items_in_batch.reshape(-1)[0]
            return loss / (num_items_in_batch if average else num_items_in_batch * n_gpu)
        loss = loss / num_items_in_batch
        if average:
            # The count is then the ranks' total, and DDP averages the ranks' gradients.
            loss = loss * (self.accelerator.num_processes // self._tp_size())
        return loss

    def _index_tensor(self, index: Any) -> torch.Tensor:
        """The batch's dataset indices as an integer tensor: a list from a custom collator
        is converted; float or bool indices are refused (a cast would truncate them)."""
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(
                f"CSLTrainer: the {self.csl_index_column!r} column must hold integer dataset "
                f"indices, got {index.dtype}; add one with with_index(train_dataset), or set "
                "csl_index_column to the column that holds them"
            )
        return index

    def _token_targets(
        self, model: torch.nn.Module, labels: torch.Tensor, shift_labels: Any = None
    ) -> tuple[torch.Tensor, bool]:
        """Labels ``[B, T]`` as targets of the ``[B, T, V]`` logits: shifted left and padded
        with -100 for causal LMs (no copy of the logits), or the batch's ``shift_labels``
        as given; and whether they are shifted."""
        if shift_labels is not None:
            labels, shift, shifted = shift_labels, False, True
        else:
            shift = self.csl_shift_labels
            if shift is None:
                shift = self._loss_shifts(model)
            shifted = bool(shift)
        if labels.dim() != 2:
            raise ValueError(
                f"CSLTrainer: token-level logits need [batch, tokens] labels, got shape "
                f"{tuple(labels.shape)}"
            )
        labels = labels.to(torch.int64)
        return (F.pad(labels[:, 1:], (0, 1), value=-100) if shift else labels), shifted

    def _decoder_inputs(
        self, model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor
    ) -> dict[str, Any]:
        """``inputs``, with an encoder-decoder model's (BART, T5) ``decoder_input_ids`` built
        from the labels (shifted right, the decoder's start token first) as the model builds
        them when it is given labels; it is called without them here, and without decoder
        inputs it decoded the source (BART) or raised (T5). A batch's own decoder inputs
        (``DataCollatorForSeq2Seq(tokenizer, model=model)`` makes them) are kept."""
        core = self._core(model)
        if not getattr(getattr(core, "config", None), "is_encoder_decoder", False) or any(
            inputs.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds")
        ):
            return inputs
        prepare = getattr(core, "prepare_decoder_input_ids_from_labels", None)
        if prepare is None:
            raise NotImplementedError(
                f"CSLTrainer: {type(core).__name__} is an encoder-decoder model without "
                "prepare_decoder_input_ids_from_labels, so its decoder inputs cannot be made "
                "from the labels; put decoder_input_ids in the batches"
            )
        return {**inputs, "decoder_input_ids": prepare(labels=labels)}

    def _core(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model inside its DDP/FSDP/DeepSpeed and ``torch.compile`` wrappers, whose
        class and config tell what it is (:func:`_uncompiled`)."""
        return self.accelerator.unwrap_model(_uncompiled(model))

    def _loss_shifts(self, model: torch.nn.Module) -> bool:
        """Whether the model's own loss shifts token labels, by transformers' rule (the
        Trainer's ``_loss_shifts_labels``): its ``loss_type`` maps to ``ForCausalLMLoss``
        (``*ForCausalLM``, and decoder-only ``*ForConditionalGeneration`` models: Llava,
        Qwen2-VL, Gemma 3, PaliGemma) and it is no encoder-decoder model (whose decoder is
        fed right-shifted labels, so its targets are the labels as they are). Failing that,
        by the class name (GPT-2's ``loss_type`` is None; its loss shifts)."""
        core = self._core(model)
        if getattr(getattr(core, "config", None), "is_encoder_decoder", False):
            return False
        if getattr(self, "_loss_shifts_labels", False):
            return True
        try:
            from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
        except ImportError:  # pragma: no cover - transformers < 4.46
            pass
        else:
            if LOSS_MAPPING.get(getattr(core, "loss_type", None)) is ForCausalLMLoss:
                return True
        return type(core).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def _linear_loss(
        self, model, inputs, labels, shift_labels, index, return_outputs, num_items_in_batch
    ):
        from ..linear_cross_entropy import linear_cross_entropy

        core = self._core(model)
        if core is not _uncompiled(model):  # (also inside torch.compile's wrapper)
            raise NotImplementedError(
                "CSLTrainer: csl_linear_cross_entropy=True calls the decoder directly, which "
                "bypasses a DDP/FSDP wrapper; use the default (logits) path there"
            )
        config = getattr(core, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise NotImplementedError(
                f"CSLTrainer: csl_linear_cross_entropy=True is for decoder-only language "
                f"models; {type(core).__name__} is an encoder-decoder model (its decoder needs "
                "the encoder's output): use the default (logits) path"
            )
        transforms = _logit_transforms(config)
        if transforms:
            raise NotImplementedError(
                f"CSLTrainer: csl_linear_cross_entropy=True takes the logits as the output "
                f"embedding's product with the hidden states; {type(core).__name__} rescales "
                f"or soft-caps them ({', '.join(transforms)}), which that would skip (another "
                "loss, silently): use the default (logits) path"
            )
        head = core.get_output_embeddings()
        decoder = core.get_decoder() if hasattr(core, "get_decoder") else None
        if head is None or decoder is None or not hasattr(head, "weight"):
            raise TypeError(
                "CSLTrainer: csl_linear_cross_entropy=True is for causal language models (a "
                f"decoder and an output embedding); {type(core).__name__} has "
                f"{'no output embedding' if head is None else 'no decoder'}: use the default "
                "(logits) path"
            )
        # The text decoder of a vision-language model (Llava, PaliGemma) takes **kwargs and
        # would drop the image inputs (pixel_values, token_type_ids) without a word.
        try:
            named = inspect.signature(decoder.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - no signature to read
            named = None
        dropped = sorted(k for k in inputs if named is not None and k not in named)
        if dropped:
            raise NotImplementedError(
                f"CSLTrainer: csl_linear_cross_entropy=True calls the decoder "
                f"({type(decoder).__name__}), which does not take {dropped} from the batch "
                f"(the inputs {type(core).__name__} handles before it): use the default "
                "(logits) path"
            )
        decoder = self._compiled_decoder(model, decoder)
        # accelerate's mixed precision (bf16=True, fp16=True) autocasts the model's forward
        # only: the decoder and the head are called here, so under it explicitly.
        autocast = getattr(self.accelerator, "autocast", contextlib.nullcontext)
        with autocast():
            outputs = decoder(**inputs)
        hidden = outputs[0]
        if self.csl_shift_labels is None:
            self.csl_shift_labels = True  # the decoder of a causal LM
        target, shifted = self._token_targets(model, labels, shift_labels)
        target = target.to(hidden.device)
        items = self._counted(num_items_in_batch, shifted)
        if self.csl_tracker is None:
            self.csl_tracker = self._default_tracker(head.weight.shape[0], hidden.device)
        self._tracker_on(hidden.device)
        with self._index_hint(), autocast():
            loss = linear_cross_entropy(
                hidden,
                head.weight,
                target,
                index.to(self.csl_tracker.device, torch.int64),
                self.csl_tracker,
                getattr(head, "bias", None),
                label_smoothing=float(self.args.label_smoothing_factor),
                reduction="mean" if items is None else "sum",
            )
        loss = self._normalize(loss, items, num_items_in_batch is not None)
        return (loss, outputs) if return_outputs else loss

    def _compiled_decoder(self, model: torch.nn.Module, decoder: Any) -> Any:
        """The decoder compiled as the Trainer compiled the model. Under
        ``torch_compile=True`` accelerate compiles the whole model
        (``torch.compile(model, **dynamo_plugin.to_kwargs())``), but the fused path calls
        the decoder, which read through that wrapper to the eager module: nothing ran
        compiled. It is compiled here once, with the same options (the same parameters:
        the optimizer's steps are its). A model compiled before it reached the Trainer
        (its options unknown) runs its decoder eagerly, with a warning; a regionally
        compiled one keeps its compiled blocks."""
        if _uncompiled(model) is model:
            return decoder
        cached = getattr(self, "_csl_decoder", None)
        if cached is not None and cached[0] is decoder:
            return cached[1]
        plugin = getattr(getattr(self.accelerator, "state", None), "dynamo_plugin", None)
        backend = getattr(plugin, "backend", None)
        if plugin is not None and str(getattr(backend, "value", backend)).lower() != "no":
            compiled = torch.compile(decoder, **plugin.to_kwargs())
        else:
            warnings.warn(
                "CSLTrainer: csl_linear_cross_entropy=True calls the model's decoder, not the "
                "torch.compile'd model, and this model was compiled before the Trainer got "
                "it (with options it cannot know): its decoder runs uncompiled. Pass the "
                "model uncompiled with TrainingArguments(torch_compile=True), or compile "
                "model.get_decoder() yourself",
                RuntimeWarning,
                stacklevel=4,
            )
            compiled = decoder
        self._csl_decoder = (decoder, compiled)
        return compiled

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = {k: v for k, v in inputs.items() if k != self.csl_index_column}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def _tracker_for(self, logits: torch.Tensor) -> CSLTracker:
        if self.csl_tracker is None:
            self.csl_tracker = self._default_tracker(logits.shape[-1], logits.device)
        return self._tracker_on(logits.device)

    def _tracker_on(self, device: torch.device) -> CSLTracker:
        """The tracker, refused unless on ``device`` (the logits'). The index is moved to
        the tracker's device, so accumulate's own check blamed the index, not the tracker
        passed in."""
        tracker = self.csl_tracker
        if tracker.device != device:
            raise ValueError(
                f"CSLTrainer: csl_tracker is on {tracker.device} but the model's logits are on "
                f"{device}: the tracker must be on the training device. Create it there "
                f"(CSLTracker(N, C, device={str(device)!r}), or CSLTracker.from_file(path, "
                f"device={str(device)!r}) for a saved one), or leave csl_tracker out: "
                "CSLTrainer then makes one on the logits' device at the first step"
            )
        return tracker

    def _default_tracker(self, num_classes: int, device: torch.device) -> CSLTracker:
        try:
            num_samples = len(self.train_dataset)
        except TypeError:  # an IterableDataset: its size is unknown before it ends
            raise TypeError(
                f"CSLTrainer: the train_dataset ({type(self.train_dataset).__name__}) has no "
                "len(), so the default tracker cannot be sized; pass "
                "csl_tracker=csl_fast.CSLTracker(N, num_classes) with N the number of "
                "distinct indices its examples carry"
            ) from None
        self._csl_sized_by_len = True
        return CSLTracker(num_samples, num_classes, device=device, **self.csl_tracker_kwargs)

    @contextlib.contextmanager
    def _index_hint(self) -> Iterator[None]:
        """Adds the likely cause to an out-of-range index when the tracker was sized by
        ``len(train_dataset)``: indices added before a Subset, filter or select keep the
        full set's numbering (the checks raise before anything is written)."""
        try:
            yield
        except IndexError as exc:
            if not getattr(self, "_csl_sized_by_len", False) or "index[" not in str(exc):
                raise
            raise IndexError(
                f"{exc}. CSLTrainer sized its tracker by len(train_dataset) = "
                f"{self.csl_tracker.num_samples}; if the indices were added before a Subset, "
                "filter or select, they count the full dataset: pass "
                "csl_tracker=csl_fast.CSLTracker(N, num_classes) with N the full dataset's "
                "size, or add the indices after selecting"
            ) from exc

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; resuming from a checkpoint also restores the tracker saved in
        it (``csl_tracker.csl``), before the first step.

        Here rather than in ``Trainer._load_from_checkpoint``, which DeepSpeed resumes
        never call (they load through ``deepspeed_load_checkpoint``): the tracker would
        restart empty there, without a word.

        With ``TrainingArguments(auto_find_batch_size=True)`` the Trainer starts training
        again from step 0 at a smaller batch size after an out-of-memory error: the tracker
        then goes back to its state at this call's start (after the checkpoint's), so the
        failed attempt's batches are not counted. That takes a copy of the tracker's
        buffers in host memory (about the size of its file, O(N)) for the duration of the
        call, only with ``auto_find_batch_size``.

        Args:
            resume_from_checkpoint: as for ``Trainer.train``: a checkpoint folder, or True
                for the last one in ``output_dir``.
            *args, **kwargs: ``Trainer.train``'s other arguments.
        """
        folder = resume_from_checkpoint
        if folder is True:
            from transformers.trainer_utils import get_last_checkpoint

            folder = get_last_checkpoint(self.args.output_dir)  # None: the Trainer says so
        refuse_tensor_parallel("CSLTrainer", self._tp_size())
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
            self._restore_tracker(os.fspath(folder))
        if self.csl_tracker is not None and loaded_unmarked(self.csl_tracker):
            # one passed in from a file (and not replaced by a checkpoint's): global state,
            # which the first end_epoch under DDP refused unmarked, after a whole epoch
            mark_synced(self.csl_tracker)
        self._csl_start = self._tracker_copy() if self.args.auto_find_batch_size else None
        self._csl_loop_began = False
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._csl_start = None  # (the copy is O(N))

    def _tracker_copy(self) -> tuple[CSLTracker | None, dict[str, Any] | None]:
        """The tracker and a host copy of its state (None for no tracker yet)."""
        tracker = self.csl_tracker
        if tracker is None:
            return None, None
        # (live tensors: copied, or training would change them; a copy, not a checkpoint:
        # no warning of unsynced records, which mark_synced makes global on a restore)
        state = state_dict(tracker)
        for group in ("buffers", "histories"):
            state[group] = {k: v.detach().to("cpu", copy=True) for k, v in state[group].items()}
        return tracker, state

    def _loop_begins(self) -> None:
        """At each start of the Trainer's training loop (on_train_begin). accelerate's
        ``find_executable_batch_size`` (``auto_find_batch_size``) reruns the loop from step
        0 at a smaller batch size after an out-of-memory error, within the same train():
        the batches the failed attempt recorded (a second presentation of each, in its
        epoch's counts) are taken back by restoring the state train() started with."""
        if self._csl_loop_began and self._csl_start is not None:
            tracker, state = self._csl_start
            if tracker is not None:
                tracker.load_state_dict(state)
                mark_synced(tracker)  # the state train() started with, global on every rank
            self.csl_tracker = tracker  # (None: made again at the first step)
        self._csl_loop_began = True
        self._check_model()

    def _check_model(self) -> None:
        """Warns when the model trained is another object than the one the tracker last
        trained: model_init builds a new one at each train(), and the tracker went on,
        summing the models' CSL (hyperparameter_search is refused for that). Warned, not
        refused: a model continued in a new object (its weights loaded) may mean to go
        on. A resume restores the tracker with its model (_restore_tracker forgets)."""
        tracker, model = self.csl_tracker, self._core(self.model)
        if tracker is None:
            return
        last = self._csl_trained
        if last is not None and last[0]() is tracker and last[1]() is not model:
            warnings.warn(
                f"CSLTrainer: train() trains another {type(model).__name__} object than the "
                f"one csl_tracker recorded (model_init builds a new model at each train()), "
                f"and the tracker keeps that model's CSL (epoch {tracker.epoch}): the new "
                "model's is added to it. Set trainer.csl_tracker = None (a new tracker at "
                "the first step) or use a new CSLTrainer for each model; to continue a model, "
                "train(resume_from_checkpoint=...) restores the tracker with it",
                RuntimeWarning,
                stacklevel=2,
            )
        self._csl_trained = (weakref.ref(tracker), weakref.ref(model))

    def _tp_size(self) -> int:
        # (transformers before get_tp_size had no tensor parallelism in the Trainer)
        return self.get_tp_size() if hasattr(self, "get_tp_size") else 1

    def _restore_tracker(self, checkpoint: str) -> None:
        self._csl_trained = None  # the checkpoint's tracker goes with the model it resumes
        path = os.path.join(checkpoint, TRACKER_FILE)
        if not os.path.exists(path):
            kept = (
                "the tracker passed in keeps the state it had"
                if self.csl_tracker is not None
                else "the tracker records only from this checkpoint on (its CSL misses the "
                "steps before it)"
            )
            warnings.warn(
                f"CSLTrainer: the checkpoint {checkpoint!r} holds no {TRACKER_FILE}: {kept}; "
                "resume from a checkpoint written by CSLTrainer to keep the tracker with it",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        if self.csl_tracker is None:
            kwargs = self.csl_tracker_kwargs
            # The file fixes the tracker's layout; the options it does not hold come from here.
            run = {k: kwargs[k] for k in ("backend", "deterministic") if k in kwargs}
            tracker = CSLTracker.from_file(path, device=self.args.device, **run)
            for name in ("dtype", "history", "num_labels"):
                have = getattr(tracker, name)
                if name in kwargs and kwargs[name] != have:
                    raise ValueError(
                        f"CSLTrainer: csl_tracker_kwargs has {name}={kwargs[name]!r} but the "
                        f"checkpoint's tracker ({path}) has {name}={have!r}; resume with the "
                        "csl_tracker_kwargs the checkpoint was written with"
                    )
            self.csl_tracker = tracker
        else:
            self.csl_tracker.load(path)
        mark_synced(self.csl_tracker)  # every rank loaded the same global state
