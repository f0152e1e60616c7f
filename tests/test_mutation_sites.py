"""Every planted bug of ``tests/mutation/run.py`` still has its site: a mutation whose
text is gone from the code would silently test nothing (three had, after refactors)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tests/mutation/run.py")
run = importlib.util.module_from_spec(_spec)
sys.modules["mutation_run"] = run  # dataclasses look their module up there
_spec.loader.exec_module(run)


@pytest.mark.parametrize("name", sorted(run.MUTATIONS))
def test_the_mutation_site_exists_once(name):
    m = run.MUTATIONS[name]
    source = (ROOT / m.path).read_text()
    assert source.count(m.old) == 1, f"{name}: update its site in tests/mutation/run.py"
    assert m.new != m.old
