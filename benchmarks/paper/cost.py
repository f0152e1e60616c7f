"""Measured wall-clock cost of each method, relative to training with CSL.

The paper's "10,000x faster" is FLOP accounting (stability memorization trains thousands
of models; CSL trains one). Here every method is timed on the same data and recipe
(10% flipped labels, one seed): plain training with ``F.cross_entropy``, training with
``csl_fast.accumulate`` into a plain CSL buffer, with the full tracker, plus input
gradients, plus eval passes, and the baselines. Stability memorization is timed on
``--mem-models-timed`` models and scaled to ``--mem-models`` (the JSON keeps both, and
the measured total from memorization.py when its results exist and it ran the same
setup).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from common import (
    Config,
    config_from,
    config_line,
    load_data,
    model_factory,
    parse_args,
    parser,
    results_stem,
    write_results,
)

import csl_fast
from csl_fast import corrupt
from csl_fast.baselines import (
    CurvatureAccumulator,
    confident_learning,
    ssft,
    stability_memorization,
)
from csl_fast.train import train

NOISE = 0.1  # flipped labels, as memorization.py's --noise
#: Config fields that do not change the cost of a memorization model's training.
_NOT_COST = ("seeds", "curv_every", "curv_probes", "curv_h", "cl_folds")


def csl_only(model, x, y, cfg, seed) -> float:
    """``train``'s loop with ``accumulate`` into a plain [N] buffer (CSL + count only)."""
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    csl = torch.zeros(x.shape[0], device=x.device)
    count = torch.zeros(x.shape[0], device=x.device)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        for s in range(0, x.shape[0], cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            loss = csl_fast.accumulate(model(x[idx]), y[idx], idx, csl, count=count)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def memorization_measured(cfg: Config, data: dict, base: float) -> tuple[dict, list[str]]:
    """memorization.py's measured total (``data``, its results JSON) and the report's
    lines on it: set against this run's CSL time (``base``) only when both ran the same
    setup. (It was compared whatever that run's dataset, epochs or noise were.)"""
    measured = {"m": data["mem_models"], "seconds": data["seconds"]["stability_memorization"]}
    theirs = {**data["config"], "noise": data["noise"]}
    ours = {**asdict(cfg), "hidden": list(cfg.hidden), "noise": NOISE}
    differ = [
        f"{k} {theirs.get(k)!r} there, {v!r} here"
        for k, v in ours.items()
        if k not in _NOT_COST and theirs.get(k) != v
    ]
    measured["same_setup"] = not differ
    if differ:
        return measured, [
            "",
            f"memorization.py's m = {measured['m']} models took {measured['seconds']:.0f}s "
            f"on another setup ({'; '.join(differ)}): not compared with this run; rerun "
            "memorization.py with this run's settings (--noise 0.1 --out "
            "memorization-noise10) and pass cost.py --memorization memorization-noise10 to "
            "compare.",
        ]
    return measured, [
        "",
        f"Measured in memorization.py: m = {measured['m']} models took "
        f"{measured['seconds']:.0f}s = {measured['seconds'] / base:.0f}x the CSL run.",
    ]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mem-models", type=int, default=100)
    p.add_argument("--mem-models-timed", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="repeats of the training variants")
    p.add_argument(
        "--memorization",
        default="memorization",
        metavar="STEM",
        help="the memorization.py results (in results/) whose measured total is set beside "
        "this run's, when they ran the same setup: `memorization.py --noise 0.1 --out "
        "memorization-noise10` is this run's (default: memorization, on clean labels)",
    )
    args = parse_args(p, "cost")
    cfg = config_from(args)
    seed = cfg.seeds[0]
    x, y, c = load_data(cfg)
    y, _ = corrupt.flip_labels(y, NOISE, num_classes=c, seed=seed)
    make = model_factory(cfg, x, c)
    kw = cfg.train_kwargs()
    t: dict[str, float] = {}

    def best(name, fn):
        vals = [fn() for _ in range(args.repeats)]
        t[name] = min(vals)
        print(f"{name}: {t[name]:.2f}s (min of {args.repeats})", flush=True)

    best(
        "plain training (F.cross_entropy)",
        lambda: train(make(seed), x, y, seed=seed, **kw).train_time,
    )
    best("CSL (accumulate into a buffer)", lambda: csl_only(make(seed), x, y, cfg, seed))

    def tracked(**extra):
        tr = csl_fast.CSLTracker(x.shape[0], c, device=cfg.device)
        return train(make(seed), x, y, seed=seed, tracker=tr, **extra, **kw)

    best("full tracker (all free statistics)", lambda: tracked().train_time)
    best("tracker + input gradients", lambda: tracked(input_grads=True).train_time)
    r = tracked(input_grads=True, eval_each_epoch=True)
    t["eval-pass CSL (extra, per run)"] = r.eval_time
    print(f"eval passes: {r.eval_time:.2f}s", flush=True)
    curv = CurvatureAccumulator(
        x,
        y,
        epochs=range(cfg.curv_every - 1, cfg.epochs, cfg.curv_every),
        n=cfg.curv_probes,
        h=cfg.curv_h,
        seed=seed,
    )
    r = train(make(seed), x, y, seed=seed, callback=curv, **kw)
    t["curvature (extra, per run)"] = r.callback_time
    print(f"curvature: {r.callback_time:.2f}s", flush=True)
    t0 = time.perf_counter()
    confident_learning(make, x, y, k=cfg.cl_folds, train_kwargs=kw, seed=seed)
    t[f"confident learning (K = {cfg.cl_folds})"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ssft(make, x, y, train_kwargs=kw, seed=seed)
    t["SSFT"] = time.perf_counter() - t0
    print("CL and SSFT done", flush=True)
    mem = stability_memorization(
        make, x, y, m=args.mem_models_timed, train_kwargs=kw, seed=seed, progress=True
    )
    per_model = mem.seconds / args.mem_models_timed
    t[f"stability memorization (m = {args.mem_models}, scaled)"] = per_model * args.mem_models
    base = t["CSL (accumulate into a buffer)"]
    plain = t["plain training (F.cross_entropy)"]
    lines = [
        "# Cost: measured wall-clock relative to training with CSL",
        "",
        f"Setup: {config_line(cfg)}; {NOISE:.0%} flipped labels. Training variants: min of "
        f"{args.repeats} runs. Stability memorization: {args.mem_models_timed} models timed "
        f"({per_model:.2f}s each), scaled to m = {args.mem_models}.",
        "",
        "| Method | seconds | x CSL run | x plain training |",
        "|---|---|---|---|",
    ]
    for name, sec in t.items():
        lines.append(f"| {name} | {sec:.2f} | {sec / base:.2f} | {sec / plain:.2f} |")
    measured = None
    mem_json = Path(f"{results_stem(args.memorization)}.json")
    if mem_json.exists():
        measured, said = memorization_measured(cfg, json.loads(mem_json.read_text()), base)
        lines += said
    write_results(
        args.out or "cost",
        {
            "config": cfg,
            "noise": NOISE,
            "seconds": t,
            "per_memorization_model": per_model,
            "memorization_measured": measured,
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
