"""csl_fast.bench, the measurement code behind benchmarks/run.py and `csl-fast bench`: every
section runs and checks what it times, the targets are read right off the rows, and the
reports render. Tiny sizes and budgets: these tests check the code, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csl_fast import bench


def test_compare_times_every_candidate_and_reports_failures():
    def boom():
        raise RuntimeError("no such kernel\nsecond line")

    stats, failed = bench.compare(
        {"a": lambda: torch.ones(4).sum(), "b": boom}, "cpu", reps=4, min_sample_s=0.0
    )
    assert set(stats) == {"a"} and stats["a"].reps == 4 and stats["a"].median > 0
    assert failed == {"b": "RuntimeError: no such kernel"}


def test_cross_entropy_section_checks_each_candidate(one_thread):
    # C large enough that the [NUM_STATS, B] statistics are small next to one logits buffer.
    rows = bench.bench_cross_entropy("cpu", [(9, 67)], reps=2, budget_s=0.2, compile=False)
    timed = {r["impl"]: r for r in rows if "median_s" in r}
    in_place = bench.fused_name("cpu", inplace=True)
    assert {bench.REF, bench.EAGER_CE, bench.fused_name("cpu"), in_place} <= set(timed)
    assert all(r["correct"] for r in timed.values()), rows
    fused = timed[bench.fused_name("cpu")]
    assert fused["speedup_vs"][bench.REF] > 0 and fused["gbps"] > 0
    # One new logits-sized buffer (the gradient) out of place, none in place.
    assert 0.9 < fused["extra_peak_logits"] < 1.5
    assert timed[in_place]["extra_peak_logits"] < 0.5
    assert any(r["impl"] == bench.LIGER and "skipped" in r for r in rows)


def test_tracking_cost_section(one_thread):
    rows = bench.bench_tracking_cost("cpu", ("cnn",), reps=3, budget_s=0.5)
    by = {r["variant"]: r for r in rows}
    assert set(by) == set(bench.STEP_VARIANTS)
    assert by[bench.STEP_PLAIN]["cost_s"] == 0.0
    assert all(r["median_s"] > 0 and r["batch"] == 64 for r in rows)


@pytest.mark.parametrize("loss_only", [False, True])
def test_steps_record_what_their_variant_tracks(loss_only):
    case = bench.TrainingCase("cnn", "cpu", num_samples=100, batches=1)
    assert case.check() is None
    for variant in bench.STEP_VARIANTS:
        case.step_fn(variant, loss_only=loss_only)()
    b = case.tracker.buffers()
    # STEP_TRACKER and STEP_FULL each recorded the batch; only STEP_FULL input gradients.
    assert b["csl_count"].sum() == 2 * case.batch
    assert (b["input_grad_count"] > 0).sum() == case.batch
    assert (case.csl > 0).sum() == case.batch
    assert len(case.host_log) == case.batch
    with pytest.raises(ValueError, match="unknown variant"):
        case.step_fn("nope", loss_only=loss_only)


def _results():
    """Synthetic rows shaped like the sections' output."""
    fused, ref = bench.fused_name("cpu"), bench.REF

    def ce(impl, median):
        return {"batch": 256, "classes": 1000, "dtype": "float32", "device": "cpu",
                "impl": impl, "csl": True, "median_s": median, "q1_s": median,
                "q3_s": median, "min_s": median, "noise_iqr": 0.01, "reps": 5,
                "calls_per_sample": 1, "gbps": 1.0, "logits_bytes": 1024000,
                "extra_peak_bytes": None, "extra_peak_logits": None, "correct": True,
                "check_error": None, "buffers": 2}  # fmt: skip

    rows = [ce(fused, 0.5e-3), ce(ref, 1.0e-3)]
    bench._add_ratios(rows, ("batch", "classes"))

    def cost(workload, variant, median, plain):
        return {"workload": workload, "batch": 64, "classes": 10, "device": "cpu",
                "variant": variant, "median_s": median, "noise_iqr": 0.02,
                "cost_s": median - plain}  # fmt: skip

    costs = [
        cost("mlp", bench.STEP_PLAIN, 100e-6, 100e-6),
        cost("mlp", bench.STEP_TRACKER, 150e-6, 100e-6),
        cost("mlp", bench.STEP_HOST, 400e-6, 100e-6),
        cost("mlp", bench.STEP_XGRAD, 300e-6, 100e-6),
        cost("mlp", bench.STEP_FULL, 410e-6, 100e-6),
        cost("cnn", bench.STEP_PLAIN, 100e-6, 100e-6),
        cost("cnn", bench.STEP_TRACKER, 90e-6, 100e-6),
        cost("cnn", bench.STEP_HOST, 150e-6, 100e-6),
    ]

    def step(variant, median, overhead_pct):
        return {"workload": "mlp", "batch": 64, "classes": 10, "device": "cpu",
                "variant": variant, "median_s": median, "noise_iqr": 0.05,
                "overhead_pct": overhead_pct, "overhead_ms": (median - 0.1) * 1e3}  # fmt: skip

    steps = [step(bench.STEP_PLAIN, 0.1, 0.0), step(bench.STEP_TRACKER, 0.098, -2.0),
             step(bench.STEP_XGRAD, 0.012, 20.0), step(bench.STEP_FULL, 0.0121, 21.0)]  # fmt: skip
    env = bench.environment("cpu")
    return {"env": env, "errors": {}, "cross_entropy": rows, "tracking_cost": costs,
            "training": steps}  # fmt: skip


def test_targets_read_the_rows():
    res = _results()
    got = {t["target"]: t for t in bench.targets(res)}
    ce = got["fused CPU op >= 1.5x the reference eager path, 256x1000 fwd+bwd"]
    assert ce["met"] and ce["value"] == pytest.approx(2.0)
    mlp = got["mlp: tracker cost >= 10x cheaper than host logging"]
    assert not mlp["met"] and mlp["value"] == pytest.approx(6.0)
    assert "+50.0 µs vs +300.0 µs per step (6.0x)" in mlp["shown"]
    step = got[f"mlp: {bench.STEP_TRACKER} step overhead <= 1%"]
    assert step["met"] and step["shown"] == (
        "-2.0% (step medians, IQR 5%); tracking cost alone +0.05% of the plain step"
    )  # +50 us of a 100 ms step
    cnn = got["cnn: tracker cost >= 10x cheaper than host logging"]
    assert cnn["met"] and "tracker not slower than plain" in cnn["shown"]
    watch = got[f"mlp: {bench.STEP_FULL}: csl_fast's cost <= 1% of the step with dL/dx"]
    assert watch["met"] and watch["value"] == pytest.approx(11 / 12)  # 110 us of a 12 ms step
    assert watch["shown"] == (
        "+0.92% (+110.0 µs); whole step +21.0% over plain, of which computing dL/dx alone +20.0%"
    )


def test_a_wrong_answer_meets_no_target():
    # the speed targets were read off rows whose check had failed: a broken fused op or
    # tracker was "met" however wrong its answers
    res = _results()
    fused = next(r for r in res["cross_entropy"] if r["impl"] == bench.fused_name("cpu"))
    fused.update(correct=False, check_error="loss: max error 3 > 0.0001 x 7")
    for row in res["training"]:
        row["check_error"] = "tracker CSL differs from F.cross_entropy per-row losses"
    got = {t["target"]: t for t in bench.targets(res)}
    ce = got["fused CPU op >= 1.5x the reference eager path, 256x1000 fwd+bwd"]
    assert ce["met"] is False
    assert ce["shown"] == "2.00x; its results were wrong: loss: max error 3 > 0.0001 x 7"
    for what in (
        f"mlp: {bench.STEP_TRACKER} step overhead <= 1%",
        f"mlp: {bench.STEP_FULL}: csl_fast's cost <= 1% of the step with dL/dx",
        "mlp: tracker cost >= 10x cheaper than host logging",
    ):
        assert got[what]["met"] is False and "tracker CSL differs" in got[what]["shown"]
    assert got["cnn: tracker cost >= 10x cheaper than host logging"]["met"]  # checked apart


def test_a_wrong_answer_meets_no_target_when_its_baseline_was_not_timed():
    # the CUDA target vanished when eager F.cross_entropy was skipped (out of memory), and
    # the CPU one was "not decided" for a fused op whose answers were wrong
    head = {"batch": 4096, "classes": 32000, "dtype": "bfloat16", "device": "cuda"}
    wrong = {"median_s": 1e-3, "gbps": 500.0, "correct": False, "check_error": "max err 0.5"}
    cuda = [
        {**head, "impl": "csl_fast[cuda]", "extra_peak_bytes": None, **wrong, "speedup_vs": {}},
        {**head, "impl": bench.EAGER_CE, "skipped": "out of memory"},
    ]
    cpu = [{**head, "batch": 256, "classes": 1000, "impl": bench.fused_name("cpu"), **wrong}]
    cpu[0]["speedup_vs"] = {}
    for device, rows in (("cuda", cuda), ("cpu", cpu)):
        got = bench.targets({"env": {"device": device}, "cross_entropy": rows})
        assert len(got) == 1 and got[0]["met"] is False, got
        assert "was not timed; its results were wrong: max err 0.5" in got[0]["shown"]


def test_a_fused_op_whose_check_raised_keeps_its_target_missed(monkeypatch, one_thread):
    # its row became "skipped" like a candidate not requested, and its target vanished
    from csl_fast.bench import cases

    real = cases._fused

    def raising(backend, inplace=False):
        if inplace:
            return real(backend, inplace)

        def run(*args):
            raise RuntimeError("boom")

        return run

    monkeypatch.setattr(cases, "_fused", raising)
    rows = bench.bench_cross_entropy("cpu", [(256, 1000)], reps=2, budget_s=0.2, compile=False)
    fused = next(r for r in rows if r["impl"] == bench.fused_name("cpu"))
    assert fused["correct"] is False and fused["check_error"] == "raised RuntimeError: boom"
    res = {"env": {"device": "cpu"}, "cross_entropy": rows}
    (target,) = bench.targets(res)
    assert target["met"] is False and target["shown"] == "not timed: raised RuntimeError: boom"


def test_a_failed_check_is_an_error_of_the_run(monkeypatch):
    # run.py exits non-zero on results["errors"], which failed checks never reached
    from csl_fast.bench import runner

    rows = _results()["cross_entropy"]
    rows[0].update(correct=False, check_error="loss: max error 3")
    monkeypatch.setattr(runner, "bench_cross_entropy", lambda *a, **kw: rows)
    res = bench.run_full("cpu", sections=("cross_entropy",))
    (shape, *_) = runner.CE_SHAPES["cpu"]
    assert res["errors"][f"cross_entropy {shape} checks"] == (
        f"correctness checks failed:\n{bench.fused_name('cpu')}: loss: max error 3"
    )


def test_without_a_plain_step_the_differences_are_not_available():
    # the plain step raised (its row skipped) or was not asked for: overhead_pct and
    # cost_s are None, and targets() and the report writers raised TypeError on them
    res = _results()
    plain = {"workload": "mlp", "device": "cpu", "variant": bench.STEP_PLAIN, "skipped": "OOM"}
    res["training"] = [plain] + [
        {**r, "overhead_pct": None, "overhead_ms": None}
        for r in res["training"]
        if r["variant"] != bench.STEP_PLAIN
    ]
    for row in res["tracking_cost"]:
        row["cost_s"] = None
    res["targets"] = bench.targets(res)
    got = {t["target"]: t for t in res["targets"]}
    step = got[f"mlp: {bench.STEP_TRACKER} step overhead <= 1%"]
    assert step["met"] is None and step["shown"].startswith("n/a (no plain baseline) (step")
    watch = got[f"mlp: {bench.STEP_FULL}: csl_fast's cost <= 1% of the step with dL/dx"]
    assert watch["met"] is None and watch["shown"].startswith("n/a (no plain baseline); ")
    host = got["mlp: tracker cost >= 10x cheaper than host logging"]
    assert host["met"] is None and host["shown"] == "n/a (no plain baseline)"
    text = bench.markdown(res)
    assert "| plain F.cross_entropy | skipped: OOM | | |" in text
    assert f"| {bench.STEP_TRACKER} | 98.00 ms (5%) | n/a (no plain baseline) | n/a" in text
    assert "| n/a (no plain baseline) | n/a (no plain baseline) |" in text  # tracking cost
    summary = bench.summary_table(res)
    assert "n/a (no plain baseline)/step" in summary and "NOT DECIDED mlp: tracker" in summary


def test_a_partial_report_that_fails_does_not_end_the_run():
    # checkpoint() ran outside the section's try: its exception ended run_full, and the
    # remaining sections were never measured
    calls = []

    def failing_report(results):
        calls.append(sorted(results))
        if len(calls) == 1:
            raise TypeError("unsupported format string passed to NoneType.__format__")

    res = bench.run_full("cpu", sections=("copy_bandwidth", "memory"), on_section=failing_report)
    assert res["memory"] and len(calls) == 2
    assert "TypeError: unsupported format string" in res["errors"]["copy_bandwidth report"]


def test_a_rewrite_cut_short_leaves_the_last_report(tmp_path, monkeypatch):
    # run.py rewrites its report after each section: the JSON was truncated before it was
    # built, and a rewrite interrupted there (a time limit's SIGINT) left it empty
    from csl_fast.bench import report

    res = _results()
    md, js = bench.write_report(res, str(tmp_path))
    before = Path(md).read_text(), Path(js).read_text()

    def interrupted(o):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_jsonable", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench.write_report({**res, "targets": bench.targets(res)}, str(tmp_path))
    assert (Path(md).read_text(), Path(js).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(md).name, Path(js).name])


def test_a_checkpoint_says_it_is_incomplete_and_leaves_the_complete_report(tmp_path):
    # run.py wrote each checkpoint under the final name, unmarked: a run killed after its
    # first section replaced the day's complete report with one section that read whole
    res = bench.run_full("cpu", sections=("memory",))
    final, _ = bench.write_report(res, str(tmp_path))
    complete = Path(final).read_text()
    seen = []

    def checkpoint(results):
        md, _ = bench.write_report(results, str(tmp_path))
        seen.append((Path(md).name, Path(md).read_text(), Path(final).read_text()))

    res = bench.run_full("cpu", sections=("copy_bandwidth", "memory"), on_section=checkpoint)
    assert len(seen) == 2
    name, text, untouched = seen[0]
    assert name == Path(final).name.replace(".md", "-in-progress.md") and untouched == complete
    assert text.splitlines()[2].startswith(
        "**Incomplete: the run was in progress when this was written** (or was cut short): "
        "sections pending memory; done copy_bandwidth."
    )
    assert res["env"]["settings"]["sections"] == ["copy_bandwidth", "memory"]
    assert "pending" not in res
    bench.write_report(res, str(tmp_path))  # the complete report replaces the checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(final).name, Path(final).with_suffix(".json").name]
    )
    assert "Incomplete" not in Path(final).read_text()


def test_reports_render_and_are_written(tmp_path):
    res = _results()
    res["targets"] = bench.targets(res)
    text = bench.markdown(res)
    assert "## Tracking cost per step" in text and "| mlp (B=64, C=10) |" in text
    assert "| mlp: tracker cost >= 10x cheaper than host logging | " in text
    assert text.count("**missed**") == 1
    summary = bench.summary_table(res)
    assert "cost mlp" in summary and "targets: 4 met, 1 missed" in summary
    md, js = bench.write_report(res, str(tmp_path))
    assert json.loads(Path(js).read_text())["tracking_cost"][1]["cost_s"] == pytest.approx(50e-6)
    assert Path(md).read_text() == text
    # a busy machine is said, above the verdicts it makes unreliable (the loads are set:
    # this machine's own are whatever the test runs beside)
    res["env"] = {**res["env"], "cpu_cores": 2, "loadavg_start": [1.5, 1, 1], "loadavg_end": None}
    assert "The machine was busy" not in bench.markdown(res)
    res["env"]["loadavg_end"] = [60.0, 1, 1]
    busy = bench.markdown(res)
    assert "**The machine was busy** (1-minute load average up to 60 on 2 cores)" in busy
    assert busy.index("machine was busy") < busy.index("## Targets")


def test_no_verdict_on_costs_that_are_noise():
    # host logging measured cheaper than the plain step: a <= b / 10 held for any tracker
    # cost below it, and 7 of 8 targets were "met" on a busy machine
    res = _results()
    for row in res["tracking_cost"]:
        if row["workload"] == "mlp":
            row["cost_s"] = {bench.STEP_TRACKER: -1.25e-3, bench.STEP_HOST: -1.05e-3}.get(
                row["variant"], row["cost_s"]
            )
    res["targets"] = bench.targets(res)
    got = {t["target"]: t for t in res["targets"]}[
        "mlp: tracker cost >= 10x cheaper than host logging"
    ]
    assert got["met"] is None and "noise, no verdict" in got["shown"]
    assert "| not decided |" in bench.markdown(res)
    assert ", 1 not decided" in bench.summary_table(res)
    res["env"] = {**res["env"], "cpu_cores": 2, "loadavg_start": [60.0, 1, 1]}
    assert bench.summary_table(res).startswith("The machine was busy")


def test_linear_cross_entropy_target_on_a_gpu():
    from csl_fast.bench import lm as bench_lm

    def row(peak, speed):
        shape = {"tokens": 8192, "hidden": 4096, "vocab": 32000}
        return {"impl": bench_lm.OURS, "median_s": 1.0, **shape, "peak_vs_eager": peak,
                "speedup_vs": {bench_lm.EAGER: speed}}  # fmt: skip

    env = {"device": "cuda"}
    met = bench.targets({"env": env, "linear_cross_entropy": [row(0.2, 1.1)]})
    missed = bench.targets({"env": env, "linear_cross_entropy": [row(0.2, 0.9), row(0.3, 1.2)]})
    assert [t["met"] for t in met] == [True] and [t["met"] for t in missed] == [False, False]
    assert bench.targets({"env": {"device": "cpu"}, "linear_cross_entropy": [row(0.2, 1.1)]}) == []


def test_linear_cross_entropy_candidates_agree_with_eager():
    from csl_fast.bench import lm as bench_lm

    case = bench_lm.LinearCECase(64, 16, 300, "cpu", torch.bfloat16, compile=False, liger=False)
    assert {bench_lm.OURS, bench_lm.OURS_LOWMEM, bench_lm.EAGER} <= set(case.impls)
    for name in case.impls:
        err, wrong = case.check(name)
        assert wrong is None and err < 1e-2, (name, wrong)
    case32 = bench_lm.LinearCECase(64, 16, 300, "cpu", compile=False, liger=False)
    assert "same as the default" in case32.skipped[bench_lm.OURS_LOWMEM]


@pytest.fixture
def no_extension(monkeypatch):
    """As if csl_fast._C had failed to load: only the reference backend can run."""
    from csl_fast import _ext

    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "EXTENSION_ERROR", "ImportError: no _C in this test")


def test_without_the_extension_csl_fast_rows_are_skipped_not_timed(no_extension, one_thread):
    ce = bench.bench_cross_entropy("cpu", [(9, 67)], reps=2, budget_s=0.2, compile=False)
    by = {r["impl"]: r for r in ce}
    assert "median_s" not in by[bench.fused_name("cpu")]
    assert "not loaded" in by[bench.fused_name("cpu")]["skipped"]
    ig = bench.bench_input_grad("cpu", [((4, 3, 8, 8), torch.float32)], reps=2, budget_s=0.2)
    assert "skipped" in {r["impl"]: r for r in ig}[bench.fused_name("cpu")]
    assert bench.TrainingCase("cnn", "cpu", num_samples=100, batches=1).backend is None
    rows = bench.bench_tracking_cost("cpu", ("cnn",), reps=2, budget_s=0.2)
    timed = {r["variant"] for r in rows if "median_s" in r}
    assert timed == set(bench.STEP_VARIANTS) - set(bench.CSL_VARIANTS)
    for r in rows:
        if r["variant"] in bench.CSL_VARIANTS:
            assert "reference fallback is not timed" in r["skipped"]


def test_training_steps_name_the_compiled_backend(monkeypatch):
    import csl_fast

    seen = []
    real = csl_fast.accumulate

    def spy(*args, **kw):
        seen.append(kw.get("backend", "auto"))
        return real(*args, **kw)

    monkeypatch.setattr(csl_fast, "accumulate", spy)
    case = bench.TrainingCase("cnn", "cpu", num_samples=100, batches=1)
    assert case.backend == "cpu" and case.tracker.backend == "cpu"
    for variant in bench.CSL_VARIANTS:
        case.step_fn(variant, loss_only=True)()
    assert seen == ["cpu"] * len(bench.CSL_VARIANTS)


def test_report_states_the_extension_error_and_the_backends():
    env = _env_for_report()
    env["backends"] = {"cpu": "compiled extension not loaded (ImportError: x)", "reference": None}
    env["extension_error"] = "ImportError: x"
    md = bench.markdown({"env": env, "errors": {}})
    assert "backends measured: none; cpu not run (compiled extension not loaded" in md
    assert "csl_fast._C did not load** (ImportError: x)" in md
    env["backends"], env["extension_error"] = {"cpu": None, "reference": None}, None
    md = bench.markdown({"env": env, "errors": {}})
    assert "backends measured: cpu\n" in md and "did not load" not in md
    # a GPU whose extension failed but whose triton ran: only cuda's rows are skipped
    env.update(device="cuda", extension_error="ImportError: x")
    env["backends"] = {"triton": None, "cuda": "compiled extension not loaded", "reference": None}
    md = bench.markdown({"env": env, "errors": {}})
    assert "backends measured: triton; cuda not run (compiled extension not loaded)" in md
    assert "the cuda backend's rows are skipped" in md and "csl_fast's rows are skipped" not in md


def test_report_prints_the_commit_it_did_not_make_whole():
    env = _env_for_report()
    env["git_commit"] = "a" * 40
    assert f"commit {'a' * 12}\n" in bench.markdown({"env": env, "errors": {}}) + "\n"
    note = "726e47e (working tree; the machine's git metadata said 6306597)"
    env.update(git_commit=note, git_commit_from="CSL_COMMIT", git_head="b" * 40)
    env["source_hash"] = "c" * 64
    md = bench.markdown({"env": env, "errors": {}})
    assert f"commit {note} (from CSL_COMMIT; git HEAD here {'b' * 12}), sources sha256" in md


def test_environment_takes_the_commit_from_csl_commit_and_hashes_the_sources(monkeypatch, tmp_path):
    from csl_fast.bench import env as env_mod

    monkeypatch.setenv("CSL_COMMIT", "1234567 (given)")
    got = env_mod._git()
    assert got["git_commit"] == "1234567 (given)" and got["git_commit_from"] == "CSL_COMMIT"
    assert got["source_hash"] == env_mod.source_hash()
    (tmp_path / "csl_fast").mkdir()
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csl_fast" / "a.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "k.cpp").write_text("int k;\n")
    (tmp_path / "csl_fast" / "_C.so").write_bytes(b"build output")
    first = env_mod.source_hash(tmp_path)
    (tmp_path / "csl_fast" / "_C.so").write_bytes(b"another build")
    assert env_mod.source_hash(tmp_path) == first  # build outputs are not sources
    (tmp_path / "csrc" / "k.cpp").write_text("int k2;\n")
    assert env_mod.source_hash(tmp_path) != first


def test_cuda_timer_waits_for_the_l2_flush_before_the_start_event(monkeypatch):
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, attr):
            return lambda *a, **k: calls.append(f"{self.name}.{attr}")

        def elapsed_time(self, other):
            return 1.0

    timer = object.__new__(bench.Timer)
    timer.device, timer.cuda = torch.device("cuda"), True
    timer._flush, timer._start, timer._end = Recorder("flush"), Recorder("start"), Recorder("end")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("synchronize"))
    timer.sample(lambda: calls.append("fn"))
    assert calls[:4] == ["flush.zero_", "synchronize", "start.record", "fn"]


def _env_for_report() -> dict:
    return {
        "device": "cpu",
        "cpu_model": "test cpu",
        "cpu_cores": 2,
        "date": "2026-12-02T00:00:00+00:00",
        "git_commit": None,
        "torch": "x",
        "triton": "x",
        "python": "3",
        "torch_threads": 1,
        "loadavg_start": [0.0],
    }


def test_an_in_place_candidate_leaves_the_shared_inputs_as_built():
    # its gradient overwrote the rotation's buffers: every other candidate was then timed
    # on gradient values (std 1e-4), not the randn * 2 logits each case builds
    case = bench.CrossEntropyCase(8, 16, torch.float32, "cpu", compile=False, buffers=2)
    before = [x.detach().clone() for x, _, _ in case.inputs]
    (name,) = [n for n in case.in_place if n in case.impls]
    step = case.timed(name)
    for _ in range(3):
        step()
    assert all(torch.equal(b, x.detach()) for b, (x, _, _) in zip(before, case.inputs, strict=True))


def test_a_linear_cross_entropy_candidate_with_wrong_gradients_is_shown_wrong(monkeypatch):
    # only the loss was compared, to no tolerance: zero gradients were timed and shown
    # as a speed-up with nothing to say they were wrong
    from csl_fast.bench import lm as bench_lm

    real = bench_lm.linear_cross_entropy

    def no_gradient(h, w, *args, **kwargs):
        return real(h, w, *args, **kwargs).detach() + 0 * (h.sum() + w.sum())

    monkeypatch.setattr(bench_lm, "linear_cross_entropy", no_gradient)
    rows = bench_lm.bench_linear_cross_entropy(
        "cpu", shapes=[(64, 16, 128)], reps=3, budget_s=0.2, compile=False, liger=False
    )
    ours = next(r for r in rows if r["impl"] == bench_lm.OURS)
    assert ours["correct"] is False and "hidden grad off by" in ours["check"]
    assert "loss" not in ours["check"]  # the loss itself is right
    assert "**NO**: hidden grad off by" in bench_lm.markdown(rows)


def test_a_linear_cross_entropy_candidate_that_records_no_csl_is_shown_wrong(monkeypatch):
    # the check compared the loss and gradients only: a "+CSL" row recording nothing passed
    from csl_fast.bench import lm as bench_lm

    real = bench_lm.linear_cross_entropy

    def records_nothing(h, w, t, index, csl, **kwargs):
        return real(h, w, t, **kwargs)

    monkeypatch.setattr(bench_lm, "linear_cross_entropy", records_nothing)
    case = bench_lm.LinearCECase(64, 16, 128, "cpu", compile=False, liger=False)
    _, wrong = case.check(bench_lm.OURS)
    assert wrong is not None and wrong.startswith("CSL off by")


def test_the_cpu_memory_probe_keeps_the_profilers_log_off_stderr():
    """torch's profiler logs profiler_start/profiler_stop from C++ to fd 2: `csl-fast
    bench` without -q printed 24 such lines among its 5 status lines. What the probed
    function says itself still reaches stderr (silenced with the log, a warning was lost
    for the whole process). In a process of its own: pytest catches warnings itself."""
    probe = (
        "import warnings, torch\n"
        "from csl_fast.bench.harness import extra_peak_bytes\n"
        "def fn():\n"
        "    warnings.warn('what fn says')\n"
        "    return torch.ones(1000).sum()\n"
        "assert extra_peak_bytes(fn, 'cpu') is not None\n"
        "print('still here', file=__import__('sys').stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert "profiler" not in done.stderr
    assert "what fn says" in done.stderr and done.stderr.endswith("still here\n")
