import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (the shared ``one_thread`` fixture) for every test here."""
