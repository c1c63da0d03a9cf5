"""The lab's arms: one arm is stage 1 (adapter, ``L_gen + lambda * L_align``) then stage 2 (adapter
+ LLM, SEA off) for one seed, evaluated along the way against the renderer's truth (:class:`Evaluator`)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...config import DataConfig, RunConfig, TrainConfig
from ...prompts import prompt_ids
from ...training.loop import train
from ...vocab import word_token_ids
from ..figure1 import nearest, visual_tokens, word_table
from . import world as W
from .plan import LabSize
from .prepare import World


class Evaluator:
    """Token alignment against the renderer's truth and held-out answer accuracy for a model."""

    def __init__(self, world: World, pixels: torch.Tensor, num_patches: int, image_token_id: int):
        self.pixels = pixels
        index = {w: i for i, w in enumerate(world.words)}
        truth = [W.true_words(s, t) for s, t in zip(world.heldout.scenes, world.heldout.truth)]
        self.object = torch.tensor([[bool(w) for w in row] for row in truth])
        self.colour = torch.tensor([[index[w[0]] if w else -1 for w in row] for row in truth])
        self.shape = torch.tensor([[index[w[1]] if w else -1 for w in row] for row in truth])
        self.token_ids = word_token_ids(world.words, world.tokenizer)
        tok = world.tokenizer
        qs = W.eval_questions(world.heldout, seed=0)
        ids = [
            prompt_ids(q, tok, template="chat", image_token_id=image_token_id, num_image_tokens=num_patches)
            for _, _, q, _ in qs
        ]
        self.lengths = torch.tensor([len(x) for x in ids])
        self.input_ids = torch.full((len(ids), int(self.lengths.max())), tok.pad_token_id)
        for i, x in enumerate(ids):
            self.input_ids[i, : len(x)] = torch.tensor(x)
        self.scene = torch.tensor([i for i, _, _, _ in qs])
        self.kinds = [k for _, k, _, _ in qs]
        self.answers = torch.tensor([tok.convert_tokens_to_ids(a) for _, _, _, a in qs])

    @torch.no_grad()
    def token_alignment(self, model) -> float:
        was = model.training
        model.eval()
        visual, _ = visual_tokens(model, self.pixels)
        near = nearest(visual, word_table(model.llm.get_input_embeddings().weight, self.token_ids)).cpu()
        model.train(was)
        hit = (near == self.colour) | (near == self.shape)
        return float(hit[self.object].float().mean())

    @torch.no_grad()
    def answer_accuracy(self, model, chunk: int = 64) -> tuple[float, dict]:
        was = model.training
        model.eval()
        right = []
        for s in range(0, len(self.answers), chunk):
            ids, n = self.input_ids[s : s + chunk], self.lengths[s : s + chunk]
            mask = (torch.arange(ids.shape[1])[None] < n[:, None]).long()
            embeds, _, _, _ = model.embed(ids, self.pixels[self.scene[s : s + chunk]])
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
            right += (logits[torch.arange(len(n)), n - 1].argmax(-1) == self.answers[s : s + chunk]).tolist()
        model.train(was)
        by_kind = {k: statistics.mean(r for r, kk in zip(right, self.kinds) if kk == k) for k in W.QUESTION_KINDS}
        return statistics.mean(right), by_kind


def eval_steps(total: int, n: int) -> set[int]:
    return {max(1, round(total * (k + 1) / n)) for k in range(n)}


@dataclass
class Arm:
    name: str
    sea: dict  # SEAConfig overrides (weight = lambda, ...)
    seed: int
    out: Path
    token_alignment: float = math.nan
    answer_accuracy: float = math.nan
    by_kind: dict = field(default_factory=dict)
    alignment_after_stage2: float = math.nan
    curve_alignment: list = field(default_factory=list)  # [step, value]
    curve_accuracy: list = field(default_factory=list)
    loss: dict = field(default_factory=dict)
    seconds: float = 0.0


def train_stage(stage: int, model, data: Path, world: World, out: Path, sizes: tuple, seed: int, common: dict, **kw):
    """One stage through the project's trainer: stage 1 on captions (``plain``), stage 2 on questions (``chat``)."""
    steps, batch, lr = sizes
    template, max_length = ("plain", 128) if stage == 1 else ("chat", 160)
    return train(
        RunConfig(
            model=model,
            data=DataConfig(
                json_path=str(data),
                image_folder=str(world.images),
                template=template,
                max_length=max_length,
                num_workers=1,
            ),
            train=TrainConfig(
                stage=stage,
                out_dir=str(out),
                init_from=kw.pop("init_from", None),
                lr=lr,
                global_batch_size=batch,
                micro_batch_size=batch,
                max_steps=steps,
                seed=seed,
                **common,
            ),
        ),
        **kw,
    )


def run_arm(arm: Arm, base, world: World, ev: Evaluator, size: LabSize, common: dict) -> Arm:
    """Stage 1 (adapter, ``L_gen + lambda * L_align``) then stage 2 (adapter + LLM, SEA off)."""
    start = time.time()
    at1, at2 = eval_steps(size.stage1[0], size.evals), eval_steps(size.stage2[0], size.evals)

    def on_stage1(step, metrics, model):
        if step in at1:
            arm.curve_alignment.append([step, ev.token_alignment(model)])

    def on_stage2(step, metrics, model):
        if step in at2:
            acc, arm.by_kind = ev.answer_accuracy(model)
            arm.curve_accuracy.append([step, acc])
            if step == size.stage2[0]:
                arm.alignment_after_stage2 = ev.token_alignment(model)

    model = dataclasses.replace(base, sea=dataclasses.replace(base.sea, **arm.sea))
    s1 = train_stage(
        1,
        model,
        world.captions,
        world,
        arm.out / "stage1",
        size.stage1,
        arm.seed,
        common,
        tokenizer=world.tokenizer,
        callback=on_stage1,
    )
    model = dataclasses.replace(model, sea=dataclasses.replace(model.sea, enabled=False))
    s2 = train_stage(
        2,
        model,
        world.questions,
        world,
        arm.out / "stage2",
        size.stage2,
        arm.seed,
        common,
        init_from=str(arm.out / "stage1"),
        callback=on_stage2,
    )
    arm.token_alignment, arm.answer_accuracy = arm.curve_alignment[-1][1], arm.curve_accuracy[-1][1]
    h1, h2 = s1.history, s2.history
    arm.loss = {
        "stage1_L_gen": [h1[0]["loss_gen"], h1[-1]["loss_gen"]],
        "stage1_L_align": [h1[0]["loss_align"], h1[-1]["loss_align"]],
        "stage1_tau": h1[-1]["tau"],
        "stage2_L_gen": [h2[0]["loss_gen"], h2[-1]["loss_gen"]],
    }
    arm.seconds = time.time() - start
    return arm


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def collect(arms: list[Arm], sea: dict) -> dict:
    """One arm's per-seed lists (in seed order), curves and summary."""
    return {
        "sea": sea,
        "seeds": [a.seed for a in arms],
        "token_alignment": [a.token_alignment for a in arms],
        "answer_accuracy": [a.answer_accuracy for a in arms],
        "answer_accuracy_by_kind": [a.by_kind for a in arms],
        "token_alignment_after_stage2": [a.alignment_after_stage2 for a in arms],
        "curves": {
            "token_alignment": [a.curve_alignment for a in arms],
            "answer_accuracy": [a.curve_accuracy for a in arms],
        },
        "summary": {
            "token_alignment": mean_std([a.token_alignment for a in arms]),
            "answer_accuracy": mean_std([a.answer_accuracy for a in arms]),
        },
        "loss": [a.loss for a in arms],
        "checkpoints": [str(a.out) for a in arms],
        "seconds": [round(a.seconds, 1) for a in arms],
    }


def run_groups(plans: list, base, world: World, ev: Evaluator, size: LabSize, common: dict, out: Path, lap) -> dict:
    """Every ``(name, SEAConfig overrides, seeds)`` of ``plans``, each seed through :func:`run_arm`."""
    groups = {}
    for name, options, group_seeds in plans:
        t0 = time.time()
        arms = []
        for s in group_seeds:
            arm = Arm(name, options, s, out / "runs" / f"seed{s}" / name.replace(":", "_").replace("=", "_"))
            arms.append(run_arm(arm, base, world, ev, size, {**common}))
            print(
                f"sea lab: {name} seed {s}: token alignment {arm.token_alignment:.3f}, answer accuracy "
                f"{arm.answer_accuracy:.3f} ({arm.seconds:.0f} s)",
                flush=True,
            )
        groups[name] = collect(arms, dataclasses.asdict(dataclasses.replace(base.sea, **options)))
        lap(name, t0)
    return groups
