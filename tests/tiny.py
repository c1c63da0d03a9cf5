"""The tests' tiny builders: tokenizers, model configs, a SigLIP-style tower, images and LLaVA-style
JSON, on top of the shipped stand-ins of :mod:`sea_model.tiny_models`. Built offline in well under a second."""

from __future__ import annotations

import random
from pathlib import Path

from sea_model.bench.report import write_json  # noqa: F401 (the one JSON writer, for the tests' data files)
from sea_model.config import ModelConfig, SEAConfig, VisionConfig
from sea_model.tiny_models import CHATML_TEMPLATE, text_words, tiny_clip_config, tiny_llm_config, word_tokenizer

# Words the tiny tokenizer knows well and the tiny SEA vocabulary is made of.
WORDS = [
    "cat",
    "dog",
    "bird",
    "car",
    "tree",
    "house",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "sky",
    "water",
    "road",
    "person",
    "ball",
    "table",
    "chair",
    "window",
    "door",
    "grass",
    "cloud",
    "boat",
    "flower",
    "sun",
    "street",
    "light",
    "shadow",
    "yellow",
    "white",
]

TINY_SIGLIP_TIMM_NAME = "sea_tiny_siglip"


def register_tiny_siglip() -> str:
    """Register (once) a tiny SigLIP-style timm ViT: no CLS token, MAP head. Returns its name."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if TINY_SIGLIP_TIMM_NAME not in timm.list_models(TINY_SIGLIP_TIMM_NAME):

        def sea_tiny_siglip(pretrained: bool = False, **kwargs):
            kwargs.setdefault("global_pool", "map")
            for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(key, None)
            return VisionTransformer(
                img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, **kwargs
            )

        register_model(sea_tiny_siglip)
    return TINY_SIGLIP_TIMM_NAME


def tiny_siglip_config() -> dict:
    """An open_clip config whose image tower is the tiny timm SigLIP-style ViT (MAP head, no proj)."""
    name = register_tiny_siglip()
    return {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "timm_model_name": name,
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def tiny_vision_config(**kw):
    """A :class:`~sea_model.config.VisionConfig` for :func:`tiny_clip_config` (random weights)."""
    return VisionConfig(name="tiny-clip", pretrained=None, model_cfg=tiny_clip_config(), **kw)


def tiny_model_config(tokenizer, *, cache_dir=None, sea: bool = True, vocab_size: int = 64, **sea_options):
    """A whole :class:`~sea_model.config.ModelConfig`: tiny CLIP tower, tiny Llama sized for
    ``tokenizer`` (plus room for ``<image>``), SEA over wordfreq's top ``vocab_size`` words with
    ``top_n=3``; ``sea_options`` override :class:`~sea_model.config.SEAConfig` fields (e.g.
    ``backend="reference"``)."""
    options = {"enabled": sea, "vocab_size": vocab_size, "top_n": 3, "cache_dir": str(cache_dir) if cache_dir else None}
    options.update(sea_options)
    return ModelConfig(vision=tiny_vision_config(), llm=tiny_llm_config(len(tokenizer) + 1), sea=SEAConfig(**options))


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = [
        "A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER: what is in the image? ASSISTANT: a photo of a cat.",
        "user assistant system describe the picture briefly. what color is it?",
        "Render a clear and concise summary of the photo.",
    ]
    for _ in range(200):
        lines.append(" ".join(rng.choice(WORDS + ["a", "the", "of", "on", "in", "is", "with"]) for _ in range(8)))
    return lines


def tiny_tokenizer(*, chat_template: bool = False, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in memory on a small corpus (about 0.1 s).

    Specials: ``<pad>`` (0), ``<s>`` (1, BOS, prepended by the post-processor), ``</s>`` (2,
    EOS), ``<unk>`` (3), then ``<image>`` (added special token). With ``chat_template`` it
    carries a ChatML template (``<|im_start|>``/``<|im_end|>`` added as specials); without one,
    stage 2 uses the Vicuna v1 format.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    extra = ["<image>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else [])
    hf.add_tokens(extra, special_tokens=True)
    if chat_template:
        hf.chat_template = CHATML_TEMPLATE
    return hf


def tiny_word_tokenizer(*, chat_template: bool = False):
    """A word-level tokenizer over the tiny corpus: every word and punctuation mark is one token,
    ``"\\n"`` is a token of its own, specials as in :func:`tiny_tokenizer`. Token boundaries are
    obvious, which makes exact token-by-token expectations easy to write."""
    return word_tokenizer(text_words(_corpus()), chat_template=chat_template)


def make_images(folder, n: int = 4, *, size=(40, 30), corrupt: int = 0, seed: int = 0) -> list[str]:
    """Write ``n`` random RGB PNGs (``img0.png``...) and ``corrupt`` broken files (``bad0.png``...)
    into ``folder``; returns the relative names of the good images."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = size if i % 2 == 0 else size[::-1]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    for i in range(corrupt):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return names


def pretrain_entries(images: list[str], *, seed: int = 0) -> list[dict]:
    """``blip_laion_cc_sbu_558k.json``-style entries: one image, a short caption each."""
    rng = random.Random(seed)
    return [
        {
            "id": f"pt{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                {"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(4))},
            ],
        }
        for i, name in enumerate(images)
    ]


def finetune_entries(images: list[str], *, seed: int = 0) -> list[dict]:
    """``llava_v1_5_mix665k.json``-style entries: multi-turn with images, plus text-only ones."""
    rng = random.Random(seed)

    def turn():
        return [
            {"from": "human", "value": f"what color is the {rng.choice(WORDS)}?"},
            {"from": "gpt", "value": f"it is {rng.choice(WORDS)}."},
        ]

    out = []
    for i, name in enumerate(images):
        conv = turn() + turn()
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
        out.append({"id": f"ft{i}", "image": name, "conversations": conv})
    out.append({"id": "text-only", "conversations": turn()})
    return out


def trainer_args(out, **kw):
    """``transformers.TrainingArguments`` of the tests' tiny CPU Trainer runs (one step, no saving, no
    logging services), with ``kw`` overriding."""
    import pytest

    pytest.importorskip("accelerate")  # transformers.Trainer needs it (the `model` extra installs it)
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return TrainingArguments(**{**base, **kw})


def llava_sea(words, **sea_options):
    """A tiny random HF Llava (only its projector trains, in train mode) with SEA attached by ``LlavaSEA``:
    ``(tokenizer, llava, sea)``. Labels without random draws (one label per patch, no dedup) unless
    ``sea_options`` say otherwise."""
    import torch

    from sea_model import tiny_models
    from sea_model.hf import LlavaSEA

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    clip = tiny_models.tiny_hf_clip("clip")
    llava = tiny_models.tiny_hf_llava(clip, tok)
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    options = dict(backend="reference", cache_dir=False, progress=False, window=1, top_n=1, dedup=False)
    return tok, llava.train(), LlavaSEA(llava, clip, tok, tok, words, **{**options, **sea_options})
