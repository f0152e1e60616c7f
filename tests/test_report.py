"""The numbers in the report (csl_fast/report.py) against what csl_fast.evaluate and
csl_fast.detect compute for the same run: the AUROC table, the top-k table, and the demo's
flagged counts and overhead note.

The HTML is read by section (an ``<h2>`` heading and the first table or ``<pre>`` after it),
so sections added to the report later do not disturb these checks.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast.evaluate import auroc
from csl_fast.report import RunSamples, detection_table, format_detection_table, write_report

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class _Sections(HTMLParser):
    """``{h2 heading: [cells of each table row] or preformatted text}``: the first table
    or ``<pre>`` after each heading."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[list[str]] | str] = {}
        self._heading: str | None = None
        self._in_h2 = self._in_cell = self._in_pre = False
        self._text = ""
        self._rows: list[list[str]] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_h2, self._text = True, ""
        elif tag == "table" and self._heading and self._heading not in self.sections:
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            self._in_cell, self._text = True, ""
        elif tag == "pre" and self._heading and self._heading not in self.sections:
            self._in_pre, self._text = True, ""

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2, self._heading = False, self._text.strip()
        elif tag in ("td", "th") and self._in_cell:
            self._in_cell = False
            self._rows[-1].append(self._text.strip())
        elif tag == "table" and self._rows is not None:
            self.sections[self._heading] = self._rows
            self._rows = None
        elif tag == "pre" and self._in_pre:
            self._in_pre = False
            self.sections[self._heading] = self._text

    def handle_data(self, data):
        if self._in_h2 or self._in_cell or self._in_pre:
            self._text += data


def _sections(path) -> dict[str, list[list[str]] | str]:
    parser = _Sections()
    with open(path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser.sections


def _section(sections, prefix: str):
    found = [v for k, v in sections.items() if k.startswith(prefix)]
    assert len(found) == 1, (prefix, list(sections))
    return found[0]


def _expected_aurocs(scores, samples) -> dict[str, dict[str, float]]:
    """Each corruption type against the clean samples only (the report's rule), samples
    without a finite score left out, computed here with csl_fast.evaluate.auroc."""
    mis, dup = samples.mislabeled, samples.duplicate
    out = {}
    for name, s in scores.items():
        v = s.double().numpy()
        row = {}
        for kind, keep, pos in (("mislabeled", ~dup, mis), ("duplicates", ~mis, dup)):
            ok = keep & np.isfinite(v)
            row[kind] = auroc(v[ok], pos[ok])
        out[name] = row
    return out


# A value printed with 3 decimals is within half a unit of the last digit, plus the
# float error of parsing it back (0.4375 prints as 0.438).
_HALF_ULP3 = 5e-4 + 1e-9


def _assert_auroc_table(rows: list[list[str]], want: dict[str, dict[str, float]]) -> None:
    head, body = rows[0], rows[1:]
    assert head[:3] == ["score", "mislabeled", "duplicates"], head
    got = {r[0]: r[1:3] for r in body}
    assert list(got) == list(want)  # every default score, in csl_fast.scores order
    for name, (mis, dup) in got.items():
        for kind, cell in (("mislabeled", mis), ("duplicates", dup)):
            assert abs(float(cell) - want[name][kind]) <= _HALF_ULP3, (name, kind, cell, want[name])


def _run(seed=0, n=160, classes=4):
    """A small tracked run on separable blobs with 10% flipped labels, and 8 samples
    marked as duplicates (what the report reads of them is the mask)."""
    from csl_fast import corrupt

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 6, generator=g) * 3
    y = torch.arange(n) % classes
    x = centres[y] + torch.randn(n, 6, generator=g)
    noisy, flipped = corrupt.flip_labels(y, 0.1, num_classes=classes, seed=seed)
    dup = torch.zeros(n, dtype=torch.bool)
    dup[torch.nonzero(~flipped).squeeze(1)[:8]] = True
    x[dup] += 2.5 * torch.randn(8, 6, generator=g)  # harder than the rest: AUROC not trivial
    model = torch.nn.Linear(6, classes)
    tracker = csl_fast.CSLTracker(n, classes)
    csl_fast.train.train(
        model, x, noisy, epochs=6, lr=0.05, batch_size=32, tracker=tracker, seed=seed
    )
    with torch.no_grad():
        predicted = model(x).argmax(1)
    samples = RunSamples(
        labels=noisy, predicted=predicted, true_labels=y, mislabeled=flipped, duplicate=dup
    )
    return tracker, samples


@pytest.fixture(scope="module")
def run():
    return _run()


def test_auroc_table_matches_evaluate(run, tmp_path):
    tracker, samples = run
    scores = csl_fast.scores(tracker)
    want = _expected_aurocs(scores, samples)
    # not every score is perfect, so an inverted AUROC (1 - a) would show
    assert any(abs(a - 0.5) > 0.1 and a < 0.999 for r in want.values() for a in r.values())
    html = write_report(tracker, tmp_path, samples)
    rows = _section(_sections(html), "Detection")
    _assert_auroc_table(rows, want)
    # the best cell of each column is the one the report marks
    with open(html, encoding="utf-8") as f:
        marked = re.findall(r"<td class=best>([0-9.]+)</td>", f.read())
    best = [f"{max(r[kind] for r in want.values()):.3f}" for kind in ("mislabeled", "duplicates")]
    assert set(best) <= set(marked), (best, marked)
    # the same numbers as detection_table returns and the demo prints
    table = detection_table(scores, samples)
    for name, row in want.items():
        for kind, value in row.items():
            assert table[name][kind] == pytest.approx(value, abs=1e-12), (name, kind)
    text = format_detection_table(table).splitlines()
    printed = {line.split()[0]: line.split()[1:3] for line in text[2:]}
    for name, row in want.items():
        got = [float(c.rstrip("*")) for c in printed[name]]
        assert got == pytest.approx([row["mislabeled"], row["duplicates"]], abs=_HALF_ULP3), name


def test_top_table_is_the_descending_ranking(run, tmp_path):
    score = "aum"  # not the default, so the table must follow the score asked for
    tracker, samples = run
    html = write_report(tracker, tmp_path, samples, score=score, top=12)
    rows = _section(_sections(html), "Top 12 by")
    head, body = rows[0], rows[1:]
    assert head[:3] == ["rank", "index", score]
    s = csl_fast.scores(tracker, [score])[score].double()
    order = torch.argsort(-s, stable=True)[:12].tolist()
    assert [int(r[1]) for r in body] == order
    assert [int(r[0]) for r in body] == list(range(1, 13))
    for r, i in zip(body, order, strict=True):
        assert float(r[2]) == pytest.approx(float(s[i]), rel=1e-3), r
        truth = "clean"
        if samples.mislabeled[i] or samples.duplicate[i]:
            truth = "mislabeled" if samples.mislabeled[i] else "duplicate"
        assert r[-1].startswith(truth), (r, truth)


def _pct(line: str) -> float:
    return float(re.search(r"ms/step\s+([+-][0-9.]+)%", line)[1])


def _ms(line: str) -> float:
    return float(re.search(r"([0-9.]+) ms/step", line)[1])


def test_demo_report_numbers(tmp_path, capsys):
    """The demo's report and results.json against the saved run, recomputed: the AUROC
    table (csl_fast.evaluate), the flagged counts (csl_fast.detect) and the overhead."""
    from csl_fast import demo, detect

    out = tmp_path / "run"
    cfg = demo.DemoConfig(
        samples=200, epochs=4, pairs=4, hidden=64, overhead_rounds=1, top=5,
        out=str(out), threads=None, quiet=True,
    )  # fmt: skip
    results = demo.run(cfg)
    printed = capsys.readouterr().out
    tracker = csl_fast.CSLTracker.from_file(out / "tracker.csl")
    samples = RunSamples.load(out / "samples.npz", tracker.num_samples)
    scores = csl_fast.scores(tracker)
    want = _expected_aurocs(scores, samples)
    sections = _sections(out / "report" / "report.html")
    _assert_auroc_table(_section(sections, "Detection"), want)
    on_disk = json.loads((out / "results.json").read_text())
    for name, row in want.items():
        for kind, value in row.items():
            assert on_disk["auroc"][name][kind] == pytest.approx(value, abs=1e-9), (name, kind)

    det = detect.mislabeled(tracker, "csl")  # as the demo: every view of the rule
    flagged = det.flagged.numpy()
    bad = samples.mislabeled | samples.duplicate
    assert on_disk["flagged_mislabeled"]["count"] == int(flagged.sum())
    assert on_disk["flagged_mislabeled"]["corrupted"] == int((flagged & bad).sum())
    assert on_disk["flagged_mislabeled"]["rule"] == det.rule
    assert on_disk["flagged_mislabeled"]["estimated_count"] == det.estimated_count
    interval = on_disk["flagged_mislabeled"]["count_interval"]
    assert interval == (None if det.count_interval is None else list(det.count_interval))
    m = re.search(r"\): (\d+) samples; (\d+) of them corrupted", printed)
    assert m and (int(m[1]), int(m[2])) == (int(flagged.sum()), int((flagged & bad).sum()))
    # a conflicting pair's original keeps its true label: 183 "corrupted" of the demo are
    # 163 wrong labels, which is what the count estimates (audit helper-127)
    wrong = samples.labels != samples.true_labels
    assert on_disk["flagged_mislabeled"]["wrong_labels"] == int((flagged & wrong).sum())
    assert on_disk["flagged_mislabeled"]["true_wrong_labels"] == int(wrong.sum())
    if det.estimated_count is not None:
        assert f"true: {int(wrong.sum())} wrong labels, {int(bad.sum())} corrupted" in printed
    assert f"; {int((flagged & wrong).sum())} with a wrong label (precision" in printed

    overhead = results["overhead"]
    note = _section(sections, "Training-time overhead").splitlines()
    lines = {
        "plain": next(x for x in note if "plain F.cross_entropy" in x),
        "tracker": next(x for x in note if "CSLTracker" in x),
        "tracker+input_grads": next(x for x in note if "input-gradient" in x),
    }
    plain = overhead["ms_per_step"]["plain"]
    for variant, line in lines.items():
        ms = overhead["ms_per_step"][variant]
        assert _ms(line) == pytest.approx(ms, abs=0.006), (variant, line)
        if variant != "plain":
            # the percentage is the ratio of the two step times, not a separate figure
            assert _pct(line) == pytest.approx((ms / plain - 1) * 100, abs=0.06), line
    assert math.isfinite(plain) and plain > 0
    # what the setup note says of memorization follows the run (it said "the network
    # memorizes" after 4 epochs that fitted a fraction of the flips: audit helper-112)
    setup = _section(sections, "Demo setup")
    fitted = on_disk["flipped_labels_fitted"]
    assert ("did not memorize" in setup) == (fitted < 0.5), (fitted, setup)
    assert demo._memorized_text(0.95).startswith("\n(the network memorized the")
    # 78% was "did not memorize most flipped labels"
    assert demo._memorized_text(0.78).startswith("\n(the network memorized most, not all")
    assert demo._memorized_text(math.nan) == ""


def test_samples_files_of_the_wrong_kind_are_refused_in_one_line(tmp_path):
    """A scalar or a string array in samples.npz failed later in len() or
    torch.from_numpy, and 1-D images in the figure: tracebacks, exit 1, in the CLI."""
    from csl_fast.report import SamplesFileError

    n = 4
    bad = {
        "labels": np.array(3),
        "predicted": np.array(["a"] * n),
        "mislabeled": np.array(["no"] * n),
        "inputs": np.array([b"x"] * n),
        "images": np.zeros(n),
    }
    for name, value in bad.items():
        path = tmp_path / f"{name}.npz"
        fields = {"labels": np.arange(n), name: value, "format": np.asarray("csl_fast.samples/1")}
        np.savez(path, **fields)
        with pytest.raises(SamplesFileError, match=rf"{name}\.npz: RunSamples: {name} must be"):
            RunSamples.load(path, n)
    for images in (np.zeros((n, 8, 8)), np.zeros((n, 8, 8, 3))):
        assert RunSamples(labels=np.arange(n), images=images).num_samples == n


def test_empty_tracker_and_negative_top_are_refused(run, tmp_path):
    # an empty tracker said "score 'csl' was not recorded; available: []"; top=-3 listed
    # all but 3 samples as the top suspects
    with pytest.raises(ValueError, match="recorded no loss"):
        write_report(csl_fast.CSLTracker(10, 3), tmp_path / "empty")
    with pytest.raises(ValueError, match="top must be an int >= 0"):
        write_report(run[0], tmp_path / "neg", top=-3)


def test_wrong_arguments_are_named_before_anything_is_written(run, tmp_path):
    """A path or a scores dict failed on a missing attribute; labels without inputs were
    dropped without a word; a misspelled score left an empty folder; a file as out_dir
    gave a bare [Errno 17]."""
    tracker, samples = run
    tracker.save(tmp_path / "run.csl")
    with pytest.raises(TypeError, match=r"got str; load a saved one with csl_fast.load"):
        write_report(str(tmp_path / "run.csl"), tmp_path / "a")
    with pytest.raises(TypeError, match=r"got Scores \(the page reads the tracker's buffers"):
        write_report(csl_fast.scores(tracker), tmp_path / "a")
    labels = torch.as_tensor(samples.labels)
    with pytest.raises(ValueError, match=r"labels= are read with the inputs .* as samples="):
        write_report(tracker, tmp_path / "a", labels=labels)
    with pytest.raises(KeyError, match=r"write_report: score 'csll' was not recorded"):
        write_report(tracker, tmp_path / "a", score="csll")
    assert not (tmp_path / "a").exists()
    with pytest.raises(FileExistsError, match=r"write_report: out_dir .* is a file"):
        write_report(tracker, tmp_path / "run.csl")


def test_run_samples_refuse_values_that_would_change_meaning():
    # astype(bool) made NaN and 0.5 "mislabeled"; 0.5 labels became class 0 downstream
    from csl_fast.report import SamplesFileError

    n = 4
    for field, value, msg in (
        ("mislabeled", np.array([0.0, np.nan, 1.0, 0.0]), "mask of 0/1"),
        ("duplicate", np.full(n, 0.5), "mask of 0/1"),
        ("labels", np.array([0.0, 0.5, 1.0, 2.0]), "whole class numbers"),
        ("true_labels", np.array([0.0, np.nan, 1.0, 2.0]), "whole class numbers"),
        ("predicted", np.zeros((n, 2), dtype=int), "1-D"),
        # a sequence run's token labels: told where they go instead
        ("labels", np.zeros((n, 3), dtype=int), "1-D.*go to csl-fast --labels FILE"),
    ):
        with pytest.raises(SamplesFileError, match=msg):
            RunSamples(**{field: value})
    ok = RunSamples(labels=np.array([0.0, 2.0, 1.0, 1.0]), mislabeled=np.array([0, 1, 1, 0]))
    assert ok.mislabeled.tolist() == [False, True, True, False]
    # whole-number float labels are class numbers: kept as floats they were saved, and
    # rank, report and clean refused the folder ("labels must be integers")
    assert ok.labels.dtype == np.int64 and ok.labels.tolist() == [0, 2, 1, 1]
    with pytest.raises(SamplesFileError, match=r"must hold class numbers; it holds 1e\+20"):
        RunSamples(labels=np.array([0.0, 1e20]))
    # too few class names: the report mixed names and numbers ("given 4 ... predicted b")
    with pytest.raises(
        SamplesFileError, match="class_names has 3 names but predicted holds class 3"
    ):
        RunSamples(labels=np.arange(3), predicted=np.arange(1, 4), class_names=["a", "b", "c"])
    assert RunSamples(labels=np.array([-1, 2]), class_names=["a", "b", "c"]).class_name(2) == "c"


def test_true_labels_alone_are_the_ground_truth_everywhere(tmp_path):
    """With labels and true_labels but no mislabeled mask, the report's cleaning section
    counted the true labels while its ROC, its flagged-set make-up, csl-fast rank and clean
    said there was no ground truth."""
    samples = RunSamples(labels=np.array([0, 1, 2, 1]), true_labels=np.array([0, 2, 2, 1]))
    assert samples.has_truth and samples.mislabeled.tolist() == [False, True, False, False]
    given = RunSamples(
        labels=np.array([0, 1]), true_labels=np.array([0, 0]), mislabeled=np.array([0, 0])
    )
    assert given.mislabeled.tolist() == [False, False]  # a mask given is kept as given
    copies = RunSamples(
        labels=np.array([0, 1, 2]), true_labels=np.array([0, 2, 1]), duplicate=np.array([0, 0, 1])
    )
    assert copies.mislabeled.tolist() == [False, True, False]  # a duplicate's copy: no flip
    samples.save(tmp_path / "samples.npz")
    assert RunSamples.load(tmp_path / "samples.npz").mislabeled.tolist() == [0, 1, 0, 0]


def test_samples_are_saved_atomically(tmp_path, monkeypatch):
    """np.savez_compressed wrote the file in place: a save that failed part way left a
    truncated samples.npz, which blocked rank, clean and report on the run folder."""
    path = tmp_path / "samples.npz"
    RunSamples(labels=np.arange(5)).save(path)

    def fail(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", fail)
    with pytest.raises(OSError, match="save the samples"):
        RunSamples(labels=np.arange(5) + 1).save(path)
    monkeypatch.undo()
    assert RunSamples.load(path).labels.tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
    RunSamples(labels=np.arange(3)).save(tmp_path / "other")  # numpy's suffix, as before
    assert RunSamples.load(tmp_path / "other.npz").num_samples == 3


def test_detection_table_refuses_scores_of_another_run():
    samples = RunSamples(mislabeled=np.array([1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="3 entries, samples describe 5"):  # was IndexError
        detection_table({"csl": torch.zeros(3)}, samples)


def _one_class_tracker(n: int) -> csl_fast.CSLTracker:
    """Two epochs of a one-class run: every loss is 0."""
    tracker = csl_fast.CSLTracker(n, 1)
    for _ in range(2):
        csl_fast.accumulate(
            torch.randn(n, 1), torch.zeros(n, dtype=torch.long), torch.arange(n), tracker
        )
        tracker.end_epoch()
    return tracker


def test_single_class_run_reports_without_a_histogram(tmp_path):
    # with one class every loss is 0: np.percentile of no positive CSL raised IndexError,
    # and `csl-fast report` exited 1 with a traceback
    n = 12
    tracker = _one_class_tracker(n)
    path = write_report(tracker, tmp_path / "one", RunSamples(labels=np.zeros(n, dtype=int)))
    with open(path, encoding="utf-8") as f:
        html = f.read()
    caption = re.search(r"<h2>CSL histogram</h2>\s*<p class=cap>([^<]*)</p>", html)
    assert caption is not None and "every sample&#x27;s CSL is 0" in caption.group(1)
    assert not (tmp_path / "one" / "csl_histogram.png").exists()


def test_a_damaged_samples_file_says_how_to_go_on(tmp_path):
    # the message ended on the exception's class name ("...: ValueError"), and rank, report
    # and clean read RUN/samples.npz by default, so the run was blocked with no way out named
    from csl_fast.report import SamplesFileError

    garbage, foreign = tmp_path / "garbage.npz", tmp_path / "foreign.npz"
    garbage.write_bytes(b"not an npz file")
    np.savez(foreign, labels=np.arange(3))
    for path in (garbage, foreign):
        with pytest.raises(SamplesFileError, match=r"RunSamples\(\.\.\.\)\.save\(path\), or move"):
            RunSamples.load(path)
    with pytest.raises(SamplesFileError, match=r"\(no format tag\)"):
        RunSamples.load(foreign)
    # a tag of another version read "no format tag"
    later = tmp_path / "later.npz"
    np.savez(later, labels=np.arange(3), format=np.asarray("csl_fast.samples/2"))
    with pytest.raises(
        SamplesFileError, match=r"format 'csl_fast.samples/2', where .*newer csl_fast"
    ):
        RunSamples.load(later)


def test_top_beyond_the_run_and_top_zero(run, tmp_path):
    # top=100000 headed "Top 100000" over 160 samples; top=0 with images divided by zero
    # in the grid (ZeroDivisionError)
    from csl_fast import report

    tracker, samples = run
    n = tracker.num_samples
    with_images = RunSamples(labels=samples.labels, images=np.zeros((n, 4, 4)))
    html = Path(write_report(tracker, tmp_path / "big", with_images, top=100000)).read_text()
    grid = min(n, report.GRID_MAX)
    assert f"<h2>Top {grid} suspicious samples</h2>" in html and f"<h2>Top {n} by csl</h2>" in html
    html = Path(write_report(tracker, tmp_path / "zero", with_images, top=0)).read_text()
    assert "Not drawn: top = 0: no sample to show." in html
    # and an empty "Top 0" table
    assert "None listed: top = 0." in html and "<h2>Top 0 by" not in html


def test_truth_without_corrupted_samples_draws_no_empty_auroc_table(run, tmp_path):
    # masks with no corrupted sample drew a "Detection (AUROC)" table of definitions only
    tracker, samples = run
    n = tracker.num_samples
    clean = RunSamples(labels=samples.labels, mislabeled=np.zeros(n, dtype=bool))
    html = Path(write_report(tracker, tmp_path, clean)).read_text(encoding="utf-8")
    start = html.index("<h2>Detection (AUROC)</h2>")
    assert html[start:].startswith("<h2>Detection (AUROC)</h2><p class=cap>Not computed")
    assert "<th class=l>definition</th>" not in html
    # the ROC caption said the ground truth was missing, beside a samples file holding it
    assert "Not drawn: the ground truth (samples.npz) holds no corrupted sample" in html
    assert "Not drawn: needs the ground truth" not in html


def test_each_score_is_sorted_once_per_corruption_type(run, tmp_path, monkeypatch):
    """At N = 10 million the report took minutes: every score was sorted three times (its
    ROC curve, roc_auc_score for the legend, the AUROC table), 27 sorts of N values."""
    import sklearn.metrics

    tracker, samples = run
    calls = {"roc_curve": 0, "roc_auc_score": 0}
    for name in calls:
        real = getattr(sklearn.metrics, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(sklearn.metrics, name, counted)
    write_report(tracker, tmp_path, samples)
    # two corruption types, every default score has both positives and clean samples
    assert calls == {"roc_curve": 2 * len(csl_fast.scores(tracker)), "roc_auc_score": 0}


def test_a_failed_write_leaves_the_earlier_report_whole(run, tmp_path, monkeypatch):
    """The figures and the page were written in place: a full disk left a truncated PNG."""
    import os

    tracker, samples = run
    write_report(tracker, tmp_path, samples)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("data_map.png"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"write the report's figure to .*data_map.png.*disk is full"):
        write_report(tracker, tmp_path, samples)  # the file, and what to do (it said neither)
    assert (tmp_path / "data_map.png").read_bytes() == before["data_map.png"]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(before)  # no temporary left


def test_csl_nan_everywhere_is_not_called_a_perfect_fit(run, tmp_path):
    # the histogram's caption said "every sample's CSL is 0" of a CSL that is NaN everywhere
    tracker = copy.deepcopy(run[0])
    tracker.csl_sum.fill_(math.nan)
    html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    caption = re.search(r"<h2>CSL histogram</h2>\s*<p class=cap>([^<]*)</p>", html)
    assert caption is not None and "no sample has a finite CSL" in caption.group(1)


def test_histogram_of_one_value_spans_a_readable_range(tmp_path, monkeypatch):
    # N = 1: bins 1e-4 wide, tick labels printed over each other
    import matplotlib.axes

    from csl_fast.report_figures import _fig_histogram

    seen = []
    hist = matplotlib.axes.Axes.hist

    def spy(ax, x, bins, **kw):
        seen.append(np.asarray(bins))
        return hist(ax, x, bins, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    _fig_histogram(np.array([1.3696]), None, str(tmp_path / "h.png"))
    assert seen and seen[0][-1] / seen[0][0] >= 3.9


def test_samples_never_presented_are_counted_on_the_page(tmp_path):
    # 5 of 20 samples never trained on vanished from every figure and table without a word
    n = 20
    tracker = csl_fast.CSLTracker(n, 3)
    seen = torch.arange(15)
    csl_fast.accumulate(torch.randn(15, 3), seen % 3, seen, tracker)
    tracker.end_epoch()
    html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert "<b>5 of 20 samples were never presented</b>" in html
    full = csl_fast.CSLTracker(n, 3)
    csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), full)
    html = Path(write_report(full, tmp_path / "all")).read_text(encoding="utf-8")
    assert "never presented" not in html


def test_unequal_presentation_counts_are_said_on_the_page(tmp_path):
    # a loss NaN for half of the samples in one epoch: their CSL sums 2 presentations,
    # the others' 3, and the page said nothing (the rows were skipped as non-finite)
    n = 20
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    for epoch in range(3):
        logits = torch.randn(n, 3, generator=torch.Generator().manual_seed(epoch))
        if epoch == 1:
            logits[:10] = math.nan
        csl_fast.accumulate(logits, torch.arange(n) % 3, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert "The 20 trained samples were presented 2 to 3 times (10 fewer than 3)" in html
    assert "epoch 2 recorded a loss for only part of them" in html


def test_loss_curves_of_unequal_counts_pick_by_the_mean(tmp_path):
    # ranked by csl_mean (the default there), the figure's hardest were still by the sum:
    # the samples presented most often
    from csl_fast.report_figures import _fig_loss_curves

    n = 20
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    for epoch in range(3):
        for idx in (torch.arange(n), torch.arange(8)):  # samples 0-7 twice an epoch
            logits = torch.randn(len(idx), 3, generator=torch.Generator().manual_seed(epoch))
            csl_fast.accumulate(logits, idx % 3, idx, tracker)
        tracker.end_epoch()
    _, caption = _fig_loss_curves(tracker, None, str(tmp_path / "c.png"))
    assert caption.endswith("hardest by csl_mean")


def test_recall_counts_the_corrupted_samples_the_run_trained_on(tmp_path):
    """12 of 22 flipped samples never presented: the page's recall counted them (0.455 for
    a rule that found every flip it could score) beside a note that they cannot be
    flagged."""
    n, c = 60, 3
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[:6] = True
    flipped[40:46] = True  # never presented
    noisy = torch.where(flipped, (y + 1) % c, y)
    tracker = csl_fast.CSLTracker(n, c)
    seen = torch.arange(40)
    for _ in range(4):
        logits = torch.nn.functional.one_hot(y[seen], c) * 4.0 + torch.randn(40, c, generator=g)
        csl_fast.accumulate(logits, noisy[seen], seen, tracker)
        tracker.end_epoch()
    samples = RunSamples(labels=noisy, true_labels=y, mislabeled=flipped.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path, samples)).read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", " ", html)
    assert "recall (of the 6 corrupted the run trained on)" in text
    assert re.search(r"corrupted samples never presented \(no score, not flagged\)\s+6", text)
    assert "flipped samples whose suggestion is the true label (presented 6)" in text


def test_a_run_that_closed_no_epoch_says_so_on_the_page(tmp_path):
    tracker = csl_fast.CSLTracker(30, 3)
    for _ in range(3):
        csl_fast.accumulate(torch.randn(30, 3), torch.arange(30) % 3, torch.arange(30), tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert "<b>Warning:</b> The tracker closed no epoch although it presented a sample" in html


def test_a_tied_score_is_drawn_as_chance_on_the_log_roc_axis():
    """A score tied everywhere (AUROC 0.5) has the ROC (0, 0) -> (1, 1); on the log
    false-positive axis it ran flat along the top, as a perfect detector's would."""
    from csl_fast.report_figures import _on_log_axis

    floor = 0.5 / 178
    x, y = _on_log_axis(np.array([0.0, 1.0]), np.array([0.0, 1.0]), floor)
    assert x.min() == floor and np.all(np.diff(x) >= 0)
    left = x < 0.01
    np.testing.assert_allclose(y[left][1:], x[left][1:], rtol=1e-12)  # the diagonal
    # a vertical step stays a step: tpr 0.8 at fpr 0, drawn at the left edge
    x, y = _on_log_axis(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.8, 0.9, 1.0]), 0.01)
    assert (x[1], y[1]) == (0.01, 0.8) and y[2] == pytest.approx(0.8 + 0.1 * 0.01 / 0.5)


def test_roc_panel_counts_the_samples_its_curves_cover():
    """10 of 40 samples scored (2 of them flipped): the panel read "8 positives vs 32
    clean" and its log axis went down to 1/64, while every curve covers 2 and 8."""
    import matplotlib.pyplot as plt

    from csl_fast.report_figures import _roc_panel, roc_curves

    flipped = np.zeros(40, bool)
    flipped[[0, 5, 20, 25, 30, 31, 32, 33]] = True
    csl = torch.full((40,), math.nan)
    csl[:10] = torch.linspace(0, 1, 10)
    scores = {"csl": csl, "final_loss": csl * 2}
    samples = RunSamples(mislabeled=flipped)

    def panel(scores):
        fig, ax = plt.subplots()
        _roc_panel(ax, "mislabeled", roc_curves(scores, samples)["mislabeled"], "csl")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        plt.close(fig)
        return ax.get_title(), ax.get_xlim()[0], legend

    title, left, _ = panel(scores)
    assert title == "mislabeled: 2 positives vs 8 clean" and left == pytest.approx(0.5 / 8)
    # eval_csl over 6 of the 10 (2 flipped): each curve says what it covers
    scores["eval_csl"] = torch.where(torch.arange(40) < 6, csl, math.nan)
    title, left, legend = panel(scores)
    assert "scores cover different samples" in title and left == pytest.approx(0.5 / 8)
    assert any(t.startswith("csl (") and t.endswith("; 2 vs 8)") for t in legend)
    assert "eval_csl (0.500; 2 vs 4)" in legend


def _black_curves(monkeypatch) -> list[str]:
    """The legend labels of the thick black curves the report's ROC panels draw."""
    from csl_fast import report_figures

    drawn: list[str] = []
    panel = report_figures._roc_panel

    def spy(ax, *args):
        panel(ax, *args)
        drawn.extend(line.get_label() for line in ax.get_lines() if line.get_color() == "black")

    monkeypatch.setattr(report_figures, "_roc_panel", spy)
    return drawn


def _roc_caption(html) -> str:
    with open(html, encoding="utf-8") as f:
        page = f.read()
    return re.search(r"<p class=cap>([^<]*)\(<code>roc\.png</code>\)", page)[1]


def _definitions(html) -> dict[str, str]:
    return {row[0]: row[-1] for row in _section(_sections(html), "Detection")[1:]}


def test_roc_of_a_sequence_run_draws_and_defines_the_score_it_ranks_by(tmp_path, monkeypatch):
    # the thick black curve was the summed csl, which ranks long sequences first, beside a
    # histogram, flagged set and top table of csl_mean; the caption said csl_mean "lies
    # under its line", and the table defined both per presentation, not per token
    g = torch.Generator().manual_seed(0)
    n, t, v = 60, 16, 4
    target = torch.randint(0, v, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    target[torch.arange(t) >= lengths[:, None]] = -100
    bad = torch.zeros(n, dtype=torch.bool)
    bad[::6] = True
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    for _ in range(3):
        logits = torch.randn(n, t, v, generator=g)
        fit = torch.nn.functional.one_hot(target.clamp(min=0), v) * 4.0
        logits = torch.where(bad[:, None, None], logits, logits + fit)
        csl_fast.accumulate(logits.reshape(-1, v), target, torch.arange(n), tracker)
        tracker.end_epoch()
    drawn = _black_curves(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = write_report(tracker, tmp_path, RunSamples(mislabeled=bad.numpy()))
    assert drawn and all(label.startswith("csl_mean (") for label in drawn), drawn
    caption = _roc_caption(html)
    assert "Thick black: csl_mean, the score this report ranks by" in caption
    assert (
        "csl ranks otherwise: the trained samples have different numbers of supervised tokens"
        in caption
        and "lies under" not in caption
    )
    said = _definitions(html)
    assert "summed token losses" in said["csl"] and "supervised tokens" in said["csl_mean"]
    assert "presentations" not in said["csl_mean"]


def test_roc_of_a_row_run_draws_the_score_it_ranks_by(run, tmp_path, monkeypatch):
    tracker, samples = run  # every sample presented equally often: ranked by csl
    drawn = _black_curves(monkeypatch)
    html = write_report(tracker, tmp_path / "equal", samples)
    assert drawn and all(label.startswith("csl (") for label in drawn), drawn
    assert "csl_mean ranks as csl does here and lies under its line" in _roc_caption(html)
    said = _definitions(html)  # a row's definitions, as they were
    assert said["csl_mean"] == "tracker.csl_mean: CSL / number of presentations"
    # the bad half of the samples presented twice an epoch: ranked by csl_mean, drawn black
    g = torch.Generator().manual_seed(0)
    n, c = 40, 3
    target = torch.arange(n) % c
    bad = torch.zeros(n, dtype=torch.bool)
    bad[::5] = True
    unequal = csl_fast.CSLTracker(n, num_classes=c)
    for _ in range(3):
        for index in (torch.arange(n), torch.arange(n // 2)):
            logits = torch.randn(len(index), c, generator=g)
            logits += 3.0 * torch.nn.functional.one_hot(target[index], c) * ~bad[index, None]
            csl_fast.accumulate(logits, target[index], index, unequal)
        unequal.end_epoch()
    drawn.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = write_report(unequal, tmp_path / "unequal", RunSamples(mislabeled=bad.numpy()))
    assert drawn and all(label.startswith("csl_mean (") for label in drawn), drawn
    caption = _roc_caption(html)
    assert "Thick black: csl_mean" in caption and "numbers of presentations" in caption


def test_sequences_with_no_supervised_token_are_not_called_never_presented(tmp_path):
    # sequences presented every epoch with every token ignore_index were "never presented"
    # in the header and the flagged set's table: the tracker counts supervised tokens, and
    # cannot tell them from held-out ones
    g = torch.Generator().manual_seed(0)
    n, t, v = 40, 6, 4
    bad = np.zeros(n, bool)
    bad[[0, 10, 20, 30]] = True
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    for _ in range(3):
        target = torch.randint(0, v, (n, t), generator=g)
        target[:2] = -100  # samples 0 and 1: presented, nothing supervised
        logits = torch.randn(n, t, v, generator=g)
        fit = 4.0 * torch.nn.functional.one_hot(target.clamp(min=0), v)
        logits = torch.where(torch.from_numpy(bad)[:, None, None], logits, logits + fit)
        csl_fast.accumulate(logits.reshape(-1, v), target, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = write_report(tracker, tmp_path, RunSamples(mislabeled=bad))
    with open(html, encoding="utf-8") as f:
        page = f.read()
    assert (
        "<b>2 of 40 samples were never presented in training with a supervised token</b> "
        "(every token ignore_index, held out, or never reached: no recorded loss)" in page
    )
    rows = dict(_section(_sections(html), "What the flagged set is made of"))
    never = "corrupted samples never presented in training with a supervised token"
    assert rows[f"{never} (no score, not flagged)"] == "1"


def test_loss_curves_pick_a_class_the_run_trained_on(tmp_path):
    # class 2 holds most labels but none of its samples was trained on: the figure picked
    # it and said "too few samples with a CSL" beside 20 trained samples of class 0 and 1
    from csl_fast.report_figures import _fig_loss_curves

    n = 40
    labels = np.array([2] * 20 + [0, 1] * 10)
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    seen = torch.arange(20, n)
    for _ in range(2):
        csl_fast.accumulate(torch.randn(20, 3), torch.from_numpy(labels[20:]), seen, tracker)
        tracker.end_epoch()
    b64, caption = _fig_loss_curves(tracker, RunSamples(labels=labels), str(tmp_path / "l.png"))
    assert b64 is not None and caption.startswith("class 0; ")


def test_grid_titles_with_long_class_names_do_not_overlap(tmp_path, monkeypatch):
    # "given airplane_large, pred truck_or_lorry" on one 7-pt line ran into the
    # neighbouring panels' titles (unreadable)
    from csl_fast import report_figures

    boxes = []

    def spy(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes.extend(ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title())
        return "png"

    monkeypatch.setattr(report_figures, "_png", spy)
    n = 8
    names = ["automobile", "airplane_large", "truck_or_lorry_or_van"]
    samples = RunSamples(
        labels=np.arange(n) % 3,
        predicted=(np.arange(n) + 1) % 3,
        images=np.zeros((n, 4, 4)),
        class_names=names,
    )
    report_figures._fig_top_grid(np.arange(n), samples, np.zeros(n), str(tmp_path / "g.png"), n)
    assert len(boxes) == n
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(boxes))


def test_figures_print_class_names_as_given_and_no_unknown_prediction(tmp_path, monkeypatch):
    # "$30-$39" was set as maths (its $ gone) and a TeX-like name crashed the report, in the
    # image grid and in the loss curves' title and legend; every tile read "pred ?" where
    # the run saved no prediction
    import matplotlib.figure
    import matplotlib.text

    texts = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        texts.extend(t for t in fig.findobj(matplotlib.text.Text) if t.get_text())
        return savefig(fig, *args, **kw)  # (where the mathtext parser raised)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    n, names = 30, ["$30-$39", r"$\price$", "plain"]
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    for _ in range(2):
        csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), tracker)
        tracker.end_epoch()
    labels = np.arange(n) % 3
    samples = RunSamples(labels=labels, images=np.zeros((n, 4, 4)), class_names=names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(tracker, tmp_path, samples, top=3)
    assert texts and not any(t.get_parse_math() for t in texts)
    tiles = [t.get_text() for t in texts if t.get_text().startswith("#")]
    assert len(tiles) == 3 and not any("pred" in t for t in tiles)
    assert any(t.get_text().endswith("class $30-$39") for t in texts)  # the loss curves
    assert matplotlib.rcParams["text.parse_math"]  # (global state left as it was)


def test_loss_curves_tick_whole_epochs(tmp_path, monkeypatch):
    # two epochs were ticked 1.0, 1.2, ..., 2.0
    import matplotlib.figure

    from csl_fast.report_figures import _fig_loss_curves

    n = 30
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    for _ in range(2):
        csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), tracker)
        tracker.end_epoch()
    ticks = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        ticks.extend(t for t in ax.get_xticks() if lo <= t <= hi)
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    _fig_loss_curves(tracker, None, str(tmp_path / "l.png"))
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_loss_curves_leave_out_samples_never_presented(tmp_path, monkeypatch):
    # an unseen sample's CSL is 0, not NaN: the "easy" curves were unseen samples, all NaN
    # ("Mean of empty slice"), and the legend counted every sample
    import matplotlib.figure

    from csl_fast.report_figures import _fig_loss_curves

    n, seen = 40, 30
    tracker = csl_fast.CSLTracker(n, 3, history=True)
    for _ in range(3):
        idx = torch.arange(seen)
        csl_fast.accumulate(torch.randn(seen, 3), idx % 3, idx, tracker)
        tracker.end_epoch()
    lines = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        lines.extend((line.get_label(), line.get_ydata()) for line in fig.axes[0].get_lines())
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _fig_loss_curves(tracker, None, str(tmp_path / "l.png"))
    assert lines and all(np.isfinite(y).all() for _, y in lines)
    assert any(label.endswith(f"({seen})") for label, _ in lines), [x for x, _ in lines]


def test_image_grid_is_titled_with_the_score_that_ranks_it(run, tmp_path, monkeypatch):
    # --score aum ranked the grid by aum under the title "Most suspicious samples by CSL"
    import matplotlib.figure

    tracker, samples = run
    n = tracker.num_samples
    titles = []
    suptitle = matplotlib.figure.Figure.suptitle

    def spy(fig, text, **kw):
        titles.append(text)
        return suptitle(fig, text, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", spy)
    with_images = RunSamples(labels=samples.labels, images=np.zeros((n, 4, 4)))
    write_report(tracker, tmp_path, with_images, score="aum", top=4)
    assert titles == ["Most suspicious samples by aum"]


def test_csl_histogram_draws_every_sample_it_counts(tmp_path, monkeypatch):
    # the lowest 0.1% of CSLs lay left of the first bin: counted in the legend, not drawn;
    # CSLs of 0 (no place on a log axis) left without a word
    from csl_fast.report_figures import _fig_histogram

    drawn, labels = _histogram_spies(monkeypatch)
    csl = np.concatenate([[0.0, 0.0, 1e-5, 2e-5], np.geomspace(0.5, 20, 3000)])
    mis = np.zeros(csl.size, dtype=bool)
    mis[-30:] = True
    _fig_histogram(csl, RunSamples(mislabeled=mis), str(tmp_path / "h.png"))
    assert drawn == [csl.size - 2 - 30, 30]  # clean (the zeros left out), mislabeled
    assert labels == ["cumulative sample loss (CSL, log scale; 2 samples with CSL 0 not shown)"]


def _histogram_spies(monkeypatch) -> tuple[list[int], list[str]]:
    """The sample counts each ``hist`` call draws, and the x-axis labels set."""
    import matplotlib.axes

    drawn: list[int] = []
    labels: list[str] = []
    hist, set_xlabel = matplotlib.axes.Axes.hist, matplotlib.axes.Axes.set_xlabel

    def spy(ax, x, bins, **kw):
        drawn.append(int(np.histogram(x, bins)[0].sum()))
        return hist(ax, x, bins, **kw)

    def spy_label(ax, text, **kw):
        labels.append(text)
        return set_xlabel(ax, text, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", spy_label)
    return drawn, labels


@pytest.mark.parametrize("shift", [-3.0, 0.0])
def test_csl_histogram_draws_negative_csl(shift, tmp_path, monkeypatch):
    """A loss that can be negative (record_loss of a Gaussian NLL): all negative, the page
    said "every sample's CSL is 0: the model fitted every label"; of mixed signs, the
    negative samples left the log axis without a word."""
    from csl_fast.report_figures import _fig_histogram

    drawn, labels = _histogram_spies(monkeypatch)
    csl = np.linspace(-2.0, 2.0, 41) + shift  # 20 negative, one 0 and 20 positive at 0
    negative = int((csl < 0).sum())
    assert _fig_histogram(csl, None, str(tmp_path / "h.png")) is not None
    assert drawn == [csl.size]
    assert labels == [
        f"cumulative sample loss (CSL, linear scale: {negative} samples with a negative CSL, "
        "the loss can be < 0)"
    ]


def test_csl_histogram_shows_a_bin_of_one_sample(tmp_path, monkeypatch):
    """The log count axis began just under 1, so a small group's bins of one sample each
    were slivers at the bottom (10 mislabeled among 2,000)."""
    from csl_fast import report_figures

    bottoms = []

    def spy(fig, path):
        bottoms.append(fig.axes[0].get_ylim()[0])
        return "png"

    monkeypatch.setattr(report_figures, "_png", spy)
    csl = np.exp(np.random.default_rng(0).normal(0, 0.6, 2000))
    csl[:10] *= 12
    mis = np.zeros(csl.size, dtype=bool)
    mis[:10] = True
    report_figures._fig_histogram(csl, RunSamples(mislabeled=mis), str(tmp_path / "h.png"))
    assert bottoms and bottoms[0] <= 0.5  # a bar of height 1 spans a third of a decade


def test_a_merged_run_says_how_many_runs_it_holds(tmp_path):
    # csl_fast.merge of 2 runs of 3 epochs: the header said "3 epochs tracked" while each
    # CSL sums 6 presentations
    n = 12
    runs = []
    for seed in range(2):
        tracker = csl_fast.CSLTracker(n, 3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            csl_fast.accumulate(
                torch.randn(n, 3, generator=g), torch.arange(n) % 3, torch.arange(n), tracker
            )
            tracker.end_epoch()
        runs.append(tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(csl_fast.merge(runs), tmp_path)).read_text(encoding="utf-8")
    assert "3 classes, 2 runs merged (csl_fast.merge; " in html
    # (the most epochs and the most eval passes of any run: not one run's, said of 'the
    # longest', which had none)
    assert "up to 3 epochs and up to 0 eval passes in a run." in html
    # the runs' counts add up: a merge is named among the causes of unequal presentations
    part = csl_fast.CSLTracker(n, 3)
    csl_fast.accumulate(torch.randn(6, 3), torch.arange(6) % 3, torch.arange(6), part)
    part.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(csl_fast.merge([runs[0], part]), tmp_path / "b")).read_text()
    assert "the tracker merges 2 runs, which may have presented them unequally" in html


def test_score_label_csl_is_accepted_as_the_cli_accepts_it(tmp_path):
    # write_report(score="label_csl") raised "score 'label_csl' was not recorded in this
    # run" on a run that recorded it; csl-fast report --score label_csl draws the page
    n, labels = 12, 5
    tracker = csl_fast.CSLTracker(n, num_labels=labels)
    target = (torch.rand(n, labels, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    csl_fast.accumulate_bce(torch.randn(n, labels), target, torch.arange(n), tracker)
    tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path, score="label_csl")).read_text()
    assert "(sample, label) entries by per-label CSL" in html and "Top 12 by csl<" in html
    plain = csl_fast.CSLTracker(n, 3)
    csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), plain)
    with pytest.raises(KeyError, match="needs a tracker created with num_labels=L"):
        write_report(plain, tmp_path / "plain", score="label_csl")


def test_a_multi_label_run_is_described_by_its_labels(tmp_path):
    # an accumulate_bce run with num_labels=5 read "300 samples, ? classes"
    n, labels = 12, 5
    tracker = csl_fast.CSLTracker(n, num_labels=labels)
    target = (torch.rand(n, labels, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    csl_fast.accumulate_bce(torch.randn(n, labels), target, torch.arange(n), tracker)
    html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert f"<p>{n} samples, 5 labels (multi-label), 0 epochs tracked" in html


def test_data_map_of_one_class_has_no_negative_variability(tmp_path, monkeypatch):
    # one class: every variability 0, and the axis ran from -0.04 to 0.04
    import matplotlib.figure

    from csl_fast.report_figures import _fig_data_map

    n = 10
    tracker = _one_class_tracker(n)
    limits = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        limits.append(fig.axes[0].get_xlim())
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    _fig_data_map(tracker, None, str(tmp_path / "d.png"))
    lo, hi = limits[0]
    assert -0.002 < lo < 0 and hi >= 0.05


def test_data_map_of_one_epoch_says_why_every_variability_is_0(tmp_path):
    # one epoch put every point at variability 0 with no caption saying why
    from csl_fast.report_figures import _fig_data_map

    n = 12
    tracker = csl_fast.CSLTracker(n, 3)
    csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), tracker)
    tracker.end_epoch()
    _, caption = _fig_data_map(tracker, None, str(tmp_path / "d.png"))
    assert "Every variability is 0: each sample was presented once" in caption
    csl_fast.accumulate(torch.randn(n, 3), torch.arange(n) % 3, torch.arange(n), tracker)
    _, caption = _fig_data_map(tracker, None, str(tmp_path / "d.png"))
    assert "variability is 0" not in caption


def test_the_data_map_colours_by_training_that_went_on_after_the_eval_pass():
    # the last eval pass coloured the map however old it was (a pass before training)
    from csl_fast.report_figures import _agreement

    idx = torch.arange(4)
    tracker = csl_fast.CSLTracker(4, 3)
    wrong = torch.nn.functional.one_hot((idx + 1) % 3, 3).float() * 5
    csl_fast.score_epoch(torch.nn.Identity(), [(wrong, idx % 3, idx)], tracker)
    csl_fast.accumulate(wrong.roll(-1, 1), idx % 3, idx, tracker)  # right in training
    correct, caption = _agreement(tracker, np.ones(4, dtype=bool))
    assert correct.all() and caption.endswith("at its last training presentation.")


def test_log_axes_under_a_decade_are_ticked_in_plain_numbers(tmp_path, monkeypatch):
    """Counts of 1 to 4 and CSLs of 2 to 20 were ticked 2x10^0, 3x10^0, ...; the
    histograms of the report (the CSL histogram, the flagged set's) read 2, 3, 10, 20."""
    from csl_fast import detect, report_figures

    labels = []

    def spy(fig, path):
        fig.canvas.draw()
        ax = fig.axes[0]
        for axis in (ax.xaxis, ax.yaxis):
            ticks = axis.get_majorticklabels() + axis.get_minorticklabels()
            labels.extend(t.get_text() for t in ticks if t.get_text())
        return "png"

    monkeypatch.setattr(report_figures, "_png", spy)
    csl = np.random.default_rng(0).uniform(2.0, 20.0, 50)
    report_figures._fig_histogram(csl, None, str(tmp_path / "h.png"))
    from csl_fast.report_cleaning import _fig_flagging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(torch.from_numpy(csl))
    _fig_flagging(det, str(tmp_path / "f.png"))
    assert len(labels) >= 8
    assert all(re.fullmatch(r"[0-9.e+\-−]+", t) for t in labels), labels
    assert {"3", "10"} <= set(labels)


def test_a_large_top_draws_a_bounded_grid_and_lists_every_sample(run, tmp_path, monkeypatch):
    """--top 100000 drew one panel per sample and ran past minutes; the grid stops at
    GRID_MAX panels, and the table still lists the whole top."""
    from csl_fast import report

    tracker, samples = run
    n = tracker.num_samples
    drawn = []
    grid = report._fig_top_grid

    def spy(ranking, samples, s, path, k, score):
        drawn.append(k)
        return grid(ranking, samples, s, path, k, score)

    monkeypatch.setattr(report, "_fig_top_grid", spy)
    monkeypatch.setattr(report, "GRID_MAX", 3)
    with_images = RunSamples(labels=samples.labels, images=np.zeros((n, 4, 4)))
    page = Path(write_report(tracker, tmp_path, with_images, top=10)).read_text(encoding="utf-8")
    assert drawn == [3]
    assert "Top 3 suspicious samples" in page and "The first 3 of the top 10" in page
    assert page.count("<tr><td>", page.index("<h2>Top 10 by csl</h2>")) >= 10


@pytest.mark.parametrize("injected", [0, 10])
def test_csl_histogram_title_promises_only_the_groups_it_draws(tmp_path, monkeypatch, injected):
    # with the truth known and nothing corrupted it read "clean vs corrupted samples"
    from csl_fast import report_figures

    titles = []
    monkeypatch.setattr(
        report_figures, "_png", lambda fig, path: titles.append(fig.axes[0].get_title())
    )
    csl = np.exp(np.random.default_rng(1).normal(0, 0.6, 500))
    mis = np.zeros(csl.size, dtype=bool)
    mis[:injected] = True
    report_figures._fig_histogram(csl, RunSamples(mislabeled=mis), str(tmp_path / "h.png"))
    report_figures._fig_histogram(csl, None, str(tmp_path / "h.png"))
    expected = (
        "CSL: clean vs corrupted samples" if injected else "CSL distribution (no sample corrupted)"
    )
    assert titles == [expected, "CSL distribution"]


def test_loss_curves_of_sequences_rank_by_the_loss_per_token(tmp_path, monkeypatch):
    # summed CSL drew 8 short, badly fitted sequences as the easiest and long clean ones as
    # the hardest, where the histogram, rank and detect use the loss per token
    import matplotlib.figure

    from csl_fast.report_figures import _fig_loss_curves

    g = torch.Generator().manual_seed(0)
    n, v = 40, 5
    tracker = csl_fast.CSLTracker(n, history=True)
    for _ in range(3):
        for idx, length, margin in ((torch.arange(8), 2, -1.0), (torch.arange(8, n), 12, 2.0)):
            target = torch.randint(0, v, (idx.numel(), length), generator=g)
            logits = torch.randn(idx.numel(), v, length, generator=g)
            logits += margin * torch.nn.functional.one_hot(target, v).transpose(1, 2)
            csl_fast.accumulate(logits, target, idx, tracker)
        tracker.end_epoch()
    lines = {}
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        lines.update((line.get_label(), line.get_ydata()) for line in fig.axes[0].get_lines())
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    _, caption = _fig_loss_curves(tracker, None, str(tmp_path / "l.png"))
    assert caption.endswith("8 easiest and 8 hardest by CSL per token")
    bad = tracker.loss_history[:, :8].float().mean(1).numpy()
    np.testing.assert_allclose(
        lines["mean of the 8 highest by CSL per token (hard)"], bad, rtol=1e-5
    )


def test_corrupted_samples_without_a_score_draw_no_empty_roc_or_auroc_table(tmp_path):
    # the one flipped sample was never presented: the AUROC table was a column of n/a, roc.png
    # an empty panel titled "1 positives vs 19 clean", and numpy warned "All-NaN axis"
    n = 20
    y = torch.arange(n) % 3
    noisy = y.clone()
    noisy[7] = (y[7] + 1) % 3
    tracker = csl_fast.CSLTracker(n, 3)
    seen = torch.arange(6)
    for _ in range(3):
        csl_fast.accumulate(torch.randn(6, 3), noisy[seen], seen, tracker)
        tracker.end_epoch()
    samples = RunSamples(labels=noisy, true_labels=y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        html = Path(write_report(tracker, tmp_path, samples)).read_text(encoding="utf-8")
    assert [w for w in caught if "NaN" in str(w.message)] == []
    start = html.index("<h2>Detection (AUROC)</h2>")
    assert html[start:].startswith("<h2>Detection (AUROC)</h2><p class=cap>Not computed")
    assert "Not drawn: no score has a finite value for both a corrupted and a clean" in html
    assert not (tmp_path / "roc.png").exists()
    table = {"csl": {"mislabeled": math.nan}}
    assert format_detection_table(table).startswith("(no detection table")


def _run_with_an_eval_pass_over_a_quarter(n=40, c=3):
    """Training fits every label; eval passes score samples 0, 4, 8, ... only."""
    y = torch.arange(n) % c
    logits = torch.nn.functional.one_hot(y, c) * 5.0
    tracker = csl_fast.CSLTracker(n, c)
    held = torch.arange(0, n, 4)
    for _ in range(3):
        csl_fast.accumulate(logits, y, torch.arange(n), tracker)
        tracker.end_epoch()
        csl_fast.score_epoch(torch.nn.Identity(), [(logits[held], y[held], held)], tracker)
    return tracker, y, held


def test_data_map_colours_samples_no_eval_pass_scored_by_training(tmp_path, monkeypatch):
    # every sample no eval pass scored was drawn as "final model disagrees" (30 of 40 here)
    import matplotlib.figure

    from csl_fast.report_figures import _fig_data_map

    tracker, _, held = _run_with_an_eval_pass_over_a_quarter()
    legends = []
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        legends.extend(t.get_text() for t in fig.axes[0].get_legend().get_texts())
        return savefig(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    drawn = _fig_data_map(tracker, None, str(tmp_path / "d.png"))
    assert legends[:2] == ["model agrees with the label (40)", "model disagrees (0)"]
    caption = drawn[1]
    assert f"for the {held.numel()} samples an eval pass scored" in caption
    assert "last training presentation for the other 30" in caption


def test_auroc_rows_over_fewer_samples_say_so(run, tmp_path):
    # eval_csl of an eval pass over 10 of 40 samples: its AUROC row sat beside rows over
    # all 40 with no word
    tracker, y, _ = _run_with_an_eval_pass_over_a_quarter()
    noisy = y.clone()
    noisy[:8] = (y[:8] + 1) % 3
    samples = RunSamples(labels=noisy, true_labels=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path, samples)).read_text(encoding="utf-8")
    table = html[html.index("<h2>Detection (AUROC)</h2>") :]
    caption = table[table.index("<p class=cap>") : table.index("</p>")]
    assert "(those with a finite score, of 40): eval_csl over 10" in caption
    assert "the others over 40." in caption
    tracker, samples = run  # every score over every sample: nothing to say
    html = Path(write_report(tracker, tmp_path / "all", samples)).read_text(encoding="utf-8")
    assert "Scores cover different samples" not in html


@pytest.mark.parametrize("history", [True, False])
def test_a_run_that_diverged_says_which_epochs_recorded_no_loss(tmp_path, history):
    # NaN logits from epoch 4: the page said "6 epochs tracked", the loss curves stopped at
    # epoch 3 with no reason, and numpy printed "Mean of empty slice" for each lost epoch
    n, c = 30, 3
    y = torch.arange(n) % c
    tracker = csl_fast.CSLTracker(n, c, history=history)
    g = torch.Generator().manual_seed(0)
    for epoch in range(6):
        logits = torch.randn(n, c, generator=g) + 3 * torch.nn.functional.one_hot(y, c)
        if epoch >= 3:
            logits[:] = float("nan")
        csl_fast.accumulate(logits, y, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        html = Path(write_report(tracker, tmp_path, RunSamples(labels=y))).read_text()
    said = [str(w.message) for w in caught if "no finite training loss" in str(w.message)]
    assert not [w for w in caught if "empty slice" in str(w.message)]
    if not history:  # (fewer presentations than epochs may be epochs of subsets: no claim)
        assert not said
        return
    which = "epochs 4-6 of 6"
    assert len(said) == 1 and which in said[0]
    assert f"<b>Warning:</b> No finite training loss was recorded in {which}" in html


def test_a_tracker_of_sequences_gets_no_data_map_and_a_histogram_caption_per_token(tmp_path):
    # the data map drew the spread of p(label) across a sequence's tokens as variability over
    # training, and the histogram's caption spoke of CSL under a figure of CSL per token
    n, t, v = 20, 6, 5
    target = torch.zeros(n, t, dtype=torch.long)
    logits = torch.zeros(n, v, t)
    logits[:, 0, ::2] = 6.0  # half the tokens near-certain, half at chance, every epoch
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    for _ in range(3):
        csl_fast.accumulate(logits, target, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert not (tmp_path / "data_map.png").exists()
    assert "Not drawn: a tracker of sequences pools the probability" in html
    assert "CSL per token (csl_mean) of every training sequence" in html
    assert "Cumulative sample loss of every training sample" not in html


def test_a_loss_history_past_float16_is_no_divergence(tmp_path):
    # float16 history rows of inf (means past 65504, CSL exact) read as epochs without a
    # finite loss: "training diverged ... CSL covers only the other epochs", all false
    n = 16
    tracker = csl_fast.CSLTracker(n, history=True)
    for epoch in range(3):
        csl_fast.record_loss(torch.full((n,), 1e5 / (epoch + 1)), torch.arange(n), tracker)
        tracker.end_epoch()
    assert torch.isinf(tracker.loss_history[0]).all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        html = Path(write_report(tracker, tmp_path)).read_text()
    assert not [w for w in caught if "no finite training loss" in str(w.message)]
    assert "No finite training loss" not in html


@pytest.mark.parametrize("loss_only", [False, True])
def test_the_top_table_leaves_out_held_out_samples_as_the_detection_does(loss_only, tmp_path):
    # eval passes over trained samples 25-29 and held-out 30-39: the page's top table by
    # eval_csl numbered the held-out ones among the trained ones, which csl-fast rank, the
    # detection and the cleaning plan leave out
    from cli_calls import held_out_run

    held_out_run(tmp_path / "run.csl", loss_only)
    tracker = csl_fast.CSLTracker.from_file(tmp_path / "run.csl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(tracker, tmp_path / "r", score="eval_csl")).read_text()
    heading = re.search(r"<h2>Top (\d+) by eval_csl</h2>", html)
    table = html[heading.start() : html.index("</table>", heading.start())]
    listed = [int(i) for i in re.findall(r"<tr><td>\d+</td><td>(\d+)</td>", table)]
    assert heading.group(1) == "5" and sorted(listed) == [25, 26, 27, 28, 29], listed
    assert "10 samples with a score were never trained on" in html  # (the section's note)


def test_the_page_leaves_out_samples_recorded_without_softmax_statistics(tmp_path):
    # record_loss samples in a tracker accumulate also fed: the top table and the flagged
    # set ranked them by another loss's CSL, first
    from cli_calls import mixed_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        html = Path(write_report(mixed_run(), tmp_path / "r")).read_text()
    heading = re.search(r"<h2>Top (\d+) by csl</h2>", html)
    table = html[heading.start() : html.index("</table>", heading.start())]
    listed = [int(i) for i in re.findall(r"<tr><td>\d+</td><td>(\d+)</td>", table)]
    assert listed and max(listed) < 200, listed
    assert "they are not ranked or flagged" in " ".join(html.split())


def test_the_flagged_set_counts_the_classes_the_samples_labels_use(tmp_path):
    """8 outputs, labels 0..2: by num_classes the report flagged none of the 12 flips;
    the samples' labels count 3 classes in use, as csl-fast clean does."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Path(
            write_report(tracker, tmp_path, samples=RunSamples(labels=labels.numpy()))
        ).read_text(encoding="utf-8")
    assert "12 flagged." in page


def _page_of_flipped_run(tmp_path: Path, outputs: int, classes: int = 3) -> str:
    """The report of tests/flip_runs.py's run, its labels given by labels= (no samples.npz)."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(outputs, classes=classes)
    inputs = torch.arange(120.0)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_report(tracker, tmp_path, inputs=inputs, labels=labels)
    return Path(path).read_text(encoding="utf-8")


def test_the_flagged_set_counts_the_classes_of_the_labels_given(tmp_path):
    """labels= (csl-fast report --labels) was read by the duplicates section only: with
    no samples.npz the report counted the 8 outputs and flagged none of the 12 flips,
    where csl-fast clean given the same labels flagged them."""
    page = _page_of_flipped_run(tmp_path, 8)
    assert "12 flagged." in page
    # and the page reads them as the given labels (its top table had no given column)
    assert "<th>given</th>" in page


def test_two_classes_of_the_labels_given_the_plan_shown_is_the_default_drop(tmp_path):
    """The suggestions section counted samples.npz's labels only: given by labels=, two
    classes on 4 outputs were shown relabelled, where csl-fast clean drops."""
    page = _page_of_flipped_run(tmp_path, 4, classes=2)
    assert "does with the flagged set by default on this run: drop every flagged sample" in page
    assert re.search(r"drop \(policy drop\)</td><td>[1-9]", page)


def test_the_histogram_draws_the_mean_loss_where_presentation_counts_differ(tmp_path, monkeypatch):
    """The ranking, ROC, flagging and loss curves switch to csl_mean where the samples were
    presented unequally often; the histogram still drew summed CSL, partly the sampler's
    counts."""
    from csl_fast import report_figures

    n = 40
    tracker = csl_fast.CSLTracker(n, 3)
    for epoch in range(4):
        rows = torch.arange(n if epoch % 2 else n // 2)  # the first half twice as often
        csl_fast.accumulate(torch.randn(len(rows), 3), rows % 3, rows, tracker)
        tracker.end_epoch()
    labels = []

    def spy(fig, path):
        labels.append(fig.axes[0].get_xlabel())
        return "png"

    monkeypatch.setattr(report_figures, "_png", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(tracker, tmp_path)
    assert any(x.startswith("mean loss per presentation over training") for x in labels), labels
    labels.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_report(tracker, tmp_path, score="csl")  # asked for: the sum, as the ranking
    assert any(x.startswith("cumulative sample loss") for x in labels), labels


def test_labels_past_the_class_names_are_not_shown_as_given_but_do_not_crash(tmp_path):
    """samples.npz with 1 class name and csl-fast report --labels of 3 classes: adopting
    the labels as the given ones re-ran RunSamples' check, and the report died with an
    internal error."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(8)
    samples = RunSamples(inputs=np.arange(120.0)[:, None], class_names=["a"])
    shown = r"csl_fast.report: the labels given \(labels=.*are not shown"
    with pytest.warns(RuntimeWarning, match=shown) as w:
        page = Path(write_report(tracker, tmp_path, samples, labels=labels)).read_text("utf-8")
    assert "12 flagged." in page and [x.filename for x in w if "not shown" in str(x.message)] == [
        __file__
    ]


def test_the_histogram_caption_says_unequally_often_only_where_counts_differ(tmp_path, monkeypatch):
    """csl_mean asked for on equal counts was captioned "presented unequally often", and
    score="csl" on sequences still drew CSL per token."""
    from csl_fast import report_figures

    labels = []

    def spy(fig, path):
        labels.append(fig.axes[0].get_xlabel())
        return "png"

    monkeypatch.setattr(report_figures, "_png", spy)
    n = 30
    equal = csl_fast.CSLTracker(n, 3)
    sequences = csl_fast.CSLTracker(n, 3)
    for _ in range(2):
        rows = torch.arange(n)
        csl_fast.accumulate(torch.randn(n, 3), rows % 3, rows, equal)
        equal.end_epoch()
        target = torch.randint(0, 3, (n, 4))
        csl_fast.accumulate(torch.randn(n * 4, 3), target, rows, sequences)
        sequences.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Path(write_report(equal, tmp_path / "e", score="csl_mean")).read_text("utf-8")
        assert "Drawn per presentation" in page and "unequally often" not in page
        labels.clear()
        page = Path(write_report(sequences, tmp_path / "s", score="csl")).read_text("utf-8")
    assert labels[0].startswith("cumulative sample loss"), labels
    assert "it grows with a sequence" in page


def test_write_report_warnings_point_at_the_callers_line(tmp_path):
    """A wrapper around write_report once added a frame, and its warnings named
    csl_fast/report.py instead of the caller."""
    from flip_runs import flipped_run

    tracker, _ = flipped_run(8)  # 8 outputs, 3 used, no labels: nothing flagged
    with pytest.warns(csl_fast.detect.DetectionWarning) as said:
        write_report(tracker, tmp_path)
    assert said and {w.filename for w in said} == {__file__}
