"""Test setup: without a GPU, Triton kernels run under the interpreter (set before triton loads).

``SEA_REQUIRE_GPU=1`` (``benchmarks/gpu_check.sh``): a skipped test fails instead, unless its reason is
one expected on a GPU too (``EXPECTED_SKIPS`` in ``benchmarks/gpu_summary.py``), so that a run where
CUDA or Triton is unavailable cannot pass by skipping.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _exact_float32_dots():
    """The interpreter's float32 ``tl.dot`` exact and rounded once, on any CPU (``tests/_exact_dots.py``)."""
    from tests._exact_dots import exact_dots

    with exact_dots():
        yield


def pytest_configure(config):
    # pytest-xdist's --dist loadgroup runs the tests of one group on one worker (tests/test_triton_gpu.py)
    config.addinivalue_line("markers", "xdist_group(name): run these tests on one pytest-xdist worker")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if os.environ.get("SEA_REQUIRE_GPU") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return report
    from benchmarks.gpu_summary import expected_on_gpu

    reason = _skip_reason(report)
    if not expected_on_gpu(reason):
        report.outcome = "failed"
        report.longrepr = f"SEA_REQUIRE_GPU=1: a skip is a failure here ({reason})"
    return report
