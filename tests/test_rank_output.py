"""``csl-fast rank``'s CSV and JSON are written a chunk of rows at a time from columns:
the same bytes as the per-row formatting of the whole list of rows they replaced."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast import cli_commands as cc
from csl_fast.report import RunSamples
from csl_fast.tracker import CSLTracker


def _old_csv(rows, columns):  # the per-row formatting the chunked writer replaced
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        out = []
        for c in columns:
            v = r[c]
            if v is None:
                out.append("")
            elif isinstance(v, bool):
                out.append("1" if v else "0")
            elif c == "score":
                out.append(repr(v))
            elif isinstance(v, list):
                out.append(" ".join("" if x is None else str(x) for x in v))
            else:
                out.append(str(v))
        w.writerow(out)
    return buf.getvalue()


def _old_field(arr, i):
    v = arr[i]
    v = v.reshape(-1).tolist() if v.ndim else v.tolist()
    if isinstance(v, list):
        return [None if isinstance(x, float) and math.isnan(x) else x for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def _tracker(n, seed=0):
    t = CSLTracker(n, 3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        logits = torch.randn(n, 3, generator=g)
        target = torch.randint(0, 3, (n,), generator=g)
        csl_fast.accumulate(logits, target, torch.arange(n), t)
        t.end_epoch()
    return t


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
@pytest.mark.parametrize("labels_kind", ["samples", "floats", "rows"])
def test_chunked_csv_and_json_equal_the_per_row_formatting(monkeypatch, chunk, labels_kind):
    monkeypatch.setattr(cc, "RANK_CHUNK", chunk)
    n = 40
    t = _tracker(n)
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.integers(0, 3, (n, 2)).astype(np.float32))
    samples = RunSamples(
        labels=rng.integers(0, 3, n), mislabeled=rng.random(n) < 0.3, predicted=None
    )
    labels = None
    if labels_kind == "floats":  # a regression's targets, with a NaN
        labels = torch.from_numpy(rng.random(n))
        labels[3] = float("nan")
    elif labels_kind == "rows":  # a multi-label run's rows
        labels = torch.from_numpy(rng.integers(0, 2, (n, 3)))
    dup_labels = None if labels_kind == "floats" else labels
    table, dup, det = cc._rank(t, samples, "csl", 1000, inputs, dup_labels)
    rows = table.rows()
    # the rows are the ones the per-row code built
    values = det.scores.double()
    ids = None
    from csl_fast import duplicate_groups

    ids = duplicate_groups.group_ids(inputs)
    flagged = det.flagged | dup.flagged
    lab = samples.labels if dup_labels is None else dup_labels
    want = [
        {
            "rank": r + 1,
            "index": i,
            "score": float(values[i]),
            "label": _old_field(lab, i),
            "predicted": None,
            "flagged": bool(flagged[i]),
            "mislabeled": _old_field(samples.mislabeled, i),
            "duplicate": None,
            "group": None if ids[i] < 0 else int(ids[i]),
        }
        for r, i in enumerate(det.ranked[:1000].tolist())
    ]
    assert rows == want
    assert [type(v) for r in rows for v in r.values()] == [
        type(v) for r in want for v in r.values()
    ]
    f = io.StringIO()
    cc._write_csv(table, f)
    assert f.getvalue() == _old_csv(want, cc.CSV_COLUMNS)
    payload = {"run": "x", "note": "n", "count_interval": [1, 2], "warning": None}
    f = io.StringIO()
    cc._write_json(table, payload, f)
    assert f.getvalue() == json.dumps({**payload, "rows": want}, indent=2) + "\n"


def test_an_empty_ranking_and_label_csl_entries_write_the_same_bytes(monkeypatch):
    monkeypatch.setattr(cc, "RANK_CHUNK", 3)
    empty = cc._RankTable(cc.CSV_COLUMNS, {}, 0)
    f = io.StringIO()
    cc._write_json(empty, {"run": "x"}, f)
    assert f.getvalue() == json.dumps({"run": "x", "rows": []}, indent=2) + "\n"
    f = io.StringIO()
    cc._write_csv(empty, f)
    assert f.getvalue() == _old_csv([], cc.CSV_COLUMNS)
    # non-finite values as json.dumps writes them
    table = cc._RankTable(
        ("rank", "index", "score", "flagged", "group"),
        {
            "index": np.arange(4),
            "score": np.array([np.inf, 1.5, -np.inf, np.nan]),
            "flagged": np.array([True, False, True, False]),
            "group": np.array([-1, 0, 2, -1]),
        },
        4,
    )
    rows = table.rows()
    f = io.StringIO()
    cc._write_json(table, {}, f)
    assert f.getvalue() == json.dumps({"rows": rows}, indent=2) + "\n"
    f = io.StringIO()
    cc._write_csv(table, f)
    assert f.getvalue() == _old_csv(rows, table.columns)


def test_the_progress_bar_stays_out_of_an_output_on_stderr(tmp_path, monkeypatch, capfd):
    """`rank --csv -o /dev/stderr` of a long ranking wrote the bar into the CSV's header
    line; to a file, the bar still shows on stderr."""
    from csl_fast.cli import main

    path = tmp_path / "run.csl"
    _tracker(40).save(path)
    monkeypatch.setattr(cc, "RANK_PROGRESS_ROWS", 10)  # (stands in for 200k rows)
    assert main(["rank", str(path), "--csv", "--top", "40", "-o", "/dev/stderr"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "rows/s" not in err
    table = list(csv.reader(io.StringIO(err[err.index("rank,index") :])))
    assert len(table) == 41
    assert main(["rank", str(path), "--csv", "--top", "40", "-o", str(tmp_path / "r.csv")]) == 0
    assert "rank: " in capfd.readouterr().err and "\r" not in (tmp_path / "r.csv").read_text()
