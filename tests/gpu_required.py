"""pytest plugin for ``make gpu-check``: on a GPU host a skipped GPU test is a failure.

Loaded with ``-p tests.gpu_required`` (benchmarks/gpu_check.sh does). A test marked
``gpu`` that skips (missing cuda-python, NVRTC, a torch without CUDA, ...) is reported
as failed with its skip reason, and a run that selects no ``gpu`` test fails too: on
the first lent GPU nothing may pass by not running.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"GPU test skipped on a GPU host (gpu-check requires it): {reason}"


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        raise pytest.UsageError("gpu-check: no test marked `gpu` was selected")
