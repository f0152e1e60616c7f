"""The public API says what it takes: every argument of the functions users call first is
typed and named in its docstring, the docstrings' defaults are the signatures', and the
arguments named after ``F.cross_entropy``'s default to what PyTorch's do."""

from __future__ import annotations

import inspect
import re

import pytest
import torch.nn.functional as F

import csl_fast

FUNCTIONS = {
    name: getattr(csl_fast, name)
    for name in csl_fast.__all__
    if inspect.isfunction(getattr(csl_fast, name))
}
FUNCTIONS |= {f"detect.{n}": getattr(csl_fast.detect, n) for n in csl_fast.detect.__all__}
FUNCTIONS |= {
    f"detect_losses.{n}": getattr(csl_fast.detect_losses, n) for n in csl_fast.detect_losses.__all__
}
FUNCTIONS = {name: f for name, f in FUNCTIONS.items() if inspect.isfunction(f)}


def _arguments(f) -> list[inspect.Parameter]:
    return [
        p
        for p in inspect.signature(f).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_argument_is_typed_and_named_in_the_docstring(name):
    f = FUNCTIONS[name]
    doc = inspect.getdoc(f) or ""
    assert doc, f"{name} has no docstring"
    assert inspect.signature(f).return_annotation is not inspect.Signature.empty, name
    for p in _arguments(f):
        assert p.annotation is not inspect.Parameter.empty, f"{name}({p.name}) has no type"
        assert re.search(rf"\b{p.name}\b", doc), f"{name}'s docstring never names {p.name!r}"


LITERAL_DEFAULT = re.compile(r"[Dd]efault:?\s+(``[^`]+``|-?\d+(?:\.\d+)?\b|True\b|False\b)")


def _entries(doc: str) -> dict[str, str]:
    """``{argument: its text}`` from a Google-style ``Args:`` section."""
    m = re.search(r"^Args:\n(.*?)(?=^\S|\Z)", doc, re.S | re.M)
    entries: dict[str, str] = {}
    names: list[str] = []
    for line in (m.group(1) if m else "").splitlines():
        head = re.match(r" {4}([\w, ]+): ?(.*)", line)
        if head:
            names = [n.strip() for n in head.group(1).split(",")]
            entries |= dict.fromkeys(names, head.group(2))
        else:
            entries |= {n: entries[n] + " " + line.strip() for n in names}
    return entries


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_defaults_a_docstring_states_are_the_signatures(name):
    """A literal default in an argument's entry ("Default 0.4", "default ``'csl'``") is the
    signature's (a default computed at call time, "default ``labels.max() + 1``", is not
    checked)."""
    f = FUNCTIONS[name]
    entries = _entries(inspect.getdoc(f) or "")
    for p in _arguments(f):
        m = LITERAL_DEFAULT.search(entries.get(p.name, ""))
        if m is None or p.default is inspect.Parameter.empty:
            continue
        stated = m.group(1).strip("`")
        try:
            value = eval(stated, {})  # a literal: a number, a string, True/False/None
        except Exception:
            continue
        assert value == p.default, f"{name}({p.name}): docstring {stated}, signature {p.default!r}"


PYTORCH_NAMED = {
    "accumulate": F.cross_entropy,
    "linear_cross_entropy": F.cross_entropy,
    "score_epoch": F.cross_entropy,
    "accumulate_bce": F.binary_cross_entropy_with_logits,
}


@pytest.mark.parametrize("name", sorted(PYTORCH_NAMED))
def test_pytorch_named_arguments_default_as_in_pytorch(name):
    ours = inspect.signature(FUNCTIONS[name]).parameters
    theirs = inspect.signature(PYTORCH_NAMED[name]).parameters
    doc = inspect.getdoc(FUNCTIONS[name])
    for arg in ("weight", "pos_weight", "ignore_index", "label_smoothing", "reduction"):
        if arg not in ours or arg not in theirs:
            continue
        if ours[arg].default is inspect.Parameter.empty:  # a required argument of its own
            assert "not ``F.cross_entropy``'s" in _entries(doc)[arg], f"{name}({arg})"
            continue
        assert ours[arg].default == theirs[arg].default, f"{name}({arg})"
