"""``csl-fast clean``: the CSV it writes (columns, 1-based ranks, one row per flagged
sample, policies, budget) and its exit codes.

One tiny demo run (200 digits, 40 epochs) is shared; errors are checked in process (exit
code and a one-line message) and once in a subprocess (no traceback).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from cli_calls import run_main, user_error

import csl_fast
from csl_fast.cleaning import CSV_COLUMNS, DEFAULT_MIN_CONFIDENCE
from csl_fast.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from csl_fast.report import RunSamples


def read(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    code = main(
        [
            "demo", "--samples", "200", "--epochs", "40", "--pairs", "4", "--hidden", "64",
            "--overhead-rounds", "0", "--no-report", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == EXIT_OK
    return out


@pytest.fixture
def bare_tracker(tmp_path):
    """A tracker file with no samples.npz beside it and no eval passes."""
    gen = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(40, 5)
    for _ in range(3):
        for s in range(0, 40, 10):
            idx = torch.arange(s, s + 10)
            logits = torch.randn(10, 5, generator=gen)
            csl_fast.accumulate(logits, torch.randint(0, 5, (10,), generator=gen), idx, tracker)
        tracker.end_epoch()
    path = tmp_path / "bare.csl"
    tracker.save(path)
    return path


def flagged_union(run) -> tuple[list[int], set[int]]:
    """The samples `clean` acts on in the demo run (whose samples.npz holds the inputs):
    the mislabeled rule's flagged set and every conflicting group, by rank; and the latter."""
    tracker = csl_fast.CSLTracker.from_file(run / "tracker.csl")
    samples = RunSamples.load(run / "samples.npz")
    det = csl_fast.detect.mislabeled(tracker)
    dup = csl_fast.detect.duplicates(
        tracker, inputs=torch.from_numpy(samples.inputs), labels=torch.from_numpy(samples.labels)
    )
    union = (det.flagged | dup.flagged).tolist()
    return [i for i in det.ranking.tolist() if union[i]], set(dup.indices.tolist())


def test_default_policy_one_row_per_flagged_sample(demo_run, tmp_path, capsys):
    out = tmp_path / "plan.csv"
    code, stdout, _ = run_main(capsys, "clean", str(demo_run), "--out", str(out))
    assert code == EXIT_OK
    rows = read(out)
    tracker = csl_fast.CSLTracker.from_file(demo_run / "tracker.csl")
    det = csl_fast.detect.mislabeled(tracker)
    expected, in_groups = flagged_union(demo_run)
    assert [int(r["index"]) for r in rows] == expected
    assert len(in_groups) == 8  # the demo's 4 conflicting pairs
    assert set(det.indices.tolist()) - in_groups  # rows of the mislabeled rule's own too
    # rank: 1-based position in the ranking, as `csl-fast rank` numbers it
    ranking = det.ranking.tolist()
    assert [int(r["rank"]) for r in rows] == [ranking.index(int(r["index"])) + 1 for r in rows]
    assert all(r["action"] in ("drop", "relabel") for r in rows if int(r["index"]) not in in_groups)
    assert sum(r["action"] == "keep" for r in rows) == 4  # one member of each pair
    labels, conf = tracker.suggestions()
    for r in rows:
        i = int(r["index"])
        assert float(r["score"]) == float(det.scores[i])
        if r["action"] == "relabel" and i not in in_groups:
            assert int(r["suggested_label"]) == int(labels[i])
            assert abs(float(r["confidence"]) - float(conf[i])) <= 5e-5
            assert float(conf[i]) >= DEFAULT_MIN_CONFIDENCE
    assert f"wrote {len(rows)} decisions to {out}" in stdout
    assert "ground truth (samples.npz)" in stdout or not rows


def test_rank_column_agrees_with_csl_fast_rank(demo_run, tmp_path, capsys):
    out = tmp_path / "plan.csv"
    code, _, _ = run_main(
        capsys, "clean", str(demo_run), "--out", str(out), "--policy", "review", "--budget", "5"
    )
    assert code == EXIT_OK
    rows = read(out)
    code, ranked, _ = run_main(capsys, "rank", str(demo_run), "--csv", "--top", "5")
    assert code == EXIT_OK
    ranked_rows = list(csv.DictReader(io.StringIO(ranked)))
    assert [(r["rank"], r["index"]) for r in rows] == [(r["rank"], r["index"]) for r in ranked_rows]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]


def test_drop_policy_and_budget(demo_run, tmp_path, capsys):
    out = tmp_path / "drop.csv"
    assert run_main(capsys, "clean", str(demo_run), "--out", str(out), "--policy", "drop")[0] == 0
    flagged, _ = flagged_union(demo_run)
    rows = read(out)
    assert [int(r["index"]) for r in rows] == flagged
    assert all(r["action"] == "drop" for r in rows)
    # --budget cuts any policy's rows to the most suspicious ones
    args = ("clean", str(demo_run), "--out", str(out), "--policy", "review", "--budget", "9")
    assert run_main(capsys, *args)[0] == 0
    review = read(out)
    assert len(review) == 9
    code, stdout, _ = run_main(
        capsys, "clean", str(demo_run), "--out", str(out), "--policy", "drop", "--budget", "2"
    )
    assert code == EXIT_OK and "budget 2" in stdout
    assert [int(r["index"]) for r in read(out)] == flagged[:2]
    # drop relabels nothing: no confidence threshold, no "0 of 0 relabels" line
    assert "min confidence" not in stdout and "relabels give" not in stdout
    assert "ground truth" in stdout
    # 0, as csl_fast.clean takes it: the CSV's header and no rows
    code, stdout, _ = run_main(
        capsys, "clean", str(demo_run), "--out", str(out), "--policy", "review", "--budget", "0"
    )
    assert code == EXIT_OK and "wrote 0 decisions" in stdout
    assert out.read_text().splitlines() == ["index,action,suggested_label,confidence,score,rank"]


def test_min_confidence_bounds_relabels(demo_run, tmp_path, capsys):
    out = tmp_path / "plan.csv"
    args = ("clean", str(demo_run), "--out", str(out), "--policy", "review", "--budget", "30")
    assert run_main(capsys, *args, "--min-confidence", "0")[0] == 0
    everything = read(out)
    assert all(
        r["action"] == "relabel"
        for r in everything
        if r["suggested_label"] != "" and r["action"] != "keep"
    )
    assert run_main(capsys, *args, "--min-confidence", "1")[0] == 0
    strict = read(out)
    assert all(float(r["confidence"]) >= 1.0 for r in strict if r["action"] == "relabel")
    assert sum(r["action"] == "relabel" for r in strict) <= sum(
        r["action"] == "relabel" for r in everything
    )


def test_ground_truth_summary_matches_samples_file(demo_run, tmp_path, capsys):
    out = tmp_path / "plan.csv"
    args = ("clean", str(demo_run), "--out", str(out), "--policy", "review", "--budget", "20")
    code, stdout, _ = run_main(capsys, *args, "--min-confidence", "0")
    assert code == EXIT_OK
    rows = read(out)
    samples = RunSamples.load(demo_run / "samples.npz")
    mis = sum(bool(samples.mislabeled[int(r["index"])]) for r in rows)
    dup = sum(bool(samples.duplicate[int(r["index"])]) for r in rows)
    right = sum(
        r["action"] == "relabel"
        and int(r["suggested_label"]) == int(samples.true_labels[int(r["index"])])
        for r in rows
    )
    relabels = sum(r["action"] == "relabel" for r in rows)
    assert f"of the 20 rows {mis} are mislabeled, {dup} duplicated" in stdout
    assert f"; {right} of {relabels} relabels give the true label" in stdout


def test_bare_tracker_file(bare_tracker, tmp_path, capsys):
    out = tmp_path / "plan.csv"
    code, stdout, _ = run_main(
        capsys, "clean", str(bare_tracker), "--out", str(out), "--policy", "review", "--budget", "3"
    )
    assert code == EXIT_OK
    assert len(read(out)) == 3
    assert "ground truth" not in stdout  # no samples.npz beside the tracker


def test_nothing_flagged_warns_on_one_line(tmp_path, capsys):
    tracker = csl_fast.CSLTracker(60, 3)
    logits = torch.tensor([[2.0, 0.0, 0.0]]).repeat(60, 1)
    for _ in range(3):
        csl_fast.accumulate(logits, torch.zeros(60, dtype=torch.long), torch.arange(60), tracker)
        tracker.end_epoch()
    path = tmp_path / "same.csl"
    tracker.save(path)
    out = tmp_path / "plan.csv"
    code, stdout, err = run_main(capsys, "clean", str(path), "--out", str(out))
    assert code == EXIT_OK
    assert out.read_text() == ",".join(CSV_COLUMNS) + "\n"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csl-fast clean: warning: ")
    assert "nothing flagged" in lines[0]
    assert "wrote 0 decisions" in stdout
    # its advice named rule='fraction', no option of the CLI: the CLI's way is said too
    if "rule='fraction'" in lines[0]:
        assert lines[0].endswith("csl-fast rank RUN --top K lists them)")
        assert "--policy review --budget K" in lines[0]
    code, _, err = run_main(capsys, "rank", str(path))
    assert code == EXIT_OK and "rule='fraction'" in err and "--policy review --budget K" in err
    # the report said only "wrote report.html": the warning was on the page alone
    code, _, err = run_main(capsys, "report", str(path), "--out", str(tmp_path / "r"), "-q")
    assert code == EXIT_OK
    assert err.startswith("csl-fast report: warning: csl_fast.detect: nothing flagged")


def test_a_run_that_closed_no_epoch_is_warned_once_on_one_line(tmp_path, capsys):
    """Without tracker.end_epoch() every epoch stamp is 0: threshold learning time is 0 or
    1 and the suggestions' confidence counts every presentation; nothing said so."""
    gen = torch.Generator().manual_seed(1)
    tracker = csl_fast.CSLTracker(40, 4)
    y = torch.arange(40) % 4
    for _ in range(5):  # no end_epoch
        logits = torch.randn(40, 4, generator=gen)
        csl_fast.accumulate(logits, y, torch.arange(40), tracker)
    path = tmp_path / "open.csl"
    tracker.save(path)
    out = tmp_path / "plan.csv"
    for args in (
        ["clean", str(path), "--out", str(out), "--policy", "review", "--budget", "4"],
        ["rank", str(path), "--score", "threshold_learning_time"],
    ):
        code, _, err = run_main(capsys, *args)
        assert code == EXIT_OK
        ours = [line for line in err.splitlines() if "closed no epoch" in line]
        assert len(ours) == 1 and "tracker.end_epoch() was never called" in ours[0], err
        assert ours[0].startswith(f"csl-fast {args[0]}: warning: csl_fast.")
        assert "up to 5 times" in ours[0]
        assert "RuntimeWarning" not in err
    with pytest.warns(RuntimeWarning, match="threshold_learning_time is 0 or 1"):
        csl_fast.scores(tracker, ["threshold_learning_time"])
    tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        csl_fast.scores(tracker, ["threshold_learning_time"])
        csl_fast.clean(tracker, policy="review", budget=4)


def test_a_run_that_diverged_says_which_epochs_recorded_no_loss(tmp_path, capsys):
    # the report said it; rank and clean ranked what was left without a word
    gen = torch.Generator().manual_seed(1)
    tracker = csl_fast.CSLTracker(40, 4, history=True)
    y = torch.arange(40) % 4
    for epoch in range(5):
        logits = torch.randn(40, 4, generator=gen) + 3 * torch.nn.functional.one_hot(y, 4)
        if epoch == 2:
            logits[30:] = float("nan")  # diverged part-way through epoch 3
        logits[:] = float("nan") if epoch >= 3 else logits
        csl_fast.accumulate(logits, y, torch.arange(40), tracker)
        tracker.end_epoch()
    path = tmp_path / "diverged.csl"
    tracker.save(path)
    for args in (
        ["clean", str(path), "--out", str(tmp_path / "plan.csv"), "--quiet"],
        ["rank", str(path), "--quiet"],
        ["rank", str(path), "--json"],
    ):
        code, out, err = run_main(capsys, *args)
        assert code == EXIT_OK
        ours = [line for line in err.splitlines() if "no finite training loss" in line]
        assert len(ours) == 1 and "epochs 4-5 of 5" in ours[0], err
        assert ours[0].startswith(f"csl-fast {args[0]}: warning: no finite training loss")
        assert "epoch 3 recorded a loss for 30 samples, epoch 2 for 40" in ours[0]
    assert "epochs 4-5 of 5" in json.loads(out)["note"]


def test_usage_errors_exit_2(demo_run, bare_tracker, tmp_path, capsys):
    out = str(tmp_path / "p.csv")
    line = user_error(
        capsys, EXIT_USAGE, "clean", str(demo_run), "--out", out, "--policy", "review"
    )
    assert "--budget" in line
    assert "--min-confidence" in user_error(
        capsys, EXIT_USAGE, "clean", str(demo_run), "--out", out, "--min-confidence", "1.5"
    )
    user_error(capsys, EXIT_USAGE, "clean", str(demo_run), "--out", out, "--policy", "fix")
    user_error(capsys, EXIT_USAGE, "clean", str(demo_run), "--out", out, "--budget", "-1")
    assert "--out" in user_error(capsys, EXIT_USAGE, "clean", str(demo_run))
    line = user_error(
        capsys, EXIT_USAGE, "clean", str(bare_tracker), "--out", out, "--score", "eval_csl"
    )
    assert "not recorded" in line
    assert not os.path.exists(out)


def test_input_errors_exit_3(demo_run, bare_tracker, tmp_path, capsys):
    out = str(tmp_path / "p.csv")
    assert "nope.csl" in user_error(
        capsys, EXIT_INPUT, "clean", str(tmp_path / "nope.csl"), "--out", out
    )
    truncated = tmp_path / "truncated.csl"
    truncated.write_bytes(bare_tracker.read_bytes()[:100])
    user_error(capsys, EXIT_INPUT, "clean", str(truncated), "--out", out)
    user_error(
        capsys, EXIT_INPUT, "clean", str(demo_run), "--out", str(tmp_path / "no_dir" / "p.csv")
    )
    user_error(capsys, EXIT_INPUT, "clean", str(demo_run), "--out", str(tmp_path))
    # a samples.npz of another run
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(bare_tracker, other / "tracker.csl")
    shutil.copy(demo_run / "samples.npz", other / "samples.npz")
    assert "another run" in user_error(capsys, EXIT_INPUT, "clean", str(other), "--out", out)


def test_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "csl_fast", "clean", str(tmp_path / "missing"), "--out", "x.csv"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == EXIT_INPUT
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("csl-fast clean: error: ")


def test_inputs_without_labels_claim_no_group_decision(tmp_path, capsys):
    # --inputs with no labels anywhere (no samples.npz) resolves no conflicting group, but
    # the summary counted every review row kept with its given label that shared an input
    # with a flagged sample as "the member whose label the network preferred is kept"
    gen = torch.Generator().manual_seed(0)
    n, bad = 60, torch.arange(6)
    y = torch.arange(n) % 3
    tracker = csl_fast.CSLTracker(n, 3)
    for _ in range(4):
        logits = torch.nn.functional.one_hot(y, 3) * 4.0 + torch.randn(n, 3, generator=gen)
        logits[bad] = logits[bad].roll(1, dims=1)  # the network disagrees with these labels
        csl_fast.accumulate(logits, y, torch.arange(n), tracker)
        tracker.end_epoch()
    tracker.save(tmp_path / "run.csl")
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.zeros((n, 2), dtype=np.float32))  # one group: every sample
    out = tmp_path / "plan.csv"
    args = ("clean", str(tmp_path / "run.csl"), "--out", str(out), "--inputs", str(inputs))
    code, stdout, _ = run_main(capsys, *args, "--policy", "review", "--budget", str(n))
    assert code == EXIT_OK
    assert any(r["action"] == "keep" for r in read(out))
    assert "flagged 0 " not in stdout
    assert "duplicates:" in stdout and "is kept" not in stdout


def test_a_short_review_worklist_says_why(tmp_path, capsys):
    """--budget 35 on a run that trained on 30 of its 40 samples wrote 30 rows without a
    word; --min-confidence -0 was echoed as "min confidence -0"."""
    n, seen = 40, torch.arange(30)
    tracker = csl_fast.CSLTracker(n, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        y = seen % 3
        csl_fast.accumulate(torch.randn(30, 3, generator=g), y, seen, tracker)
        tracker.end_epoch()
    path = tmp_path / "t.csl"
    tracker.save(path)
    out = tmp_path / "p.csv"
    args = ("clean", str(path), "--out", str(out), "--policy", "review")
    code, stdout, _ = run_main(capsys, *args, "--budget", "35", "--min-confidence", "-0")
    assert code == EXIT_OK and len(read(out)) == 30
    assert "note: 30 rows, not the budget's 35: only 30 of the 40 samples have a csl value" in (
        stdout
    )
    assert "min confidence 0)" in stdout
    code, stdout, _ = run_main(capsys, *args, "--budget", "30")
    assert code == EXIT_OK and "not the budget" not in stdout


def test_out_dash_writes_the_plan_to_stdout_and_the_summary_to_stderr(demo_run, tmp_path, capsys):
    """--out /dev/stdout failed ("the folder refuses new files"), --out - wrote a file named
    '-', and clean had no -o as rank has: the plan could not be piped."""
    out = tmp_path / "plan.csv"
    assert run_main(capsys, "clean", str(demo_run), "--out", str(out))[0] == EXIT_OK
    code, stdout, stderr = run_main(capsys, "clean", str(demo_run), "-o", "-")
    assert code == EXIT_OK
    assert stdout == out.read_text()
    assert f"wrote {len(read(out))} decisions to standard output" in stderr
    assert not os.path.exists("-")


@pytest.mark.skipif(not os.path.exists("/dev/stdout"), reason="needs /dev/stdout")
@pytest.mark.parametrize("command", ["clean", "rank"])
def test_dev_stdout_appends_to_the_log_stdout_goes_to(demo_run, tmp_path, command):
    """Written as a file, /dev/stdout (-> /proc/self/fd/1 -> the log the shell redirected
    stdout to) was replaced by a new file: the script's log lost what it held before."""
    log = tmp_path / "log.txt"
    option = "--out" if command == "clean" else "--output"
    script = (
        "import sys; from csl_fast.cli import main; print('logged before', flush=True); "
        f"sys.exit(main([{command!r}, {str(demo_run)!r}, {option!r}, '/dev/stdout', '-q']))"
    )
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", script], stdout=f, stderr=subprocess.PIPE)
    assert proc.returncode == EXIT_OK, proc.stderr
    text = log.read_text()
    assert text.startswith("logged before\n") and len(text.splitlines()) > 3
    assert ("index,action,suggested_label" if command == "clean" else "rank  index") in text
    with pytest.raises(OSError, match="names an open file descriptor"):
        csl_fast.load(demo_run / "tracker.csl").save("/dev/stdout")


def test_a_reader_that_goes_away_ends_clean_quietly(bare_tracker, capsys, monkeypatch):
    # `csl-fast clean RUN --out - | head -1` printed "error: Broken pipe" and exited 3,
    # the bad-input code, where rank in the same pipe ends quietly
    def gone(self, path_or_file):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(csl_fast.cleaning.CleaningPlan, "to_csv", gone)
    code, _, err = run_main(capsys, "clean", str(bare_tracker), "--out", "-", "-q")
    assert code == EXIT_OK and "Broken pipe" not in err


@pytest.mark.parametrize(
    ("loss_only", "first_scored", "rows", "ending"),
    [
        (False, 25, 5, "; the other 25 were never scored by an eval pass"),
        (True, 25, 5, "; the other 25 were never scored by an eval pass"),
        (False, 0, 30, "\n"),  # (every sample has a value: it said "the other 0 ...")
    ],
)
def test_a_short_review_worklist_counts_held_out_samples_as_having_a_score(
    loss_only, first_scored, rows, ending, tmp_path, capsys
):
    # eval passes scored 15 of 40 samples, 10 of them never trained on (not ranked): the
    # note said "only 5 of the 40 samples have a eval_csl value (the others were never
    # scored by an eval pass)" of the 10 an eval pass had scored
    from cli_calls import held_out_run

    path = tmp_path / "held.csl"
    held_out_run(path, loss_only, first_scored)
    out = tmp_path / "p.csv"
    args = ("clean", str(path), "--out", str(out), "--policy", "review", "--budget", "40")
    code, stdout, _ = run_main(capsys, *args, "--score", "eval_csl")
    assert code == EXIT_OK and len(read(out)) == rows
    valued = 40 - first_scored
    assert (
        f"note: {rows} rows, not the budget's 40: {valued} of the 40 samples have a eval_csl "
        "value, but 10 of them are held out (scored by an eval pass, never trained on), and "
        f"are not ranked{ending}"
    ) in stdout
    assert "the other 0" not in stdout


def test_clean_help_says_when_the_rank_is_empty(capsys):
    # it said "rank 1-based, as in csl-fast rank" of a column that is empty for a sample
    # the detection does not rank (a never-presented group member, a held-out sample)
    with pytest.raises(SystemExit) as exit_info:  # argparse exits after --help
        main(["clean", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "empty for a sample the detection does not rank" in help_text
    assert "never presented in training" in help_text and "eval pass scored" in help_text


def test_samples_of_another_recorder_are_not_called_never_presented(tmp_path, capsys):
    # a tracker that mixes recorders: the detection gives the record_loss samples no
    # score, and the short-listing notes said they were never presented in training
    t = csl_fast.CSLTracker(30, 3)
    y = torch.arange(20) % 3
    for _ in range(3):
        csl_fast.accumulate(torch.randn(20, 3) + 3 * torch.eye(3)[y], y, torch.arange(20), t)
        csl_fast.record_loss(torch.rand(10), torch.arange(20, 30), t)
        t.end_epoch()
    t.save(tmp_path / "mixed.csl")
    run, out = str(tmp_path / "mixed.csl"), str(tmp_path / "plan.csv")
    for args in (
        ["clean", run, "--out", out, "--policy", "review", "--budget", "40"],
        ["rank", run, "--top", "40"],
    ):
        code, out_text, err = run_main(capsys, *args)
        assert code == EXIT_OK
        said = out_text + err  # (clean's summary goes to the stream the plan does not)
        assert "but 10 of those without one were presented, recorded without softmax" in said


def test_two_classes_in_use_drop_by_default_and_warn(tmp_path, capsys):
    """As csl_fast.clean: on two classes in use (here 4 outputs, the labels of
    samples.npz) the default policy drops, and --policy relabel-confident relabels; both
    say why on standard error."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(4, classes=2)
    run = tmp_path / "run"
    run.mkdir()
    tracker.save(run / "tracker.csl")
    RunSamples(labels=labels.numpy()).save(run / "samples.npz")
    code, out, err = run_main(capsys, "clean", str(run), "--out", str(tmp_path / "p.csv"))
    assert code == EXIT_OK and "relabel, " in out and "(policy drop" in out
    assert ": 0 relabel," in out and "(policy drop)" in out  # no groups: no threshold used
    assert "warning: csl_fast.clean: every flagged sample is dropped (policy drop)" in err
    code, out, err = run_main(
        capsys,
        "clean",
        str(run),
        "--out",
        str(tmp_path / "q.csv"),
        "--policy",
        "relabel-confident",
    )
    assert code == EXIT_OK and ": 0 relabel," not in out and "policy relabel-confident" in out
    assert "policy='relabel-confident' relabels, but two classes are in use" in err
    rows = read(tmp_path / "q.csv")
    assert {r["action"] for r in rows} >= {"relabel"}


def test_the_detection_counts_the_classes_samples_npz_labels_use(tmp_path, capsys):
    """8 outputs, labels 0..2: by num_classes the 12 flips lost no label firmly and
    nothing was flagged; samples.npz's labels count 3 classes in use."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(8)
    run = tmp_path / "run"
    run.mkdir()
    tracker.save(run / "tracker.csl")
    tracker.save(tmp_path / "bare.csl")
    RunSamples(labels=labels.numpy()).save(run / "samples.npz")
    code, out, _ = run_main(capsys, "clean", str(run), "--out", str(tmp_path / "p.csv"))
    assert code == EXIT_OK and "flagged 12 of 120 samples" in out
    code, out, _ = run_main(
        capsys, "clean", str(tmp_path / "bare.csl"), "--out", str(tmp_path / "q.csv")
    )
    assert code == EXIT_OK and "flagged 0 of 120 samples" in out


def test_two_classes_in_use_the_default_still_resolves_conflicting_groups(tmp_path, capsys):
    """The default drop on two classes dropped every member of every conflicting group,
    which surely holds a wrong label; they are resolved as under relabel-confident."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(4, classes=2)
    x = torch.arange(120.0)
    x[61:73] = torch.arange(12.0)  # flip i and clean 61 + i: same input, other label
    run = tmp_path / "run"
    run.mkdir()
    tracker.save(run / "tracker.csl")
    RunSamples(labels=labels.numpy(), inputs=x[:, None].numpy()).save(run / "samples.npz")
    code, out, err = run_main(capsys, "clean", str(run), "--out", str(tmp_path / "p.csv"))
    assert code == EXIT_OK and "every flagged sample is dropped (policy drop)" in err
    actions = {int(r["index"]): r["action"] for r in read(tmp_path / "p.csv")}
    assert all(actions[i] == "relabel" and actions[61 + i] == "keep" for i in range(12))
    # the groups are resolved by the confidence threshold: the summary names it
    assert "(policy drop, min confidence 0.4)" in out + err
