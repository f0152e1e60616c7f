"""A user's type checker reads csl_fast's annotations (PEP 561: ``csl_fast/py.typed``)
and a typical training script checks clean: ``accumulate`` and ``linear_cross_entropy``
return a ``torch.Tensor`` where ``F.cross_entropy`` would (``loss.backward()`` was an
error under mypy: the declared return was ``Tensor | CrossEntropyOutput``), and a
``CrossEntropyOutput`` when a ``return_*`` flag is ``True``."""

from __future__ import annotations

import os
import site
import textwrap
from pathlib import Path

import pytest

import csl_fast

api = pytest.importorskip("mypy.api")

ROOT = Path(csl_fast.__file__).resolve().parent.parent

SCRIPT = """
from typing import assert_type

import torch

import csl_fast
from csl_fast import CrossEntropyOutput, detect

tracker = csl_fast.CSLTracker(100, 10)
logits = torch.randn(8, 10, requires_grad=True)
target = torch.randint(0, 10, (8,))
index = torch.arange(8)
loss = csl_fast.accumulate(logits, target, index, tracker, label_smoothing=0.1)
assert_type(loss, torch.Tensor)
loss.backward()
out = csl_fast.accumulate(logits, target, index, tracker, return_z_loss=True)
assert_type(out, CrossEntropyOutput)
acc = csl_fast.accumulate(logits, target, index, tracker, return_token_accuracy=True)
assert_type(acc, CrossEntropyOutput)
flag: bool = bool(index.numel())
either = csl_fast.accumulate(logits, target, index, tracker, return_z_loss=flag)
assert_type(either, torch.Tensor | CrossEntropyOutput)
h = torch.randn(8, 4, requires_grad=True)
w = torch.randn(10, 4, requires_grad=True)
assert_type(csl_fast.linear_cross_entropy(h, w, target, index, tracker), torch.Tensor)
assert_type(
    csl_fast.linear_cross_entropy(h, w, target, return_token_accuracy=True), CrossEntropyOutput
)
tracker.end_epoch()
csl: torch.Tensor = csl_fast.scores(tracker)["csl"]
det = detect.mislabeled(tracker)
flagged: torch.Tensor = det.indices
plan = csl_fast.clean(tracker)
plan.to_csv("plan.csv")
tracker.save("t.csl")
again: csl_fast.CSLTracker = csl_fast.CSLTracker.load("t.csl")
"""


def test_a_training_script_type_checks(tmp_path, monkeypatch):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    # a config of its own: a user's ~/.mypy.ini (strict = True, say) is not what is tested
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\n", encoding="utf-8")
    if str(ROOT) in {os.path.realpath(p) for p in site.getsitepackages()}:
        monkeypatch.delenv("MYPYPATH", raising=False)  # installed: mypy finds it there
    else:
        # an editable install or a checkout: mypy does not follow the import hook, and
        # refuses site-packages itself in MYPYPATH
        monkeypatch.setenv("MYPYPATH", str(ROOT))
    stdout, stderr, code = api.run(
        [
            str(script),
            "--config-file",
            str(config),
            "--follow-imports=silent",  # csl_fast's own modules are not what is checked
            "--cache-dir",
            str(tmp_path / "cache"),
            "--python-version",
            "3.11",
        ]
    )
    assert code == 0, stdout + stderr
