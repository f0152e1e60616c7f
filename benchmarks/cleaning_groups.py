"""Conflicting duplicate groups in the cleaning plan, measured on the demo (issue 14).

For each demo seed: ``csl-fast demo``'s setup exactly (scikit-learn's digits, 10% flipped
labels, 20 conflicting-label duplicate pairs, :func:`csl_fast.demo.inject`; MLP
64-512-512-10, Adam lr 3e-3, batch 128, 80 epochs, the demo's tracked training), the
default rule's flagged set (``detect.mislabeled(tracker, "csl")``), then three plans:

- ``groups``: ``csl_fast.clean(tracker, detection=det, inputs=x, labels=y)``, what the
  demo does: in each conflicting group the member carrying the group's label (the label
  the network preferred, :mod:`csl_fast.cleaning_groups`) is kept, the others relabelled;
- ``previous``: ``csl_fast.clean(tracker, detection=det)``: the flagged set alone, each
  member with its own suggestion (the plan before the groups);
- ``drop copies``: ``groups`` with every member of a conflicting group dropped instead.

Reported: how many injected pairs the ``previous`` plan swaps (both members relabelled,
each to the other's given label), how many groups' label is the true one, and the
clean-test accuracy (the 360 held-out digits) of one retraining on each plan's cleaned
data for each training seed (model initialisation and batch order; training seed = demo
seed is the demo's own retraining).

    python benchmarks/cleaning_groups.py [--seeds 0 1] [--train-seeds 0 1 2] [--out PATH]

20 trainings, one thread: about 6 min on a shared 2-core CPU. Results:
``benchmarks/results/cleaning_groups.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from run_meta import add_force, at_least_one, refuse_overwrite, results_files, write_results  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast import detect  # noqa: E402
from csl_fast.demo import DemoConfig, inject, load_digits, load_held_out  # noqa: E402
from csl_fast.train import mlp, predict, train  # noqa: E402

PLANS = ("groups", "previous", "drop copies")


def _plans(tracker, det, x, y) -> dict[str, csl_fast.cleaning.CleaningPlan]:
    groups = csl_fast.clean(tracker, detection=det, inputs=x, labels=y)
    previous = csl_fast.clean(tracker, detection=det)
    members = torch.zeros(groups.num_samples, dtype=torch.bool)
    if groups.duplicates is not None:
        for g in groups.duplicates.groups:
            members[g] = True
    in_group = members[groups.index]
    drop = dataclasses.replace(
        groups, relabel=groups.relabel & ~in_group, keep=groups.keep & ~in_group
    )
    return {"groups": groups, "previous": previous, "drop copies": drop}


def _swapped_pairs(plan, pairs: list[list[int]], y: torch.Tensor) -> int:
    """Pairs whose two members the plan relabels each to the other's given label."""
    keep, labels = plan.apply(y)
    new = torch.full_like(y, -1)
    new[keep] = labels
    return sum(1 for a, b in pairs if new[a] == y[b] and new[b] == y[a] and bool(y[a] != y[b]))


def run_one(seed: int, train_seeds: list[int], epochs: int) -> dict:
    cfg = DemoConfig(seed=seed, epochs=epochs)
    torch.set_num_threads(1)
    x, y_clean, _ = load_digits(cfg.samples, seed)
    x_test, y_test = load_held_out(cfg.samples, seed)
    data = inject(x, y_clean, cfg.noise, cfg.pairs, seed, 10)
    x, y, truth = data["x"], data["y"], data["true_labels"]
    hidden = (cfg.hidden, cfg.hidden)
    train_kwargs = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size}
    t0 = time.perf_counter()
    tracker = csl_fast.CSLTracker(len(y), 10, history=True)
    train(
        mlp(64, 10, hidden, seed=seed),
        x,
        y,
        optimizer="adam",
        tracker=tracker,
        input_grads=True,
        eval_each_epoch=True,
        seed=seed,
        **train_kwargs,
    )
    det = detect.mislabeled(tracker, "csl")
    plans = _plans(tracker, det, x, y)
    dup = plans["groups"].duplicates
    pairs = [g for g in dup.groups if len(g) == 2] if dup is not None else []
    gplan = plans["groups"]
    kept = gplan.kept
    row = {
        "seed": seed,
        "epochs": epochs,
        "test_size": len(y_test),
        "groups": len(dup.groups) if dup is not None else 0,
        "group_label_true": int((gplan.suggested_label[kept] == truth[gplan.index[kept]]).sum()),
        "previous_swapped_pairs": _swapped_pairs(plans["previous"], pairs, y),
        "rows": {name: len(p) for name, p in plans.items()},
        "accuracy": {name: [] for name in PLANS},
    }
    for ts in train_seeds:
        for name in PLANS:
            keep, labels = plans[name].apply(y)
            model = mlp(64, 10, hidden, seed=ts)
            train(model, x[keep], labels, optimizer="adam", seed=ts, **train_kwargs)
            acc = float((predict(model, x_test).argmax(1) == y_test).float().mean())
            row["accuracy"][name].append(acc)
            print(f"seed {seed} train seed {ts} {name}: {acc:.3f}", file=sys.stderr, flush=True)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _markdown(rows: list[dict], meta: dict, train_seeds: list[int]) -> str:
    lines = [
        "# Conflicting duplicate groups in the cleaning plan (demo)",
        "",
        f"{meta['date']}, {meta['machine']}, commit {meta['commit']}; "
        "`python benchmarks/cleaning_groups.py` (module doc: the setup and the three plans).",
        "",
        "| demo seed | conflicting groups | group label = true label | pairs the previous "
        "plan swaps |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['groups']} | {r['group_label_true']} of {r['groups']} | "
            f"{r['previous_swapped_pairs']} |"
        )
    lines += [
        "",
        f"Clean-test accuracy after one retraining (training seeds {train_seeds}; "
        f"{rows[0]['test_size']} held-out digits; {rows[0]['epochs']} epochs):",
        "",
        "| demo seed | " + " | ".join(PLANS) + " |",
        "|---|" + "---|" * len(PLANS),
    ]
    for r in rows:
        cells = [" / ".join(f"{a:.3f}" for a in r["accuracy"][n]) for n in PLANS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    means = [statistics.mean(a for r in rows for a in r["accuracy"][n]) for n in PLANS]
    lines.append("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="demo seeds")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--epochs", type=at_least_one, default=DemoConfig.epochs, help="a smoke test: 2"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cleaning_groups"))
    add_force(ap)
    args = ap.parse_args(argv)
    refuse_overwrite(ap, args.force, *results_files(args.out))
    rows = []
    for seed in args.seeds:
        row = run_one(seed, args.train_seeds, args.epochs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(write_results(args.out, rows, lambda r, m: _markdown(r, m, args.train_seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
