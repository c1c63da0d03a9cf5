"""The lab's CLIP: a tiny open_clip model trained on the scenes with the project's ``contrastive_loss``,
its held-out retrieval (R@1) and the precision of SEA's labeler with it against the renderer's truth.

The image tower pools by averaging its patch tokens (open_clip ``pool_type="avg"``), so the
image embedding is the mean of the patch features SEA labels with; with CLS pooling (LLaVA's CLIP)
nothing trains the patch features directly. The text tower's token embeddings stay at their random
initialisation (fixed codes for the few dozen BPE tokens the world uses; training all 49,408 rows
costs most of a step). Texts: the full caption half of the time, else a part of it (some
attributes of one object), so that short texts such as a single word, which the labeler scores
patches against, are in the text tower's training distribution.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from sea_kernels import contrastive_loss, patch_labels

from .world import Scene, Split, true_words


def clip_config(*, image_size: int, patch_size: int) -> dict:
    """A tiny open_clip CLIP: ViT with average pooling, a 2-layer text tower with CLIP's BPE."""
    return {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": 64,
            "layers": 3,
            "head_width": 32,
            "pool_type": "avg",
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def clip_text(scene: Scene, rng: random.Random) -> str:
    """The caption, or (half of the time) some attributes of one of its objects (``"red circle"``)."""
    if rng.random() < 0.5:
        return scene.caption()
    o = rng.choice(scene.objects)
    parts = [p for p in (o.size, o.colour, o.shape, f"at the {o.where}") if rng.random() < 0.5]
    return " ".join(parts or [rng.choice((o.colour, o.shape))])


def load_images(folder: Path, names: list[str], processor) -> torch.Tensor:
    from PIL import Image

    out = []
    for name in names:
        with Image.open(folder / name) as im:
            out.append(processor(im.convert("RGB")))
    return torch.stack(out)


def train_clip(bundle, images: torch.Tensor, split: Split, *, steps: int, batch: int, lr: float, seed: int) -> dict:
    """Train ``bundle.model`` (both towers) in place; returns the loss history summary."""
    model = bundle.model
    model.train().requires_grad_(True)
    model.token_embedding.requires_grad_(False)  # 49,408 random rows, a few dozen used: fixed codes
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, start = [], time.time()
    for _ in range(steps):
        idx = torch.randint(len(split.scenes), (batch,), generator=gen)
        tokens = bundle.tokenizer([clip_text(split.scenes[i], rng) for i in idx.tolist()])
        x = model.encode_image(images[idx])
        t = model.encode_text(tokens)
        loss = contrastive_loss(x, t, model.logit_scale.exp().clamp(max=100.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "seconds": time.time() - start,
    }


@torch.no_grad()
def recall_at_1(bundle, images: torch.Tensor, split: Split) -> float:
    """Held-out image-to-text retrieval among the split's captions: the share of images whose
    nearest caption is their own (a caption equal to another scene's counts as right)."""
    captions = [s.caption() for s in split.scenes]
    x = torch.nn.functional.normalize(bundle.model.encode_image(images), dim=-1)
    t = torch.nn.functional.normalize(bundle.encode_text(captions), dim=-1)
    best = (x @ t.T).argmax(1).tolist()
    return sum(captions[j] == captions[i] for i, j in enumerate(best)) / len(captions)


@torch.no_grad()
def labeler_precision(
    tower,
    images: torch.Tensor,
    split: Split,
    words: list[str],
    vocab_features: torch.Tensor,
    *,
    top_n: int,
    window: int,
    negate: bool,
    seed: int,
) -> dict:
    """SEA's labeler (``patch_labels``, one sampled label per window) on held-out scenes, scored
    against the renderer: ``precision`` is the share of sampled labels that are one of their
    patch's true words (a label on a background patch is wrong); ``object_share`` the share of
    sampled patches that show an object; ``labelled`` the share of windows that got a label."""
    out = tower(images)
    labels = patch_labels(
        out.patch_features,
        vocab_features,
        grid=out.grid,
        top_n=top_n,
        window=window,
        negate=negate,
        generator=torch.Generator().manual_seed(seed),
        backend="reference",
    )
    right = on_object = n = 0
    for b in range(len(split.scenes)):
        truth = true_words(split.scenes[b], split.truth[b])
        for p, lab, ok in zip(labels.patch[b].tolist(), labels.label[b].tolist(), labels.valid[b].tolist()):
            if ok:
                n += 1
                right += words[lab] in truth[p]
                on_object += bool(truth[p])
    total = labels.valid.numel()
    return {
        "negate": negate,
        "top_n": top_n,
        "precision": right / max(n, 1),
        "object_share": on_object / max(n, 1),
        "labelled": n / total,
        "labels": n,
    }
