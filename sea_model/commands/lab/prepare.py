"""What every run of ``sea lab`` shares: the world on disk, a tiny CLIP trained on it (with the
labeler setting it labels best), a tiny LLM pretrained on text, and the arms' model configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import DataConfig, ModelConfig, RunConfig, SEAConfig, TrainConfig, VisionConfig
from ...training.loop import train
from ...vision import VisionTower, load_clip
from ...vocab import wordfreq_words
from ..demo import demo_llm_config, demo_tokenizer
from . import clip as C
from . import world as W
from .plan import DISTRACTORS, IMAGE_SIZE, PATCH, LabSize


@dataclass
class World:
    """The lab's world on disk: its scenes, SEA vocabulary, tokenizer and LLaVA JSON files."""

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
    own = list(dict.fromkeys([*W.COLOURS, *W.SHAPES, *W.SIZES, *W.ROWS, *W.COLUMNS, "object"]))
    extra = [w for w in wordfreq_words(DISTRACTORS + len(own)).words if w not in own]
    return own + extra[:DISTRACTORS]


def make_world(root: Path, size: LabSize, seed: int) -> World:
    """Training, validation and held-out scenes under ``root``, the SEA word list, the tokenizer,
    and the captions, questions and texts as LLaVA JSON files."""
    images = root / "images"
    split = dict(size=IMAGE_SIZE, patch=PATCH)
    train_split = W.write_split(images, "train", size.train, seed=seed * 1000 + 1, **split)
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
        train_split,
        val,
        heldout,
        words,
        vocab_file,
        root / "tokenizer",
        tokenizer,
        W.write_json(root / "captions.json", W.caption_entries(train_split)),
        W.write_json(root / "questions.json", W.question_entries(train_split, seed=seed)),
        W.write_json(root / "texts.json", W.text_entries(size.llm[0] * size.llm[1], seed=seed + 7)),
    )


@dataclass
class Clip:
    """The trained CLIP (its ``VisionConfig``), its scores and the labeler setting chosen with it."""

    config: object  # VisionConfig of the trained CLIP
    r_at_1: float
    training: dict
    labeler: list[dict]  # validation and held-out precision per (negate, top_n)
    negate: bool  # the chosen labeler setting
    top_n: int
    heldout_pixels: torch.Tensor


def make_clip(world: World, out: Path, size: LabSize, seed: int) -> Clip:
    """The lab's CLIP trained on the training scenes (saved as ``out/clip.pt``), its held-out R@1,
    and the labeler setting with the best validation precision."""
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


def base_model_config(world: World, clip: Clip, llm: Path, out: Path, backend: str) -> ModelConfig:
    """The model both arms start from: the lab's CLIP, the pretrained LLM, SEA with the chosen labeler."""
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
