"""pytest plugin for ``benchmarks/gpu_check.sh``: each failure's full report (test errors
and collection errors too) appended to ``$CSL_INCREMENTAL_LOG`` the moment it is known.

pytest writes its junit XML and its failure sections when the session ends; a run killed
by a time limit (or a crashed CUDA context) would lose them. This file keeps them.
Load with ``-p incremental_log`` and ``benchmarks/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os


def _write(text: str) -> None:
    path = os.environ.get("CSL_INCREMENTAL_LOG")
    # Under pytest-xdist the workers' reports reach the controller too: it alone writes.
    if path and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(text)


def pytest_runtest_logreport(report) -> None:
    if report.failed:  # in setup, call or teardown
        _write(
            f"{'FAILED' if report.when == 'call' else 'ERROR'} {report.nodeid} "
            f"[{report.when}, {report.duration:.2f}s]\n{report.longreprtext.rstrip()}\n{'-' * 80}\n"
        )


def pytest_collectreport(report) -> None:
    if report.failed:
        _write(f"COLLECTION ERROR {report.nodeid}\n{report.longreprtext.rstrip()}\n{'-' * 80}\n")
