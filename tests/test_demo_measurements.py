"""csl_fast.demo_measurements: how the demo's overhead measurement is reported."""

import pytest
import torch

from csl_fast.demo_measurements import _fmt_overhead, measure_overhead


def _overhead(pct: dict[str, float], rounds: int = 5, noise: float = 3.2) -> dict:
    plain = 1.0
    return {
        "rounds": rounds,
        "steps_per_epoch": 20,
        "batch_size": 64,
        "device": "cpu",
        "ms_per_step": {"plain": plain, **{v: plain * (1 + p / 100) for v, p in pct.items()}},
        "overhead_pct": {"plain": 0.0, **pct},
        "noise_pct": noise,
    }


def test_a_negative_overhead_is_called_timing_noise_with_the_plain_epochs_spread():
    """Tracked training at -8.9% was printed as a measurement (audit helper-112)."""
    text = _fmt_overhead(_overhead({"tracker": -8.9, "tracker+input_grads": -6.2}), None)
    assert "a negative figure is timing noise" in text and "+-3.2%" in text
    assert "timing noise" not in _fmt_overhead(
        _overhead({"tracker": 4.0, "tracker+input_grads": 30.0}), None
    )
    one = _fmt_overhead(_overhead({"tracker": -1.0, "tracker+input_grads": 5.0}, rounds=1), None)
    assert "median of 1 interleaved epoch," in one and "one round measures no spread" in one


def test_overhead_rounds_below_one_are_refused():
    """Only the discarded warm-up round ran at rounds=0: NumPy's "zero-size array to
    reduction operation" came out of the median instead."""
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for rounds in (0, -2):
        with pytest.raises(ValueError, match="rounds must be an int >= 1"):
            measure_overhead(
                x,
                y,
                lambda: torch.nn.Linear(4, 3),
                num_classes=3,
                batch_size=4,
                lr=0.1,
                rounds=rounds,
            )
