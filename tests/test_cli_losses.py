"""``csl-fast rank``/``report``/``clean`` on trackers fed only by ``record_loss`` (and
per-label CSL, as ``accumulate_bce`` writes it): which scores exist, what is flagged, exit
codes, and no cross-entropy advice."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings

import pytest
import torch

import csl_fast
from csl_fast.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from csl_fast.scores import has_logit_stats, scores

N, L, BAD = 400, 5, 20
# Advice of the cross-entropy rule that means nothing for a loss-only run.
CE_ADVICE = ("two-view", "margin view", "detect from the tracker", "suggested label:")


def _loss_only(path, bad: int = BAD, labels: int | None = None):
    g = torch.Generator().manual_seed(0)
    csl = (torch.randn(N, generator=g) * 0.8 + 2).exp()
    csl[:bad] *= 300  # corrupted targets: a group far above the bulk
    t = csl_fast.CSLTracker(N, num_labels=labels)
    idx = torch.arange(N)
    for _ in range(3):
        if labels is None:
            csl_fast.record_loss(csl / 3, idx, t)
        else:  # what accumulate_bce records: per-entry losses and their sum
            entry = (torch.randn(N, labels, generator=g) * 0.8).exp()
            entry[:bad, 0] *= 40
            t.label_csl.index_put_((idx,), entry, accumulate=True)
            csl_fast.record_loss(entry.sum(1), idx, t)
    t.save(path)
    return t


@pytest.fixture
def reg_run(tmp_path):
    return str(tmp_path / "reg.csl"), _loss_only(tmp_path / "reg.csl")


@pytest.fixture
def ml_run(tmp_path):
    return str(tmp_path / "ml.csl"), _loss_only(tmp_path / "ml.csl", labels=L)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _no_ce_advice(text: str) -> None:
    for phrase in CE_ADVICE:
        assert phrase not in text, phrase


def test_scores_of_a_loss_only_tracker(reg_run):
    _, t = reg_run
    assert not has_logit_stats(t)
    assert list(scores(t)) == ["csl", "csl_mean", "final_loss"]
    assert torch.isnan(scores(t, ["aum"])["aum"]).all()  # asked by name: undefined
    # An eval pass (softmax of a classifier) gives in_confidence its own probabilities.
    ev = csl_fast.CSLTracker(4, 3)
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    csl_fast.score_epoch(torch.nn.Linear(2, 3), [batch], ev)
    conf = scores(ev, ["in_confidence", "aum"])
    assert torch.isfinite(conf["in_confidence"]).all() and torch.isnan(conf["aum"]).all()
    ce = csl_fast.CSLTracker(4, 3)
    csl_fast.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), ce)
    assert has_logit_stats(ce) and "aum" in scores(ce)


def test_a_run_of_only_non_finite_losses_is_called_diverged(capsys, tmp_path):
    # record_loss skips non-finite losses, so a diverged run's tracker holds nothing: the
    # CLI asked whether it was "saved before any training step?", after 3 epochs
    t = csl_fast.CSLTracker(30)
    for _ in range(3):
        csl_fast.record_loss(torch.full((30,), math.nan), torch.arange(30), t)
        t.end_epoch()
    t.save(tmp_path / "nan.csl")
    code, _, err = run(capsys, "rank", str(tmp_path / "nan.csl"))
    assert code == EXIT_INPUT and "closed 3 epoch(s)" in err and "NaN or inf" in err
    assert "before any training step" not in err
    # a tracker that closed no epoch keeps the old advice
    csl_fast.CSLTracker(30).save(tmp_path / "fresh.csl")
    code, _, err = run(capsys, "rank", str(tmp_path / "fresh.csl"))
    assert code == EXIT_INPUT and "before any training step" in err


def test_rank_says_what_exists_and_flags_by_the_tail_rule(capsys, reg_run):
    path, _ = reg_run
    code, out, err = run(capsys, "rank", path, "--top", "30", "--csv")
    assert code == EXIT_OK
    assert "recorded losses only" in err and "tail rule" in err
    _no_ce_advice(out + err)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 30
    flagged = [int(r["index"]) for r in rows if r["flagged"] == "1"]
    assert 15 <= len(flagged) <= 25 and sum(i < BAD for i in flagged) >= 0.9 * len(flagged)
    assert [float(r["score"]) for r in rows] == sorted(
        (float(r["score"]) for r in rows), reverse=True
    )
    code, out, err = run(capsys, "rank", path, "--json", "--score", "csl_mean", "--quiet")
    assert code == EXIT_OK and err == ""
    payload = json.loads(out)
    assert "recorded losses only" in payload["note"] and payload["score"] == "csl_mean"


@pytest.mark.parametrize("score", ["aum", "confidence", "forgetting", "in_confidence"])
def test_rank_refuses_softmax_scores_plainly(capsys, reg_run, score):
    code, out, err = run(capsys, "rank", reg_run[0], "--score", score)
    assert code == EXIT_USAGE and out == ""
    line = err.strip()
    assert line.startswith("csl-fast rank: error: ") and "\n" not in line
    assert "recorded losses only" in line and "available: csl, csl_mean, final_loss" in line


def test_rank_when_nothing_stands_out_warns_without_ce_advice(capsys, tmp_path):
    path = tmp_path / "clean.csl"
    _loss_only(path, bad=0)
    code, out, err = run(capsys, "rank", str(path), "--top", "5")
    assert code == EXIT_OK
    assert "csl-fast rank: warning: csl_fast.detect_losses: nothing flagged" in err
    _no_ce_advice(out + err)
    assert "yes" not in out  # nothing flagged


def test_warnings_name_the_score_asked_for(capsys, tmp_path):
    # --score final_loss warned "nothing flagged by rule='tail' on 'custom'"
    path = tmp_path / "clean.csl"
    _loss_only(path, bad=0)
    for command in (["rank", str(path)], ["report", str(path), "--out", str(tmp_path / "r")]):
        code, _, err = run(capsys, *command, "--score", "final_loss")
        assert code == EXIT_OK
        text = err + (tmp_path / "r" / "report.html").read_text() if "report" in command else err
        assert "on 'final_loss'" in text.replace("&#x27;", "'") and "'custom'" not in text


def test_rank_label_csl_lists_entries(capsys, ml_run):
    path, t = ml_run
    code, out, err = run(capsys, "rank", path, "--score", "label_csl", "--csv", "--top", "25")
    assert code == EXIT_OK and "(sample, label) entries" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["rank", "index", "entry_label", "score", "flagged"]
    top = rows[0]
    i, k = int(top["index"]), int(top["entry_label"])
    assert math.isclose(float(top["score"]), float(t.label_csl.max()), rel_tol=1e-6)
    assert float(t.label_csl[i, k]) == float(t.label_csl.max())
    assert sum(r["flagged"] == "1" and r["entry_label"] == "0" for r in rows) >= 15
    # clean acts on samples: it points to the entries' listing, which works here
    code, _, err = run(capsys, "clean", path, "--out", "-", "--score", "label_csl")
    assert code == EXIT_USAGE and "rank RUN --score label_csl" in err
    code, out, _ = run(capsys, "rank", path, "--score", "label_csl", "--top", "3")
    assert code == EXIT_OK and "entry_label" in out.splitlines()[0]
    with pytest.raises(SystemExit):
        run(capsys, "rank", "--help")
    assert ",".join(rows[0]) in " ".join(capsys.readouterr().out.split())  # as --help says


def test_rank_label_csl_without_per_label_csl_is_a_usage_error(capsys, reg_run):
    code, _, err = run(capsys, "rank", reg_run[0], "--score", "label_csl")
    assert code == EXIT_USAGE and "num_labels=L" in err and "accumulate_bce" in err
    # clean said "list the entries with csl-fast rank RUN --score label_csl", which fails
    code, _, err = run(capsys, "clean", reg_run[0], "--out", "-", "--score", "label_csl")
    assert code == EXIT_USAGE and "num_labels=L" in err and "--score label_csl" not in err


def test_label_csl_of_a_tracker_with_labels_fed_by_record_loss(capsys, tmp_path):
    """num_labels=L but no per-label CSL recorded: report and rank --score label_csl
    crashed ("internal error") on mislabeled_entries' ValueError."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "labels.csl"
    tracker = csl_fast.CSLTracker(N, num_labels=L)
    csl_fast.record_loss(torch.rand(N), torch.arange(N), tracker)
    tracker.save(path)
    code, _, err = run(capsys, "rank", str(path), "--score", "label_csl")
    assert code == EXIT_USAGE and "per-label CSL is 0" in err and "accumulate_bce" in err
    code, _, err = run(capsys, "report", str(path), "--out", str(tmp_path / "r"), "--quiet")
    assert code == EXIT_OK, err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "entries by per-label CSL</h2><p class=cap>Not drawn: " in page


def test_clean_drops_flagged_samples_of_a_loss_only_run(capsys, reg_run, tmp_path):
    path, _ = reg_run
    out_csv = tmp_path / "plan.csv"
    code, out, err = run(capsys, "clean", path, "--out", str(out_csv))
    assert code == EXIT_OK
    assert "no suggested labels" in err and "policy drop" in err
    _no_ce_advice(out + err)
    assert "0 relabel" in out and "(policy drop)" in out and "corrupted samples (" in out
    rows = list(csv.DictReader(out_csv.open()))
    assert rows and all(r["action"] == "drop" for r in rows)
    assert sum(int(r["index"]) < BAD for r in rows) >= 0.9 * len(rows)
    code, _, err = run(capsys, "clean", path, "--out", str(out_csv), "--score", "label_csl")
    assert code == EXIT_USAGE and "this run has no per-label CSL" in err


def test_report_of_a_loss_only_run(capsys, ml_run, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir = tmp_path / "report"
    code, _, err = run(capsys, "report", ml_run[0], "--out", str(out_dir), "--quiet")
    assert code == EXIT_OK, err
    page = (out_dir / "report.html").read_text()
    assert "recorded losses only" in page and "tail rule" in page
    assert "Top 24 (sample, label) entries by per-label CSL" in page
    # the entries' count read "bad samples"
    section = page[page.index("entries by per-label CSL</h2>") :]
    assert "bad entries" in section and "bad samples" not in section
    assert not (out_dir / "data_map.png").exists() and (out_dir / "flagging.png").exists()
    _no_ce_advice(page)


def test_report_of_a_regression_run_speaks_of_targets(capsys, reg_run, tmp_path):
    """A regression run's page read "? classes" and a caption of labels that contradict
    similar samples."""
    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, "report", reg_run[0], "--out", str(tmp_path / "r"), "--quiet")
    assert code == EXIT_OK, err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "? classes" not in page and "class count not given" in page
    assert "whose target is wrong" in page and "contradicts similar samples" not in page


def test_a_tracker_fed_by_accumulate_bce(capsys, tmp_path):
    """The contract end to end: accumulate_bce fills label_csl; the CLI reads it."""
    g = torch.Generator().manual_seed(3)
    n, labels = 64, 4
    t = csl_fast.CSLTracker(n, num_labels=labels)
    x = torch.randn(n, labels, generator=g)
    y = (torch.rand(n, labels, generator=g) < 0.3).float()
    want = torch.zeros(n, labels)
    for idx in torch.randperm(n, generator=g).split(16):
        csl_fast.accumulate_bce(x[idx], y[idx], idx, t)
        want[idx] += torch.nn.functional.binary_cross_entropy_with_logits(
            x[idx], y[idx], reduction="none"
        )
    torch.testing.assert_close(t.label_csl, want)
    assert not has_logit_stats(t)
    path = tmp_path / "bce.csl"
    t.save(path)
    code, out, err = run(capsys, "rank", str(path), "--score", "label_csl", "--csv", "--top", "5")
    assert code == EXIT_OK, err
    rows = list(csv.DictReader(io.StringIO(out)))
    i, k = int(rows[0]["index"]), int(rows[0]["entry_label"])
    assert float(want[i, k]) == pytest.approx(float(want.max()))
    code, out, err = run(capsys, "rank", str(path), "--top", "3")
    assert code == EXIT_OK and "recorded losses only" in err


def test_an_entries_warning_points_to_the_command_that_lists_entries():
    # it pointed to clean --policy review (which refuses label_csl) and rank --top K
    # (which lists samples by csl)
    from csl_fast.cli_errors import warning_line

    entries = warning_line(
        "csl_fast.detect_losses: nothing flagged by rule='tail' on 'label_csl': ... "
        "(Detection.top(k)) or use rule='fraction'"
    )
    assert entries.endswith("csl-fast rank RUN --score label_csl --top K lists the K most "
                            "suspicious (sample, label) entries)")  # fmt: skip
    assert "--policy review" not in entries
    samples = warning_line("csl_fast.detect: nothing flagged ... use rule='fraction'")
    assert "csl-fast clean RUN --policy review --budget K" in samples


def test_report_says_the_entries_warning_on_stderr(capsys, tmp_path):
    # the entries' "nothing flagged" was on the page alone, where rank says it
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(300, num_labels=4)
    for _ in range(3):
        logits = torch.randn(300, 4, generator=g)
        target = (torch.rand(300, 4, generator=g) > 0.5).float()
        csl_fast.accumulate_bce(logits, target, torch.arange(300), tracker)
        tracker.end_epoch()
    tracker.save(tmp_path / "ml.csl")
    args = ("report", str(tmp_path / "ml.csl"), "--out", str(tmp_path / "r"), "--quiet")
    code, _, err = run(capsys, *args, "--score", "label_csl")
    assert code == EXIT_OK, err
    assert "csl-fast report: warning: csl_fast.detect_losses: nothing flagged" in err
    assert "'label_csl'" in err


def test_scores_of_a_loss_only_run_are_detected_and_cleaned_as_the_run(reg_run):
    # clean(scores(t)) ran the cross-entropy valley rule without the losses-only warning,
    # and its advice sent the user to csl_fast.scores(tracker), what was passed
    _, t = reg_run
    s = scores(t)
    assert s.losses_only and not scores(csl_fast.CSLTracker(4, 3)).losses_only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        by_tracker = csl_fast.clean(t, policy="drop")
        by_scores = csl_fast.clean(s, policy="drop")
        det = csl_fast.detect.mislabeled(s)
    assert by_scores.detection.rule == by_tracker.detection.rule
    assert by_scores.index.tolist() == by_tracker.index.tolist()
    assert det.warning is None or "recorded losses only" in det.warning
    with pytest.raises(ValueError, match="recorded losses only"):
        csl_fast.clean(s, policy="relabel-confident")  # (no suggested labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        assert csl_fast.clean(s).policy == "drop"  # (the default, as csl-fast clean's)


def test_entries_ranked_by_their_mean_are_headed_so(capsys, tmp_path):
    # presentation counts that differ: the entries are ranked by label_csl_mean, whose
    # values the table and JSON showed under "label_csl"
    t = _loss_only(tmp_path / "ml.csl", labels=L)
    extra = torch.arange(10)
    t.label_csl[extra] *= 2
    csl_fast.record_loss(torch.ones(10), extra, t)
    t.save(tmp_path / "ml.csl")
    code, out, _ = run(capsys, "rank", str(tmp_path / "ml.csl"), "--score", "label_csl")
    assert code == EXIT_OK and "label_csl_mean" in out.splitlines()[0]
    code, out, _ = run(capsys, "rank", str(tmp_path / "ml.csl"), "--score", "label_csl", "--json")
    assert json.loads(out)["score"] == "label_csl_mean"
