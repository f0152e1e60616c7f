"""Markdown and JSON reports of a run, and the short terminal summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

from .. import atomic_file
from . import lm
from .cases import EAGER_CE, LIGER, REF, REF_COMPILE
from .env import device_slug
from .harness import MEASURED_BACKENDS, _fmt_bytes, _fmt_signed, _fmt_time
from .training import STEP_PLAIN, fmt_overhead, vs_plain


def _busy(env: dict) -> str | None:
    """A warning when other processes held the cores: two short runs in a row on a
    2-core machine at load 60-90 measured a 4.1x and a 34x speed-up, one "missed" and one
    "met"."""
    loads = [x for key in ("loadavg_start", "loadavg_end") for x in (env.get(key) or [])[:1]]
    cores = env.get("cpu_cores") or 1
    if not loads or max(loads) <= cores:
        return None
    return (
        f"**The machine was busy** (1-minute load average up to {max(loads):g} on {cores} "
        "cores): other processes shared the cores, so the timings and the verdicts below are "
        "unreliable; rerun on an idle machine."
    )


def _commit(env: dict) -> str:
    """The commit as recorded: a full hash from git shortened to 12 digits, any other text
    (``CSL_COMMIT``, a hand-written note) whole; then the source hash, when recorded."""
    commit = env.get("git_commit") or "unknown"
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = commit[:12]
    if env.get("git_commit_from") == "CSL_COMMIT":
        commit += " (from CSL_COMMIT" + (
            f"; git HEAD here {env['git_head'][:12]})" if env.get("git_head") else ")"
        )
    if env.get("source_hash"):
        commit += f", sources sha256 {env['source_hash'][:16]}"
    return commit


def _backends(env: dict) -> list[str]:
    """Which compiled csl_fast backends this run measured, and the extension's load error:
    csl_fast's rows are skipped without them, never timed on the reference fallback."""
    status = env.get("backends")
    if status is None:  # results written before backends were recorded
        return []
    wanted = MEASURED_BACKENDS.get(env["device"], ())
    ran = [b for b in wanted if b in status and status[b] is None]
    lines = [
        f"- csl_fast backends measured: {', '.join(ran) or 'none'}"
        + "".join(f"; {b} not run ({status.get(b)})" for b in wanted if b not in ran)
    ]
    skipped = [b for b in wanted if b not in ran]
    if env.get("extension_error") or not ran:
        which = (
            f"the {' and '.join(skipped)} backend's rows are skipped"
            if ran
            else "csl_fast's rows are skipped"
        )
        error = env.get("extension_error")
        head = "The compiled extension csl_fast._C did not load" if error else "No compiled backend"
        lines.append(
            f"- **{head}** ({error or 'none can run on this device'}): {which}; the "
            "pure-PyTorch reference fallback is not timed under csl_fast's name."
        )
    return lines


def _in_progress(results: dict) -> list[str]:
    """The notice a checkpoint written mid-run opens with: without it, a run killed after
    its first section left a one-section report that read as complete."""
    pending = results.get("pending")
    if not pending:
        return []
    asked = results["env"]["settings"]["sections"]
    done = [s for s in asked if s not in pending]
    return [
        "",
        f"**Incomplete: the run was in progress when this was written** (or was cut short): "
        f"sections pending {', '.join(pending)}; done {', '.join(done) or 'none'}. The "
        "targets below are those of the finished sections only.",
    ]


def markdown(results: dict, short: bool = False) -> str:
    env = results["env"]
    dev = env["device"]
    lines = []
    title = "csl_fast overhead report (short)" if short else "csl_fast benchmarks"
    what = env.get("gpu") or f"{env['cpu_model']}, {env['cpu_cores']} cores"
    lines += [
        f"# {title}: {dev} ({what})",
        "",
        f"- date {env['date']}, commit {_commit(env)}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}",
        f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if dev == "cuda" else "")
        + f", Liger-Kernel {env.get('liger_kernel') or 'not installed'}",
        f"- torch threads {env['torch_threads']}; load average at start {env['loadavg_start']}"
        + (f", at end {env['loadavg_end']}" if env.get("loadavg_end") else ""),
        *([f"- command: `{results['command']}`"] if results.get("command") else []),
        *([f"- compiled extension: {env['extension']}"] if env.get("extension") else []),
        "",
    ]
    lines[1:1] = _in_progress(results)
    lines[-1:-1] = _backends(env)
    busy = _busy(env)
    if busy:
        lines += [busy, ""]
    if results.get("copy_bandwidth"):
        c = results["copy_bandwidth"]
        lines += [
            f"Copy bandwidth ({_fmt_bytes(c['bytes'])} `dst.copy_(src)`, read + write): "
            f"**{c['gbps']:.1f} GB/s**.",
            "",
        ]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['shown']} | {_VERDICT[t['met']]} |")
        lines.append("")
    ce = results.get("cross_entropy")
    if ce:
        lines += [
            "## Cross entropy, forward + backward",
            "",
            "Median time per call (IQR/median in brackets); speedup = reference eager time / "
            "this time; GB/s counts one read + one write of the logits; extra peak = peak "
            "bytes allocated during the call beyond the inputs and the returned logits "
            "gradient (for 'in place', `inplace_grad=True`, beyond the inputs alone) ("
            + (
                "`torch.cuda.max_memory_allocated`"
                if dev == "cuda"
                else "PyTorch CPU allocations seen by the profiler"
            )
            + "), in logits-sized buffers. "
            "Reference eager = `F.cross_entropy(reduction='none')` + `index_add_` + "
            "`.mean().backward()`.",
            "",
        ]
        for key, rows in _group(ce, ("batch", "classes", "dtype")).items():
            b, c, dt = key
            lines += [
                f"### {b} x {c}, {dt}",
                "",
                "| impl | CSL | median (IQR/median) | min | vs reference | vs F.cross_entropy "
                "alone | GB/s | extra peak | correct |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                if "skipped" in r:
                    lines.append(f"| {r['impl']} | | skipped: {r['skipped']} | | | | | | |")
                    continue
                sv = r["speedup_vs"]
                vs_ref = "1.00x" if r["impl"] == REF else _x(sv.get(REF))
                vs_ce = "1.00x" if r["impl"] == EAGER_CE else _x(sv.get(EAGER_CE))
                ep = r["extra_peak_logits"]
                lines.append(
                    f"| {r['impl']} | {'yes' if r['csl'] else 'no'} | {_fmt_time(r['median_s'])}"
                    f" ({r['noise_iqr']:.0%}) | {_fmt_time(r['min_s'])} | {vs_ref} | {vs_ce} | "
                    f"{r['gbps']:.1f} | "
                    f"{'n/a' if ep is None else f'{ep:.2f}'} | "
                    f"{'yes' if r['correct'] else 'NO: ' + str(r['check_error'])} |"
                )
            lines.append("")
    ig = results.get("input_grad")
    if ig:
        lines += [
            "## Input-gradient norms + scatter",
            "",
            "Reference = `grad.flatten(1).pow(2).sum(1)` + `index_add_`; GB/s counts one "
            "read of the gradient.",
            "",
            "| shape | dtype | impl | time | vs reference | GB/s | correct |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ig:
            if "skipped" in r:
                lines.append(
                    f"| {r['shape']} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | | |"
                )
                continue
            vs = "1.00x" if r["impl"] == REF else _x(r["speedup_vs"].get(REF))
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['impl']} | {_fmt_time(r['median_s'])} "
                f"({r['noise_iqr']:.0%}) | {vs} | {r['gbps']:.1f} | "
                f"{'yes' if r['correct'] else 'NO: ' + str(r['check_error'])} |"
            )
        lines.append("")
    tr = results.get("training")
    if tr:
        lines += [
            "## Whole training steps (SGD, float32)",
            "",
            "Median step time (IQR/median); overhead against the plain step. "
            "Full tracking = `CSLTracker` + `accumulate` + `watch` (input-gradient norms, "
            "which needs dL/dx: the 'plain + dL/dx' row is that cost alone).",
            "",
        ]
        for kind, rows in _group(tr, ("workload",)).items():
            r0 = next((r for r in rows if "batch" in r), {})
            lines += [
                f"### {kind[0]} (B={r0.get('batch')}, C={r0.get('classes')})",
                "",
                "| variant | step | overhead | |",
                "|---|---|---|---|",
            ]
            for r in rows:
                if "skipped" in r:
                    lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | |")
                    continue
                lines.append(
                    f"| {r['variant']} | {_fmt_time(r['median_s'])} ({r['noise_iqr']:.0%}) | "
                    f"{fmt_overhead(r['overhead_pct'])} | "
                    f"{vs_plain(r['overhead_ms'], '{:+.2f} ms'.format)} |"
                )
            if r0.get("check_error"):
                lines.append(f"\ncheck failed: {r0['check_error']}")
            lines.append("")
    cost = results.get("tracking_cost")
    if cost:
        lines += [
            "## Tracking cost per step",
            "",
            "Only what the variants differ in, timed apart from the model on each "
            "workload's logits: the loss, its backward into the logits and the recording "
            "(for the two dL/dx variants also a backward of a fixed gradient into a leaf of "
            "the input, watched in the full variant), interleaved over many repetitions "
            "(whole-step medians are too noisy to resolve sub-millisecond differences). "
            "Cost = variant - plain `F.cross_entropy`; the host-logging cost over the "
            "tracker's is the '10x cheaper' target; full minus 'plain + dL/dx' is what "
            "csl_fast adds to a step that computes dL/dx.",
            "",
            "| workload | variant | loss part (IQR/median) | cost per step | per sample |",
            "|---|---|---|---|---|",
        ]
        for r in cost:
            if "skipped" in r:
                lines.append(f"| {r['workload']} | {r['variant']} | skipped: {r['skipped']} | | |")
                continue
            lines.append(
                f"| {r['workload']} (B={r['batch']}, C={r['classes']}) | {r['variant']} | "
                f"{_fmt_time(r['median_s'])} ({r['noise_iqr']:.0%}) | "
                f"{vs_plain(r['cost_s'], _fmt_signed)} | "
                f"{vs_plain(r['cost_s'] and r['cost_s'] / r['batch'], _fmt_signed)} |"
            )
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += [
            "## Tracker memory per sample",
            "",
            "| what | bytes per sample | grows |",
            "|---|---|---|",
        ]
        for r in mem:
            lines.append(f"| {r['what']} | {r['bytes_per_sample']:.0f} | {r['grows']} |")
        lines.append("")
    if results.get("linear_cross_entropy"):
        lines += [
            "## Linear cross entropy (language-model head)",
            "",
            "Forward + backward from the hidden states to the loss (gradients of the hidden "
            "states and the weight); peak = extra memory above the inputs during one call.",
            "",
            lm.markdown(results["linear_cross_entropy"]),
            "",
        ]
    for name, tb in results.get("errors", {}).items():
        lines += [f"## Section {name} FAILED", "", "```", tb.strip()[-2000:], "```", ""]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _group(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in key), []).append(r)
    return out


def summary_table(results: dict) -> str:
    """A few lines for a terminal: fused vs reference per shape, step overheads, targets
    (and the busy-machine warning first, as the report gives it)."""
    busy = _busy(results.get("env", {}))
    lines = [busy.replace("**", "")] if busy else []
    for r in results.get("cross_entropy", []):
        if "median_s" in r and r["impl"].startswith("csl_fast["):
            sv = r["speedup_vs"]
            lines.append(
                f"CE {r['batch']:>5}x{r['classes']:<6} {r['dtype']:<8} {r['impl']:<15} "
                f"{_fmt_time(r['median_s']):>10}  vs ref {_x(sv.get(REF)):>6}  "
                f"vs F.ce {_x(sv.get(EAGER_CE)):>6}  vs compile {_x(sv.get(REF_COMPILE)) or '-':>6}"
                f"  vs liger {_x(sv.get(LIGER)) or '-':>6}  {r['gbps']:7.1f} GB/s"
            )
    for r in results.get("training", []):
        if "median_s" in r and r["variant"] != STEP_PLAIN:
            lines.append(
                f"step {r['workload']:<12} {r['variant']:<40} {fmt_overhead(r['overhead_pct']):>7}"
            )
    for r in results.get("tracking_cost", []):
        if "median_s" in r and r["variant"] != STEP_PLAIN:
            cost = vs_plain(r["cost_s"], _fmt_signed)
            lines.append(f"cost {r['workload']:<12} {r['variant']:<40} {cost:>9}/step")
    met = [t for t in results.get("targets", []) if t["met"]]
    missed = [t for t in results.get("targets", []) if t["met"] is False]
    open_ = [t for t in results.get("targets", []) if t["met"] is None]
    lines.append(
        f"targets: {len(met)} met, {len(missed)} missed"
        + (f", {len(open_)} not decided" if open_ else "")
    )
    lines += [f"  MISSED {t['target']}: {t['shown']}" for t in missed]
    # (noise, or a candidate not timed: the reason decides whether to rerun)
    lines += [f"  NOT DECIDED {t['target']}: {t['shown']}" for t in open_]
    if results.get("errors"):
        lines.append(f"FAILED sections: {', '.join(results['errors'])}")
    return "\n".join(lines)


_VERDICT = {True: "met", False: "**missed**", None: "not decided"}


IN_PROGRESS = "-in-progress"


def report_stem(env: dict, out_dir: str, suffix: str = "") -> str:
    """The path, less ``.md``/``.json``, of the complete report :func:`write_report` writes
    for a run of ``env`` (:func:`environment`): ``<device-slug>-<date><suffix>``."""
    return os.path.join(out_dir, f"{device_slug(env)}-{env['date'][:10]}{suffix}")


def write_report(results: dict, out_dir: str, suffix: str = "") -> tuple[str, str]:
    """Write ``<device-slug>-<date><suffix>.md`` and ``.json`` into ``out_dir`` (``suffix``
    names a partial run); return the paths.

    A checkpoint of a run still in progress (``results["pending"]``) goes to
    ``<...><suffix>-in-progress.md``/``.json`` instead, so a run killed after its first
    section leaves the day's complete report, committed ones included, as it was; the
    complete report is written atomically under the final name and the in-progress files
    are then removed."""
    os.makedirs(out_dir, exist_ok=True)
    final = report_stem(results["env"], out_dir, suffix)
    stem = final + IN_PROGRESS if results.get("pending") else final
    md, js = stem + ".md", stem + ".json"
    # Both built before either is written, each written atomically: run.py rewrites the
    # report after every section, and a rewrite cut short (a time limit's SIGINT) left an
    # empty JSON where the finished sections had been.
    text, data = markdown(results), json.dumps(_jsonable(results), indent=1)
    atomic_file.write_text(md, lambda f: f.write(text), "write the report", "report.md")
    atomic_file.write_text(js, lambda f: f.write(data), "write the report", "report.json")
    if stem == final:
        for ext in (".md", ".json"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(final + IN_PROGRESS + ext)
    return md, js


def _jsonable(o):
    """Strict JSON: non-finite floats become strings, unknown objects their str()."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    return str(o)
