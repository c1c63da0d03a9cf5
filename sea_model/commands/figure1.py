"""``sea inspect``: the paper's Figure 1 for any checkpoint — which LLM word each visual token is nearest to.

For every patch of an image:

* its visual token (the adapter's output) and the LLM word nearest to it: cosine against the
  Eq. 8 embeddings of the SEA vocabulary's words (each word's mean input embedding over its
  subword tokens), and optionally the nearest row of the LLM's whole token table;
* its CLIP labels from SEA's own labeler: the ``top_n`` words by cosine between the patch's
  joint-space feature and the words' CLIP text features (``-cos`` when ``negate``), kept when
  the score is > 0 (Eq. 4-6). A patch with at least one is *labelled*.

Scores: **token alignment** is the share of labelled patches whose nearest word is among their
labels; **top-1 agreement** the share whose nearest word is their first label. The figure draws
the image (as the tower sees it), its patch grid and each patch's nearest word: green when it is
among the patch's labels, red when not, grey on unlabelled patches.

Sources: a sea checkpoint (stage 1 or 2; the vocabulary is the one its config names), or a LLaVA
``mm_projector.bin`` with the model config it belongs to (default LLaVA-1.5: CLIP ViT-L/14-336
and Vicuna-7B; random parts of a config are rebuilt under ``seed``, as the trainer builds them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sea_kernels import cosine_topk, word_embeddings

from ..config import ModelConfig
from ..model import build_model
from ..training import checkpoint as ckpt
from ..vocab import load_words


@dataclass
class Inspected:
    """What the model does with one image."""

    name: str
    image: object  # the image as the tower sees it (PIL, after preprocessing)
    grid: tuple[int, int]
    nearest: list[str]  # per patch, the nearest SEA-vocabulary word
    labels: list[list[str]]  # per patch, the CLIP labels (top_n with score > 0), best first
    nearest_token: list[str] = field(default_factory=list)  # per patch, nearest token of the whole table

    def scores(self) -> dict:
        labelled = [i for i, lab in enumerate(self.labels) if lab]
        hit = sum(self.nearest[i] in self.labels[i] for i in labelled)
        top1 = sum(self.nearest[i] == self.labels[i][0] for i in labelled)
        n = len(labelled)
        return {
            "patches": len(self.labels),
            "labelled": n,
            "token_alignment": hit / n if n else None,
            "top1_agreement": top1 / n if n else None,
            "aligned": hit,
            "top1": top1,
        }


# --------------------------------------------------------------------------- the measurements


def word_table(embedding_weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``(q, D)`` float32: every word's Eq. 8 embedding (mean input embedding over its tokens)."""
    labels = torch.arange(token_ids.shape[0], device=embedding_weight.device)
    return word_embeddings(labels, token_ids.to(embedding_weight.device), embedding_weight.detach()).float()


@torch.no_grad()
def visual_tokens(model, pixel_values: torch.Tensor, *, joint_space: bool = False):
    """``(visual tokens (B, P, D) float32, tower output)`` for preprocessed images."""
    out = model.tower(pixel_values, joint_space=joint_space)
    param = next(model.adapter.parameters(), None)
    visual = model.adapter(out.hidden.to(param.dtype if param is not None else out.hidden.dtype))
    return visual.float(), out


def nearest(visual: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the row of ``table`` (q, D) with the largest cosine to each ``visual`` row (..., D)."""
    sims = F.normalize(visual.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    return sims.argmax(-1)


def clip_labels(patch_features: torch.Tensor, vocab_features: torch.Tensor, *, top_n: int, negate: bool):
    """Per patch, SEA's candidate labels: vocabulary indices of the ``top_n`` scores that are > 0."""
    top = cosine_topk(patch_features, vocab_features.to(patch_features.device), top_n, negate=negate)
    keep = top.values > 0
    return [[int(j) for j, k in zip(ji, ki) if k] for ji, ki in zip(top.indices.tolist(), keep.tolist())]


@torch.no_grad()
def inspect_images(
    model, tokenizer, words: list[str], images: dict, *, top_n: int, negate: bool, all_tokens: bool = False
) -> list[Inspected]:
    """``images``: name -> PIL image. The model needs ``vocab_features`` and ``word_token_ids``."""
    if model.vocab_features is None or model.word_token_ids is None:
        raise ValueError("the model has no SEA vocabulary (build it with sea.enabled=True)")
    processor = model.tower.image_processor()
    device = model.vocab_features.device
    pixel_values = torch.stack([processor(im) for im in images.values()]).to(device)
    visual, out = visual_tokens(model, pixel_values, joint_space=True)
    emb = model.llm.get_input_embeddings().weight
    near = nearest(visual, word_table(emb, model.word_token_ids)).tolist()
    near_tok = nearest(visual, emb).tolist() if all_tokens else None
    results = []
    for b, name in enumerate(images):
        labels = clip_labels(out.patch_features[b], model.vocab_features, top_n=top_n, negate=negate)
        results.append(
            Inspected(
                name,
                _displayed(pixel_values[b], processor),
                tuple(out.grid),
                [words[j] for j in near[b]],
                [[words[j] for j in lab] for lab in labels],
                [tokenizer.convert_ids_to_tokens(int(t)) for t in near_tok[b]] if near_tok else [],
            )
        )
    return results


def _displayed(pixel_values: torch.Tensor, processor):
    """The preprocessed image back as a PIL image (what the patches cover)."""
    from PIL import Image

    mean = torch.tensor(processor.cfg.mean).view(3, 1, 1)
    std = torch.tensor(processor.cfg.std).view(3, 1, 1)
    x = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


# --------------------------------------------------------------------------- outputs


def draw(result: Inspected, path: Path, *, title: str | None = None) -> Path:
    """Figure 1 for one image: the image, its patch grid, each patch's nearest word (green: among its
    CLIP labels, red: not, grey: unlabelled patch) and, small under it, the patch's first CLIP label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gh, gw = result.grid
    fig, ax = plt.subplots(figsize=(8, 8.6))
    ax.imshow(result.image, extent=(0, gw, gh, 0), interpolation="nearest")
    for k in range(1, gw):
        ax.axvline(k, color="white", lw=0.5, alpha=0.7)
    for k in range(1, gh):
        ax.axhline(k, color="white", lw=0.5, alpha=0.7)
    size = max(3.0, min(9.0, 70.0 / gw))
    for p, word in enumerate(result.nearest):
        labels = result.labels[p]
        colour = "#9e9e9e" if not labels else ("#1a9850" if word in labels else "#d73027")
        if labels:  # the patch's first CLIP label, small, under the nearest word
            ax.text(
                p % gw + 0.5,
                p // gw + 0.8,
                labels[0],
                ha="center",
                va="center",
                fontsize=size * 0.7,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.6},
            )
        ax.text(
            p % gw + 0.5,
            p // gw + 0.5,
            word,
            ha="center",
            va="center",
            fontsize=size,
            color="white",
            bbox={"boxstyle": "round,pad=0.15", "fc": colour, "ec": "none", "alpha": 0.85},
        )
    s = result.scores()
    ax.set_axis_off()
    head = title or result.name
    if s["labelled"]:
        head += f"\ntoken alignment {s['token_alignment']:.2f}, top-1 agreement {s['top1_agreement']:.2f}"
        head += f" ({s['labelled']} labelled patches)"
    ax.set_title(head, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(results: list[Inspected], source: dict) -> dict:
    """Scores per image and over all images (patch-weighted), plus every patch's words."""
    per = []
    for r in results:
        patches = [
            {
                "nearest": r.nearest[p],
                "labels": r.labels[p],
                **({"nearest_token": r.nearest_token[p]} if r.nearest_token else {}),
            }
            for p in range(len(r.nearest))
        ]
        per.append({"image": r.name, "grid": list(r.grid), **r.scores(), "per_patch": patches})
    n = sum(p["labelled"] for p in per)
    return {
        "source": source,
        "token_alignment": sum(p["aligned"] for p in per) / n if n else None,
        "top1_agreement": sum(p["top1"] for p in per) / n if n else None,
        "labelled": n,
        "patches": sum(p["patches"] for p in per),
        "images": per,
    }


def markdown(s: dict) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| image | patches | labelled | token alignment | top-1 agreement |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in s["images"]:
        scores = f"{fmt(p['token_alignment'])} | {fmt(p['top1_agreement'])}"
        lines.append(f"| {p['image']} | {p['patches']} | {p['labelled']} | {scores} |")
    lines.append(
        f"| **all** | {s['patches']} | {s['labelled']} | {fmt(s['token_alignment'])} | {fmt(s['top1_agreement'])} |"
    )
    src = ", ".join(f"{k} {v}" for k, v in s["source"].items())
    return f"# sea inspect\n\n{src}\n\n" + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading


def load_model_config(path: str | os.PathLike):
    """A :class:`~sea_model.config.ModelConfig` from YAML/JSON: the model config itself, or a run
    config (``run_config.yaml``) or checkpoint ``config.json`` holding it under ``model``."""
    import yaml

    try:
        d = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such file: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML/JSON: {err}") from None
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping (a model config), got {type(d).__name__}")
    try:
        return ModelConfig.from_dict(d)
    except TypeError as err:
        raise ValueError(f"{path}: not a model config ({err})") from None


def load(checkpoint=None, *, mm_projector=None, config=None, device="cpu", seed: int = 0):
    """``(model with SEA vocabulary, tokenizer, words, source dict)`` from a sea checkpoint, or from
    an ``mm_projector.bin`` with a :class:`~sea_model.config.ModelConfig` (default LLaVA-1.5's)."""
    if (checkpoint is None) == (mm_projector is None):
        raise ValueError("give either a checkpoint or an mm_projector.bin")
    tokenizer = None
    if checkpoint is not None:
        path = ckpt.resolve(checkpoint)
        info = ckpt.read_info(path)
        config = ModelConfig.from_dict(info["model"])
        tokenizer = ckpt.load_tokenizer(path)
        source = {"checkpoint": str(path), "stage": info["stage"], "step": info["step"]}
    else:
        if not Path(mm_projector).is_file():
            raise FileNotFoundError(f"--mm_projector: no such file: {mm_projector}")
        config = config if config is not None else ModelConfig()
        source = {"mm_projector": str(mm_projector)}
    config.sea.enabled = True  # the vocabulary is what inspection needs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random parts as the trainer built them
        model, tokenizer = build_model(config, tokenizer, device=device, progress=False)
    if checkpoint is not None:
        ckpt.load_weights(model, path)
    else:
        ckpt.load_mm_projector(model.adapter, mm_projector)
    model.eval()
    words = load_words(config.sea.words, size=config.sea.vocab_size).words
    return model, tokenizer, words, source


def run(
    images: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    checkpoint=None,
    mm_projector=None,
    config=None,
    top_n: int | None = None,
    negate: bool | None = None,
    all_tokens: bool = False,
    device: str = "cpu",
    seed: int = 0,
    title: str | None = None,
) -> dict:
    """Inspect ``images``; write ``<out>/<image stem>.png`` for each, ``summary.json`` and ``summary.md``.
    ``top_n``/``negate`` default to the model's SEA settings. Returns the summary."""
    from PIL import Image

    model, tokenizer, words, source = load(
        checkpoint, mm_projector=mm_projector, config=config, device=device, seed=seed
    )
    sea = model.sea_config
    top_n = sea.top_n if top_n is None else top_n
    negate = sea.negate if negate is None else negate
    loaded = {}
    for p in images:
        try:
            with Image.open(p) as im:
                loaded[Path(p).name] = im.convert("RGB")
        except (FileNotFoundError, OSError) as err:
            raise ValueError(f"--image {p}: cannot read ({err})") from None
    results = inspect_images(model, tokenizer, words, loaded, top_n=top_n, negate=negate, all_tokens=all_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        draw(r, out / f"{Path(r.name).stem}.png", title=title)
    s = summary(results, {**source, "top_n": top_n, "negate": negate, "words": len(words)})
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    (out / "summary.md").write_text(markdown(s))
    return s
