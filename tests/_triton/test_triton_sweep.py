"""``benchmarks/triton_sweep.py`` (run by ``benchmarks/gpu_check.sh`` on a GPU) works: every
configuration it times is launched and checked against the default one first. Here on a
tiny shape, in whichever mode the Triton kernels run on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sweep():
    spec = importlib.util.spec_from_file_location(
        "triton_sweep", ROOT / "benchmarks" / "triton_sweep.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_times_every_configuration(tdevice):
    sweep = _sweep()
    rows = sweep.sweep_shape(3, 10, tdevice, budget_s=0.5)
    assert len(rows) == len(sweep.configs(10, tdevice)) >= 2
    assert rows[0]["default"] and not any(r["default"] for r in rows[1:])
    for r in rows:
        assert "skipped" not in r, r
        assert r["median_s"] > 0 and r["vs_default"] > 0
    text = sweep.markdown({"env": {"device": tdevice, "date": "d", "torch": "t"}, "rows": rows})
    assert "(default)" in text and "Best per shape" in text


def test_sweep_reports_a_configuration_that_fails(tdevice, monkeypatch):
    sweep = _sweep()
    real = sweep.launch

    def broken(logits, target, cfg, *out):
        if cfg != sweep.configs(10, tdevice)[0]:
            raise RuntimeError("out of resources: shared memory")
        return real(logits, target, cfg, *out)

    monkeypatch.setattr(sweep, "launch", broken)
    rows = sweep.sweep_shape(3, 10, tdevice, budget_s=0.2)
    assert "median_s" in rows[0]
    assert all("out of resources" in r["skipped"] for r in rows[1:])


def test_gpu_check_script_parses():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_max_configs_keeps_the_default_and_a_spread():
    sweep = _sweep()
    cands = [("default",), *((i,) for i in range(19))]
    picked = sweep.spread(cands, 5)
    assert picked[0] == ("default",) and len(picked) == 5
    assert picked[1] == (0,) and picked[-1] == (18,)  # both ends of the range stay in
    assert len(set(picked)) == 5
    assert sweep.spread(cands, 1) == [("default",)]
    assert sweep.spread(cands[:3], 10) == cands[:3] and sweep.spread(cands, None) == cands
