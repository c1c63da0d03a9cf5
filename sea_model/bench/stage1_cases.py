"""The Stage-1 training step as a family of benchmark cases (:class:`~sea_model.bench.op_cases.CaseSet`).

Variants (the backends of op ``stage1``): ``sea-off`` (the baseline), ``sea-reference``,
``sea-fused``; sizes ``demo`` and ``demo-41k`` on CPU, ``llava-7b`` on CUDA, ``llava-cpu`` by name
(see :mod:`sea_model.bench.stage1`). At ``llava-7b`` only some LM layers are built: the step is timed
with ``layers`` and with ``layers_short`` of them (an auxiliary call) and the full-depth step is
modelled from the per-layer time measured with SEA off.
"""

from __future__ import annotations

from . import stage1
from .op_cases import CaseSet, device_type, pick_sizes

TARGETS = {"demo": 1.05, "llava-cpu": 1.03, "llava-7b": 1.01}  # Stage-1 overhead targets of fused SEA (not asserted)
SIZE_NAMES = {
    "cpu": {"quick": ["demo"], "full": ["demo", "demo-41k"]},
    "cuda": {"quick": ["llava-7b"], "full": ["llava-7b"]},
}


class Stage1Cases(CaseSet):
    ops = ("stage1",)
    titles = {"stage1": "Stage-1 training step (forward + backward + AdamW)"}
    builder = "sea_model.bench.stage1_cases:build_case"
    budget_factor = 3.0  # the Stage-1 overhead is a small difference of long calls: more rounds

    def size_names(self, op, device="cpu", mode="quick"):
        return pick_sizes(mode, SIZE_NAMES[device_type(device)], stage1.STAGE1_SIZES)

    def size_params(self, op, size, device="cpu"):
        return dict(stage1.STAGE1_SIZES[size])

    def backends(self, op, device="cpu"):
        return list(stage1.STAGE1_BACKENDS)

    def describe(self, op, params):
        return stage1.describe(params)

    def flops(self, op, params):
        return None

    def matmul_shape(self, op, params):
        return None

    def work(self, op, params):
        """The x axis of the plots: tokens per step."""
        return float(stage1.tokens_per_step(params))

    def build(self, op, backend, device="cpu", **params):
        return build_case(op, backend, device, **params)

    def calls(self, op, params, device):
        calls = super().calls(op, params, device)
        if stage1.is_modelled(params):
            short = params["layers_short"]
            calls.append((f"sea-off ({short} layers)", "sea-off", {**params, "active_layers": short}))
        return calls

    def finish(self, op, params, rows, built):
        for r in rows:
            if r["backend"] in built:
                r["extra"]["tower"] = getattr(built[r["backend"]][0], "tower_kind", None)
        if stage1.is_modelled(params):
            _model_full_depth(params, rows)
        stage1.clear_cache()

    def summarize(self, result):
        result["stage1"] = summary(result["results"])
        result["notes"] = [f"stage1 {size}: {s['note']}" for size, s in result["stage1"].items() if s.get("modelled")]


STAGE1_CASES = Stage1Cases()


def build_case(op: str, backend: str, device: str = "cpu", **params):
    """``(fn, inputs)`` of one Stage-1 step (the memory subprocess rebuilds cases through this)."""
    if op != "stage1":
        raise ValueError(f"op must be 'stage1'; got {op!r}")
    return stage1.stage1_case(backend, device, **params)


def _model_full_depth(params: dict, rows: list[dict]) -> None:
    """The full-depth step time of each variant from the per-layer time measured with SEA off."""
    by = {r["backend"]: r for r in rows if not r.get("error")}
    aux = next((r for r in by.values() if r.get("auxiliary")), None)
    off = by.get("sea-off")
    if not (aux and off):
        return
    n_built, n_short, n_total = stage1.built_layers(params), params["layers_short"], stage1.total_layers(params)
    per_layer = max(0.0, (off["median_s"] - aux["median_s"]) / (n_built - n_short))
    for r in by.values():
        r["extra"]["per_layer_s"] = per_layer
        if not r.get("auxiliary"):
            r["extra"]["modelled_step_s"] = r["median_s"] + (n_total - n_built) * per_layer
            r["extra"]["layers_modelled"] = n_total


def summary(rows: list[dict]) -> dict:
    """Per Stage-1 size: step time per variant (modelled where the LM was cut) and overhead vs SEA off."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows if r["op"] == "stage1"):
        these = {r["backend"]: r for r in rows if r["op"] == "stage1" and r["size"] == size and not r.get("error")}
        modelled = any("modelled_step_s" in r.get("extra", {}) for r in these.values())
        key = (lambda r: r["extra"]["modelled_step_s"]) if modelled else (lambda r: r["median_s"])
        steps = {
            b: key(r)
            for b, r in these.items()
            if not r.get("auxiliary") and (not modelled or "modelled_step_s" in r["extra"])
        }
        off = steps.get("sea-off")
        out[size] = {
            "modelled": modelled,
            "step_s": steps,
            "overhead": {b: t / off for b, t in steps.items() if off and b != "sea-off"},
            "tower": next((r["extra"].get("tower") for r in these.values() if r.get("extra", {}).get("tower")), None),
            "target_fused": TARGETS.get(size),
        }
        if modelled:
            out[size]["note"] = _modelled_note(next(iter(these.values())))
    return out


def _modelled_note(r: dict) -> str:
    p = r["params"]
    return (
        f"LM: {stage1.built_layers(p)} of {stage1.total_layers(p)} layers built; the "
        f"{stage1.total_layers(p)}-layer step is modelled from the per-layer time measured with SEA off "
        f"({r['extra'].get('per_layer_s', 0) * 1e3:.1f} ms per layer)"
    )
