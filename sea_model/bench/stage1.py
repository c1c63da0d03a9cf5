"""One Stage-1 training step of :class:`sea_model.model.SEAModel`, with SEA off, on with the
reference ops, and on with the fused ops (``backend="auto"``).

The step is the trainer's own :func:`sea_model.training.step.train_step` with one micro-batch (data loading,
schedule and logging aside): ``freeze_for_stage(1)`` (adapter + SEA's log-scale train, tower and LM
frozen), forward under bf16 autocast on GPUs, ``loss.backward()`` outside it (through the frozen LM
into the adapter), gradient clipping at 1.0, ``AdamW.step()``, ``zero_grad``, the losses read once. Weights are
random; the SEA vocabulary is random features with random LM token ids (1 to ``word_tokens``
tokens per word); the batch is random pixels and ``<image>`` x P + ``text`` random caption tokens.

Sizes:

* ``demo``: the sizes of ``sea demo`` (:mod:`sea_model.commands.demo`): a CLIP ViT of width 64, 2 layers, on
  64 px images (16 patches), joint dim 32; a 2-layer Llama of hidden 128 (intermediate 256, 4
  heads, 237 token ids); SEA over 219 words, ``top_n=3``; micro batch 32, 12 caption tokens; float32.
* ``demo-41k``: the same with the paper's 41,242-word vocabulary (labels dominate).
* ``llava-cpu``: the proportions of a small real MLLM, for CPUs: open_clip's ViT-B-16 (random weights)
  at 224 px (14 x 14 = 196 patches, width 768, 12 layers, joint dim 512, ``select_layer=-2``),
  adapter ``mlp2x_gelu`` 768 -> 768, a Llama-shaped LM of hidden 768, 12 layers, 12 heads,
  intermediate 2048 and a 32,000-token vocabulary; SEA over 41,242 words of 1 to 3 tokens,
  ``top_n=10``; micro batch 4, 32 caption tokens; float32. Here the labels' FLOPs are a few percent
  of the step.
* ``llava-7b``: LLaVA-1.5-7B shapes: a CLIP ViT-L/14-336 tower (24 x 24 = 576 patches, width 1024,
  24 layers, joint dim 768; random weights), adapter ``mlp2x_gelu`` 1024 -> 4096, Vicuna-7B-shaped
  Llama layers (hidden 4096, intermediate 11008, 32 heads, vocabulary 32,000) of which only
  ``layers`` (4) are built: the step is measured with 4 and with 2 layers and the 32-layer step is
  modelled as ``t(4 layers) + 28 x (t(4) - t(2)) / 2`` (the per-layer time measured with SEA off; SEA's
  own cost does not depend on the depth). SEA over 41,242 words of 1 to 3 tokens, ``top_n=10``;
  micro batch 32 (LLaVA-1.5's per-device stage-1 batch), 32 caption tokens; bf16 weights for tower
  and LM, float32 adapter, bf16 autocast. One GPU, so no cross-rank negatives; no gradient
  checkpointing (as ``sea_model.training``), which LLaVA itself uses (it would add a forward per layer
  and make SEA's share smaller still).

The tower is open_clip's ``VisionTower`` when open_clip is installed, else :class:`StandInTower`, a
plain-PyTorch CLIP ViT of the same shapes (conv patch embedding, CLS token, pre-LN blocks with
QuickGELU MLPs, hidden states of layer -2 for the adapter, ``ln_post`` + ``proj`` of every patch for
the joint-space features; ``SEA_BENCH_STANDIN_TOWER=1`` forces it); the result says which ran.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from sea_kernels._common import DTYPES, SHORT_DTYPES

STAGE1_BACKENDS = ("sea-off", "sea-reference", "sea-fused")
SEA_BACKEND = {"sea-off": None, "sea-reference": "reference", "sea-fused": "auto"}

TOWERS = {
    "demo": dict(image_size=64, patch_size=16, width=64, layers=2, heads=2, embed_dim=32),
    "vit-b-16": dict(
        image_size=224, patch_size=16, width=768, layers=12, heads=12, embed_dim=512, open_clip_name="ViT-B-16"
    ),
    "vit-l-14-336": dict(
        image_size=336,
        patch_size=14,
        width=1024,
        layers=24,
        heads=16,
        embed_dim=768,
        open_clip_name="ViT-L-14-336-quickgelu",
    ),
}
LLMS = {
    "demo": dict(
        vocab_size=237,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "llama-768": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}

STAGE1_SIZES = {
    "demo": dict(tower="demo", llm="demo", batch=32, text=12, q=219, word_tokens=1, top_n=3, dtype="float32"),
    "demo-41k": dict(tower="demo", llm="demo", batch=32, text=12, q=41242, word_tokens=1, top_n=3, dtype="float32"),
    "llava-cpu": dict(
        tower="vit-b-16", llm="llama-768", batch=4, text=32, q=41242, word_tokens=3, top_n=10, dtype="float32"
    ),
    "llava-7b": dict(
        tower="vit-l-14-336",
        llm="llama-7b",
        batch=32,
        text=32,
        q=41242,
        word_tokens=3,
        top_n=10,
        dtype="bfloat16",
        layers=4,
        layers_short=2,
    ),
}


def num_patches(params: dict) -> int:
    t = TOWERS[params["tower"]]
    return (t["image_size"] // t["patch_size"]) ** 2


def tokens_per_step(params: dict) -> int:
    return params["batch"] * (num_patches(params) + params["text"])


def total_layers(params: dict) -> int:
    return LLMS[params["llm"]]["num_hidden_layers"]


def built_layers(params: dict) -> int:
    return params.get("layers") or total_layers(params)


def is_modelled(params: dict) -> bool:
    return built_layers(params) < total_layers(params)


def describe(params: dict) -> str:
    t, m = TOWERS[params["tower"]], LLMS[params["llm"]]
    dtype = SHORT_DTYPES[params["dtype"]]
    layers = (
        f"{built_layers(params)} of {total_layers(params)} layers"
        if is_modelled(params)
        else f"{total_layers(params)} layers"
    )
    return (
        f"B={params['batch']} P={num_patches(params)} T={num_patches(params) + params['text']} ViT "
        f"w{t['width']}x{t['layers']}, "
        f"LM h{m['hidden_size']} {layers}, q={params['q']} {dtype}"
    )


# --------------------------------------------------------------------------- the tower stand-in


class _Block(nn.Module):
    """A pre-LN CLIP transformer block (attention + QuickGELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, int(width * mlp_ratio))
        self.c_proj = nn.Linear(int(width * mlp_ratio), width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.out_proj(a)
        h = self.c_fc(self.ln_2(x))
        return x + self.c_proj(h * torch.sigmoid(1.702 * h))


class StandInTower(nn.Module):
    """A frozen CLIP-ViT-shaped tower in plain PyTorch with ``VisionTower``'s interface (random weights).

    ``forward(pixel_values, *, joint_space=True, pooled=True) -> TowerOutput(hidden (B, P, width) of
    layer select_layer without CLS, patch_features (B, P, embed_dim), pooled (B, embed_dim), grid)``;
    with ``joint_space=False`` it stops after ``select_layer`` and the last two are None; with
    ``pooled=False`` pooled is None."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        select_layer: int = -2,
        **_,
    ):
        super().__init__()
        side = image_size // patch_size
        self.image_size = (image_size, image_size)
        self.grid = (side, side)
        self.num_patches = side * side
        self.hidden_size, self.feature_dim = width, embed_dim
        self.layer = select_layer % (layers + 1)
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen, like VisionTower

    @torch.no_grad()
    def forward(self, pixel_values, *, joint_space: bool = True, pooled: bool = True):
        from ..vision import TowerOutput

        w = self.conv1.weight
        x = self.conv1(pixel_values.to(device=w.device, dtype=w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        selected = x
        last = len(self.blocks) if joint_space else self.layer  # without SEA: stop at select_layer
        for i, block in enumerate(self.blocks[:last], start=1):
            x = block(x)
            if i == self.layer:
                selected = x
        if not joint_space:
            return TowerOutput(selected[:, 1:], None, None, self.grid)
        pool = self.ln_post(x[:, 0]) @ self.proj if pooled else None
        patches = self.ln_post(x[:, 1:]) @ self.proj
        return TowerOutput(selected[:, 1:], patches, pool, self.grid)


def build_tower(name: str, device, dtype: torch.dtype):
    """``(tower, description)``: open_clip's ``VisionTower`` when open_clip is installed, else the stand-in."""
    cfg = dict(TOWERS[name])
    open_clip_name = cfg.pop("open_clip_name", None)
    standin = os.environ.get("SEA_BENCH_STANDIN_TOWER", "0") not in ("", "0")
    if not standin and importlib.util.find_spec("open_clip") is not None:
        from ..config import VisionConfig
        from ..tiny_models import tiny_clip_config
        from ..vision import VisionTower

        if open_clip_name:
            vc = VisionConfig(name=open_clip_name, pretrained=None)
        else:
            vc = VisionConfig(name=f"bench-{name}", pretrained=None, model_cfg=tiny_clip_config(**cfg))
        tower = VisionTower.from_config(vc, device=device).to(device=device, dtype=dtype)
        return tower, f"open_clip {open_clip_name or 'CLIP ViT'} (random weights)"
    with torch.device(device):
        tower = StandInTower(**cfg)
    why = "SEA_BENCH_STANDIN_TOWER is set" if standin else "open_clip is not installed"
    return tower.to(device=device, dtype=dtype), f"plain-PyTorch CLIP ViT stand-in ({why}; random weights)"


# --------------------------------------------------------------------------- the model and the step

_SHARED: dict = {}


def clear_cache() -> None:
    """Drop the cached tower and LM (the runner calls this after each size)."""
    _SHARED.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _shared(params: dict, device):
    """Tower, LM, vocabulary buffers and a batch, built once per size and device (seeded)."""
    key = json.dumps({k: v for k, v in params.items() if k != "active_layers"}, sort_keys=True) + str(device)
    if key in _SHARED:
        return _SHARED[key]
    from ..model import load_llm
    from ..tiny_models import tiny_llm_config

    dtype = DTYPES[params["dtype"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower, tower_kind = build_tower(params["tower"], device, dtype)
        llm_cfg = dict(LLMS[params["llm"]])
        llm_cfg["num_hidden_layers"] = built_layers(params)
        vocab = llm_cfg.pop("vocab_size")
        spec = tiny_llm_config(vocab, max_position_embeddings=4096, **llm_cfg)
        try:
            with torch.device(device):  # initialise on the device: fast for 7B-shaped layers
                llm = load_llm(spec, dtype=dtype)
        except Exception:  # pragma: no cover - an older transformers without device-context support
            llm = load_llm(spec, dtype=dtype)
        llm = llm.to(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        q, lw = params["q"], params["word_tokens"]
        vocab_features = torch.randn(q, tower.feature_dim, generator=g)
        ids = torch.randint(3, vocab, (q, lw), generator=g)
        lengths = torch.randint(1, lw + 1, (q, 1), generator=g)
        ids = ids.masked_fill(torch.arange(lw)[None, :] >= lengths, -1)
        b, p, t = params["batch"], tower.num_patches, params["text"]
        image_token_id = vocab  # beyond the LM's table, as a tokenizer's added <image>
        input_ids = torch.cat([torch.full((b, p), image_token_id), torch.randint(3, vocab, (b, t), generator=g)], dim=1)
        labels = input_ids.clone()
        labels[:, :p] = -100
        size = tower.image_size
        batch = {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": labels.to(device),
            "pixel_values": torch.randn(b, 3, *size, generator=g).to(device),
        }
    shared = dict(
        tower=tower,
        tower_kind=tower_kind,
        llm=llm,
        image_token_id=image_token_id,
        vocab_features=vocab_features,
        word_token_ids=ids,
        batch=batch,
    )
    _SHARED[key] = shared
    return shared


@contextlib.contextmanager
def active_layers(llm, n: int | None):
    """Run only the first ``n`` decoder layers of a Llama-style LM (None: all)."""
    inner = llm.model
    layers, count = inner.layers, llm.config.num_hidden_layers
    if n is None or n >= len(layers):
        yield
        return
    inner.layers = nn.ModuleList(list(layers)[:n])
    llm.config.num_hidden_layers = n
    try:
        yield
    finally:
        inner.layers = layers
        llm.config.num_hidden_layers = count


def stage1_case(backend: str, device="cpu", *, warmup_steps: int = 2, **params):
    """``(step, (batch,))``: one Stage-1 training step of the variant ``backend`` (see the module doc).

    ``params`` are a ``STAGE1_SIZES`` entry, optionally with ``active_layers`` (run only that many of
    the built LM layers: the per-layer time of a modelled size)."""
    from ..config import SEAConfig
    from ..model import SEAModel
    from ..training import step as trainer

    if backend not in STAGE1_BACKENDS:
        raise ValueError(f"stage1 backend must be one of {STAGE1_BACKENDS}; got {backend!r}")
    n_active = params.pop("active_layers", None)
    device = torch.device(device)
    shared = _shared(params, device)
    sea_backend = SEA_BACKEND[backend]
    sea = SEAConfig(enabled=sea_backend is not None, top_n=params["top_n"], backend=sea_backend or "auto")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = SEAModel(
            shared["tower"],
            shared["llm"],
            image_token_id=shared["image_token_id"],
            adapter="mlp2x_gelu",
            sea=sea,
            vocab_features=shared["vocab_features"] if sea.enabled else None,
            word_token_ids=shared["word_token_ids"] if sea.enabled else None,
        ).to(device)
    model.freeze_for_stage(1)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = trainer.StepState(
        model=model,
        optimizer=torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0),
        params=trainable,
        generator=torch.Generator(device=device).manual_seed(0),
        grad_clip=1.0,
        bf16=device.type == "cuda",
    )
    llm = shared["llm"]

    def step(batch):  # the trainer's own step (sea_model.training.step.train_step), one micro-batch
        with active_layers(llm, n_active):
            return trainer.train_step(state, iter([batch]), accum=1)["loss"]

    for _ in range(warmup_steps):  # optimizer state, kernels compiled, extension loaded
        step(shared["batch"])
    step.tower_kind = shared["tower_kind"]  # type: ignore[attr-defined]
    step.state = state  # type: ignore[attr-defined]  # the model and optimizer (benchmarks/stage1_regions.py)
    return step, (shared["batch"],)
