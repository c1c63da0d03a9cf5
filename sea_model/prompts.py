"""Conversation templates: the text a LLaVA conversation becomes, which of its tokens are supervised
(only the assistant's answers; every other label is -100), and generation prompts.

* ``"plain"`` (stage 1, LLaVA's ``conv_llava_plain``): ``<image>`` + caption + ``"\\n"``; the
  human turn is dropped, the caption and the newline are supervised.
* ``"chat"`` (stage 2): the tokenizer's own chat template; each answer span is the text the
  template adds for that assistant turn (end-of-turn tokens included).
* ``"vicuna_v1"`` (stage 2 for tokenizers without a chat template):
  ``"<system> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>"`` with LLaVA's
  system prompt and the tokenizer's EOS as ``</s>``; each ``<a_i></s>`` is supervised.
* ``"auto"``: ``"chat"`` when the tokenizer has a chat template, else ``"vicuna_v1"``.

Supervision is decided per token from the tokenizer's character offsets (a token is supervised
when it ends inside an answer span), so a fast tokenizer is required. As in LLaVA, an entry's
``<image>`` is moved to the start of its turn; each ``<image>`` token is then expanded into
``num_image_tokens`` copies, one per visual token, which the model replaces with the adapter's
outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import TEMPLATES

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def add_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Make ``token`` a special token of ``tokenizer`` (if it is not already) and return its id.

    The id may lie beyond the LLM's embedding table: the model never embeds it (image positions
    are overwritten by visual tokens) and never predicts it (their labels are -100).
    """
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat_template; use 'vicuna_v1' or 'auto'")
    return template


# --------------------------------------------------------------------------- rendering


def render(turns: Sequence[tuple[str, str]], tokenizer, template: str, *, generation: bool = False):
    """Turns ``[(role, text)]`` (role ``"user"``/``"assistant"``, alternating from ``"user"``) ->
    ``(text, answer_spans, add_special_tokens)``. ``answer_spans`` are ``[start, end)`` character
    ranges to supervise. With ``generation`` the text ends where the assistant's answer begins."""
    template = resolve_template(template, tokenizer)
    spans: list[tuple[int, int]] = []
    if template == "plain":
        # conv_llava_plain: the human turn is replaced by the image alone.
        image = IMAGE_TOKEN if IMAGE_TOKEN in turns[0][1] else ""
        if generation:
            return image, spans, True
        text = image
        for role, value in turns[1:]:
            if role == "assistant":
                spans.append((len(text), len(text) + len(value) + 1))
                text += value + "\n"
        return text, spans, True
    if template == "vicuna_v1":
        eos = tokenizer.eos_token or "</s>"
        text = VICUNA_SYSTEM + " "
        for role, value in turns:
            if role == "user":
                text += f"USER: {value} "
            else:
                text += "ASSISTANT: "
                spans.append((len(text), len(text) + len(value) + len(eos)))
                text += value + eos
        if generation:
            text += "ASSISTANT:"
        return text, spans, True
    # chat: the tokenizer's template; answer i is what rendering turn i adds to the prefix.
    messages = [{"role": r, "content": v} for r, v in turns]

    def chat(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    if generation:
        return chat(messages, True), spans, False
    text = chat(messages, False)
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before, through = chat(messages[:i], True), chat(messages[: i + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                "the tokenizer's chat template does not render conversations prefix-consistently, so answer "
                "spans cannot be located; use template='vicuna_v1'"
            )
        spans.append((len(before), len(through)))
    return text, spans, False


def tokenize(text: str, spans, tokenizer, *, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """``text`` -> ``(input_ids, labels)``; a token is supervised when it ends inside a span."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: a fast tokenizer (with offset mapping) is required")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (_, end) in enumerate(enc["offset_mapping"]):
        if any(s < end <= e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


def expand_image_tokens(ids: list[int], labels: list[int], image_token_id: int, n: int):
    """Each ``image_token_id`` becomes ``n`` copies with label -100."""
    out_ids, out_labels = [], []
    for t, l in zip(ids, labels):
        if t == image_token_id:
            out_ids += [image_token_id] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(t)
            out_labels.append(l)
    return out_ids, out_labels


def normalize_turns(conversations: Sequence[dict], has_image: bool) -> list[tuple[str, str]]:
    """LLaVA conventions: drop a leading non-human turn; move ``<image>`` to the start of its turn
    (or add it to the first human turn when the entry has an image but no ``<image>``)."""
    turns = [(ROLES[c["from"]], c["value"]) for c in conversations]
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    out = []
    for role, value in turns:
        if IMAGE_TOKEN in value:
            value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
        out.append((role, value))
    if has_image and not any(IMAGE_TOKEN in v for _, v in out):
        out[0] = (out[0][0], IMAGE_TOKEN + "\n" + out[0][1])
    return out


def encode_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer,
    *,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None = None,
) -> tuple[list[int], list[int], bool]:
    """Normalised turns -> ``(input_ids, labels, has_image)`` with image tokens expanded and
    truncation applied."""
    text, spans, special = render(turns, tokenizer, template)
    ids, labels = tokenize(text, spans, tokenizer, add_special_tokens=special)
    ids, labels = expand_image_tokens(ids, labels, image_token_id, num_image_tokens)
    has_image = image_token_id in ids
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        n_img = sum(t == image_token_id for t in ids)
        if 0 < n_img < num_image_tokens:  # cut through the image block: drop the block
            first = ids.index(image_token_id)
            ids, labels = ids[:first], labels[:first]
        has_image = image_token_id in ids
    return ids, labels, has_image


def prompt_ids(
    question: str,
    tokenizer,
    *,
    template: str = "auto",
    image: bool = True,
    image_token_id: int,
    num_image_tokens: int,
) -> list[int]:
    """Token ids of a generation prompt asking ``question`` (about an image when ``image``)."""
    value = (IMAGE_TOKEN + "\n" + question) if image else question
    text, _, special = render([("user", value)], tokenizer, template, generation=True)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    ids, _ = expand_image_tokens(ids, [IGNORE_INDEX] * len(ids), image_token_id, num_image_tokens)
    return ids
