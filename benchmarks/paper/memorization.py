"""Similarity with memorization (the poster's first table) and the theorem trends.

Stability-based memorization (Feldman & Zhang) from ``--mem-models`` models, each trained
on a random 70% subset with the same recipe; every score from ONE tracked training run on
the full data. Raw cosine similarity (CS) and Pearson correlation (PC) of each score with
memorization on all samples and on the top 10% most memorized (the paper's CIFAR-100
"Top 5k" of 50k), plus binned trends for Thms 5.3-5.5 (memorization vs learning time,
learning time vs CSL, memorization vs CSL) in the JSON and a PNG.
"""

from __future__ import annotations

import time

import torch
from common import (
    METHODS,
    PAPER_SIMILARITY,
    config_from,
    config_line,
    load_data,
    model_factory,
    parse_args,
    parser,
    rate_arg,
    results_stem,
    run_all,
    write_results,
)

from csl_fast import corrupt, evaluate
from csl_fast.baselines import stability_memorization


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mem-models", type=int, default=100, help="m models for the estimate")
    p.add_argument("--noise", type=rate_arg, default=0.0, help="label noise (paper: clean data)")
    p.add_argument("--top-fraction", type=rate_arg, default=0.1)
    p.add_argument("--bins", type=int, default=20)
    args = parse_args(p, "memorization", extra=(".png",))
    cfg = config_from(args)
    seed = cfg.seeds[0]
    x, y, c = load_data(cfg)
    if args.noise > 0:
        y, _ = corrupt.flip_labels(y, args.noise, num_classes=c, seed=seed)
    n = x.shape[0]
    print(f"memorization on {cfg.dataset}: 1 tracked run + {args.mem_models} models", flush=True)
    t0 = time.perf_counter()
    scores, times = run_all(cfg, x, y, c, seed, progress=args.progress)
    print(f"tracked run + baselines done in {time.perf_counter() - t0:.0f}s", flush=True)

    mem = stability_memorization(
        model_factory(cfg, x, c),
        x,
        y,
        m=args.mem_models,
        train_kwargs=cfg.train_kwargs(),
        seed=10_000 + seed,
        progress=True,
    )
    times["stability_memorization"] = mem.seconds
    print(f"stability memorization: {args.mem_models} models in {mem.seconds:.0f}s", flush=True)
    m = mem.memorization.float()
    ok = torch.isfinite(m)
    k = max(2, int(args.top_fraction * int(ok.sum())))
    sims = {}
    for name, key in METHODS.items():
        if key not in scores:
            continue
        s = scores[key]
        good = ok & torch.isfinite(s)
        if int(good.sum()) < 2:
            continue
        sims[name] = evaluate.similarity(s[good], m[good], top_k=k)
    # (not a run of ties across the k-th: of digits' 1797 samples 1648 have memorization 0)
    top = ok.nonzero()[:, 0][torch.as_tensor(evaluate.top_k_indices(m[ok], k))]
    se = (mem.p_in * (1 - mem.p_in) / mem.n_in + mem.p_out * (1 - mem.p_out) / mem.n_out).sqrt()
    trends = {
        "memorization_vs_learning_time": evaluate.binned_trend(
            scores["learning_time"][ok], m[ok], args.bins
        ),
        "learning_time_vs_csl": evaluate.binned_trend(
            scores["csl"][ok], scores["learning_time"][ok], args.bins
        ),
        "memorization_vs_csl": evaluate.binned_trend(scores["csl"][ok], m[ok], args.bins),
        "memorization_vs_eval_csl": evaluate.binned_trend(scores["eval_csl"][ok], m[ok], args.bins),
    }
    n_in, n_out = float(mem.n_in.double().mean()), float(mem.n_out.double().mean())
    lines = [
        "# Similarity with memorization",
        "",
        f"Setup: {config_line(cfg)}. N = {n}, label noise {args.noise:.0%}. Memorization: "
        f"{args.mem_models} models on random 70% subsets (each sample in ~{n_in:.0f} "
        f"/ out of ~{n_out:.0f}; mean standard error of the estimate "
        f"{float(se[top].mean()):.3f} over the top-k, {float(se[ok].mean()):.3f} over all); "
        f"mean memorization "
        f"{float(m[ok].mean()):.3f}, {int((m[ok] > 0.5).sum())} samples above 0.5. "
        f"Top-k: the {k} most memorized samples ({args.top_fraction:.0%}), less a run of "
        f"ties across the {k}-th (evaluate.top_k_indices): {len(top)} samples.",
        "",
        "| Method | CS top-k | PC top-k | CS all | PC all | paper C100 top 5k (CS, PC) "
        "| paper C100 all | paper ImageNet top 50k | paper ImageNet all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in sims.items():
        paper = PAPER_SIMILARITY.get(name)
        pc = " | ".join(f"{a:.2f}, {b:.2f}" for a, b in paper) if paper else "— | — | — | —"
        lines.append(
            f"| {name} | {v['cs_top']:.3f} | {v['pc_top']:.3f} | {v['cs_all']:.3f} | "
            f"{v['pc_all']:.3f} | {pc} |"
        )
    lines += [
        "",
        f"Binned trends (up to {args.bins} bins of about equal size, tied values in one bin; "
        "mean y per bin), see memorization.png:",
        "",
    ]
    for tname, tr in trends.items():
        ys = ", ".join(f"{v:.3g} ({c})" for v, c in zip(tr["y"], tr["count"], strict=True))
        lines.append(f"- {tname} (samples per bin in brackets): {ys}")
    _plot(trends, f"{results_stem(args.out or 'memorization')}.png")
    write_results(
        args.out or "memorization",
        {
            "config": cfg,
            "mem_models": args.mem_models,
            "noise": args.noise,
            "top_k": k,
            "similarity": sims,
            "trends": trends,
            "seconds": times,
            "memorization": [round(float(v), 4) for v in m],
            "scores": {
                kk: [round(float(v), 5) for v in scores[kk]]
                for kk in ("csl", "eval_csl", "learning_time", "curvature", "final_loss")
            },
        },
        "\n".join(lines),
    )


def _plot(trends, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(trends)[:3]
    labels = [("learning time", "memorization"), ("CSL", "learning time"), ("CSL", "memorization")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, name, (xl, yl) in zip(axes, names, labels, strict=True):
        t = trends[name]
        ax.errorbar(t["x"], t["y"], fmt="o-", ms=3)
        ax.set_xlabel(xl + " (bin mean)")
        ax.set_ylabel(yl)
        ax.set_title(name.replace("_", " "), fontsize=9)
    fig.tight_layout()
    # beside the .md (a run with --out elsewhere replaced the committed figure)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
