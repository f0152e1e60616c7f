"""csl_fast.demo: its settings checked where the library takes them, its run folder."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from csl_fast import demo
from csl_fast.cli import EXIT_USAGE, main


@pytest.mark.parametrize(
    "settings, option, match",
    [
        # trained on the 1,797 digits while results.json said 5000
        ({"samples": 5000}, "samples", r"in \[50, 1797\] \(digits has 1797 samples\)"),
        ({"samples": 49}, "samples", r"in \[50, 1797\]"),
        ({"noise": 0.6}, "noise", r"fraction in \[0, 0.5\]"),
        ({"noise": 1.5}, "noise", r"fraction in \[0, 0.5\], got 1.5"),  # (said [0, 1])
        ({"epochs": 0}, "epochs", "must be an int >= 1, got 0"),
        ({"overhead_rounds": -1}, "overhead_rounds", "must be an int >= 0"),
        ({"threads": 0}, "threads", "must be an int >= 1"),
        # int(0.29 * 100) is 28, flip_labels flips 29: 36 pairs passed the check, then
        # duplicate_pairs raised after the corruption, a traceback from the CLI
        ({"samples": 100, "noise": 0.29, "pairs": 36}, "pairs", "among the 71 samples"),
        ({"seed": -1}, "seed", r"\[0, 2\*\*63\)"),
        ({"lr": 0.0}, "lr", "positive number"),
        ({"lr": float("nan")}, "lr", "positive number"),
    ],
)
def test_settings_the_demo_cannot_run_with_are_refused(settings, option, match):
    with pytest.raises(demo.DemoConfigError, match=match) as err:
        demo.DemoConfig(**settings)
    assert err.value.option == option
    assert str(err.value).startswith(f"csl_fast.demo.DemoConfig: {option}: ")


def test_the_largest_pairs_that_fit_are_taken():
    assert demo.DemoConfig(samples=100, noise=0.29, pairs=35).pairs == 35


@pytest.mark.parametrize("name", ["samples", "epochs", "hidden", "batch_size", "top", "pairs"])
def test_counts_are_checked_by_name(name):
    with pytest.raises(demo.DemoConfigError, match=f"DemoConfig: {name}: must be an int"):
        demo.DemoConfig(**{name: -1})
    with pytest.raises(TypeError, match=f"DemoConfig: {name} must be an int, got float"):
        demo.DemoConfig(**{name: 200.0})


def test_the_cli_says_the_library_check_with_the_option_name(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["demo", "--samples", "100", "--noise", "0.29", "--pairs", "36", "--out", str(out)])
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--pairs: 36: 72 samples do not fit among the 71 samples" in err, err
    assert "internal error" not in err and not out.exists()


@pytest.mark.parametrize(
    "args, match",
    [((0,), r"samples .*, got 0"), ((-1,), "samples .*, got -1"), ((100, -1), "seed .*, got -1")],
)
def test_load_digits_refuses_sizes_it_cannot_take(args, match):
    # NumPy's "cannot reshape array of size 0", "negative dimensions"
    with pytest.raises(ValueError, match=rf"load_digits: {match}"):
        demo.load_digits(*args)


def test_load_digits_subset_and_its_complement():
    x, y, images = demo.load_digits(100, seed=3)
    x_out, y_out = demo.load_held_out(100, seed=3)
    assert x.shape == (100, 64) and images.shape == (100, 8, 8) and x_out.shape == (1697, 64)
    assert np.bincount(np.r_[y.numpy(), y_out.numpy()], minlength=10).sum() == 1797


def _tiny(out, **kw):
    settings = dict(samples=50, epochs=1, hidden=4, pairs=1, overhead_rounds=0, quiet=True)
    return demo.DemoConfig(out=str(out), **{**settings, **kw})


def test_run_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run(_tiny(tmp_path / "run", threads=1, report=False))
        assert torch.get_num_threads() == 2  # was left at the demo's 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["report.html", "roc.png"])
def test_a_folder_where_a_report_file_goes_is_refused_before_training(tmp_path, name):
    # found after training, cleaning and retraining, with no results.json
    out = tmp_path / "run"
    (out / "report" / name).mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=f"writes report/{name} in"):
        demo.run(_tiny(out))
    assert os.listdir(out) == ["report"]


def test_a_file_where_the_report_folder_goes_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report").write_text("")
    with pytest.raises(NotADirectoryError, match=r"writes its report into the folder.*--no-report"):
        demo.run(_tiny(out))
    assert sorted(os.listdir(out)) == ["report"]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"noise": "0.1"}, r"noise must be a fraction in \[0, 0.5\], got str"),  # (said [0, 1])
        ({"lr": "0.1"}, "lr must be a number, got str"),  # (a DemoConfigError)
        ({"lr": True}, "lr must be a number, got bool"),  # (trained at lr 1)
        ({"report": "no"}, "report must be True or False"),  # (truthy: the report was written)
        ({"quiet": "no"}, "quiet must be True or False"),
        ({"out": 5}, "out must be a folder path, got int"),  # (failed inside run())
        ({"device": 5}, "device must be a str or torch.device, got int"),
    ],
)
def test_settings_of_the_wrong_type_are_type_errors(settings, match):
    with pytest.raises(TypeError, match=match):
        demo.DemoConfig(**settings)


def test_a_run_stopped_after_cleaning_leaves_the_earlier_runs_files_together(tmp_path, monkeypatch):
    # clean.csv was written before retraining: a run stopped there left its plan beside the
    # earlier run's tracker and samples, its indices all valid for them
    out = tmp_path / "run"
    demo.run(_tiny(out, report=False))
    before = {
        name: (out / name).read_bytes() for name in ("tracker.csl", "samples.npz", "clean.csv")
    }

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "retrain_gain", stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run(_tiny(out, report=False, samples=60, seed=3))
    assert {name: (out / name).read_bytes() for name in before} == before
