"""``sea bench`` on tiny cases: the table, the JSON (with its fields) and one plot per op are written.

Times are never asserted; these cases only check that the harness runs every op and backend and
reports what the issue asks for."""

from __future__ import annotations

import json
import warnings

import pytest

from sea_model.bench import CASE_SETS, report, run
from sea_model.bench.stage1 import clear_cache
from sea_model.commands.cli import build_parser

TINY = {
    "topk": {"a": dict(b=1, p=16, q=64, d=16, dtype="float32")},
    "labels": {"a": dict(b=1, p=16, q=64, d=16, dtype="float32")},
    "loss": {"a": dict(n=32, dim=16, dtype="float32")},
    # A modelled step (1 of the 2 LM layers built, the per-layer time from 0 layers), as at 7B shapes.
    "stage1": {
        "tiny": dict(
            tower="demo",
            llm="demo",
            batch=2,
            text=4,
            q=50,
            word_tokens=2,
            top_n=3,
            dtype="float32",
            layers=1,
            layers_short=0,
        )
    },
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEA_BENCH_STANDIN_TOWER", "1")  # the GPU machines' tower (no open_clip there)
        result = run(
            list(TINY), TINY, "cpu", out, min_runs=2, max_runs=3, budget_s=0.0, progress=False, echo=lambda *a: None
        )
    return out, result


def test_writes_table_json_and_one_plot_per_op(bench):
    out, result = bench
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "sea-bench/1" and data["device"] == "cpu" and data["ops"] == list(TINY)
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1 and data["machine"]["torch_threads"] >= 1
    assert data["versions"]["torch"] and data["versions"]["sea"] and "triton" in data["versions"]
    assert set(data["git"]) == {"revision", "dirty"}
    assert data["load_average"]["start"] and data["load_average"]["end"]
    table = (out / "table.md").read_text()
    assert "| op | size |" in table and "sea-fused" in table
    for op in TINY:
        assert (out / f"{op}.png").stat().st_size > 0
    assert data["files"]["plots"] == [str(out / f"{op}.png") for op in TINY]


def test_every_backend_is_timed_and_measured_against_the_baseline(bench):
    _, result = bench
    rows = result["results"]
    assert not [r for r in rows if r.get("error")]
    for op, sizes in TINY.items():
        for size in sizes:
            got = [r for r in rows if r["op"] == op and r["size"] == size and not r.get("auxiliary")]
            assert [r["backend"] for r in got] == CASE_SETS[op].backends(op, "cpu")
            assert got[0]["baseline"] and got[0]["ratio"] == 1.0
            for r in got:
                assert 2 <= r["runs"] <= 3
                assert 0 < r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["iqr_s"] >= 0
                assert r["ratio"] > 0 and isinstance(r["extra_peak_bytes"], int) and r["extra_peak_bytes"] >= 0
                assert r["tflops"] is None  # on GPUs only
    assert {"cpu", "cpu_fallback"} <= {r["backend"] for r in rows if r["op"] == "loss"}


def test_stage1_overhead_is_reported_and_modelled_when_layers_are_cut(bench):
    _, result = bench
    s = result["stage1"]["tiny"]
    assert s["modelled"] and "modelled" in s["note"] and "stand-in" in s["tower"]
    assert set(s["overhead"]) == {"sea-reference", "sea-fused"} and all(v > 0 for v in s["overhead"].values())
    aux = [r for r in result["results"] if r.get("auxiliary")]
    assert [r["backend"] for r in aux] == ["sea-off (0 layers)"] and aux[0]["extra_peak_bytes"] is None
    fused = next(r for r in result["results"] if r["backend"] == "sea-fused")
    assert fused["extra"]["modelled_step_s"] >= fused["median_s"] and fused["extra"]["layers_modelled"] == 2


def test_redraw_from_json(bench, tmp_path):
    out, _ = bench
    written = report.redraw(out / "bench.json", tmp_path)
    assert [p.name for p in written] == ["table.md", *(f"{op}.png" for op in TINY)]


def test_named_sizes_resolve_on_both_devices():
    for device in ("cpu", "cuda"):
        for mode in ("quick", "full"):
            for op, cases in CASE_SETS.items():
                for size in cases.size_names(op, device, mode):
                    params = cases.size_params(op, size, device)
                    assert cases.describe(op, params) and cases.work(op, params) > 0
    assert CASE_SETS["labels"].size_params("labels", "full", "cuda")["dtype"] == "bfloat16"


def test_cli_bench_arguments(monkeypatch):
    args = build_parser().parse_args(
        ["bench", "--ops", "labels,loss", "--sizes", "full", "--device", "cpu", "--out", "x"]
    )
    assert (args.ops, args.sizes, args.device, args.out) == ("labels,loss", "full", "cpu", "x")
    seen = {}
    monkeypatch.setattr("sea_model.bench.run", lambda *a, **kw: seen.update(kw))
    for argv, want in ([], None), (["--rounds", "12"], 12):
        parsed = build_parser().parse_args(["bench", "--ops", "loss", *argv])
        assert parsed.func(parsed) == 0 and seen["min_runs"] == want
    with pytest.raises(ValueError, match="unknown op"):
        run(["nope"], "quick", "cpu", "unused", progress=False)


def test_plot_without_memory_numbers_warns_nothing(bench, tmp_path):
    """A --no-memory run: the memory panel says so instead of a matplotlib legend warning."""
    pytest.importorskip("matplotlib")
    _, result = bench
    rows = [dict(r, extra_peak_bytes=None) for r in result["results"] if r["op"] == "loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = report.plot_op(rows, "loss", "loss", tmp_path / "loss.png")
    assert path is not None and path.stat().st_size > 0


def test_stage1_regions_script_times_every_part(monkeypatch, capsys):
    """benchmarks/stage1_regions.py (where SEA's Stage-1 cost goes) runs on the demo step."""
    from benchmarks import stage1_regions

    monkeypatch.setenv("SEA_BENCH_STANDIN_TOWER", "1")
    monkeypatch.setattr("sys.argv", ["stage1_regions.py", "demo", "--rounds", "1"])
    try:
        stage1_regions.main()
    finally:
        clear_cache()  # the stand-in tower must not stay cached under the demo size
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms |" not in line]
    assert len(rows) == 7 and all(float(r.split("|")[2]) > 0 for r in rows)
