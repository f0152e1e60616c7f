"""What the default rule flags on real images: the flagged MNIST samples, drawn.

Reads the cached runs of ``benchmarks/flagging.py --regimes mnist-mlp mnist-lenet`` (train
them first), runs :func:`csl_fast.detect.mislabeled` with its default rule on each
tracker, and draws the flagged images, most suspicious first, each titled with its
dataset index, its given label, the class the tracker suggests instead
(:meth:`csl_fast.CSLTracker.suggestions`) and, for labels the benchmark flipped, ``flip``.
On a run with no flipped labels, whatever is flagged is what the network found hardest to
fit in MNIST itself.

    python benchmarks/flagging_gallery.py    # writes docs/flagged-mnist.png
    python benchmarks/flagging_gallery.py --runs mnist-mlp-0.005-4 --out /tmp/x.png
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mnist_data
import numpy as np
from flagging import stats_of, tracker_of  # puts this checkout's csl_fast first on the path
from run_meta import add_force, refuse_overwrite

from csl_fast import detect

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: the clean runs (no flipped label) of both MNIST regimes, seed 4
RUNS = ("mnist-lenet-0-4", "mnist-mlp-0-4")
#: images drawn per run (most suspicious first)
PER_RUN = 30
COLUMNS = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="+", default=list(RUNS))
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "csl_fast_flagging"))
    p.add_argument("--out", default=str(DOCS / "flagged-mnist.png"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.out)
    x, _, _, _ = mnist_data.load()
    panels = []
    for run in args.runs:
        path = Path(args.cache) / f"{run}.npz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: python benchmarks/flagging.py --regimes ...")
        tracker = tracker_of(stats_of(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning is summarised in the panel title
            det = detect.mislabeled(tracker)
        suggested, _ = tracker.suggestions()
        z = np.load(path)
        shown = det.indices[:PER_RUN].tolist()
        caveat = det.diagnostics.get("count")
        title = (
            f"{run}: {len(det)} of {det.scores.numel()} flagged, "
            f"{int(z['flipped'].sum())} labels flipped" + (f" ({caveat})" if caveat else "")
        )
        panels.append((title, shown, z["labels"], suggested.numpy(), z["flipped"]))
    rows = sum(math.ceil(len(p[1]) / COLUMNS) for p in panels)
    fig = plt.figure(figsize=(COLUMNS * 1.1, rows * 1.25 + 0.5 * len(panels)))
    figs = fig.subfigures(
        len(panels), 1, height_ratios=[math.ceil(len(p[1]) / COLUMNS) for p in panels]
    )
    for sub, (title, shown, labels, suggested, flipped) in zip(
        np.atleast_1d(figs), panels, strict=True
    ):
        sub.suptitle(title, fontsize=10)
        axes = sub.subplots(math.ceil(len(shown) / COLUMNS), COLUMNS, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, shown, strict=False):
            ax.imshow(x[i].view(28, 28).numpy(), cmap="gray_r")
            flip = " flip" if flipped[i] else ""
            ax.set_title(f"{i}: {labels[i]} -> {suggested[i]}{flip}", fontsize=7)
    fig.savefig(args.out, dpi=80, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
