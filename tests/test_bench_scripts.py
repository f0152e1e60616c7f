"""The benchmark scripts built on csl_fast.bench (benchmarks/run.py, per_call.py,
sync_memory.py): they refuse to time the wrong code and record how they measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # their sibling imports (run_meta)
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_refuses_without_the_compiled_backend(monkeypatch, tmp_path, capsys):
    from csl_fast import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "ImportError: no _C in this test")
    run = _script("run")
    args = ["--quick", "--sections", "memory", "--out", str(tmp_path)]
    assert run.main(args) == 3
    err = capsys.readouterr().err
    assert "cpu: compiled extension not loaded" in err and "no _C in this test" in err
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written
    assert run.main([*args, "--allow-missing-backends"]) == 0
    assert "did not load" in next(tmp_path.glob("*.md")).read_text()


def test_run_times_only_this_checkouts_code(monkeypatch, tmp_path, capsys):
    # an editable install's import hook handed out another checkout's build, which the
    # report stamped with this tree's commit and source hash (audit helper-126)
    run = _script("run")
    monkeypatch.setattr(run, "ROOT", str(tmp_path))
    assert run.main(["--quick", "--sections", "memory", "--out", str(tmp_path / "o")]) == 3
    err = capsys.readouterr().err
    assert "csl_fast came from" in err and "not from this checkout" in err
    assert not (tmp_path / "o").exists()
    for bad in (["--reps", "0"], ["--threads", "-1"], ["--budget-scale", "0"]):
        with pytest.raises(SystemExit):
            run.main(bad)
        assert "must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--device", "foo"], "--device: not a device: 'foo'"),  # (a traceback, exit 1)
        (["--device", "meta"], "only cpu and cuda are measured"),  # ("build the extension")
        (["--sections", ","], "--sections names no section"),  # (an empty report, exit 0)
    ],
)
def test_run_refuses_arguments_it_cannot_measure(args, said, tmp_path, capsys):
    run = _script("run")
    with pytest.raises(SystemExit) as exit_:
        run.main([*args, "--out", str(tmp_path)])
    assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_report_names_its_command_and_extension(tmp_path):
    run = _script("run")
    assert run.main(["--quick", "--sections", "memory", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*.md")
    # named as a partial run: it replaced the day's full report, committed ones included
    assert report.name.endswith("-quick-memory.md")
    text = report.read_text()
    assert "- command: `python benchmarks/run.py --quick --sections memory --out" in text
    assert "- compiled extension: " in text


def test_run_goes_on_with_one_of_two_gpu_backends(monkeypatch, tmp_path, capsys):
    # a GPU whose triton cannot run still times the cuda backend (run.py refused the whole
    # run, and gpu_check.sh lost every GPU timing with it)
    import torch

    from csl_fast import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    status = {"triton": "triton not importable (ModuleNotFoundError)", "cuda": None}
    monkeypatch.setattr(bench, "compiled_backends", lambda device: dict(status))
    monkeypatch.setattr(bench, "compiled_backend", lambda device: ("cuda", None))
    run = _script("run")

    class Measuring(Exception):
        pass

    def measure(*args, **kwargs):
        raise Measuring

    monkeypatch.setattr(bench, "run_full", measure)
    env = bench.environment("cpu")  # (this machine has no GPU to describe)
    monkeypatch.setattr(bench, "environment", lambda device: {**env, "device": "cuda"})
    with pytest.raises(Measuring):  # past the refusal, into the measurement
        run.main(["--device", "cuda", "--sections", "memory", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "triton's rows are skipped: triton not importable" in err
    assert "no compiled csl_fast backend" not in err
    monkeypatch.setattr(bench, "compiled_backend", lambda device: (None, "none"))
    status["cuda"] = "compiled extension not loaded"
    assert run.main(["--device", "cuda", "--sections", "memory", "--out", str(tmp_path)]) == 3
    assert "no compiled csl_fast backend this cuda run" in capsys.readouterr().err


def test_per_call_checks_each_child_imported_its_own_tree(tmp_path):
    check = _script("per_call").check_identity
    tree = tmp_path / "tree"
    pkg = tree / "csl_fast"
    ok = {
        "_module": str(pkg / "__init__.py"),
        "_extension": str(pkg / "_C.cpython-311-x86_64-linux-gnu.so"),
        "_extension_error": None,
    }
    check("t", str(tree), ok)
    other = tmp_path / "main" / "csl_fast"
    for bad, says in (
        ({"_module": str(other / "__init__.py")}, "csl_fast was imported from"),
        ({"_extension": str(other / "_C.so")}, "csl_fast._C came from"),
        ({"_extension": None, "_extension_error": "ImportError: x"}, "did not load: ImportError"),
    ):
        with pytest.raises(SystemExit, match=says):
            check("t", str(tree), {**ok, **bad})


def test_sync_memory_fixes_and_records_the_mmap_threshold():
    sync = _script("sync_memory")
    row = sync.measure(20_000, 2)
    assert row["malloc_mmap_threshold"] == sync.MMAP_THRESHOLD == 131072
    assert "fixed glibc's mmap threshold at 128 KiB" in sync._markdown([row], _meta())
    row = sync.measure(20_000, 2, 0)
    assert row["malloc_mmap_threshold"] is None
    assert "under-states" in sync._markdown([row], _meta())


def _meta() -> dict:
    return {"date": "d", "commit": "c", "machine": "m"}


def test_a_regenerated_report_keeps_its_hand_written_discussion(tmp_path):
    with_discussion = _script("run_meta").with_discussion
    report = tmp_path / "r.md"
    new = "# Title\n\nDate 2026-12-03 02:00 UTC, commit bbb, x.\n\n| t |\n"
    assert with_discussion(report, new) == new  # no file yet
    report.write_text("# Title\n\nDate 2026-11-30 11:02 UTC, commit aaa, x.\n\n| old |\n")
    assert with_discussion(report, new) == new  # no discussion
    prose = "**Ranking.** AUROC 0.99.\n\nLimits: one set.\n"
    report.write_text(
        "# Title\n\nDate 2026-11-30 11:02 UTC, commit aaa, x.\n\n| old |\n\n"
        "## Discussion (written by hand after this run)\n" + prose
    )
    once = with_discussion(report, new)
    heading = "## Discussion (written by hand after the run of 2026-11-30 11:02 UTC, commit aaa;"
    assert once.startswith(new.rstrip("\n") + "\n\n" + heading) and once.endswith(prose)
    assert "| old |" not in once
    report.write_text(once)  # regenerated again: the prose keeps the run it was written for
    assert with_discussion(report, new.replace("bbb", "ccc")).endswith(once[once.index(heading) :])


def test_flagging_without_cached_runs_writes_nothing(tmp_path):
    # --no-train on a fresh clone (no cache) replaced the committed flagging.md and .json
    # with empty tables, and exited 0 (audit helper-126)
    import subprocess

    out = tmp_path / "flagging"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "flagging.py"), "--no-train", "--regimes", "digits-mlp",
         "--cache", str(tmp_path / "cache"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "no cached run under" in proc.stderr, proc.stderr
    assert not out.with_suffix(".md").exists() and not out.with_suffix(".json").exists()


def test_per_call_refuses_a_folder_for_out_before_timing(tmp_path, monkeypatch, capsys):
    # found when the table was written, after every round had been timed
    per_call = _script("per_call")

    def no_child(*args):
        raise AssertionError("timed before checking --out")

    monkeypatch.setattr(per_call, "_run_child", no_child)
    monkeypatch.setattr(sys, "argv", ["per_call.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        per_call.main()
    assert exc.value.code == 2 and "a folder; give a file" in capsys.readouterr().err


def test_per_call_records_when_and_how_it_ran():
    # the JSON had no date or machine, and the table's command read "--tree this checkout=..."
    per_call = _script("per_call")
    meta = {"date": "2026-12-03 22:00 UTC", "command": "python benchmarks/per_call.py --rounds 1"}
    trees = [["this checkout", str(BENCH.parent)]]
    lines = per_call._markdown(trees, {"this checkout": {"c": 1.0}}, ["c"], (0,), (0,), 1, meta)
    text = "\n".join(lines)
    assert meta["date"] in text and f"Command: `{meta['command']}`" in text


def test_a_run_with_fewer_repetitions_or_candidates_is_named_partial(tmp_path):
    # --quick and --sections named their reports; --no-compile or fewer repetitions alone
    # took the full report's name, replacing a committed one without a word
    run = _script("run")
    args = ["--no-compile", "--reps", "3", "--step-reps", "3", "--budget-scale", "0.1"]
    assert run.main([*args, "--sections", "memory", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("*.md")
    assert report.name.endswith("-no-compile-reps3-step-reps3-budget-scale0.1-memory.md")


def test_the_scale_benchmarks_tracker_is_one_a_run_could_leave(tmp_path):
    """flagging_scale.py timed a tracker whose suggested labels had no votes behind them
    (about a fifth of its samples): a state save() refuses and no run produces."""
    import csl_fast

    tracker, _ = _script("flagging_scale").synthetic_tracker(2000)
    tracker.save(tmp_path / "t.csl")
    assert csl_fast.load(tmp_path / "t.csl").num_samples == 2000


def test_a_run_with_threads_or_skipped_backends_is_named_partial(tmp_path, monkeypatch):
    # --threads and --allow-missing-backends took the full report's name (audit helper-231)
    from csl_fast import _ext

    run = _script("run")
    assert (
        run.main(["--quick", "--threads", "1", "--sections", "memory", "--out", str(tmp_path)]) == 0
    )
    assert next(tmp_path.glob("*.md")).name.endswith("-quick-threads1-memory.md")
    monkeypatch.setattr(_ext, "_C", None)
    args = ["--quick", "--allow-missing-backends", "--sections", "memory", "--out", str(tmp_path)]
    assert run.main(args) == 0
    assert len(list(tmp_path.glob("*-quick-no-cpu-memory.md"))) == 1


def test_run_never_replaces_the_days_report_without_force(tmp_path, capsys):
    run = _script("run")
    args = ["--quick", "--sections", "memory", "--out", str(tmp_path)]
    assert run.main(args) == 0
    (report,) = tmp_path.glob("*.md")
    report.write_text("committed")
    with pytest.raises(SystemExit) as exit_:
        run.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{report} exists; pass --force" in err and "--out" in err
    assert report.read_text() == "committed"
    assert run.main([*args, "--force"]) == 0 and report.read_text() != "committed"


def _writes_results(text: str) -> bool:
    return any(w in text for w in ("write_atomic(", "write_results(", "savefig(", "write_text("))


def test_every_script_that_writes_results_refuses_to_replace_them():
    # a rerun, smoke runs included, replaced the committed results file without a word:
    # one rule (run_meta.refuse_overwrite) for every script (audit helper-231)
    scripts = sorted(BENCH.glob("*.py")) + sorted((BENCH / "paper").glob("*.py"))
    lacking = [
        p.name
        for p in scripts
        if "def main(" in (text := p.read_text())
        and _writes_results(text)
        and "refuse_overwrite(" not in text
        and "parse_args(p, " not in text  # (paper/common.py's parse_args calls it)
    ]
    assert not lacking


@pytest.mark.parametrize(
    ("argv", "existing"),
    [
        (["record_scale.py", "--sizes", "2000", "--rounds", "1"], "results/record_scale.md"),
        (["paper/mislabeled.py", "--epochs", "1"], "paper/results/mislabeled.json"),
        (["paper/multilabel.py", "--epochs", "1"], "paper/results/multilabel.json"),
    ],
)
def test_a_smoke_run_refuses_to_replace_the_committed_results(argv, existing, monkeypatch, capsys):
    import runpy

    path = BENCH / existing
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(sys, "argv", [str(BENCH / argv[0]), *argv[1:]])
    monkeypatch.setattr(sys, "path", [str((BENCH / argv[0]).parent), *sys.path])
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # (its sibling imports)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / argv[0]), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert f"{path} exists; pass --force to replace it, or --out" in err
    assert path.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["host_profile.py", "--out", "X", "--device", "foo"], "not a device: 'foo'"),
        (
            ["host_profile.py", "--out", "X", "--device", "cpu", "--calls", "0"],
            "--calls: must be >= 1",
        ),
        (["half_backward.py", "--rounds", "0", "--forward-only"], "--rounds: must be >= 1"),
        (["extras_overhead.py", "--rounds", "0"], "--rounds: must be >= 1"),
        (["load_scale.py", "--sizes", "0", "--out", "X"], "--sizes: must be >= 1"),
        (["flagging_scale.py", "--sizes", "0", "--out", "X"], "--sizes: must be >= 1"),
        (["record_scale.py", "--threads", "0", "--out", "X"], "--threads: must be >= 1"),
        (["loss_detection_limits.py", "--rates", "2.0", "--out", "X"], "not a rate in [0, 1]"),
        (["sync_memory.py", "--n", "0", "--out", "X"], "--n: must be >= 1"),
        (["sync_memory.py", "--worlds", "1", "--out", "X"], "--worlds: must be >= 2"),
        (["paper/mislabeled.py", "--epochs", "0", "--out", "X"], "--epochs: must be >= 1"),
        (["paper/duplicates.py", "--batch-size", "0", "--out", "X"], "--batch-size: must be >= 1"),
        (["paper/cost.py", "--cl-folds", "1", "--out", "X"], "--cl-folds: must be >= 2"),
        (["paper/regression.py", "--threads", "0", "--out", "X"], "--threads: must be >= 1"),
    ],
)
def test_a_bad_argument_is_a_usage_error(argv, said, tmp_path, monkeypatch, capsys):
    # tracebacks (ZeroDivisionError, StatisticsError, ...), or exit 0 with nothing measured
    import runpy

    argv = [str(tmp_path / "o") if a == "X" else a for a in argv]
    monkeypatch.setattr(sys, "argv", [str(BENCH / argv[0]), *argv[1:]])
    monkeypatch.setattr(sys, "path", [str((BENCH / argv[0]).parent), *sys.path])
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / argv[0]), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err, err
    assert not list(tmp_path.iterdir())


def test_host_profile_on_a_machine_without_cuda_says_so(monkeypatch):
    import argparse

    import torch

    device_arg = _script("run_meta").device_arg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(argparse.ArgumentTypeError, match="no such cuda device here"):
        device_arg("cuda")  # (host_profile.py's default: an AssertionError traceback)
    # mps on a machine without it: a NotImplementedError traceback
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.mps, "is_available", lambda: False, raising=False)
    with pytest.raises(argparse.ArgumentTypeError, match="no such mps device here"):
        device_arg("mps")
    # an index past the machine's devices
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(argparse.ArgumentTypeError, match="no such cuda device here"):
        device_arg("cuda:7")
    assert device_arg("cuda:0") == "cuda:0"
    assert device_arg("cpu") == "cpu"


def test_sync_memory_reports_a_failed_rank_instead_of_waiting():
    # a rank's error ended it without a word and the parent waited 600 s for its rows
    import time

    sync = _script("sync_memory")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"rank \d: ValueError: CSLTracker: num_samples"):
        sync.measure(-1, 2)
    assert time.perf_counter() - t0 < 60


def test_an_untracked_module_marks_the_commit_dirty(tmp_path):
    # `git status --untracked-files=no` called a tree with a new csl_fast/*.py clean
    import subprocess

    commit = _script("run_meta").commit
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "csl_fast").mkdir()
    (tmp_path / "csl_fast" / "a.py").write_text("")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    (tmp_path / "notes.txt").write_text("")  # (not source: still clean)
    assert not commit(tmp_path).endswith("-dirty")
    (tmp_path / "csl_fast" / "new.py").write_text("")
    assert commit(tmp_path).endswith("-dirty")
