"""The markdown tables of ``benchmarks/flagging.py`` (its results file), kept apart so that
the benchmark module holds the runs and the rules' evaluation only."""

from __future__ import annotations

#: regimes the rule's constants were chosen on (``benchmarks/flagging.py``)
TUNING = ("digits-mlp", "mnist1d-cnn", "mnist1d-mlp-pair")
#: ... at these noise rates
TUNING_NOISE = (0.0, 0.005, 0.02, 0.05, 0.10)


def held_out(run: dict) -> bool:
    """A run never used to choose the rule or its constants (another regime or rate)."""
    return run["regime"] not in TUNING or run["noise"] not in TUNING_NOISE


def cell(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def mean_of(rows: list[dict], key: str, field: str) -> float | None:
    vals = [r[key][field] for r in rows if r[key][field] is not None]
    return sum(vals) / len(vals) if vals else None


def markdown_saved(rows: list[dict]) -> str:
    sources = sorted({r["source"] for r in rows if r.get("source")})
    lines = [
        "",
        "## Saved trackers trained longer (`--saved`)",
        "",
        "Trackers saved by `benchmarks/paper/cleaning.py` (noisy stage). The default rule, and "
        "the same tracker with the margin view only (the rule before the doubt view of "
        "`csl_fast.flagging.doubted`).",
        "",
        *(
            [
                f"Carried over from {sources[0]} (`--saved-from`; the trackers are not on "
                "this machine): evaluated with the rule of that commit, before the count's "
                "`unknown` / `lower bound` cases.",
                "",
            ]
            if sources
            else []
        ),
        "| file | epochs | flips | margin-lost | flagged | P | R | F1 | est. count [interval] "
        "| margin view only: flagged / F1 | top-k P=R |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, m = r["default"], r["margin_view_only"]
        lo, hi = d["count_interval"]
        top = cell(r["oracle_top_k"]["precision"]) if r["oracle_top_k"] else "-"
        lines.append(
            f"| {r['file']} | {r['epochs']} | {r['positives']} | {r['label_lost_margin']} "
            f"| {d['flagged']} | {cell(d['precision'])} | {cell(d['recall'])} | {cell(d['f1'])} "
            f"| {d['estimated_count']} [{lo}, {hi}] | {m['flagged']} / {cell(m['f1'])} | {top} |"
        )
    return "\n".join(lines) + "\n"


def _count_cell(c: dict) -> str:
    if c["estimated_count"] is None:
        return "unknown"
    lo, hi = c["count_interval"]
    caveats = ("lower bound", "few anchors", "fit-dependent")
    bound = f" ({c['count']})" if c.get("count") in caveats else ""
    if c.get("count_source") == "valley":  # the caveat is the mixture's, not the count's
        bound = (
            f" (valley; the mixture's: {c['count']})"
            if c.get("count") in caveats
            else " (raised to the valley's)"
        )
    return f"{c['estimated_count']} [{lo}, {hi}]{bound}"


def _run_table(runs: list[dict]) -> list[str]:
    lines = [
        "| regime | noise | seed | flips | flagged | P | R | F1 | est. count [interval] "
        "| cleanlab flagged | P | R | F1 | previous GMM flagged / F1 | valley F1 "
        "| top-k P=R | P,R >= 0.8 for k/flips in |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c, g = r["csl_fast"], r["previous_gmm"]
        cl = r["cleanlab"] or {"flagged": "-", "precision": None, "recall": None, "f1": None}
        top = cell(r["oracle_top_k"]["precision"]) if r["oracle_top_k"] else "-"
        win = r["ranking"]["window"] if r.get("ranking") else None
        lines.append(
            f"| {r['regime']} | {r['noise']:.1%} | {r['seed']} | {r['positives']} "
            f"| {c['flagged']} | {cell(c['precision'])} | {cell(c['recall'])} | {cell(c['f1'])} "
            f"| {_count_cell(c)} | {cl['flagged']} | {cell(cl['precision'])} "
            f"| {cell(cl['recall'])} | {cell(cl['f1'])} | {g['flagged']} / {cell(g['f1'])} "
            f"| {cell(r['valley_1d']['f1'])} | {top} "
            f"| {'none' if not win else f'{win[0]:.2f}-{win[1]:.2f}'} |"
        )
    return lines


def _summary_table(runs: list[dict]) -> list[str]:
    lines = [
        "| regime | noise | F1 csl_fast | F1 cleanlab | P csl_fast | R csl_fast "
        "| mean abs count error | interval covers truth | flagged % csl_fast "
        "| flagged % cleanlab |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in dict.fromkeys(r["regime"] for r in runs):
        for noise in dict.fromkeys(r["noise"] for r in runs if r["regime"] == regime):
            rs = [r for r in runs if r["regime"] == regime and r["noise"] == noise]
            err = [r["csl_fast"]["count_error"] for r in rs if r["positives"]]
            err = [abs(e) for e in err if e is not None]
            known = [r for r in rs if r["csl_fast"]["estimated_count"] is not None]
            covers = sum(bool(r["csl_fast"]["interval_covers"]) for r in known)
            unknown = len(rs) - len(known)
            share = [r["csl_fast"]["flagged"] / r["samples"] for r in rs]
            with_cl = [r for r in rs if r["cleanlab"] is not None]
            share_cl = [r["cleanlab"]["flagged"] / r["samples"] for r in with_cl]
            lines.append(
                f"| {regime} | {noise:.1%} | {cell(mean_of(rs, 'csl_fast', 'f1'))} "
                f"| {cell(mean_of(with_cl, 'cleanlab', 'f1')) if with_cl else '-'} "
                f"| {cell(mean_of(rs, 'csl_fast', 'precision'))} "
                f"| {cell(mean_of(rs, 'csl_fast', 'recall'))} "
                f"| {cell(sum(err) / len(err) if err else None, '.0%')} "
                f"| {covers}/{len(known)}{f' ({unknown} unknown)' if unknown else ''} "
                f"| {sum(share) / len(share):.2%} "
                f"| {f'{sum(share_cl) / len(share_cl):.2%}' if share_cl else '-'} |"
            )
    return lines


def _ranking_table(runs: list[dict]) -> list[str]:
    names = list(max((r["ranking"]["top_k"] for r in runs if r.get("ranking")), key=len))
    lines = [
        "| regime | noise | seed | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in runs:
        if not r.get("ranking"):
            continue
        t = r["ranking"]["top_k"]
        lines.append(
            f"| {r['regime']} | {r['noise']:.1%} | {r['seed']} | "
            + " | ".join(cell(t.get(n)) for n in names)
            + " |"
        )
    return lines


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [
        "# No-ground-truth flagging: csl_fast's default rule vs cleanlab",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        f"`{meta.get('command', 'python benchmarks/flagging.py')}` (see its docstring for "
        "the regimes). Per run: "
        "precision / recall / F1 of the flagged set against the flipped labels; the estimated "
        "count with its interval (`unknown` when the rule found no separation and flagged "
        "nothing, with a warning; `lower bound` when it warned that the surely-bad samples "
        "are under a fifth of the count, or when fewer than 10 of them would have been "
        "stretched to over 5x their number and the count was cut to them; `few anchors` "
        "when it warned that there are fewer than 10 of them; `fit-dependent` when it "
        "warned that the fits with 2, 3 and 4 clean components disagree by over 1.5x; "
        "`valley; the mixture's: ...` when the mixture's count carried that caveat and a "
        "separate upper mode of the score settled it: the valley rule's count is flagged; "
        "`raised to the valley's` when the mixture's count had no caveat and a weaker upper "
        "mode whose count lies inside its interval, above it, raised it); "
        "cleanlab's "
        "`find_label_issues` on K = 3 fold out-of-sample probabilities (fresh model per "
        "fold) on the same labels; the previous rule "
        "(2-component GMM on log-CSL); the 1-D valley rule alone (what a plain score tensor "
        "gets); CSL's top-k at the true k (the ceiling of any count-based rule) and the "
        "range of k / flips for which CSL's top-k has precision and recall >= 0.8 (the count "
        "a rule must hit).",
        "",
    ]
    sources = sorted({r["cleanlab"]["source"] for r in runs if r["cleanlab"]} - {"computed"})
    if sources:
        reused = sum(1 for r in runs if r["cleanlab"] and r["cleanlab"]["source"] != "computed")
        check = (
            "none was recomputed in this run"
            if reused == len(runs)
            else f"the other {len(runs) - reused} were computed in this run"
        )
        lines += [
            f"cleanlab's figures for {reused} of the {len(runs)} runs are taken from "
            f"{', '.join(sources)} (`--cleanlab-from`): the same seeds give the same corrupted "
            f"labels and folds; {check}.",
            "",
        ]
    tuning = [r for r in runs if not held_out(r)]
    held = [r for r in runs if held_out(r)]
    for title, rs in (
        ("Regimes the rule was chosen on", tuning),
        (
            "Held-out runs (regimes and noise rates never used to choose the rule or its "
            "constants)",
            held,
        ),
    ):
        if not rs:
            continue
        lines += [f"## {title}", "", *_run_table(rs), "", "Mean over seeds:", ""]
        lines += [*_summary_table(rs), ""]
    lines += [
        "## The anchors: samples pinned as surely bad",
        "",
        "Mean margin < 0; of those, lost firmly (the label's probability below "
        "`LOST_PROB / C` = 0.06 while doubted, `csl_fast.flagging.label_lost`, chosen on "
        "`benchmarks/flagging_practice.py` and `benchmarks/flagging_limits.py`); and "
        "confidently doubted (`csl_fast.flagging.doubted`, constants `DOUBT_PROB = 0.2`, "
        "`DOUBT_SPAN = 3` chosen on the first three regimes), each as flipped / clean "
        "samples. The lost firmly and the doubted are pinned; a clean sample pinned is a "
        "false anchor; the held-out regimes test the constants.",
        "",
        "| regime | noise | seed | flips | margin < 0: flipped / clean "
        "| lost firmly: flipped / clean | doubted: flipped / clean "
        "| anchored share of the count |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["csl_fast"]
        neg_f, neg = c["margin_negative_flipped"], c["margin_negative"]
        lost_f, lost = c["label_lost_flipped"], c["label_lost"]
        dbt_f, dbt = c["label_doubted_flipped"], c["label_doubted"]
        mixture = c.get("mixture_count")
        share = (
            f"{c['anchors'] / mixture:.2f} (count cut to them)"
            if mixture
            else f"{c['anchors'] / c['estimated_count']:.2f} (the valley rule's count)"
            if c.get("count_source") == "valley"
            else f"{c['anchors'] / c['estimated_count']:.2f}"
            if c["anchors"] is not None and c["estimated_count"]
            else "-"
        )
        lines.append(
            f"| {r['regime']} | {r['noise']:.1%} | {r['seed']} | {r['positives']} "
            f"| {neg_f} / {neg - neg_f} | {lost_f} / {lost - lost_f} | {dbt_f} / {dbt - dbt_f} "
            f"| {share} |"
        )
    lines.append("")
    if any(r.get("ranking") for r in runs):
        lines += [
            "## Can another statistic rank better than CSL?",
            "",
            "Precision of the top k (k = the true number of flips) of each statistic the "
            "tracker keeps: CSL; the mean margin (AUM, negated); 1 - the mean probability of "
            "the label (data-map confidence); the vote's hits / presentations (how often the "
            "network predicted one other class); CSL / sum(1 - p_y) (the doubt view's ratio); "
            "and a logistic regression on all 12 per-sample statistics *trained with the "
            "ground truth of the other seed* of the same regime and noise (a supervised "
            "ceiling for any combination of them).",
            "",
            *_ranking_table(runs),
            "",
        ]
    return "\n".join(lines)
