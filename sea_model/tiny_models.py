"""Tiny random stand-ins, built offline in well under a second: what ``sea demo``, ``sea lab`` and
the Stage-1 benchmark build their models and tokenizers from.

A tiny open_clip ViT config, a tiny Llama config, a word-level tokenizer (every word one token),
and tiny Hugging Face CLIP/SigLIP and Llava models with captioned samples (``examples/``). The
tests' builders on top of these are in ``tests/tiny.py``. Nothing here downloads anything.
"""

from __future__ import annotations

import random

from .vision import hf_vision_part

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_clip_config(
    *, image_size: int = 32, patch_size: int = 8, width: int = 32, layers: int = 3, heads: int = 2, embed_dim: int = 16
) -> dict:
    """An open_clip CLIP config: ViT ``image_size/patch_size`` grid, CLS pooling, tiny text tower.

    The text tower keeps CLIP's BPE vocabulary (49,408) so open_clip's bundled tokenizer works.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def tiny_llm_config(vocab_size: int, **overrides) -> dict:
    """A 2-layer Llama config dict (hidden 32), usable as ``ModelConfig.llm``."""
    cfg = {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def word_tokenizer(words, *, specials=("<pad>", "<s>", "</s>", "<unk>"), eos_token="</s>", chat_template: bool = False):
    """A word-level tokenizer: ``specials`` then the sorted ``words``, one token each; ``"\\n"`` is a
    token of its own, ``<image>`` an added special (with ``chat_template``, ``<|im_start|>`` and
    ``<|im_end|>`` too, and a ChatML template). The post-processor prepends ``<s>`` (BOS).
    Whitespace pre-tokenization: a text of known words splits into exactly those tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", specials.index("<s>"))]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=eos_token, unk_token="<unk>"
    )
    hf.add_tokens([AddedToken("\n", normalized=False)])
    hf.add_tokens(["<image>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else []), special_tokens=True)
    if chat_template:
        hf.chat_template = CHATML_TEMPLATE
    return hf


def text_words(texts) -> list[str]:
    """The distinct words (and punctuation marks) of ``texts``, as :func:`word_tokenizer` splits them."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    return sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text)})


# --------------------------------------------------------------------------- Hugging Face models


def tiny_hf_clip(family: str = "clip", *, text_vocab_size: int = 512, image_size: int = 32, patch_size: int = 8):
    """A tiny random Hugging Face ``CLIPModel`` (``family="clip"``) or ``SiglipModel`` (``"siglip"``):
    ViT of width 32, 3 blocks, a ``(image_size / patch_size)^2`` grid; text tower of width 32 over
    ``text_vocab_size`` ids (large enough for :func:`tiny_tokenizer`), eos = pad + 2 as there."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(
        vocab_size=text_vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if family == "clip":
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    if family == "siglip":
        return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    raise ValueError(f"family must be 'clip' or 'siglip'; got {family!r}")


def tiny_hf_llava(
    clip, tokenizer, *, vision_feature_layer=-2, vision_feature_select_strategy: str = "default", hidden: int = 48
):
    """A tiny random ``LlavaForConditionalGeneration`` whose vision tower carries the weights of
    ``clip``'s vision part (a :func:`tiny_hf_clip` model), a 2-layer Llama over ``tokenizer``'s ids,
    and ``<image>`` as its image token."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=clip.config.vision_config,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act="gelu",
    )
    llava = LlavaForConditionalGeneration(config)
    hf_vision_part(llava.model.vision_tower).load_state_dict(clip.vision_model.state_dict())
    return llava


def llava_caption_samples(
    tokenizer, llava, words: list[str], n: int = 8, *, caption_words: int = 5, seed: int = 0
) -> list[dict]:
    """Stage-1 samples for a :func:`tiny_hf_llava` model: ``<image>`` x (its image tokens), then a
    caption of random ``words`` and ``</s>``; ``labels`` supervise the caption only; random pixels."""
    import torch

    cfg = llava.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n_image = side * side + (
        1 if cfg.vision_feature_select_strategy == "full" and "clip" in cfg.vision_config.model_type else 0
    )
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        caption = tokenizer(" " + " ".join(rng.choice(words) for _ in range(caption_words)), add_special_tokens=False)
        ids = [cfg.image_token_id] * n_image + caption["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100] * n_image + ids[n_image:]
        size = cfg.vision_config.image_size
        out.append(
            {
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "pixel_values": torch.randn(3, size, size, generator=gen),
            }
        )
    return out


def collate_padded(samples: list[dict], pad_id: int = 0) -> dict:
    """Right-pad ``input_ids``/``labels`` (``pad_id``/-100), add ``attention_mask``, stack ``pixel_values``."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)

    def pad(key, value):
        return torch.stack([torch.cat([s[key], s[key].new_full((width - len(s[key]),), value)]) for s in samples])

    ids = pad("input_ids", pad_id)
    mask = torch.stack([torch.arange(width) < len(s["input_ids"]) for s in samples]).long()
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": pad("labels", -100),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
    }
