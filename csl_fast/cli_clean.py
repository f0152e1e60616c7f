"""``csl-fast clean``: one decision per flagged sample of a saved run, written as CSV
(:func:`csl_fast.clean`), and its summary. With the run's inputs (``--inputs`` or the
``inputs`` of ``samples.npz``, :mod:`csl_fast.cli_inputs`) the plan also resolves the
groups of identical inputs whose labels conflict (:mod:`csl_fast.cleaning_groups`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from .cli_errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE, CLIError, warning_line

__all__ = ["cmd_clean"]


def cmd_clean(args: argparse.Namespace) -> int:
    from .cleaning import (
        EVAL_PASSES_ONLY,
        RelabelWarning,
        binary_policy,
        clean,
        no_suggestions,
    )
    from .cli_commands import (
        _scores_for,
        check_output,
        detection_for,
        load_run_for,
        loss_only,
        output_stream,
    )
    from .cli_inputs import run_inputs, say_note
    from .detect import DetectionWarning
    from .scores import epochs_without_loss

    if args.policy == "review" and args.budget is None:
        raise CLIError("--policy review needs --budget K (how many samples you will review)")
    stream = output_stream(args.out, "--out")
    if stream is None:
        check_output(args.run, args.out, "--out", args.inputs, args.labels)
    tracker, samples = load_run_for(args)
    if args.score == "label_csl":
        # (the advice below pointed a run without per-label CSL at a command that refuses it)
        _scores_for(tracker, args.score)
        raise CLIError(
            "--score label_csl: clean acts on samples; list the suspicious (sample, label) "
            "entries with csl-fast rank RUN --score label_csl",
            EXIT_USAGE,
        )
    inputs, labels, aside = run_inputs(args, tracker, samples)
    say_note(args, aside)
    with warnings.catch_warnings():
        # the detection's warning, if any, is printed below as one line
        warnings.simplefilter("ignore", DetectionWarning)
        _scores_for(tracker, args.score)  # a clear error when the score was not recorded
        # (the samples' labels count the classes in use, with or without --inputs)
        class_labels = labels if labels is not None else getattr(samples, "labels", None)
        det = detection_for(tracker, args.score, class_labels)
        policy = args.policy
        missing = no_suggestions(tracker)
        if missing is not None and policy in (None, "relabel-confident"):
            policy = "drop"
            losses = loss_only(tracker)
            what = (
                "losses only (csl_fast.record_loss or csl_fast.accumulate_bce)"
                if losses
                else "eval passes only (csl_fast.score_epoch), which cast no votes"
                if missing == EVAL_PASSES_ONLY
                else "sequences (a sequence's label is its token string, not one class)"
            )
            how = "; flagged by the tail rule of csl_fast.detect_losses" if losses else ""
            if not args.quiet:
                print(
                    f"csl-fast clean: note: this run recorded {what}: there are no suggested "
                    f"labels, so every flagged sample is dropped (policy drop){how}",
                    file=sys.stderr,
                )
        # (printed below as the detection's warning is: it says why relabels became drops)
        warnings.simplefilter("ignore", RelabelWarning)
        # (the policy stays None: clean's default makes the same choice from det's classes
        # in use, and resolves conflicting groups where it drops the flagged samples)
        _, relabel_warning = binary_policy(tracker, policy, class_labels, det)
        plan = clean(
            tracker,
            detection=det,
            policy=policy,
            min_confidence=args.min_confidence,
            budget=args.budget,
            score=args.score,
            inputs=inputs,
            labels=labels,
        )
    try:
        plan.to_csv(args.out if stream is None else stream)
    except BrokenPipeError:
        raise  # `csl-fast clean RUN --out - | head`: main() ends quietly, as for rank
    except OSError as exc:
        raise CLIError(exc.strerror, EXIT_INPUT) from None
    if plan.warning:
        print(f"csl-fast clean: warning: {warning_line(plan.warning)}", file=sys.stderr)
    if relabel_warning is not None:
        print(f"csl-fast clean: warning: {warning_line(relabel_warning)}", file=sys.stderr)
    lost = epochs_without_loss(tracker)
    if lost is not None:  # what the flagged set rests on, --quiet or not
        print(f"csl-fast clean: warning: {lost}", file=sys.stderr)
    where = {None: args.out, sys.stdout: "standard output", sys.stderr: "standard error"}
    summary = _clean_summary(plan, samples, args, where[stream], tracker)
    # the other stream than the CSV's
    print(summary, file=sys.stderr if stream is sys.stdout else sys.stdout)
    return EXIT_OK


def _clean_summary(
    plan: Any, samples: Any, args: argparse.Namespace, where: str, tracker: Any
) -> str:
    from .cli_inputs import duplicates_summary
    from .scores import unscored_reason

    det = plan.detection
    kept = f", {plan.num_kept} keep" if plan.duplicates is not None or plan.num_kept else ""
    lines = [
        f"wrote {len(plan)} decisions to "
        f"{where}: {plan.num_relabeled} relabel, "
        f"{plan.num_dropped} drop{kept} (policy {plan.policy}"
        + ("" if args.budget is None else f", budget {args.budget}")
        # (a drop that resolves no group relabels nothing: its confidence threshold is moot;
        # the two-class default's drop still resolves groups by it)
        + (
            ""
            if plan.policy == "drop" and not (plan.groups_resolved and plan.duplicates is not None)
            else f", min confidence {args.min_confidence:g}"
        )
        + ")",
        f"flagged {len(det)} of {det.scores.numel()} samples by {args.score} (rule {det.rule})",
    ]
    n = det.scores.numel()
    if plan.policy == "review" and len(plan) < args.budget:
        from .cli_commands import HELD_OUT, other_loss_clause, value_counts

        # (rank says as much of its --top; the worklist came back short without a word)
        valued, held = value_counts(det)
        why = (
            f"the run has {n} samples"
            if len(plan) == n
            else f"only {len(plan)} of the {n} samples have a {args.score} value (the others "
            f"were {unscored_reason(args.score, tracker)})"
            f"{other_loss_clause(tracker, args.score)}"
            if not held
            # (it said "only 50 ... have a value" when eval passes had scored 150: the 100
            # held out among them were counted as having none)
            else f"{valued} of the {n} samples have a {args.score} value, but {held} of "
            f"them are {HELD_OUT}, and are not ranked"
            # ("the other 0 were never scored" when every sample had a value)
            + (
                f"; the other {n - valued} were {unscored_reason(args.score, tracker)}"
                if valued < n
                else ""
            )
            + other_loss_clause(tracker, args.score)
        )
        lines.append(f"note: {len(plan)} rows, not the budget's {args.budget}: {why}")
    from .detect import count_phrase

    what = (
        "corrupted samples"
        if det.rule == "tail"
        else "bad sequences"
        if tracker.sequences
        # the count is of samples whose label the run rejects: flipped labels, and both
        # members of a pair of identical inputs with conflicting labels
        else "samples with a doubtful label"
    )
    estimate = count_phrase(det, what)
    if estimate is not None:
        lines.append(estimate)
    if det.diagnostics.get("note"):
        lines.append(f"note: {det.diagnostics['note']}")
    if plan.duplicates is not None:
        line = duplicates_summary(plan.duplicates)
        group_kept = int((plan.kept & plan.grouped).sum())
        if group_kept:
            # (a run that recorded losses only has no class to relabel to)
            relabelled = bool((plan.relabel & plan.grouped).any())
            others = "relabelled to its label" if relabelled else "dropped"
            line += (
                "; in each conflicting group with two labels measured the member whose "
                f"label the network preferred is kept ({group_kept}), the others {others} "
                "(a group with one label measured keeps the score's plan)"
            )
        lines.append(line)
    if samples is None or not samples.has_truth or len(plan) == 0:
        return "\n".join(lines)
    from .cleaning import evaluate_plan

    acc = evaluate_plan(plan, samples.true_labels, samples.mislabeled, samples.duplicate)
    truth = (
        f"ground truth (samples.npz): of the {len(plan)} rows {acc['mislabeled']} are "
        f"mislabeled, {acc['duplicate']} duplicated, {acc['clean']} clean"
    )
    if acc["relabel_correct"] is not None and plan.num_relabeled:
        truth += f"; {acc['relabel_correct']} of {plan.num_relabeled} relabels give the true label"
        if acc["kept"] and acc["keep_correct"] is not None:
            truth += f", {acc['keep_correct']} of {acc['kept']} kept hold it"
    lines.append(truth)
    return "\n".join(lines)
