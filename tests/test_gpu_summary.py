"""benchmarks/gpu_summary.py on synthetic gpu_check outputs, and SEA_REQUIRE_GPU=1 (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "benchmarks" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gs = _load()

STEPS = ["environment", "tests on the GPU", "sea bench --sizes quick --device cuda"]
FLOAT64_SKIP = "triton computes float64 labels in float32 (documented), so it cannot match a float64 reference"


def _row(op, size, backend, median_s=0.01, **kw):
    params = {"topk": dict(b=32, p=576, q=41242, d=768), "loss": dict(n=4608, dim=4096), "stage1": {}}
    row = dict(op=op, size=size, backend=backend, baseline=backend in ("reference", "sea-off"))
    row.update(params=params.get(op, params["topk"]), median_s=median_s, ratio=0.1, matmul_tflops=600.0, extra={})
    return {**row, **kw}


def _bench_rows() -> list[dict]:
    """A row for every expected (triton, Stage-1) case, and the reference rows the ratios use."""
    rows = []
    for op, size, backend in gs.expected_rows():
        if op == "stage1":
            step = 1.0 if backend == "sea-off" else 1.005
            rows.append(_row(op, size, backend, step / 2, extra={"modelled_step_s": step}))
        else:
            rows += [_row(op, size, "reference", 0.1, ratio=1.0), _row(op, size, backend)]
    return rows


def _testcase(name, inner=""):
    return f'<testcase classname="tests.test_x" name="{name}" time="0.1">{inner}</testcase>'


def _write(out: Path, *, steps=None, cases=None, rows=None):
    """gpu_check.sh's outputs in ``out``: every step ok, tests passed, every expected bench row."""
    (out / "bench").mkdir(parents=True, exist_ok=True)
    steps = steps or [(name, "ok") for name in STEPS]
    (out / "steps.tsv").write_text("".join(f"{name}\t12\t210\t{status}\n" for name, status in steps))
    if cases is None:
        skipped = f'<skipped type="pytest.skip" message="{FLOAT64_SKIP}">x.py:1: {FLOAT64_SKIP}</skipped>'
        cases = [_testcase("test_a"), _testcase("test_float64[triton]", skipped)]
    xml = f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'
    (out / "tests.xml").write_text(xml)
    data = {"schema": "sea-bench/1", "results": _bench_rows() if rows is None else rows}
    (out / "bench" / "bench.json").write_text(json.dumps(data))


def _run(out: Path) -> tuple[int, str]:
    status = gs.main([str(out)])
    return status, (out / "summary.md").read_text()


def test_the_expected_rows_come_from_the_bench_cases():
    rows = set(gs.expected_rows())
    assert {("labels", "b32", "triton"), ("labels", "b32-trainer", "triton"), ("topk", "b32", "triton")} <= rows
    assert {
        ("loss", "4608-d4096", "triton"),
        ("stage1", "llava-7b", "sea-fused"),
        ("stage1", "llava-7b", "sea-off"),
    } <= rows


def test_all_good_exits_0(tmp_path):
    _write(tmp_path)
    status, text = _run(tmp_path)
    assert status == 0, text
    assert "all checks passed" in text
    assert "| labels b32-trainer triton | 10.00 ms | 5.14x torch.mm | <= 1.5x torch.mm |" in text
    assert "10.0x faster than reference" in text and "x the 4-GEMM floor" in text
    assert "| stage1 llava-7b sea-fused | 1005.0 ms | +0.5% over SEA off | <= +1% (sea-fused) |" in text
    assert "skipped (expected on a GPU)" in text


def test_an_errored_bench_row_fails(tmp_path):
    rows = [r for r in _bench_rows() if (r["op"], r["size"], r["backend"]) != ("labels", "b32", "triton")]
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 6.08 GiB"
    rows.append(dict(op="labels", size="b32", backend="triton", params={}, baseline=False, error=error, ratio=None))
    _write(tmp_path, rows=rows)
    status, text = _run(tmp_path)
    assert status == 1
    assert f"| labels b32 triton | ERROR | {error} |  |" in text and "**1 failure(s)**" in text


def test_a_missing_bench_row_fails(tmp_path):
    rows = [r for r in _bench_rows() if (r["op"], r["size"], r["backend"]) != ("loss", "4608-d4096", "triton")]
    _write(tmp_path, rows=rows)
    status, text = _run(tmp_path)
    assert status == 1
    assert "| loss 4608-d4096 triton | MISSING |" in text and "**1 failure(s)**" in text


@pytest.mark.parametrize("name", ["bench/bench.json", "tests.xml", "steps.tsv"])
def test_a_missing_file_fails(tmp_path, name):
    _write(tmp_path)
    (tmp_path / name).unlink()
    status, text = _run(tmp_path)
    assert status == 1
    assert "MISSING" in text and "**1 failure(s)**" in text


def test_a_skipped_test_fails(tmp_path):
    skipped = '<skipped type="pytest.skip" message="needs a CUDA GPU">x.py:1: needs a CUDA GPU</skipped>'
    _write(tmp_path, cases=[_testcase("test_a"), _testcase("test_labels_full_size[bf16]", skipped)])
    status, text = _run(tmp_path)
    assert status == 1
    assert "| test_x::test_labels_full_size[bf16] | SKIPPED (a failure here): needs a CUDA GPU |" in text
    assert "**1 failure(s)**" in text


@pytest.mark.parametrize("status", ["timed out", "skipped", "exit 1"])
def test_a_step_that_did_not_finish_fails(tmp_path, status):
    _write(tmp_path, steps=[("environment", "ok"), ("tests on the GPU", status)])
    code, text = _run(tmp_path)
    assert code == 1
    assert f"| tests on the GPU | 12 | 210 | {status} |" in text and "**1 failure(s)**" in text


def test_require_gpu_turns_unexpected_skips_into_failures(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\n"
        "def test_cuda():\n    pass\n\n\n"
        f"def test_float64():\n    pytest.skip({FLOAT64_SKIP!r})\n\n\n"
        "def test_ok():\n    pass\n"
    )
    env = {**os.environ, "SEA_REQUIRE_GPU": "1", "PYTHONPATH": str(ROOT)}
    xml = tmp_path / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", "-p", "no:xdist"]
    cmd += ["--rootdir", str(tmp_path), f"--junitxml={xml}", str(tmp_path / "test_skips.py")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    results = {cells[0]: (cells[1], ok) for cells, ok in gs.checks(str(xml))}
    status, ok = results["test_skips::test_cuda"]
    assert not ok and status.startswith("FAILED") and "a skip is a failure here (needs a CUDA GPU)" in status
    assert results["test_skips::test_float64"][1] and results["test_skips::test_ok"] == ("passed", True)


def test_the_full_size_gpu_tests_share_one_xdist_group():
    from tests import test_triton_gpu as t

    full = [t.test_labels_full_size, t.test_labels_as_the_trainer_calls_them, t.test_contrastive_loss_full_size]
    for fn in full:
        assert [m.args for m in fn.pytestmark if m.name == "xdist_group"] == [("gpu_full",)], fn.__name__
