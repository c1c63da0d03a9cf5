"""The pytest-benchmark suites' summary: every measured case against its baseline (the reference;
SEA off for the Stage-1 step), printed through pytest's terminal reporter at the end of the run, so
that output capture never swallows it."""

from __future__ import annotations

import os

import pytest

_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def bench_rows() -> list[dict]:
    """Result rows in ``sea bench``'s format; the test functions append to it."""
    return _ROWS


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    from sea_model.bench.report import add_ratios, format_table, stage1_lines
    from sea_model.bench.stage1_cases import summary

    rows = add_ratios(list(_ROWS))
    tr = terminalreporter
    tr.section("sea: median time and extra peak RSS against the baseline")
    tr.write_line(f"load average {os.getloadavg()[0]:.2f}; baseline: reference (ops), sea-off (stage1)")
    for line in format_table(rows).splitlines():
        tr.write_line(line)
    for line in stage1_lines(summary(rows)):
        tr.write_line(line)
