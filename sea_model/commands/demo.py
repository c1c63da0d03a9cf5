"""``sea demo``: both training stages, end to end, on a synthetic dataset, offline, on a CPU.

1. Scenes drawn with PIL: one shape (circle, square, triangle) of one of six colours, small or
   big, at one of nine positions on a light background. Stage-1 entries caption them
   (``"a small red circle in the top left"``); stage-2 entries ask two questions each
   (``"What colour is the circle?"`` -> ``"red"``; shape, position, size).
2. A word-level tokenizer over the demo's words and a SEA vocabulary of the demo's content
   words plus wordfreq's most frequent words (each one token), a tiny random CLIP (64 px,
   16 patches) and a tiny random Llama.
3. Stage 1 (adapter + SEA's temperature, ``L_gen + L_align``), stage 2 (adapter + LLM, from the
   stage-1 output), then one question answered through the same path as ``sea generate``.

Everything is random at the start (no pretrained weights can be downloaded here), so the CLIP
patch labels SEA aligns to carry no meaning; the demo shows the pipeline, its outputs and a loss
that falls, and the stage-2 LM learns the answer vocabulary from scratch, so learning rates
are higher than LLaVA's defaults (which assume pretrained models).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, RunConfig, SEAConfig, TrainConfig, VisionConfig
from ..model import answer
from ..tiny_models import text_words, tiny_clip_config, tiny_llm_config, word_tokenizer
from ..training.checkpoint import load_for_inference
from ..training.distributed import resolve_device
from ..training.loop import train
from ..vocab import wordfreq_words
from .shapes import COLOURS, COLUMNS, PRETRAIN_PROMPT, ROWS, SHAPES, Obj, background, draw_shape

OBJECT_SIZES = {"small": 0.13, "big": 0.25}  # half-width as a fraction of the image side
IMAGE_SIZE = 64
SEA_WORDS = 200  # wordfreq words in the SEA vocabulary besides the demo's own


def random_scene(rng: random.Random) -> Obj:
    """A demo scene: one object, anywhere in the 3 x 3 grid."""
    return Obj(
        rng.choice(SHAPES),
        rng.choice(sorted(COLOURS)),
        rng.choice(sorted(OBJECT_SIZES)),
        rng.randrange(3),
        rng.randrange(3),
    )


def draw(scene: Obj, rng: random.Random, size: int = IMAGE_SIZE):
    """The scene as a PIL image: a light, slightly varying background and the shape, jittered."""
    from PIL import ImageDraw

    image = background(rng, size)
    r = OBJECT_SIZES[scene.size] * size
    cx = (scene.column + 0.5) * size / 3 + rng.uniform(-2, 2)
    cy = (scene.row + 0.5) * size / 3 + rng.uniform(-2, 2)
    draw_shape(ImageDraw.Draw(image), scene.shape, [cx - r, cy - r, cx + r, cy + r], COLOURS[scene.colour])
    return image


def write_dataset(folder: Path, n: int, *, seed: int = 0) -> tuple[list[Obj], Path, Path]:
    """``n`` scenes as PNGs under ``folder/images`` plus ``pretrain.json`` and ``finetune.json``."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, pretrain, finetune = [], [], []
    for i in range(n):
        scene = random_scene(rng)
        name = f"scene{i:04d}.png"
        draw(scene, rng).save(images / name)
        scenes.append(scene)
        pretrain.append(
            {
                "id": f"pt{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": PRETRAIN_PROMPT},
                    {"from": "gpt", "value": scene.caption()},
                ],
            }
        )
        (q1, a1), (q2, a2) = rng.sample(scene.questions(), 2)
        finetune.append(
            {
                "id": f"ft{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\n" + q1},
                    {"from": "gpt", "value": a1},
                    {"from": "human", "value": q2},
                    {"from": "gpt", "value": a2},
                ],
            }
        )
    pt, ft = folder / "pretrain.json", folder / "finetune.json"
    pt.write_text(json.dumps(pretrain, indent=1))
    ft.write_text(json.dumps(finetune, indent=1))
    return scenes, pt, ft


def demo_texts() -> list[str]:
    """Every text the demo's data and questions can contain."""
    texts = [PRETRAIN_PROMPT.replace("<image>", "")]
    for shape in SHAPES:
        for colour in COLOURS:
            for size in OBJECT_SIZES:
                for row in range(3):
                    for col in range(3):
                        s = Obj(shape, colour, size, row, col)
                        texts.append(s.caption())
                        texts += [q + " " + a for q, a in s.questions()]
    return texts


def demo_tokenizer(extra_words: list[str]):
    """A word-level tokenizer (ChatML template, ``<|im_end|>`` as EOS) knowing every demo word
    and ``extra_words``; each is one token, so every SEA word has a single embedding row."""
    words = text_words(demo_texts() + ["user assistant a"]) + list(extra_words)
    specials = ("<pad>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>")
    return word_tokenizer(words, specials=specials, eos_token="<|im_end|>", chat_template=True)


def sea_words() -> list[str]:
    """The demo's content words, then wordfreq's most frequent lower-case words."""
    own = list(dict.fromkeys([*COLOURS, *SHAPES, *OBJECT_SIZES, *ROWS, *COLUMNS, "object", "image"]))
    return own + [w for w in wordfreq_words(SEA_WORDS + len(own)).words if w not in own][:SEA_WORDS]


RUN_SIZES = {
    # images, stage-1/2 (steps, global batch, lr), micro batch
    "default": {"images": 512, "stage1": (60, 32, 1e-3), "stage2": (300, 32, 2e-3), "micro": 32},
    "quick": {"images": 24, "stage1": (3, 8, 1e-3), "stage2": (3, 8, 3e-3), "micro": 8},
}


def run(
    out: str | Path = "sea-demo",
    *,
    quick: bool = False,
    device: str | None = None,
    backend: str = "auto",
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
) -> dict:
    """Build the data, train both stages, answer a question; returns the paths and the answer.

    ``threads``: torch CPU threads (None: leave as is). The demo's tensors are tiny, so one thread
    is as fast as several on an idle machine and much faster on a busy one."""
    start = time.time()
    device = str(resolve_device(device, "--device"))  # before anything is written
    sizes = RUN_SIZES["quick" if quick else "default"]
    out = Path(out)
    for sub in ("data", "stage1", "stage2"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if threads is not None:
        torch.set_num_threads(threads)

    print(f"sea demo: writing {sizes['images']} synthetic scenes to {out / 'data'}", flush=True)
    scenes, pretrain_json, finetune_json = write_dataset(out / "data", sizes["images"], seed=seed)
    tokenizer, model_config = _tokenizer_and_model(out / "data", backend)
    common = dict(micro_batch_size=sizes["micro"], save_every=0, keep_last=1, seed=seed, device=device)
    common.update(progress=progress)
    stage1 = _stage(1, out, model_config, pretrain_json, sizes["stage1"], common, tokenizer=tokenizer)
    stage2 = _stage(2, out, model_config, finetune_json, sizes["stage2"], common)
    asked = _ask(out, seed, device)
    result = {"out": out, "stage1": stage1, "stage2": stage2, **asked, "elapsed": time.time() - start}
    print(_summary(result, device, len(scenes)), flush=True)
    return result


def demo_llm_config(tokenizer, max_position_embeddings: int = 128):
    """The demo's tiny random Llama (hidden 128, 2 layers, 4 heads) over ``tokenizer``, whose
    ``<|im_end|>`` ends an answer; ``sea lab`` uses it too."""
    return tiny_llm_config(
        len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        max_position_embeddings=max_position_embeddings,
    )


def _tokenizer_and_model(data: Path, backend: str):
    """The demo's tokenizer (saved under ``data/tokenizer``), its SEA word list (``data/vocab.txt``)
    and the tiny random model's configuration."""
    words = sea_words()
    (data / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = demo_tokenizer(words)
    tokenizer.save_pretrained(str(data / "tokenizer"))
    model_config = ModelConfig(
        vision=VisionConfig(
            name="demo-clip",
            pretrained=None,
            model_cfg=tiny_clip_config(image_size=IMAGE_SIZE, patch_size=16, width=64, layers=2, heads=2, embed_dim=32),
        ),
        llm=demo_llm_config(tokenizer),
        tokenizer=str(data / "tokenizer"),
        sea=SEAConfig(words=str(data / "vocab.txt"), top_n=3, backend=backend, cache_dir=str(data.parent / "cache")),
    )
    return tokenizer, model_config


def _stage(stage: int, out: Path, model_config, json_path: Path, size: tuple, common: dict, tokenizer=None):
    """Stage 1: adapter (+ SEA's temperature) with ``L_gen + L_align`` on the captions; stage 2:
    adapter + LLM from the stage-1 output, SEA off (as in the paper), on the questions."""
    steps, batch, lr = size
    what = "captions (adapter + SEA)" if stage == 1 else "conversations (adapter + LLM)"
    print(f"sea demo: stage {stage}, {steps} steps of {batch} {what}", flush=True)
    if stage == 2:
        model_config = dataclasses.replace(model_config, sea=dataclasses.replace(model_config.sea, enabled=False))
    data = DataConfig(
        json_path=str(json_path),
        image_folder=str(out / "data" / "images"),
        template="plain" if stage == 1 else "chat",
        max_length=64 if stage == 1 else 96,
        num_workers=0,
    )
    init_from = str(out / "stage1") if stage == 2 else None
    train_config = TrainConfig(
        stage=stage,
        out_dir=str(out / f"stage{stage}"),
        init_from=init_from,
        lr=lr,
        global_batch_size=batch,
        max_steps=steps,
        **common,
    )
    return train(RunConfig(model=model_config, data=data, train=train_config), tokenizer=tokenizer)


def _ask(out: Path, seed: int, device: str) -> dict:
    """A question about a new scene, answered through the ``sea generate`` path."""
    from PIL import Image

    rng = random.Random(seed + 10_000)
    scene = random_scene(rng)
    image_path = out / "data" / "question.png"
    draw(scene, rng).save(image_path)
    question, truth = scene.questions()[0]
    model, tok, _ = load_for_inference(out / "stage2", device=device)
    with Image.open(image_path) as im:
        reply = answer(model, tok, question, im.convert("RGB"), template="chat", max_new_tokens=8)
    return {"question": question, "truth": truth, "answer": reply, "image": image_path, "scene": scene.caption()}


def _summary(r: dict, device: str, n_scenes: int) -> str:
    out, stage1, stage2 = r["out"], r["stage1"], r["stage2"]
    first1, last1 = stage1.history[0], stage1.history[-1]
    first2, last2 = stage2.history[0], stage2.history[-1]
    no_plot = "(no plot: matplotlib not installed)"
    return (
        f"\nsea demo: done in {r['elapsed']:.0f} s on {device}\n"
        f"  data:     {out / 'data'} ({n_scenes} scenes, pretrain.json, finetune.json, vocab.txt, tokenizer/)\n"
        f"  stage 1:  {stage1.out_dir}  L_gen {first1['loss_gen']:.2f} -> {last1['loss_gen']:.2f}, "
        f"L_align {first1['loss_align']:.2f} -> {last1['loss_align']:.2f}, tau {last1['tau']:.3f}\n"
        f"            checkpoint {stage1.checkpoint}\n"
        f"            {stage1.metrics}, {stage1.plot or no_plot}, LLaVA adapter {stage1.mm_projector}\n"
        f"  stage 2:  {stage2.out_dir}  L_gen {first2['loss_gen']:.2f} -> {last2['loss_gen']:.2f}\n"
        f"            checkpoint {stage2.checkpoint}\n"
        f"            {stage2.metrics}, {stage2.plot or no_plot}\n"
        f"  question: {r['question']}  (image {r['image']}: {r['scene']})\n"
        f"  answer:   {r['answer']!r}  (truth: {r['truth']!r})\n"
        f'  again:    sea generate --checkpoint {out / "stage2"} --image {r["image"]} --prompt "{r["question"]}"'
    )
