"""``--inputs`` / ``--labels`` of ``csl-fast rank``, ``clean`` and ``report``
(csl_fast/cli_inputs.py): file formats, the samples.npz field, exit codes, a conflicting
pair flagged and acted on, a same-label pair never flagged.

One tiny tracked run on separable blobs (no samples.npz) with two planted duplicate
pairs: samples 0 and 1 identical with different labels, 2 and 3 identical with the same
label.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from cli_calls import run_main, user_error

import csl_fast
from csl_fast.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from csl_fast.report import RunSamples

N, C = 240, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(N) % C
    x = torch.randn(N, 8, generator=gen) * 0.6
    x[torch.arange(N), y] += 3.0
    x[1] = x[0]  # labels 0 and 1: a conflict
    x[6] = x[2]  # labels 2 and 2: benign
    assert y[0] != y[1] and y[2] == y[6]
    torch.set_num_threads(1)
    tracker = csl_fast.CSLTracker(N, C)
    model = csl_fast.train.mlp(8, C, (32, 32), seed=0)
    csl_fast.train.train(
        model, x, y, epochs=20, lr=3e-3, optimizer="adam", batch_size=64, tracker=tracker
    )
    folder = tmp_path_factory.mktemp("inputs")
    tracker.save(folder / "tracker.csl")
    np.save(folder / "x.npy", x.numpy())
    torch.save(x, folder / "x.pt")
    np.save(folder / "y.npy", y.numpy())
    torch.save(y, folder / "y.pt")
    return folder, tracker, x, y


def test_rank_marks_the_conflicting_pair_and_numbers_groups(run, capsys):
    folder, tracker, _, y = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)  # flags nothing
        plain = csl_fast.detect.mislabeled(tracker).flagged
    assert not plain[[0, 1, 2, 6]].any()  # the score rule alone flags none of the pairs
    for x_file, y_file in (("x.npy", "y.pt"), ("x.pt", "y.npy")):
        code, out, err = run_main(
            capsys, "rank", str(folder / "tracker.csl"), "--csv", "--top", str(N),
            "--inputs", str(folder / x_file), "--labels", str(folder / y_file),
        )  # fmt: skip
        assert code == EXIT_OK, err
        rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
        assert len(rows) == N
        assert rows[0]["flagged"] == rows[1]["flagged"] == "1"
        assert rows[2]["flagged"] == rows[6]["flagged"] == "0"  # same label: never flagged
        assert rows[0]["group"] == rows[1]["group"] == "0"
        assert rows[2]["group"] == rows[6]["group"] == "1"
        assert all(rows[i]["group"] == "" for i in rows if i not in (0, 1, 2, 6))
        others = [i for i in rows if i not in (0, 1)]
        assert [rows[i]["flagged"] == "1" for i in others] == [bool(plain[i]) for i in others]
        assert "2 groups of identical inputs, 1 with conflicting labels" in err
        # the label column shows the --labels file's labels (it was empty: samples.npz only)
        assert all(int(r["label"]) == int(y[i]) for i, r in rows.items())


def test_rank_without_inputs_leaves_group_empty(run, capsys):
    folder = run[0]
    code, out, _ = run_main(capsys, "rank", str(folder / "tracker.csl"), "--csv", "--top", "5")
    assert code == EXIT_OK
    assert all(r["group"] == "" for r in csv.DictReader(io.StringIO(out)))


def test_clean_keeps_the_preferred_label_and_relabels_the_other(run, tmp_path, capsys):
    folder, tracker, _, y = run
    out = tmp_path / "plan.csv"
    code, stdout, err = run_main(
        capsys, "clean", str(folder / "tracker.csl"), "--out", str(out),
        "--inputs", str(folder / "x.npy"), "--labels", str(folder / "y.npy"),
    )  # fmt: skip
    assert code == EXIT_OK, err
    with open(out, newline="") as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f)}
    assert 2 not in rows and 6 not in rows
    mean = tracker.csl_sum / tracker.csl_count
    keeper, other = (0, 1) if mean[0] < mean[1] else (1, 0)
    assert rows[keeper]["action"] == "keep"
    assert rows[keeper]["suggested_label"] == str(int(y[keeper]))
    assert rows[other]["action"] == "relabel"
    assert rows[other]["suggested_label"] == str(int(y[keeper]))
    assert "1 keep" in stdout and "1 with conflicting labels" in stdout
    assert "the others relabelled to its label" in stdout
    # --policy drop drops both members
    code, _, _ = run_main(
        capsys, "clean", str(folder / "tracker.csl"), "--out", str(out), "--policy", "drop",
        "--inputs", str(folder / "x.npy"), "--labels", str(folder / "y.npy"),
    )  # fmt: skip
    with open(out, newline="") as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f)}
    assert rows[0]["action"] == rows[1]["action"] == "drop"


def test_samples_npz_inputs_are_used_and_old_files_still_load(run, tmp_path, capsys):
    folder, tracker, x, y = run
    new = tmp_path / "new"
    new.mkdir()
    tracker.save(new / "tracker.csl")
    RunSamples(labels=y.numpy(), inputs=x.numpy()).save(new / "samples.npz")
    assert np.array_equal(RunSamples.load(new / "samples.npz").inputs, x.numpy())
    code, out, _ = run_main(capsys, "rank", str(new), "--csv", "--top", str(N))
    assert code == EXIT_OK
    rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows[0]["flagged"] == "1" and rows[0]["group"] == "0"
    # a samples.npz written before the inputs field existed: no group, no error
    old = tmp_path / "old"
    old.mkdir()
    tracker.save(old / "tracker.csl")
    np.savez_compressed(
        old / "samples.npz", labels=y.numpy(), format=np.asarray("csl_fast.samples/1")
    )
    assert RunSamples.load(old / "samples.npz").inputs is None
    code, out, _ = run_main(capsys, "rank", str(old), "--csv", "--top", "5")
    assert code == EXIT_OK
    assert all(r["group"] == "" for r in csv.DictReader(io.StringIO(out)))
    # inputs given, labels from samples.npz
    code, out, _ = run_main(
        capsys, "rank", str(old), "--csv", "--top", str(N), "--inputs", str(folder / "x.npy")
    )
    rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
    assert code == EXIT_OK and rows[1]["flagged"] == "1" and rows[6]["flagged"] == "0"


def test_report_shows_the_groups(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder = run[0]
    dest = tmp_path / "rep"
    code, _, err = run_main(
        capsys, "report", str(folder / "tracker.csl"), "--out", str(dest), "-q",
        "--inputs", str(folder / "x.pt"), "--labels", str(folder / "y.pt"),
    )  # fmt: skip
    assert code == EXIT_OK, err
    html = (dest / "report.html").read_text()
    assert "Duplicate groups (identical inputs)" in html
    assert "groups with conflicting labels</td><td>1</td>" in html
    assert "samples in them</td><td>4</td>" in html
    assert "<td>0, 1</td>" in html and "<td>2, 6</td>" not in html  # only the flagged group


def test_input_file_errors(run, tmp_path, capsys):
    folder, _, x, y = run
    tr = str(folder / "tracker.csl")
    out = str(tmp_path / "p.csv")
    np.save(tmp_path / "short.npy", x[:-1].numpy())
    line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "short.npy"))
    assert f"({N - 1}, 8)" in line and f"the tracker has {N} samples" in line
    np.save(tmp_path / "yf.npy", y.float().numpy())
    line = user_error(
        capsys, EXIT_INPUT, "clean", tr, "--out", out,
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "yf.npy"),
    )  # fmt: skip
    assert "float32" in line and "integers" in line
    np.save(tmp_path / "y2.npy", y[:10].numpy())
    line = user_error(
        capsys, EXIT_INPUT, "report", tr, "--out", str(tmp_path / "r"),
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "y2.npy"),
    )  # fmt: skip
    assert f"[{N}]" in line
    torch.save({"x": x}, tmp_path / "dict.pt")
    line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "dict.pt"))
    assert "not one tensor" in line
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "not a readable array" in user_error(
        capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "obj.npy")
    )
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "bad.npy"))
    # numpy and torch advise loading such files unsafely; the tool must never pass that on
    # (the object array above, a pickled object and garbage in a .pt file)
    torch.save({"when": datetime.datetime(2026, 1, 1)}, tmp_path / "obj.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x80\x04garbage")
    for name in ("obj.npy", "obj.pt", "bad.pt"):
        line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / name))
        assert "not a readable array file" in line and "save the array itself" in line
        assert not re.search(r"allow_pickle=|weights_only.{0,20}False|unsafe|trust", line), line
    line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "gone.npy"))
    assert "no such file" in line
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "r" / "report.html").exists()


def test_empty_rows_and_labels_outside_the_classes_are_input_errors(run, tmp_path, capsys):
    # [N, 0] inputs ended in a traceback (exit 1); labels -1 or C + 5 were taken, and clean
    # could relabel a duplicate group to such a "class"
    folder, _, _, y = run
    tr = str(folder / "tracker.csl")
    np.save(tmp_path / "empty.npy", np.zeros((N, 0)))
    line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / "empty.npy"))
    assert f"shape ({N}, 0) holds no values" in line
    out = str(tmp_path / "p.csv")
    labels = y.clone()
    labels[7] = C + 5
    np.save(tmp_path / "y_bad.npy", labels.numpy())
    line = user_error(
        capsys, EXIT_INPUT, "clean", tr, "--out", out,
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "y_bad.npy"),
    )  # fmt: skip
    assert f"labels range over [0, {C + 5}], but the run has C = {C} classes" in line
    assert not (tmp_path / "p.csv").exists()
    # a negative label is an unlabelled sample (ignore_index), as the run trained on it:
    # refused as "not class indices" though detect.duplicates takes it
    labels[7] = -100
    np.save(tmp_path / "y_ignored.npy", labels.numpy())
    code, _, err = run_main(
        capsys, "clean", tr, "--out", out,
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "y_ignored.npy"),
    )  # fmt: skip
    assert code == 0, err
    # and so in the run folder's samples.npz (rank, clean and report read it)
    from csl_fast.report import RunSamples

    beside = tmp_path / "run"
    beside.mkdir()
    (beside / "tracker.csl").write_bytes((folder / "tracker.csl").read_bytes())
    RunSamples(labels=labels.numpy()).save(beside / "samples.npz")
    code, _, err = run_main(capsys, "rank", str(beside), "--top", "3")
    assert code == 0, err


def test_sparse_and_meta_tensor_files_are_input_errors(run, tmp_path, capsys):
    """A sparse or meta tensor passed the one-tensor check and failed in the grouping
    (reshape of a sparse tensor): a traceback and exit 1."""
    folder, _, x, _ = run
    tr = str(folder / "tracker.csl")
    torch.save(x.to_sparse(), tmp_path / "sparse.pt")
    torch.save(torch.empty(x.shape, device="meta"), tmp_path / "meta.pt")
    for name, what in (("sparse.pt", "torch.sparse_coo tensor"), ("meta.pt", "meta tensor")):
        line = user_error(capsys, EXIT_INPUT, "rank", tr, "--inputs", str(tmp_path / name))
        assert f"holds a {what}" in line, line


def test_usage_errors(run, tmp_path, capsys):
    folder = run[0]
    tr = str(folder / "tracker.csl")
    (tmp_path / "x.txt").write_text("1 2 3\n")
    line = user_error(capsys, EXIT_USAGE, "rank", tr, "--inputs", str(tmp_path / "x.txt"))
    assert ".npy, .pt or .pth" in line
    line = user_error(capsys, EXIT_USAGE, "rank", tr, "--labels", str(folder / "y.npy"))
    assert "--labels needs" in line and "--inputs" in line


def test_help_documents_the_options(capsys):
    for command in ("rank", "report", "clean"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--inputs FILE" in text and "--labels FILE" in text and ".npy or .pt" in text


def test_loss_only_run_needs_labels_and_drops_conflicts(tmp_path, capsys):
    """A run fed by record_loss has no score rule to infer conflicts by: inputs alone are
    a usage error; with labels the conflicting pair is flagged and, with no suggested
    labels to relabel with, dropped."""
    gen = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(50)
    for _ in range(3):
        csl_fast.record_loss(torch.rand(50, generator=gen), torch.arange(50), tracker)
    tracker.save(tmp_path / "loss.csl")
    x = torch.randn(50, 4, generator=gen)
    x[9] = x[4]
    y = torch.arange(50) % 3
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", y.numpy())
    tr, xs, ys = str(tmp_path / "loss.csl"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    line = user_error(capsys, EXIT_USAGE, "rank", tr, "--inputs", xs)
    assert "--labels" in line
    out = tmp_path / "plan.csv"
    code, _, err = run_main(
        capsys, "clean", tr, "--out", str(out), "-q", "--inputs", xs, "--labels", ys
    )
    assert code == EXIT_OK, err
    with open(out, newline="") as f:
        rows = {int(r["index"]): r for r in csv.DictReader(f)}
    assert rows[4]["action"] == rows[9]["action"] == "drop"


@pytest.mark.parametrize("kind", ["regression", "multi-label", "sequences"])
def test_a_run_without_class_labels_takes_its_targets_as_labels(tmp_path, capsys, kind):
    """A regression's float targets, a multi-label run's target rows and a sequence's
    token labels are the labels such a run has: they were refused as "labels must be
    integers [N]" although the error for inputs alone asked for them. The conflicting
    pair is flagged in rank, report and clean, its targets printed as they are (int()
    printed 0.73 as 0), and under review the member the network fitted best is kept, the
    other dropped (no class to relabel to)."""
    gen = torch.Generator().manual_seed(1)
    n = 40
    x = torch.randn(n, 4, generator=gen)
    x[9] = x[4]
    if kind == "regression":
        tracker = csl_fast.CSLTracker(n)
        targets = torch.randn(n, generator=gen)
        for _ in range(3):
            loss = torch.rand(n, generator=gen) + 1.0
            loss[9] = 0.1  # the member whose target the network fits
            csl_fast.record_loss(loss, torch.arange(n), tracker)
            tracker.end_epoch()
        shown = f"{float(targets[4]):.4g}, {float(targets[9]):.4g}"
    elif kind == "sequences":
        tracker = csl_fast.CSLTracker(n, 5)
        targets = torch.randint(0, 5, (n, 3), generator=gen)
        targets[:, 0] = -100  # a prompt token
        targets[9] = (targets[4] + 1) % 5
        targets[9, 0] = -100
        for _ in range(3):
            logits = torch.randn(n, 3, 5, generator=gen)
            logits[9] += 8 * torch.nn.functional.one_hot(targets[9].clamp(min=0), 5)
            csl_fast.accumulate(logits.flatten(0, 1), targets, torch.arange(n), tracker)
            tracker.end_epoch()
        shown = " ".join(str(int(v)) for v in targets[4]) + ", "
        shown += " ".join(str(int(v)) for v in targets[9])
    else:
        tracker = csl_fast.CSLTracker(n, num_labels=3)
        targets = (torch.rand(n, 3, generator=gen) > 0.5).float()
        targets[9] = 1 - targets[4]
        for _ in range(3):
            logits = torch.randn(n, 3, generator=gen)
            logits[9] = (targets[9] * 2 - 1) * 8  # fitted
            csl_fast.accumulate_bce(logits, targets, torch.arange(n), tracker)
            tracker.end_epoch()
        shown = " ".join(str(int(v)) for v in targets[4]) + ", "
        shown += " ".join(str(int(v)) for v in targets[9])
    tracker.save(tmp_path / "run.csl")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "t.npy", targets.numpy())
    files = ["--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "t.npy")]
    run_file = str(tmp_path / "run.csl")
    code, out, err = run_main(capsys, "rank", run_file, "--json", "--top", str(n), *files)
    assert code == EXIT_OK, err
    rows = {r["index"]: r for r in json.loads(out)["rows"]}
    assert rows[4]["flagged"] and rows[9]["flagged"]
    assert rows[4]["label"] == targets[4].tolist()
    plan_file = tmp_path / "plan.csv"
    for policy, expected in (("drop", ("drop", "drop")), ("review", ("drop", "keep"))):
        extra = ["--budget", str(n)] if policy == "review" else []
        code, out, err = run_main(
            capsys, "clean", run_file, "--out", str(plan_file), "--policy", policy, *extra, *files
        )
        assert code == EXIT_OK, err
        with open(plan_file, newline="") as f:
            plan = {int(r["index"]): r for r in csv.DictReader(f)}
        assert (plan[4]["action"], plan[9]["action"]) == expected, policy
        assert plan[4]["suggested_label"] == plan[9]["suggested_label"] == ""
    assert "the others dropped" in out
    code, _, err = run_main(capsys, "report", run_file, "--out", str(tmp_path / "r"), "-q", *files)
    assert code == EXIT_OK, err
    html_text = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert f"<tr><td>4, 9</td><td>{shown}</td>" in html_text


def test_rank_json_carries_the_duplicate_summary(run, capsys):
    folder = run[0]
    code, out, _ = run_main(
        capsys, "rank", str(folder / "tracker.csl"), "--json", "--top", str(N), "-q",
        "--inputs", str(folder / "x.npy"), "--labels", str(folder / "y.npy"),
    )  # fmt: skip
    assert code == EXIT_OK
    doc = json.loads(out)
    assert "1 with conflicting labels" in doc["duplicates"]
    assert "group" in doc["rows"][0]
    # flagged_count is the score rule's; the flagged column also marks the conflicting
    # pair, and its total is said (the counts disagreed with the rows, unexplained)
    marked = sum(r["flagged"] for r in doc["rows"])
    assert doc["flagged_with_duplicates_count"] == marked == doc["flagged_count"] + 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int16])
def test_labels_of_any_integer_dtype(run, tmp_path, capsys, dtype):
    # torch has no min/max for uint16/uint32/uint64: the range check crashed ("internal
    # error") on a valid compact label file, in samples.npz and in --labels alike
    folder, tracker, x, y = run
    tracker.save(tmp_path / "tracker.csl")
    RunSamples(labels=y.numpy().astype(dtype), inputs=x.numpy()).save(tmp_path / "samples.npz")
    code, out, err = run_main(capsys, "rank", str(tmp_path), "--csv", "--top", str(N))
    assert code == EXIT_OK, err
    rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows[0]["flagged"] == rows[1]["flagged"] == "1" and rows[6]["flagged"] == "0"
    np.save(tmp_path / "y.npy", y.numpy().astype(dtype))
    plan = tmp_path / "plan.csv"
    code, _, err = run_main(
        capsys, "clean", str(folder / "tracker.csl"), "--out", str(plan), "-q",
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert code == EXIT_OK, err
    bad = y.numpy().astype(dtype)
    bad[3] = C  # out of the run's classes: still an input error, with the range
    np.save(tmp_path / "y.npy", bad)
    line = user_error(
        capsys, EXIT_INPUT, "rank", str(folder / "tracker.csl"),
        "--inputs", str(folder / "x.npy"), "--labels", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert f"[0, {C}]" in line


def test_samples_npz_inputs_set_aside_where_they_cannot_be_used(tmp_path, capsys):
    """A loss-only run saved with its inputs (and no labels), or ranked by label_csl,
    still ranks and reports: the inputs are set aside with a note, not a usage error;
    the same inputs given with --inputs are still refused."""
    gen = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(50, num_labels=3)
    x = torch.randn(50, 4, generator=gen)
    target = (torch.rand(50, 3, generator=gen) > 0.5).float()
    for _ in range(3):
        csl_fast.accumulate_bce(
            torch.randn(50, 3, generator=gen), target, torch.arange(50), tracker
        )
        tracker.end_epoch()
    tracker.save(tmp_path / "tracker.csl")
    RunSamples(inputs=x.numpy()).save(tmp_path / "samples.npz")
    np.save(tmp_path / "x.npy", x.numpy())
    for score in ("csl", "label_csl"):
        code, out, err = run_main(capsys, "rank", str(tmp_path), "--score", score, "--csv")
        assert code == EXIT_OK, err
        assert "the inputs in samples.npz are not used" in err and out
        code, out, err = run_main(capsys, "rank", str(tmp_path), "--score", score, "-q")
        assert code == EXIT_OK and "not used" not in err  # --quiet: no note
        code, out, _ = run_main(capsys, "rank", str(tmp_path), "--score", score, "--json")
        assert code == EXIT_OK and "inputs in samples.npz are not used" in json.loads(out)["note"]
    code, _, err = run_main(capsys, "report", str(tmp_path), "--out", str(tmp_path / "r"), "-q")
    assert code == EXIT_OK, err
    # the note was on stderr only (gone under --quiet), and the page said nothing of why it
    # had no duplicate section
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "<h2>No duplicate groups</h2><pre>The inputs in samples.npz are not used" in html
    line = user_error(
        capsys, EXIT_USAGE, "rank", str(tmp_path / "tracker.csl"),
        "--inputs", str(tmp_path / "x.npy"),
    )  # fmt: skip
    assert "--labels" in line


def test_a_big_endian_npy_is_read(run, tmp_path, capsys):
    # a valid numeric file was called "truncated, damaged, or holding Python objects"
    folder, _, x, y = run
    np.save(tmp_path / "x.npy", x.numpy().astype(">f4"))
    np.save(tmp_path / "y.npy", y.numpy().astype(">i8"))
    big = tmp_path / "big"
    big.mkdir()
    run[1].save(big / "tracker.csl")
    RunSamples(labels=y.numpy().astype(">i8"), inputs=x.numpy().astype(">f4")).save(
        big / "samples.npz"
    )
    code, out, err = run_main(capsys, "rank", str(big), "--csv", "--top", str(N))
    assert code == EXIT_OK, err
    rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows[0]["flagged"] == rows[1]["flagged"] == "1" and rows[6]["flagged"] == "0"
    code, out, err = run_main(
        capsys, "rank", str(folder / "tracker.csl"), "--csv", "--top", str(N),
        "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert code == EXIT_OK, err
    rows = {int(r["index"]): r for r in csv.DictReader(io.StringIO(out))}
    assert rows[0]["flagged"] == rows[1]["flagged"] == "1" and rows[6]["flagged"] == "0"


def test_labels_without_inputs_say_where_the_inputs_were_looked_for(run, tmp_path, capsys):
    # a run folder without samples.npz was told that its samples.npz had no inputs
    folder = run[0]
    line = user_error(
        capsys, EXIT_USAGE, "clean", str(folder / "tracker.csl"), "--out",
        str(tmp_path / "p.csv"), "--labels", str(folder / "y.npy"),
    )  # fmt: skip
    assert "give --inputs FILE (the run has no samples.npz to take them from)" in line


def test_rank_shows_targets_readably_and_writes_strict_json(tmp_path, capsys):
    """A NaN target (a missing one) is null in --json (a bare NaN is no JSON); a long row
    of token labels is cut to its first values in the table and the report (one cell ran
    to several KB); a bool target reads 0 or 1, not "yes" or blank."""
    gen = torch.Generator().manual_seed(0)
    n, t = 12, 40
    targets = torch.randint(0, 5, (n, t), generator=gen)
    targets[9] = (targets[4] + 1) % 5
    tracker = csl_fast.CSLTracker(n, 5)
    for _ in range(2):
        logits = torch.randn(n * t, 5, generator=gen)
        csl_fast.accumulate(logits, targets, torch.arange(n), tracker)
        tracker.end_epoch()
    x = torch.randn(n, 3, generator=gen)
    x[9] = x[4]
    tracker.save(tmp_path / "seq.csl")
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "t.npy", targets.numpy())
    files = ["--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "t.npy")]
    code, out, err = run_main(capsys, "rank", str(tmp_path / "seq.csl"), "-q", *files)
    assert code == EXIT_OK, err
    assert f"... ({t} values)" in out and max(map(len, out.splitlines())) < 120
    code, _, err = run_main(
        capsys, "report", str(tmp_path / "seq.csl"), "--out", str(tmp_path / "r"), "-q", *files
    )
    assert code == EXIT_OK, err
    assert f"... ({t} values), " in (tmp_path / "r" / "report.html").read_text(encoding="utf-8")

    reg = csl_fast.CSLTracker(n)
    for _ in range(2):
        csl_fast.record_loss(torch.rand(n, generator=gen), torch.arange(n), reg)
        reg.end_epoch()
    reg.save(tmp_path / "reg.csl")
    y = torch.randn(n, generator=gen)
    y[3] = math.nan
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "b.npy", (y > 0).numpy())
    args = ["rank", str(tmp_path / "reg.csl"), "--top", str(n), "--inputs", str(tmp_path / "x.npy")]
    code, out, err = run_main(capsys, *args, "--labels", str(tmp_path / "y.npy"), "--json")
    assert code == EXIT_OK, err
    rows = json.loads(out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))["rows"]
    assert {r["index"]: r["label"] for r in rows}[3] is None
    code, out, err = run_main(capsys, *args, "--labels", str(tmp_path / "b.npy"))
    assert code == EXIT_OK, err
    body = [line.split() for line in out.splitlines()[2:]]
    assert {row[3] for row in body} == {"0", "1"}  # rank, index, csl, label
