"""``sea lab``: does SEA work? Both arms trained in a synthetic world whose truth the renderer knows.

Steps (all offline, CPU):

1. The world (:mod:`.world`): training, validation and held-out scenes with their
   per-patch truth; captions (stage 1), questions (stage 2), text-only descriptions (the LLM).
2. A tiny CLIP trained on the training scenes (:mod:`.clip`); held-out R@1; the
   precision of SEA's labeler against the renderer with ``negate`` True/False and ``top_n`` 1/10
   on the validation scenes. The SEA arm uses the labeler setting with the best validation
   precision (chosen before any adapter is trained; the baseline does not label).
3. A tiny Llama pretrained on text alone (questions answered from a description in words), as
   LLaVA starts from a pretrained LLM; saved with ``save_pretrained`` and shared by every run.
4. Per seed, two arms from the same initialisation, data, steps and seed, differing only in
   lambda: ``sea`` (lambda = 1) and ``baseline`` (lambda = 0; SEA still computes ``L_align``,
   which gets weight 0). Stage 1 trains the adapter on captions; stage 2 trains adapter + LLM on
   questions from that adapter (SEA off in stage 2 for both, as in the paper).
5. Metrics on held-out scenes, along training: **token alignment** (stage 1): the share of object
   patches whose visual token's nearest LLM word (cosine against the Eq. 8 embeddings of the SEA
   vocabulary) is one of the patch's true words (its object's colour and shape); **answer
   accuracy** (stage 2): the share of held-out questions (five kinds, one-word answers) whose
   greedy answer's first token is the answer word.
6. Ablations of the SEA arm (lambda 0.1 and 10, temperature init, ``negate``, ``top_n``).

Outputs under ``OUT``: ``results.json``, ``results.md``, ``curves.png``, ``figure1/<arm>/`` (``sea
inspect`` of the seed-0 stage-1 checkpoints on the same held-out scene) and every checkpoint
(``runs/seed<k>/<arm>/stage{1,2}``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .arms import Evaluator, run_groups
from .plan import ALL_ABLATIONS, PATCHES, SIZES, LabSize, ablation_options
from .prepare import base_model_config, make_clip, make_world, pretrain_llm
from .results import describe, figure1, plot_curves, table


class _Laps:
    """Seconds per phase (``results["seconds"]``), each printed as it ends."""

    def __init__(self):
        self.timing: dict[str, float] = {}
        self.t0 = time.time()

    def start(self) -> None:
        self.t0 = time.time()

    def __call__(self, name: str, t0: float | None = None) -> None:
        self.timing[name] = round(time.time() - (self.t0 if t0 is None else t0), 1)
        print(f"sea lab: {name} done in {self.timing[name]:.0f} s", flush=True)


def _prepare(out: Path, size: LabSize, seeds: list[int], common: dict, backend: str, lap: _Laps):
    """``(world, clip, base model config, evaluator)``: what every arm shares."""
    lap.start()
    world = make_world(out / "data", size, seeds[0])
    lap("world")
    lap.start()
    clip = make_clip(world, out / "clip", size, seeds[0])
    lap("clip")
    print(f"sea lab: CLIP held-out R@1 {clip.r_at_1:.3f}; labeler negate={clip.negate} top_n={clip.top_n}", flush=True)
    lap.start()
    llm = pretrain_llm(world, clip, out / "llm", size, {**common, "seed": seeds[0]})
    base = base_model_config(world, clip, llm, out, backend)
    lap("llm")
    ev = Evaluator(world, clip.heldout_pixels, PATCHES, world.tokenizer.convert_tokens_to_ids("<image>"))
    return world, clip, base, ev


def _plans(seeds: list[int], size: LabSize, full: bool, chosen: dict) -> list:
    """``(name, SEAConfig overrides, seeds)`` of both arms and the ablations."""
    plans = [("sea", {"weight": 1.0}, seeds), ("baseline", {"weight": 0.0}, seeds)]
    plans += [
        (f"ablation:{n}", ablation_options(n, chosen), seeds if full else seeds[:1])
        for n in (ALL_ABLATIONS if full else size.ablations)
    ]
    return plans


def run(
    out: str | Path = "sea-lab",
    *,
    quick: bool = False,
    full: bool = False,
    seeds: list[int] | None = None,
    threads: int | None = 1,
    backend: str = "reference",
    progress: bool = False,
    size: LabSize | None = None,
) -> dict:
    """The whole experiment (see the module docstring); returns the results dict written to
    ``OUT/results.json``."""
    start, cpu_start = time.time(), time.process_time()
    size = size or SIZES["quick" if quick else "default"]
    seeds = list(seeds) if seeds else list(size.seeds)
    out = Path(out)
    for sub in ("data", "clip", "llm", "runs", "figure1", "cache"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if threads is not None:
        torch.set_num_threads(threads)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    common = {"save_every": 0, "keep_last": 1, "device": "cpu", "progress": progress, "tensorboard": False}
    common["plot"] = False
    lap = _Laps()
    world, clip, base, ev = _prepare(out, size, seeds, common, backend, lap)
    plans = _plans(seeds, size, full, {"negate": clip.negate, "top_n": clip.top_n})
    groups = run_groups(plans, base, world, ev, size, common, out, lap)
    command = "sea lab" + (" --quick" if quick else "") + (" --full" if full else "")
    results = describe(command, seeds, size, world, clip, ev, groups)
    lap.start()
    results["figure1"] = figure1(results, world, out / "figure1")
    results["curves_png"] = str(plot_curves(results, out / "curves.png"))
    lap("figures")
    timing = lap.timing
    timing["total"] = round(time.time() - start, 1)
    timing["cpu_total"] = round(time.process_time() - cpu_start, 1)  # this process's CPU time (all threads)
    results["seconds"] = timing
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    print("\n" + table(results) + f"\nsea lab: done in {timing['total']:.0f} s; {out / 'results.json'}", flush=True)
    return results
