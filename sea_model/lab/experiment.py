"""``sea lab``: does SEA work? Both arms trained in a synthetic world whose truth the renderer knows.

Steps (all offline, CPU):

1. The world (:mod:`sea_model.lab.world`): training, validation and held-out scenes with their
   per-patch truth; captions (stage 1), questions (stage 2), text-only descriptions (the LLM).
2. A tiny CLIP trained on the training scenes (:mod:`sea_model.lab.clip`); held-out R@1; the
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

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import world as W


@dataclass(frozen=True)
class LabSize:
    train: int  # training scenes (CLIP, stage 1, stage 2)
    val: int  # scenes for choosing the labeler setting
    heldout: int  # evaluation scenes
    clip: tuple[int, int, float]  # steps, batch, lr
    llm: tuple[int, int, float]  # text pretraining: steps, batch, lr
    stage1: tuple[int, int, float]
    stage2: tuple[int, int, float]
    seeds: tuple[int, ...]
    evals: int  # evaluations along each stage
    ablations: tuple[str, ...]  # run with the first seed only, unless --full


SIZES = {
    "default": LabSize(
        train=1500,
        val=48,
        heldout=100,
        clip=(300, 128, 2e-3),
        llm=(150, 32, 3e-3),
        stage1=(80, 32, 2e-3),
        stage2=(200, 32, 2e-3),
        seeds=(0, 1, 2),
        evals=5,
        ablations=("tau_init", "lambda=10", "top_n"),
    ),
    "quick": LabSize(
        train=96,
        val=16,
        heldout=16,
        clip=(20, 32, 2e-3),
        llm=(10, 16, 3e-3),
        stage1=(6, 16, 2e-3),
        stage2=(6, 16, 2e-3),
        seeds=(0, 1),
        evals=2,
        ablations=("lambda=10",),
    ),
}
ALL_ABLATIONS = ("lambda=0.1", "lambda=10", "tau_init", "negate", "top_n")
IMAGE_SIZE, PATCH = 64, 16
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # visual tokens per image
DISTRACTORS = 200  # wordfreq words in the SEA vocabulary besides the world's own


# --------------------------------------------------------------------------- preparation


@dataclass
class World:
    root: Path
    images: Path
    train: W.Split
    val: W.Split
    heldout: W.Split
    words: list[str]  # the SEA vocabulary
    vocab_file: Path
    tokenizer_dir: Path
    tokenizer: object
    captions: Path
    questions: Path
    texts: Path


def sea_vocabulary() -> list[str]:
    """The world's content words, then wordfreq's most frequent words as distractors."""
    from .. import vocab

    own = list(dict.fromkeys([*W.COLOURS, *W.SHAPES, *W.SIZES, *W.ROWS, *W.COLUMNS, "object"]))
    extra = [w for w in vocab.wordfreq_words(DISTRACTORS + len(own)).words if w not in own]
    return own + extra[:DISTRACTORS]


def make_world(root: Path, size: LabSize, seed: int) -> World:
    from ..demo import demo_tokenizer

    images = root / "images"
    split = dict(size=IMAGE_SIZE, patch=PATCH)
    train = W.write_split(images, "train", size.train, seed=seed * 1000 + 1, **split)
    val = W.write_split(images, "val", size.val, seed=seed * 1000 + 2, **split)
    heldout = W.write_split(images, "heldout", size.heldout, seed=seed * 1000 + 3, **split)
    words = sea_vocabulary()
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n")
    tokenizer = demo_tokenizer(W.world_words() + words)
    tokenizer.save_pretrained(str(root / "tokenizer"))
    return World(
        root,
        images,
        train,
        val,
        heldout,
        words,
        vocab_file,
        root / "tokenizer",
        tokenizer,
        W.write_json(root / "captions.json", W.caption_entries(train)),
        W.write_json(root / "questions.json", W.question_entries(train, seed=seed)),
        W.write_json(root / "texts.json", W.text_entries(size.llm[0] * size.llm[1], seed=seed + 7)),
    )


@dataclass
class Clip:
    config: object  # VisionConfig of the trained CLIP
    r_at_1: float
    training: dict
    labeler: list[dict]  # validation and held-out precision per (negate, top_n)
    negate: bool  # the chosen labeler setting
    top_n: int
    heldout_pixels: torch.Tensor


def make_clip(world: World, out: Path, size: LabSize, seed: int) -> Clip:
    from ..vision import VisionConfig, VisionTower, load_clip
    from . import clip as C

    config = VisionConfig(
        name="lab-clip", pretrained=None, model_cfg=C.clip_config(image_size=IMAGE_SIZE, patch_size=PATCH)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bundle = load_clip(config)
    processor = VisionTower.from_clip(bundle).image_processor()
    pixels = {
        k: C.load_images(world.images, s.images, processor)
        for k, s in (("train", world.train), ("val", world.val), ("heldout", world.heldout))
    }
    steps, batch, lr = size.clip
    training = C.train_clip(bundle, pixels["train"], world.train, steps=steps, batch=batch, lr=lr, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "clip.pt"
    torch.save(bundle.model.state_dict(), path)
    r1 = C.recall_at_1(bundle, pixels["heldout"], world.heldout)
    tower = VisionTower.from_clip(bundle)
    feats = bundle.encode_text(world.words)
    rows = []
    for negate in (True, False):
        for top_n in (10, 1):
            row = {"negate": negate, "top_n": top_n}
            for split in ("val", "heldout"):
                p = C.labeler_precision(
                    tower,
                    pixels[split],
                    getattr(world, split),
                    world.words,
                    feats,
                    top_n=top_n,
                    window=2,
                    negate=negate,
                    seed=seed,
                )
                row[split] = {k: p[k] for k in ("precision", "object_share", "labelled", "labels")}
            rows.append(row)
    best = max(rows, key=lambda r: r["val"]["precision"])  # ties: the paper's negate=True, top_n=10 first
    return Clip(
        dataclasses.replace(config, pretrained=str(path)),
        r1,
        training,
        rows,
        best["negate"],
        best["top_n"],
        pixels["heldout"],
    )


def pretrain_llm(world: World, clip: Clip, out: Path, size: LabSize, common: dict) -> Path:
    """The tiny Llama trained on text alone (through the trainer's stage 2, no images), saved with
    ``save_pretrained`` for every run to start from."""
    from ..config import DataConfig, RunConfig, TrainConfig
    from ..demo import demo_llm_config
    from ..model import ModelConfig, SEAConfig
    from ..train import train

    llm = demo_llm_config(world.tokenizer, max_position_embeddings=192)
    steps, batch, lr = size.llm
    result = train(
        RunConfig(
            model=ModelConfig(
                vision=clip.config, llm=llm, tokenizer=str(world.tokenizer_dir), sea=SEAConfig(enabled=False)
            ),
            data=DataConfig(json_path=str(world.texts), template="chat", max_length=128, num_workers=1),
            train=TrainConfig(
                stage=2,
                out_dir=str(out),
                lr=lr,
                global_batch_size=batch,
                micro_batch_size=batch,
                max_steps=steps,
                **common,
            ),
        ),
        tokenizer=world.tokenizer,
    )
    path = out / "llm"
    result.model.llm.save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------- evaluation


class Evaluator:
    """Token alignment against the renderer's truth and held-out answer accuracy for a model."""

    def __init__(self, world: World, pixels: torch.Tensor, num_patches: int, image_token_id: int):
        from ..data import prompt_ids
        from ..vocab import word_token_ids

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
        from ..inspect import nearest, visual_tokens, word_table

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


# --------------------------------------------------------------------------- one arm


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
    from ..config import DataConfig, RunConfig, TrainConfig
    from ..train import train

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


# --------------------------------------------------------------------------- ablations and results


def ablation_options(name: str, chosen: dict) -> dict:
    """SEAConfig overrides of the SEA arm for ablation ``name``."""
    if name.startswith("lambda="):
        return {"weight": float(name.split("=", 1)[1])}
    if name == "tau_init":  # CLIP's tau = 0.07 instead of the paper's log-scale 0 (tau = 1)
        return {"init_log_scale": math.log(1 / 0.07)}
    if name == "negate":
        return {"negate": not chosen["negate"]}
    if name == "top_n":
        return {"top_n": 1 if chosen["top_n"] == 10 else 10}
    raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ALL_ABLATIONS)}")


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


def table(results: dict) -> str:
    """The Markdown table: mean ± std over seeds (sample std), arms then ablations."""

    def cell(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    lines = [
        "| run | lambda | seeds | token alignment (stage 1) | answer accuracy (stage 2) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    groups = [(k, v) for k, v in results["arms"].items()] + [
        (f"ablation {k}", v) for k, v in results["ablations"].items()
    ]
    for name, r in groups:
        s = r["summary"]
        lines.append(
            f"| {name} | {r['sea']['weight']:g} | {len(r['seeds'])} | {cell(s['token_alignment'])} | "
            f"{cell(s['answer_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"sea": "#1a9850", "baseline": "#d73027"}
    for ax, key, title in (
        (axes[0], "token_alignment", "stage 1: token alignment (held-out object patches)"),
        (axes[1], "answer_accuracy", "stage 2: answer accuracy (held-out questions)"),
    ):
        for arm, r in results["arms"].items():
            for k, curve in enumerate(r["curves"][key]):
                steps, values = zip(*curve)
                ax.plot(
                    steps,
                    values,
                    color=colours.get(arm, "grey"),
                    alpha=0.8,
                    marker="o",
                    ms=3,
                    label=f"{arm} (lambda={r['sea']['weight']:g})" if k == 0 else None,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the whole experiment


def base_model_config(world: World, clip: Clip, llm: Path, out: Path, backend: str):
    from ..model import ModelConfig, SEAConfig

    sea = SEAConfig(
        weight=1.0,
        top_n=clip.top_n,
        window=2,
        negate=clip.negate,
        init_log_scale=0.0,
        backend=backend,
        words=str(world.vocab_file),
        cache_dir=str(out / "cache"),
    )
    return ModelConfig(vision=clip.config, llm=str(llm), tokenizer=str(world.tokenizer_dir), sea=sea)


def figure1(results: dict, world: World, out: Path) -> dict:
    """``sea inspect`` of each arm's seed-0 stage-1 checkpoint on the same held-out scene."""
    from .. import inspect

    image = world.images / world.heldout.images[0]
    paths = {}
    for arm, r in results["arms"].items():
        s = inspect.run(
            [image],
            out / arm,
            checkpoint=Path(r["checkpoints"][0]) / "stage1",
            title=f"{arm} (lambda={r['sea']['weight']:g}), seed {r['seeds'][0]}, stage 1",
        )
        paths[arm] = {
            "png": str(out / arm / f"{image.stem}.png"),
            "token_alignment_vs_clip_labels": s["token_alignment"],
        }
    return {"image": str(image), "caption": world.heldout.scenes[0].caption(), **paths}


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


def describe(command: str, seeds: list, size: LabSize, world: World, clip: Clip, ev: Evaluator, groups: dict) -> dict:
    """The results dict (before figures and timing)."""
    return {
        "command": command,
        "seeds": seeds,
        "size": dataclasses.asdict(size),
        "world": {
            "image_size": IMAGE_SIZE,
            "patch": PATCH,
            "train": size.train,
            "val": size.val,
            "heldout": size.heldout,
            "vocabulary": len(world.words),
            "heldout_questions": len(ev.answers),
        },
        "clip": {
            "r_at_1": clip.r_at_1,
            "r_at_1_pool": size.heldout,
            "training": clip.training,
            "labeler": clip.labeler,
            "chosen": {"negate": clip.negate, "top_n": clip.top_n},
        },
        "arms": {"sea": groups.pop("sea"), "baseline": groups.pop("baseline")},
        "ablations": {k.split(":", 1)[1]: v for k, v in groups.items()},
    }


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
    timing = {}

    def lap(name, t0):
        timing[name] = round(time.time() - t0, 1)
        print(f"sea lab: {name} done in {timing[name]:.0f} s", flush=True)

    t0 = time.time()
    world = make_world(out / "data", size, seeds[0])
    lap("world", t0)
    t0 = time.time()
    clip = make_clip(world, out / "clip", size, seeds[0])
    lap("clip", t0)
    print(f"sea lab: CLIP held-out R@1 {clip.r_at_1:.3f}; labeler negate={clip.negate} top_n={clip.top_n}", flush=True)
    t0 = time.time()
    base = base_model_config(
        world, clip, pretrain_llm(world, clip, out / "llm", size, {**common, "seed": seeds[0]}), out, backend
    )
    lap("llm", t0)
    ev = Evaluator(world, clip.heldout_pixels, PATCHES, world.tokenizer.convert_tokens_to_ids("<image>"))
    chosen = {"negate": clip.negate, "top_n": clip.top_n}
    plans = [("sea", {"weight": 1.0}, seeds), ("baseline", {"weight": 0.0}, seeds)]
    plans += [
        (f"ablation:{n}", ablation_options(n, chosen), seeds if full else seeds[:1])
        for n in (ALL_ABLATIONS if full else size.ablations)
    ]
    groups = run_groups(plans, base, world, ev, size, common, out, lap)
    command = "sea lab" + (" --quick" if quick else "") + (" --full" if full else "")
    results = describe(command, seeds, size, world, clip, ev, groups)
    t0 = time.time()
    results["figure1"] = figure1(results, world, out / "figure1")
    results["curves_png"] = str(plot_curves(results, out / "curves.png"))
    lap("figures", t0)
    timing["total"] = round(time.time() - start, 1)
    timing["cpu_total"] = round(time.process_time() - cpu_start, 1)  # this process's CPU time (all threads)
    results["seconds"] = timing
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    print("\n" + table(results) + f"\nsea lab: done in {timing['total']:.0f} s; {out / 'results.json'}", flush=True)
    return results
