"""In-process calls of ``csl_fast.cli.main`` for the CLI tests (tests/test_cli*.py)."""

from __future__ import annotations

from csl_fast.cli import main


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``csl-fast ARGS`` run in this process."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def user_error(capsys, code: int, command: str, *args: str) -> str:
    """The one line ``csl-fast COMMAND ARGS`` prints on stderr as it exits with ``code``."""
    got, out, err = run_main(capsys, command, *args)
    assert got == code, (got, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"csl-fast {command}: error: "), lines[0]
    return lines[0]


def held_out_run(path, loss_only: bool = False, first_scored: int = 25) -> None:
    """Save to ``path`` a run of 40 samples trained on 0-29, with eval passes over 25-39:
    15 samples with an eval_csl value, 10 of them held out (never trained on).
    ``loss_only``: the training losses recorded by record_loss (no softmax statistics);
    ``first_scored``: the eval passes score samples from it to 39."""
    import torch
    import torch.nn.functional as F

    import csl_fast

    g = torch.Generator().manual_seed(0)
    n, trained, scored = 40, torch.arange(30), torch.arange(first_scored, 40)
    y = torch.arange(n) % 3
    tracker = csl_fast.CSLTracker(n, 3)
    for epoch in range(4):
        logits = torch.randn(n, 3, generator=g) + (1.0 + epoch) * torch.eye(3)[y]
        if loss_only:
            loss = F.cross_entropy(logits[trained], y[trained], reduction="none")
            csl_fast.record_loss(loss, trained, tracker)
        else:
            csl_fast.accumulate(logits[trained], y[trained], trained, tracker)
        tracker.end_epoch()
        batch = (logits[scored], y[scored], scored)
        csl_fast.score_epoch(torch.nn.Identity(), [batch], tracker)
    tracker.save(path)


def mixed_run(path=None):
    """A tracker of 300 samples: 0-199 fed by accumulate (0-19 with flipped labels), 200-299
    by record_loss (another loss, on a larger scale) into the same tracker; saved to
    ``path`` when given."""
    import torch

    import csl_fast

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 3
    noisy = y.clone()
    noisy[:20] = (noisy[:20] + 1) % 3
    tracker = csl_fast.CSLTracker(300, 3)
    for _ in range(6):
        logits = torch.randn(200, 3, generator=g) + 3 * torch.nn.functional.one_hot(y, 3)
        csl_fast.accumulate(logits, noisy, torch.arange(200), tracker)
        csl_fast.record_loss(torch.rand(100, generator=g) * 50, torch.arange(200, 300), tracker)
        tracker.end_epoch()
    if path is not None:
        tracker.save(path)
    return tracker
