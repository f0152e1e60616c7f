"""End-to-end tests of the ``csl-fast`` command line, each command in a subprocess.

One tiny demo run (200 digits, 4 epochs) is shared by the tests of ``rank`` and
``report``; error cases check the exit code and the one-line message (no traceback).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from cli_calls import run_main, user_error

import csl_fast
from csl_fast.cli import CSV_COLUMNS, EXIT_INPUT, EXIT_USAGE, main, rank_rows
from csl_fast.report import FIGURES


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "csl_fast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_user_error(proc: subprocess.CompletedProcess, code: int, command: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"csl-fast {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = cli(
        "demo",
        "--samples", "200",
        "--epochs", "4",
        "--pairs", "4",
        "--hidden", "64",
        "--overhead-rounds", "1",
        "--top", "5",
        "--out", str(out),
        "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_demo_outputs(demo_run):
    out, proc = demo_run
    assert proc.stderr == ""  # --quiet: no progress bars or status lines
    for name in ("tracker.csl", "samples.npz", "results.json", "report/report.html"):
        assert (out / name).is_file(), name
    for png in FIGURES:
        assert (out / "report" / png).stat().st_size > 1000, png
    text = proc.stdout
    # The detection table parses: "<score> <auroc mislabeled> <auroc duplicates>".
    rows = {}
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)\s+([0-9.]+|n/a)\*?\s+([0-9.]+|n/a)\*?", line.strip())
        if m:
            rows[m[1]] = (m[2], m[3])
    assert {"csl", "final_loss", "aum", "forgetting", "in_confidence"} <= set(rows)
    assert 0.0 <= float(rows["csl"][0]) <= 1.0 and 0.0 <= float(rows["csl"][1]) <= 1.0
    assert re.search(r"plain F\.cross_entropy\s+[0-9.]+ ms/step", text)
    assert re.search(r"CSLTracker.*[0-9.]+ ms/step\s+[+-][0-9.]+%", text)
    top = re.findall(
        r"^\s+(\d+)\s+(\d+)\s+[0-9.]+\s+(\d)\s+(\d)\s+(clean|mislabeled|duplicate)", text, re.M
    )
    assert len(top) == 5
    results = json.loads((out / "results.json").read_text())
    assert results["num_samples"] == 200 and results["num_mislabeled"] == 20
    assert results["num_duplicate_samples"] == 8
    assert set(results["auroc"]["csl"]) == {"mislabeled", "duplicates"}
    assert results["flagged_duplicates"]["injected"] == 8  # the 4 pairs, exactly
    assert re.search(r"Duplicates flagged .*: 8 samples in 4 groups; 8 of them injected", text)
    html = (out / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(FIGURES)
    # samples.npz keeps the inputs, so the report has the duplicate groups
    assert "Duplicate groups (identical inputs)" in html
    assert "groups with conflicting labels</td><td>4</td>" in html
    assert not re.search(r"src=['\"](?!data:)", html)  # self-contained


def test_rank_table(demo_run):
    out, _ = demo_run
    proc = cli("rank", str(out), "--top", "6")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    header = lines[0].split()
    assert header[:3] == ["rank", "index", "csl"]
    assert {"label", "predicted", "mislabeled", "duplicate"} <= set(header)
    assert set(lines[1]) <= {"-", " "}
    body = lines[2:]
    assert len(body) == 6
    assert [int(line.split()[0]) for line in body] == list(range(1, 7))
    scores = [float(line.split()[2]) for line in body]
    assert scores == sorted(scores, reverse=True)


def test_rank_prints_the_detections_note(tmp_path, capsys):
    """rank showed only the flagged column when the rule's cut fell inside a tie of a
    discrete score (which samples are flagged then depends on the dataset order)."""
    import csl_fast

    g = torch.Generator().manual_seed(0)
    t = csl_fast.CSLTracker(400, 10)
    b = t.buffers()
    bad = torch.arange(400) < 40
    mean = torch.where(
        bad,
        2 + 0.3 * torch.randn(400, generator=g),
        torch.exp(-2 + 0.4 * torch.randn(400, generator=g)),
    )
    b["csl_count"].fill_(10)
    b["csl_sum"].copy_(10 * mean)
    # a bad label lost firmly: doubted for CSL / 5 presentations (p far below chance),
    # a clean one learned at a constant probability
    b["p_true_sum"].copy_(torch.where(bad, 10 - 2 * mean, 10 * torch.exp(-mean)))
    b["margin_sum"].copy_(torch.where(bad & (torch.arange(400) % 2 == 0), -10.0, 10.0))
    b["last_max_prob"].fill_(0.9)
    b["forgetting"].fill_(1)  # every sample forgotten once: one tie of 400
    t.epoch = 10  # ten presentations in ten closed epochs
    path = str(tmp_path / "tied.csl")
    t.save(path)
    code, out, err = run_main(capsys, "rank", path, "--score", "forgetting", "--top", "3")
    assert code == 0
    assert "rank: note: the cut falls inside a tie: 400 samples score 'forgetting' = 1" in err
    code, out, err = run_main(capsys, "rank", path, "--score", "forgetting", "--json", "-q")
    assert code == 0 and err == ""
    payload = json.loads(out)
    assert "the cut falls inside a tie" in payload["note"]
    assert payload["estimated_count"] == payload["flagged_count"] > 0
    assert payload["warning"] is None


def test_rank_quiet_keeps_the_detection_warning(tmp_path, capsys):
    """rank -q dropped the warning that says why nothing is flagged: every row came back
    flagged false with nothing on stderr and nothing in the JSON to say why."""
    import csl_fast

    t = csl_fast.CSLTracker(60, 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # one epoch: nothing stands out, and the warning says to train longer
        csl_fast.accumulate(
            torch.randn(60, 3, generator=g), torch.arange(60) % 3, torch.arange(60), t
        )
    t.end_epoch()
    path = str(tmp_path / "short.csl")
    t.save(path)
    # -q before the command too (it was accepted only after it)
    for args in (["rank", path, "-q"], ["-q", "rank", path], ["rank", path, "-q", "--json"]):
        code, out, err = run_main(capsys, *args)
        assert code == 0 and "rank: warning: csl_fast.detect: nothing flagged" in err, err
        assert "rank: note:" not in err, err
    payload = json.loads(out)
    assert payload["flagged_count"] == 0 and payload["estimated_count"] is None
    assert payload["warning"].startswith("csl_fast.detect: nothing flagged")


def test_rank_csv(demo_run, capsys):
    # In process: the entry point is covered by test_rank_table; this checks the format.
    out, _ = demo_run
    code, stdout, _ = run_main(
        capsys, "rank", str(out), "--csv", "--top", "7", "--score", "final_loss"
    )
    assert code == 0
    reader = csv.DictReader(io.StringIO(stdout))
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    rows = list(reader)
    assert len(rows) == 7
    assert [int(r["rank"]) for r in rows] == list(range(1, 8))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert 0 <= int(r["index"]) < 200
        assert 0 <= int(r["label"]) < 10 and 0 <= int(r["predicted"]) < 10
        assert r["flagged"] in ("0", "1") and r["mislabeled"] in ("0", "1")


def test_rank_json_to_file(demo_run, tmp_path, capsys):
    # In process (the subprocess tests above cover the entry point): --json, -o, -q.
    out, _ = demo_run
    dest = tmp_path / "top.json"
    assert (
        main(["rank", str(out / "tracker.csl"), "--json", "--top", "3", "-o", str(dest), "-q"]) == 0
    )
    captured = capsys.readouterr()
    doc = json.loads(dest.read_text())
    # -q keeps only the detection's warning (this small run flags nothing), in the file too
    from csl_fast.cli_errors import warning_line

    assert captured.out == "" and captured.err == (
        ""
        if doc["warning"] is None
        else f"csl-fast rank: warning: {warning_line(doc['warning'])}\n"
    )
    assert doc["score"] == "csl" and doc["num_samples"] == 200
    assert doc["direction"] == "higher = more suspicious"
    assert len(doc["rows"]) == 3
    assert set(doc["rows"][0]) == set(CSV_COLUMNS)
    assert doc["rows"][0]["rank"] == 1 and isinstance(doc["rows"][0]["mislabeled"], bool)


def test_report_command(demo_run, tmp_path):
    out, _ = demo_run
    dest = tmp_path / "rep"
    proc = cli("report", str(out), "-o", str(dest), "--top", "8", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (dest / "report.html").is_file()
    for png in FIGURES:
        assert (dest / png).is_file(), png


@pytest.fixture(scope="module")
def bare_tracker(tmp_path_factory):
    """A tracker file without samples.npz and without eval passes."""
    import csl_fast

    path = tmp_path_factory.mktemp("bare") / "bare.csl"
    tracker = csl_fast.CSLTracker(50, 5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for start in range(0, 50, 10):
            idx = torch.arange(start, start + 10)
            logits = torch.randn(10, 5, generator=gen)
            csl_fast.accumulate(logits, torch.randint(0, 5, (10,), generator=gen), idx, tracker)
        tracker.end_epoch()
    tracker.save(path)
    return path


def test_rank_bare_tracker_and_unrecorded_score(bare_tracker, capsys):
    code, out, _ = run_main(capsys, "rank", str(bare_tracker), "--csv", "--top", "4")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4
    assert all(r["label"] == "" and r["mislabeled"] == "" for r in rows)
    line = user_error(capsys, EXIT_USAGE, "rank", str(bare_tracker), "--score", "eval_csl")
    assert "eval_csl" in line and "not recorded" in line


def test_a_tracker_that_recorded_nothing_is_an_input_error(tmp_path, capsys):
    """A tracker saved before any training step exited 2 (usage) with "score 'csl' was not
    recorded", though no option could help: it is a bad input (3), in every command that
    reads a run, whatever the score asked for."""
    import csl_fast

    for tracker in (csl_fast.CSLTracker(50, 5), csl_fast.CSLTracker(50, 5, num_labels=3)):
        path = tmp_path / "fresh.csl"
        tracker.save(path)
        for command in (
            ["rank", str(path)],
            ["rank", str(path), "--score", "label_csl"],
            ["report", str(path), "--out", str(tmp_path / "report")],
            ["clean", str(path), "--out", str(tmp_path / "c.csv")],
            ["clean", str(path), "--out", str(tmp_path / "c.csv"), "--score", "aum"],
        ):
            line = user_error(capsys, EXIT_INPUT, *command)
            assert line.endswith(
                "the run recorded nothing (no training presentation, eval pass or "
                "input-gradient record; a tracker saved before any training step?): save the "
                "tracker after training on it"
            ), line


def test_an_output_that_is_an_input_is_refused(demo_run, tmp_path, capsys):
    """clean RUN --out RUN/tracker.csl replaced the tracker with the CSV and exited 0."""
    run = tmp_path / "run"
    shutil.copytree(demo_run[0], run)
    files = {name: (run / name).read_bytes() for name in ("tracker.csl", "samples.npz")}
    os.link(run / "tracker.csl", tmp_path / "alias.csl")
    outs = [run / "tracker.csl", run / "samples.npz", tmp_path / "alias.csl"]
    for out in map(str, outs):
        for command in (["clean", str(run), "--out", out], ["rank", str(run), "--output", out]):
            line = user_error(capsys, EXIT_INPUT, *command)
            assert "is an input of this command" in line, line
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.zeros((3, 2)))
    files["../inputs.npy"] = inputs.read_bytes()
    for option in ("--output", "--out"):
        command = "rank" if option == "--output" else "clean"
        line = user_error(
            capsys, EXIT_INPUT, command, str(run), "--inputs", str(inputs), option, str(inputs)
        )
        assert "is an input of this command" in line, line
    assert files == {name: (run / name).read_bytes() for name in files}


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """rank --output into a missing folder failed only after ranking; both commands now
    refuse a folder, or a file in a folder that does not exist, up front (an empty
    tracker would fail later with another message)."""
    import csl_fast

    path = tmp_path / "fresh.csl"
    csl_fast.CSLTracker(50, 5).save(path)
    for out, why in ((tmp_path / "nodir" / "x.csv", "no folder"), (tmp_path, "is a folder")):
        for command in (
            ["rank", str(path), "--output", str(out)],
            ["clean", str(path), "--out", str(out)],
        ):
            line = user_error(capsys, EXIT_INPUT, *command)
            assert why in line, line


def test_an_output_that_fails_part_way_keeps_the_previous_file(
    demo_run, tmp_path, capsys, monkeypatch
):
    """clean --out and rank --output wrote row by row into the file itself: a full disk
    (ulimit -f 4) left a plan cut mid-row where the previous one had been, exit 3."""
    import errno

    for command, option in (("clean", "--out"), ("rank", "--output")):
        out = tmp_path / f"{command}.csv"
        out.write_text("previous\n")

        def full(fd):
            raise OSError(errno.EFBIG, "File too large")

        with monkeypatch.context() as m:
            m.setattr(os, "fsync", full)
            code, _, err = run_main(capsys, command, str(demo_run[0]), option, str(out))
        line = err.strip().splitlines()[-1]
        assert code == EXIT_INPUT and line.startswith(f"csl-fast {command}: error: "), err
        assert "too large" in line and str(out) in line and ".tmp" not in line, line
        assert out.read_text() == "previous\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            f"{c}.csv" for c in ("clean", "rank")[: 1 + (command == "rank")]
        )


def test_truncated_tracker_file(tmp_path, bare_tracker):
    truncated = tmp_path / "truncated.csl"
    data = bare_tracker.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    line = assert_user_error(cli("report", str(truncated)), EXIT_INPUT, "report")
    assert "truncated.csl" in line


def test_missing_and_foreign_files(tmp_path, capsys):
    line = user_error(capsys, EXIT_INPUT, "rank", str(tmp_path / "nope.csl"))
    assert "nope.csl" in line
    foreign = tmp_path / "foreign.csl"
    torch.save({"weights": torch.zeros(3)}, foreign)
    line = user_error(capsys, EXIT_INPUT, "rank", str(foreign))
    assert "not a csl_fast tracker file" in line
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    user_error(capsys, EXIT_INPUT, "report", str(text))
    folder = tmp_path / "empty_run"
    folder.mkdir()
    user_error(capsys, EXIT_INPUT, "rank", str(folder))


def test_usage_errors(capsys):
    line = user_error(capsys, EXIT_USAGE, "demo", "--noise", "0.9")
    assert "--noise" in line
    user_error(capsys, EXIT_USAGE, "rank")
    user_error(capsys, EXIT_USAGE, "rank", "x", "--csv", "--json")
    user_error(capsys, EXIT_USAGE, "demo", "--samples", "5000")


def test_demo_numbers_its_libraries_refuse_are_usage_errors(tmp_path, capsys):
    """A negative or huge --seed (numpy and torch refuse it) and a --hidden the allocator
    cannot hold ended in a traceback and exit 1; --threads 100000 crashed OpenBLAS."""
    out = str(tmp_path / "demo")
    cases = {
        "--seed": ("-1", "2**64", str(2**64)),
        "--hidden": ("10000000000",),
        "--threads": ("100000",),
    }
    for option, values in cases.items():
        for value in values:
            line = user_error(capsys, EXIT_USAGE, "demo", option, value, "--out", out)
            assert f"argument {option}: expected an integer in [" in line, line
    assert not os.path.exists(out)


def test_unknown_option_names_the_subcommand(capsys):
    line = user_error(capsys, EXIT_USAGE, "info", "--foo")
    assert "unrecognized arguments: --foo" in line and "csl-fast info --help" in line
    code, _, err = run_main(capsys, "--foo")
    assert code == EXIT_USAGE and err.startswith("csl-fast: error: unrecognized arguments")


def _profiled_short_bench(device=None, quiet=False):
    # What the real run_short does that is loud: torch's profiler (the CPU memory probe),
    # whose Kineto backend writes to file descriptor 2 directly.
    from csl_fast.bench.harness import extra_peak_bytes

    extra_peak_bytes(lambda: torch.ones(1000).sum(), "cpu")
    os.write(2, b"a C-level line on fd 2\n")
    return "bench report"


def test_bench_quiet_is_silent_on_stderr(monkeypatch, capfd):
    import csl_fast.bench

    monkeypatch.setattr(csl_fast.bench, "run_short", _profiled_short_bench)
    assert main(["bench", "--device", "cpu"]) == 0
    loud = capfd.readouterr()
    assert "C-level line" in loud.err  # the fd-2 writes are seen when not quiet
    assert main(["bench", "-q", "--device", "cpu"]) == 0
    quiet = capfd.readouterr()
    assert quiet.out.strip() == "bench report"
    assert quiet.err == ""
    print("still here", file=sys.stderr)  # fd 2 restored afterwards
    assert capfd.readouterr().err == "still here\n"


def test_bench_without_a_compiled_backend_exits_with_the_reason(monkeypatch, capsys):
    # the short report would time no csl_fast row (the reference fallback is never timed
    # under its name): a dependency error naming why, before any measurement
    import csl_fast.bench

    def never(*args, **kwargs):
        raise AssertionError("measured without a compiled backend")

    monkeypatch.setattr(csl_fast.bench, "run_short", never)
    monkeypatch.setattr(
        csl_fast.bench,
        "compiled_backend",
        lambda device: (None, "no compiled csl_fast backend (cpu: extension not built)"),
    )
    assert main(["bench", "--device", "cpu"]) == 4
    err = capsys.readouterr().err
    assert "extension not built" in err and "csl-fast info" in err


def test_info_console_script():
    exe = shutil.which("csl-fast")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "csl_fast", "info"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("csl_fast ") and "backends for cpu" in proc.stdout


@pytest.fixture
def plain_tracker(tmp_path):
    """A small saved tracker with values (no kernels needed)."""
    from csl_fast import CSLTracker

    t = CSLTracker(30, 3)
    t.csl_sum.copy_(torch.linspace(0, 3, 30))
    t.csl_count.fill_(2)
    t.epoch = 2
    path = tmp_path / "plain.csl"
    t.save(path)
    return path


def test_damaged_and_hostile_files_are_one_line_input_errors(tmp_path, plain_tracker, capsys):
    flipped = tmp_path / "flipped.csl"
    data = bytearray(plain_tracker.read_bytes())
    data[-100] ^= 0x01
    flipped.write_bytes(bytes(data))
    line = user_error(capsys, EXIT_INPUT, "rank", str(flipped))
    assert "flipped.csl" in line and "checksum" in line
    # a file that claims 10**11 samples: refused before any allocation
    from csl_fast import CSLTracker

    state = CSLTracker(30, 3).state_dict()
    state["num_samples"] = 10**11
    torch.save({**state, "version": 1}, tmp_path / "huge.csl")
    line = user_error(capsys, EXIT_INPUT, "rank", str(tmp_path / "huge.csl"))
    assert "huge.csl" in line
    state["num_samples"] = "30"
    torch.save({**state, "version": 1}, tmp_path / "str.csl")
    line = user_error(capsys, EXIT_INPUT, "report", str(tmp_path / "str.csl"))
    assert "'num_samples' must be an int" in line and "got str '30'" in line
    # pickles that are not tensors: refused, and no advice to load them unsafely
    (tmp_path / "pickle.csl").write_bytes(b"\x80\x04\x95" + os.urandom(200))
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.csl")
    for name in ("pickle.csl", "module.csl"):
        for command in ("rank", "report"):
            line = user_error(capsys, EXIT_INPUT, command, str(tmp_path / name))
            assert "weights_only" not in line and "unsafe" not in line.lower()


def test_unwritable_outputs_exit_3_with_one_line(tmp_path, plain_tracker, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = user_error(
        capsys, EXIT_INPUT, "report", str(plain_tracker), "--out", str(blocker / "report")
    )
    assert "--out" in line and "a_file" in line
    line = user_error(capsys, EXIT_INPUT, "report", str(plain_tracker), "--out", str(blocker))
    assert "not a folder" in line
    line = user_error(capsys, EXIT_INPUT, "demo", "--out", str(blocker / "demo"))
    assert "--out" in line


def test_os_errors_exit_3_internal_errors_exit_1_debug_adds_traceback(
    tmp_path, plain_tracker, capsys, monkeypatch
):
    import errno

    from csl_fast import cli as cli_module

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/report.html")

    monkeypatch.setitem(cli_module.COMMANDS, "rank", full)
    line = user_error(capsys, EXIT_INPUT, "rank", str(plain_tracker))
    assert "No space left on device" in line and "/data/report.html" in line
    code, _, err = run_main(capsys, "--debug", "rank", str(plain_tracker))
    assert code == EXIT_INPUT and "Traceback" in err and err.strip().endswith("report.html")
    code, _, err = run_main(capsys, "rank", str(plain_tracker), "--debug")
    assert code == EXIT_INPUT and "Traceback" in err

    def bug(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(cli_module.COMMANDS, "rank", bug)
    code, _, err = run_main(capsys, "rank", str(plain_tracker))
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
    assert "internal error" in err.strip().splitlines()[-1]
    monkeypatch.undo()
    line = user_error(capsys, EXIT_INPUT, "rank", str(tmp_path / "gone.csl"))
    code, _, err = run_main(capsys, "--debug", "rank", str(tmp_path / "gone.csl"))
    assert code == EXIT_INPUT and "Traceback" in err


def test_version1_tracker_warns_in_one_line(tmp_path, capsys):
    from csl_fast import CSLTracker
    from csl_fast.tracker_file import VERSION_BUFFERS

    t = CSLTracker(30, 3)
    t.csl_sum.copy_(torch.linspace(0, 3, 30))
    t.csl_count.fill_(1)
    state = t.state_dict()
    state["version"] = 1
    state["buffers"] = {k: v for k, v in state["buffers"].items() if k in VERSION_BUFFERS[1]}
    torch.save(state, tmp_path / "old.csl")
    code, out, err = run_main(capsys, "rank", str(tmp_path / "old.csl"), "--top", "3")
    assert code == 0 and out
    lines = err.strip().splitlines()
    assert lines[0] == (
        f"csl-fast: warning: {tmp_path / 'old.csl'}: a tracker file of format version 1, which "
        "has no checksum: loaded unverified (a damaged byte would go unnoticed). Check the "
        "tracker, e.g. that its scores look as they did, before saving it again, which adds a "
        "checksum to whatever it holds."
    )
    # The rest: one line each for what this (loss-only) tracker holds and what was flagged.
    assert all(line.startswith("csl-fast rank: ") for line in lines[1:]), lines


def test_demo_with_nothing_injected_prints_no_nan(tmp_path, capsys):
    # precision of 0 flagged duplicates and recall of 0 injected ones printed "nan" and
    # "nan%", and the detection table said "no ground truth" although the truth was known
    out = str(tmp_path / "clean")
    args = ["demo", "--samples", "150", "--epochs", "3", "--noise", "0", "--pairs", "0"]
    args += ["--overhead-rounds", "0", "--no-report", "-q", "--out", out]
    code, text, _ = run_main(capsys, *args)
    assert code == 0
    assert "nan" not in text.lower()
    assert "of all 0 found" in text and "(precision n/a), n/a of all 0 found" in text
    assert "no ground truth: no detection table" not in text


def test_a_demo_rerun_never_leaves_an_earlier_runs_results_beside_its_files(tmp_path, capsys):
    """A rerun whose report step failed (OUT/report a file) left the new tracker beside the
    old run's results.json, and `csl-fast report` showed the old run's notes."""
    from csl_fast import CSLTracker

    out = tmp_path / "run"
    args = ["demo", "--samples", "60", "--epochs", "2", "--pairs", "0", "-q"]
    args += ["--overhead-rounds", "0", "--out", str(out)]
    assert run_main(capsys, *args, "--no-report")[0] == 0
    assert json.loads((out / "results.json").read_text())["num_samples"] == 60
    (out / "report").write_text("a file where the report folder goes")
    args[2] = "80"
    code, text, err = run_main(capsys, *args)
    assert code == EXIT_INPUT and "report" in err
    assert "Detection" not in text  # refused before training, not after
    # refused before anything is written: the earlier run's files stand together, as they were
    assert json.loads((out / "results.json").read_text())["num_samples"] == 60
    assert CSLTracker.from_file(out / "tracker.csl").num_samples == 60
    # a results.json of another run's size lends the report none of its notes
    (out / "report").unlink()
    assert run_main(capsys, *args, "--no-report")[0] == 0
    assert CSLTracker.from_file(out / "tracker.csl").num_samples == 80
    other = json.loads((out / "results.json").read_text())
    other["num_samples"] = 60
    (out / "results.json").write_text(json.dumps(other))
    code, _, err = run_main(capsys, "report", str(out))
    assert code == 0 and "describes a run of 60 samples, the tracker has 80" in err
    page = (out / "report" / "report.html").read_text(encoding="utf-8")
    assert "Demo setup" not in page


@pytest.mark.parametrize("name", ["tracker.csl", "samples.npz", "clean.csv", "results.json"])
def test_a_demo_output_name_taken_by_a_folder_is_refused_before_training(tmp_path, capsys, name):
    # found only when the file was written, after training
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    args = ["demo", "--samples", "60", "--epochs", "2", "--pairs", "0", "-q", "--no-report"]
    code, text, err = run_main(capsys, *args, "--overhead-rounds", "0", "--out", str(out))
    assert code == EXIT_INPUT and f"writes {name} in" in err and "move or remove it" in err
    assert "Detection" not in text and sorted(p.name for p in out.iterdir()) == [name]


def test_a_large_run_gets_a_status_line_unless_quiet(plain_tracker, capsys, monkeypatch):
    """At 10 million samples rank read, checked and scored for 8 s showing nothing."""
    from csl_fast import cli_commands

    code, _, err = run_main(capsys, "rank", str(plain_tracker))
    assert code == 0 and "csl-fast: reading" not in err  # a small run: no line
    monkeypatch.setattr(cli_commands, "LARGE_RUN_BYTES", 0)
    code, _, err = run_main(capsys, "rank", str(plain_tracker))
    assert code == 0 and f"csl-fast: reading {plain_tracker} (" in err
    code, _, err = run_main(capsys, "rank", str(plain_tracker), "-q")
    assert code == 0 and "csl-fast: reading" not in err


def test_rank_says_why_it_lists_fewer_than_top(tmp_path, capsys):
    # samples never presented have no score and were left out without a word: --top 20
    # printed 10 rows
    import csl_fast

    tracker = csl_fast.CSLTracker(20, 3)
    for _ in range(2):
        csl_fast.accumulate(torch.randn(10, 3), torch.arange(10) % 3, torch.arange(10), tracker)
        tracker.end_epoch()
    path = tmp_path / "half.csl"
    tracker.save(path)
    code, out, err = run_main(capsys, "rank", str(path), "--csv", "--top", "20")
    assert code == 0 and len(out.strip().splitlines()) == 1 + 10
    assert "listed 10 of the --top 20: only 10 of the 20 samples have a csl value" in err
    code, out, err = run_main(capsys, "rank", str(path), "--csv", "--top", "10")
    assert code == 0 and "note: listed" not in err


def test_report_of_a_tracker_file_writes_where_its_help_says(tmp_path, capsys):
    # --help said "default: RUN/report", a path inside the tracker file; the report went
    # to the folder 'report' next to the file
    import csl_fast

    tracker = csl_fast.CSLTracker(12, 3)
    csl_fast.accumulate(torch.randn(12, 3), torch.arange(12) % 3, torch.arange(12), tracker)
    tracker.end_epoch()
    tracker.save(tmp_path / "run.csl")
    with pytest.raises(SystemExit) as exit_info:  # argparse exits after --help
        main(["report", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "for a tracker file, the folder 'report' next to it" in help_text
    code, _, _ = run_main(capsys, "report", str(tmp_path / "run.csl"), "-q")
    assert code == 0 and (tmp_path / "report" / "report.html").exists()


def test_report_of_an_eval_only_run_says_to_rank_it_instead(tmp_path, capsys):
    # exited 1 with write_report's traceback, called an internal error
    tracker = csl_fast.CSLTracker(12, 3)
    batch = (torch.randn(12, 3), torch.arange(12) % 3, torch.arange(12))
    csl_fast.score_epoch(torch.nn.Identity(), [batch], tracker)
    tracker.save(tmp_path / "run.csl")
    line = user_error(
        capsys, EXIT_USAGE, "report", str(tmp_path / "run.csl"), "--score", "eval_csl", "-q"
    )
    assert "recorded no training presentation" in line
    assert line.endswith(f"csl-fast rank {tmp_path / 'run.csl'} --score eval_csl")
    # without --score it said "score 'csl' was not recorded ... available: eval_csl", and
    # --score eval_csl then got the line above
    assert user_error(capsys, EXIT_USAGE, "report", str(tmp_path / "run.csl"), "-q") == line
    assert not (tmp_path / "report").exists()
    code, out, _ = run_main(capsys, "rank", str(tmp_path / "run.csl"), "--score", "eval_csl")
    assert code == 0 and "eval_csl" in out


def test_unranked_samples_of_an_eval_score_are_said_to_be_unscored(tmp_path, capsys):
    # "never presented in training" of samples that an eval pass had not scored
    tracker = csl_fast.CSLTracker(12, 3)
    batch = (torch.randn(6, 3), torch.arange(6) % 3, torch.arange(6))
    csl_fast.score_epoch(torch.nn.Identity(), [batch], tracker)
    tracker.save(tmp_path / "run.csl")
    code, _, err = run_main(capsys, "rank", str(tmp_path / "run.csl"), "--score", "eval_csl")
    assert code == 0
    assert "the others were never scored by an eval pass (csl_fast.score_epoch)" in err
    out = tmp_path / "plan.csv"
    args = ["clean", str(tmp_path / "run.csl"), "--score", "eval_csl", "--out", str(out)]
    code, summary, _ = run_main(capsys, *args, "--policy", "review", "--budget", "10")
    assert code == 0 and "(the others were never scored by an eval pass" in summary
    # final_loss is read from the eval passes once there is one, trained or not
    code, summary, _ = run_main(
        capsys, *args[:3], "final_loss", *args[4:], "--policy", "review", "--budget", "10"
    )
    assert code == 0 and "(the others were never scored by an eval pass" in summary
    # eval passes cast no suggested-label votes: the default policy becomes drop, said so
    code, _, err = run_main(capsys, *args)
    assert code == 0 and "this run recorded eval passes only (csl_fast.score_epoch)" in err


def _exit_codes_in_help() -> dict[int, str]:
    """``csl-fast --help``'s exit codes: ``{code: what it says the code is for}``."""
    from csl_fast.cli import build_parser

    epilog = " ".join(build_parser().epilog.split())
    body = epilog.split("Exit codes:", 1)[1].split(". --debug", 1)[0].strip()
    return {int(m[1]): m[2] for m in re.finditer(r"(?:^|; )(\d+) (.*?)(?=; \d+ |$)", body)}


def test_help_exit_codes_are_what_the_commands_return(tmp_path, plain_tracker, capsys):
    """Each failure `csl-fast --help` lists under a code exits with that code."""
    files = tmp_path / "files"  # not beside the tracker, where samples.npz would be read
    files.mkdir()
    np.save(files / "x.npy", np.arange(60.0).reshape(30, 2))
    np.save(files / "x29.npy", np.zeros((29, 2)))
    np.save(files / "y.npy", np.zeros(30, dtype=np.int64))
    np.save(files / "y7.npy", np.full(30, 7))
    np.savez(files / "samples.npz", labels=np.zeros(30, dtype=np.int64))
    (files / "garbage.csl").write_bytes(b"not a tracker")
    from csl_fast import CSLTracker

    CSLTracker(30, 3).save(files / "fresh.csl")
    # a run folder whose samples.npz labels 7 a sample of the 3-class run: without inputs
    # beside them, rank showed them as the samples' labels
    bad_labels = tmp_path / "bad_labels"
    bad_labels.mkdir()
    (bad_labels / "tracker.csl").write_bytes(plain_tracker.read_bytes())
    from csl_fast.report import RunSamples

    RunSamples(labels=np.full(30, 7)).save(bad_labels / "samples.npz")
    run, d = str(plain_tracker), str(files)
    cases = [  # (code, what --help says it is for, the command)
        (3, "missing", ["rank", f"{d}/gone.csl"]),
        (3, "damaged", ["rank", f"{d}/garbage.csl"]),
        (3, "of another format", ["rank", f"{d}/samples.npz"]),
        (3, "of another run: not N rows", ["rank", run, "--inputs", f"{d}/x29.npy"]),
        (3, "labels not class indices in [0, C)", ["rank", run, "--inputs", f"{d}/x.npy",
                                                   "--labels", f"{d}/y7.npy"]),
        (3, "labels not class indices in [0, C)", ["rank", str(bad_labels)]),
        (3, "labels not class indices in [0, C)", ["clean", str(bad_labels), "--out",
                                                   f"{d}/plan.csv"]),
        (3, "an output that cannot be written", ["rank", run, "-o", f"{d}/no/dir.csv"]),
        (3, "a tracker that recorded nothing", ["rank", f"{d}/fresh.csl"]),
        (2, "a bad value", ["rank", run, "--top", "0"]),
        (2, "an unknown option", ["rank", run, "--nope"]),
        (2, "a score the run did not record", ["rank", run, "--score", "label_csl"]),
        (2, "not .npy/.pt/.pth", ["rank", run, "--inputs", f"{d}/garbage.csl"]),
        (2, "--labels without inputs", ["rank", run, "--labels", f"{d}/y.npy"]),
    ]  # fmt: skip
    codes = _exit_codes_in_help()
    assert set(codes) == {0, 1, 2, 3, 4, 130}, codes
    for code, listed, argv in cases:
        assert listed in codes[code], f"--help does not list {listed!r} under {code}"
        got, _, err = run_main(capsys, *argv)
        assert got == code, (argv, got, err)
        assert err.count("\n") == 1 and err.startswith(f"csl-fast {argv[0]}: error: "), err


def test_help_defaults_are_the_parsers():
    """Every '(default X)' a subcommand's --help states, X a literal, is the parser's."""
    import argparse
    import ast

    from csl_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, parser in sub.choices.items():
        for action in parser._actions:
            for stated in re.findall(r"\(default:? ([^)]*)\)", action.help or ""):
                word = stated.split(":")[0].strip()
                try:
                    value = ast.literal_eval(word)
                except (ValueError, SyntaxError):
                    value = word  # a bare word: a string default (csl, csl-demo)
                if isinstance(action.default, (int, float, str)) and action.default is not None:
                    assert value == action.default, (name, action.option_strings, stated)
                    checked += 1
    assert checked >= 15


def test_a_run_of_sequences_ranks_cleans_and_reports_by_csl_mean(tmp_path, capsys):
    """A tracker of sequences: rank, clean and report default to csl_mean (csl, summed
    over tokens, ranked the long clean sequences first); clean drops (no suggestions)."""
    from sequence_runs import sequence_tracker

    tracker, bad = sequence_tracker()
    path = str(tmp_path / "seq.csl")
    tracker.save(path)
    code, out, err = run_main(capsys, "rank", path, "--json", "--top", "30")
    got = json.loads(out)
    assert code == 0 and got["score"] == "csl_mean" and got["flagged_count"] == 30
    assert sum(bool(bad[r["index"]]) for r in got["rows"]) >= 28
    assert "warning" not in err
    code, out, err = run_main(capsys, "rank", path, "--score", "csl", "--top", "3")
    assert code == 0 and err.count("sums the loss over each sequence") == 1, err
    code, out, err = run_main(capsys, "clean", path, "--out", str(tmp_path / "plan.csv"))
    assert code == 0 and "recorded sequences" in err and "(policy drop)" in err
    assert "0 relabel, 30 drop" in out and "by csl_mean" in out
    code, out, err = run_main(capsys, "report", path, "--out", str(tmp_path / "rep"), "-q")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert code == 0 and "Flagged set: csl_mean" in page
    assert "None: this run recorded sequences" in page
    # with inputs and labels: a conflicting group's plan drops (no relabelling policy)
    x = np.arange(tracker.num_samples, dtype=np.float32)[:, None]
    x[1] = x[0]
    y = np.zeros(tracker.num_samples, dtype=np.int64)
    y[1] = 1
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code, out, err = run_main(
        capsys, "report", path, "--out", str(tmp_path / "rep2"), "-q",
        "--inputs", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert code == 0, err  # it raised: the duplicates' plan asked for relabelling
    assert "conflicting" in (tmp_path / "rep2" / "report.html").read_text()
    code, out, err = run_main(capsys, "clean", path, "--out", str(tmp_path / "p2.csv"))
    assert "estimated 30 bad sequences" in out
    assert csl_fast.cli.load_run(path)[0].sequences  # the public helper's signature kept


def test_rank_says_a_warning_both_detections_share_once(tmp_path, capsys):
    """The flagged column's detection and the duplicates' one (inputs, no labels) gave
    the same one-epoch warning: rank printed it twice."""
    g = torch.Generator().manual_seed(0)
    n, c = 300, 3
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), y] += 3
    logits[:15] = torch.randn(15, c, generator=g)
    logits[torch.arange(15), (y[:15] + 1) % c] += 4  # 15 labels the logits contradict
    t = csl_fast.CSLTracker(n, num_classes=c)
    csl_fast.accumulate(logits, y, torch.arange(n), t)
    t.end_epoch()
    t.save(tmp_path / "one.csl")
    inputs = np.arange(n, dtype=np.float32)[:, None]
    inputs[1] = inputs[0]  # a group that holds a flagged sample
    np.save(tmp_path / "x.npy", inputs)
    code, _, err = run_main(
        capsys, "rank", str(tmp_path / "one.csl"), "--inputs", str(tmp_path / "x.npy")
    )
    assert code == 0 and err.count("the tracker recorded one epoch") == 1, err
    inputs = np.arange(n, dtype=np.float32)[:, None]
    inputs[201] = inputs[200]  # a group of clean samples: it holds no flagged sample
    np.save(tmp_path / "x.npy", inputs)
    code, _, err = run_main(
        capsys, "rank", str(tmp_path / "one.csl"), "--inputs", str(tmp_path / "x.npy")
    )
    assert code == 0 and err.count("the tracker recorded one epoch") == 1, err
    assert "duplicates: nothing flagged" in err
    with pytest.warns(csl_fast.detect.DetectionWarning, match="duplicates: nothing flagged"):
        rank_rows(t, None, "csl", 3, torch.from_numpy(inputs))


def test_rank_notes_a_run_that_closed_no_epoch(tmp_path, capsys):
    tracker = csl_fast.CSLTracker(30, 3)
    for _ in range(3):
        csl_fast.accumulate(torch.randn(30, 3), torch.arange(30) % 3, torch.arange(30), tracker)
    tracker.save(tmp_path / "t.csl")
    code, _, err = run_main(capsys, "rank", str(tmp_path / "t.csl"), "--top", "3")
    assert code == 0 and "note: the tracker closed no epoch although it presented" in err


def test_the_demos_retrain_note_names_its_score_on_a_page_of_another(tmp_path):
    """`csl-fast report RUN --score final_loss` showed the demo's retraining, of the plan
    flagged by CSL, as if it were that page's plan (audit helper-112)."""
    from csl_fast.cli_commands import _run_notes

    notes = [["Demo setup", "data"], ["Clean and retrain", "0.975"]]
    (tmp_path / "results.json").write_text(json.dumps({"report_notes": notes, "num_samples": 9}))
    same = _run_notes(str(tmp_path), 9, True)
    assert same == [("Demo setup", "data"), ("Clean and retrain", "0.975")]
    other = dict(_run_notes(str(tmp_path), 9, True, "final_loss"))
    assert list(other) == [
        "Demo setup",
        "Clean and retrain (the demo's plan, flagged by csl; this page flags by final_loss)",
    ]


def test_report_and_demo_without_matplotlib_exit_4_in_one_line(
    demo_run, tmp_path, monkeypatch, capsys
):
    """The report's ImportError named no module: exit 1, a traceback and "internal error";
    the demo failed so after training."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as an environment without it
    code, _, err = run_main(capsys, "report", str(demo_run[0]), "--out", str(tmp_path / "r"))
    assert code == 4 and err.strip().endswith(
        "this command needs matplotlib: pip install matplotlib (or pip install 'csl_fast[eval]')"
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    args = ["demo", "--samples", "60", "--epochs", "2", "--pairs", "0", "--overhead-rounds", "0"]
    code, text, err = run_main(capsys, *args, "--out", str(tmp_path / "d"))
    assert code == 4 and "needs matplotlib" in err and "Detection" not in text


def test_no_command_is_one_line_on_stderr(capsys):
    # the whole help went to stdout, with exit 2
    code = main([])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE and out == ""
    assert err.count("\n") == 1 and err.startswith(
        "csl-fast: error: no command given; pick one of demo"
    )


def _eval_pass_run(trained: int, n: int = 40, c: int = 3) -> csl_fast.CSLTracker:
    """Samples 0..trained-1 trained on (3 epochs); an eval pass over all n after each."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % c
    tracker = csl_fast.CSLTracker(n, c)
    model = torch.nn.Linear(4, c)
    x = torch.randn(n, 4, generator=g)
    for _ in range(3):
        if trained:
            seen = torch.arange(trained)
            csl_fast.accumulate(model(x[seen]).detach(), y[seen], seen, tracker)
            tracker.end_epoch()
        csl_fast.score_epoch(model, [(x, y, torch.arange(n))], tracker)
    return tracker


def test_rank_and_review_list_no_held_out_sample(capsys, tmp_path):
    # held-out samples an eval pass scored sat after the ranked ones, in index order, with
    # rank numbers, right after the note that said they are not ranked
    tracker = _eval_pass_run(trained=30)
    tracker.save(tmp_path / "run.csl")
    code, out, err = run_main(capsys, "rank", str(tmp_path / "run.csl"), "--score", "eval_csl",
                              "--top", "100", "--csv")  # fmt: skip
    assert code == 0, err
    listed = [int(r["index"]) for r in csv.DictReader(io.StringIO(out))]
    assert len(listed) == 30 and max(listed) < 30
    with pytest.warns(csl_fast.detect.DetectionWarning):
        det = csl_fast.detect.mislabeled(tracker, score="eval_csl")
    assert det.top(100).tolist() == det.ranked.tolist() and det.ranked.max() < 30
    with pytest.warns(csl_fast.detect.DetectionWarning):
        plan = csl_fast.clean(tracker, score="eval_csl", policy="review", budget=100)
    assert plan.index.max() < 30


def test_an_eval_only_run_is_ranked_and_cleaned_by_eval_csl_without_a_score(capsys, tmp_path):
    # the default csl was refused with exit 2, a usage error the user never made
    _eval_pass_run(trained=0).save(tmp_path / "run.csl")
    code, out, err = run_main(capsys, "rank", str(tmp_path / "run.csl"), "--csv")
    assert code == 0 and out, err
    code, _, err = run_main(capsys, "clean", str(tmp_path / "run.csl"), "--out",
                            str(tmp_path / "plan.csv"))  # fmt: skip
    assert code == 0, err
    # eval counts that differ (a DistributedSampler's padding): by the mean, not the sum
    padded = _eval_pass_run(trained=0)
    pad = torch.arange(2)
    for _ in range(3):
        csl_fast.score_epoch(torch.nn.Identity(), [(torch.randn(2, 3), pad % 3, pad)], padded)
    padded.save(tmp_path / "padded.csl")
    code, out, err = run_main(capsys, "rank", str(tmp_path / "padded.csl"), "--csv")
    assert code == 0, err
    _, index, score = out.splitlines()[1].split(",")[:3]
    assert float(score) == pytest.approx(float(padded.eval_csl_mean[int(index)]), rel=1e-6)


@pytest.mark.parametrize("loss_only", [False, True])
def test_rank_counts_held_out_samples_as_having_a_score(loss_only, tmp_path, capsys):
    # eval passes scored 15 of 40 samples, 10 of them never trained on (not ranked): the
    # note said "only 5 of the 40 samples have a eval_csl value", counting those 10 with
    # the 25 that have none
    from cli_calls import held_out_run

    path = tmp_path / "held.csl"
    held_out_run(path, loss_only)
    code, out, err = run_main(capsys, "rank", str(path), "--csv", "--score", "eval_csl")
    assert code == 0 and len(out.strip().splitlines()) == 1 + 5
    assert (
        "listed 5 of the --top 20: 15 of the 40 samples have a eval_csl value, but 10 of them "
        "are held out (scored by an eval pass, never trained on), and are not ranked; the "
        "other 25 were never scored by an eval pass"
    ) in " ".join(err.split())
    assert "only 5 of the 40" not in err
    # (and the detection's note, of a loss-only run too)
    assert "10 samples with a score were never trained on" in " ".join(err.split())


def test_rank_and_clean_leave_out_samples_recorded_without_softmax_statistics(tmp_path, capsys):
    # record_loss samples in a tracker accumulate also fed: ranked by another loss's CSL,
    # they took the flipped labels' places in the flagged set and the plan's drops
    from cli_calls import mixed_run

    path = tmp_path / "mixed.csl"
    mixed_run(path)
    code, out, err = run_main(capsys, "rank", str(path), "--csv", "--top", "300")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 200 and max(int(r["index"]) for r in rows) < 200
    assert sorted(int(r["index"]) for r in rows if r["flagged"] == "1") == list(range(20))
    assert "they are not ranked or flagged" in " ".join(err.split())
    plan = tmp_path / "plan.csv"
    code, out, err = run_main(capsys, "clean", str(path), "--out", str(plan), "--policy", "drop")
    assert code == 0, err
    dropped = [int(r["index"]) for r in csv.DictReader(plan.open())]
    assert sorted(dropped) == list(range(20))
    assert "they are not ranked or flagged" in " ".join((out + err).split())


def test_rank_says_nothing_of_unscored_samples_when_every_sample_has_a_value(tmp_path, capsys):
    # eval passes over all 40 samples, 10 of them held out: the note ended "the other 0
    # were never scored by an eval pass"
    from cli_calls import held_out_run

    path = tmp_path / "held.csl"
    held_out_run(path, first_scored=0)
    code, out, err = run_main(capsys, "rank", str(path), "--csv", "--score", "eval_csl",
                              "--top", "40")  # fmt: skip
    assert code == 0 and len(out.strip().splitlines()) == 1 + 30
    said = " ".join(err.split())
    assert (
        "listed 30 of the --top 40: 40 of the 40 samples have a eval_csl value, but 10 of them "
        "are held out (scored by an eval pass, never trained on), and are not ranked"
    ) in said
    assert "the other 0" not in said
