"""Stage 1 of LLaVA with SEA, on Hugging Face models: a plain loop, then ``transformers.Trainer``.

Offline and on a CPU in well under two minutes: it builds a tiny random CLIP (``CLIPModel``), a
tiny random ``LlavaForConditionalGeneration`` whose vision tower carries that CLIP's vision
weights, and a word-level tokenizer built on the fly, then trains the projector
(Stage 1) with ``L = L_gen + L_align`` on random captioned images:

    python examples/hf_llava_stage1.py              # last line: L_gen=... L_align=... tau=...
    python examples/hf_llava_stage1.py --overhead   # also: time a Stage-1 step without/with SEA

With real models, replace the ``tiny`` builders by ``from_pretrained`` calls (a llava-hf
checkpoint and the ``CLIPModel`` of its tower, e.g. ``openai/clip-vit-large-patch14-336``) and
``WORDS`` by a word list (the paper's 41k words); the SEA lines stay the same.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sea_model import tiny_models as tiny
from sea_model.hf import LlavaSEA, SEATrainer

# The SEA vocabulary and the captions' words (a real run: the paper's 41k-word list).
WORDS = "cat dog bird car tree house red blue green small big sky water road person ball table chair".split()


def build(seed: int = 0):
    """(llava, clip, tokenizer, samples): tiny random models, Stage-1 freezing, 16 captioned images."""
    torch.manual_seed(seed)
    tokenizer = tiny.word_tokenizer(WORDS + ["a"])  # one token per word, <image> added
    clip = tiny.tiny_hf_clip("clip")
    llava = tiny.tiny_hf_llava(clip, tokenizer)
    llava.requires_grad_(False)  # Stage 1: only the projector trains (and SEA's temperature)
    llava.model.multi_modal_projector.requires_grad_(True)
    return llava.train(), clip, tokenizer, tiny.llava_caption_samples(tokenizer, llava, WORDS, 16, seed=seed)


def plain_loop(llava, sea, samples, steps: int, batch: int = 4) -> dict:
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*params, *sea.parameters()], lr=1e-3)
    for step in range(steps):
        chunk = [samples[(step * batch + i) % len(samples)] for i in range(batch)]
        out = llava(**tiny.collate_padded(chunk))
        align = sea.align()
        loss = out.loss + sea.weight * align.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        row = {
            "L_gen": out.loss.item(),
            "L_align": align.loss.item(),
            "pairs": int(align.pairs),
            "tau": sea.temperature,
        }
        print(f"plain loop step {step + 1}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return row


def with_trainer(llava, sea, samples, steps: int, out_dir: str) -> dict:
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        learning_rate=1e-3,
        weight_decay=0.01,
        logging_steps=1,
        save_steps=steps,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = SEATrainer(model=llava, sea=sea, args=args, train_dataset=samples, data_collator=tiny.collate_padded)
    trainer.train()
    return [h for h in trainer.state.log_history if "L_align" in h][-1]


def step_time(llava, sea, samples, *, use_sea: bool, compiled=None, repeats: int = 20) -> list[float]:
    """Seconds of Stage-1 forward + backward + AdamW steps, SEA off or on (``compiled``: the SEA loss module)."""
    batch = tiny.collate_padded(samples[:8])
    params = [p for p in llava.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*params, *sea.parameters()], lr=1e-4)
    times = []
    sea.enabled = use_sea
    for _ in range(repeats):
        start = time.perf_counter()
        out = llava(**batch)
        loss = out.loss
        if use_sea:
            loss = loss + sea.weight * sea.align().loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    sea.enabled = True
    return times


def overhead(llava, sea, samples, rounds: int = 5) -> None:
    """Median step time without SEA, with SEA (eager) and with the SEA loss under torch.compile,
    interleaved round by round so that machine load hits all three alike."""
    import copy
    import statistics

    eager_fn = sea.loss_fn
    # In place (Module.compile), not torch.compile(module): sea.align() calls the module itself, so a
    # wrapper returned by torch.compile would be bypassed. Llava's forward and the backward stay eager.
    compiled_fn = copy.deepcopy(eager_fn)
    compiled_fn.compile(fullgraph=True)
    results = {"sea-off": [], "sea-eager": [], "sea-compiled": []}
    for r in range(rounds + 1):
        for name in results:
            sea.loss_fn = compiled_fn if name == "sea-compiled" else eager_fn
            t = step_time(llava, sea, samples, use_sea=name != "sea-off")
            if r:  # round 0 warms up (and compiles)
                results[name] += t
    sea.loss_fn = eager_fn
    base = statistics.median(results["sea-off"])
    for name, t in results.items():
        med = statistics.median(t)
        print(f"overhead {name}: median {med * 1e3:.2f} ms/step ({(med / base - 1) * 100:+.1f}% vs sea-off)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps in each of the two runs")
    parser.add_argument("--overhead", action="store_true", help="time Stage-1 steps without and with SEA")
    parser.add_argument("--backend", default="auto", help="SEA kernel backend (auto, reference, cpu, triton)")
    args = parser.parse_args(argv)

    llava, clip, tokenizer, samples = build()
    # SEA: the CLIP model gives the joint-space head and embeds the words once (cached under ~/.cache/sea).
    sea = LlavaSEA(llava, clip, tokenizer, tokenizer, WORDS, backend=args.backend, cache_dir=False, progress=False)
    plain_loop(llava, sea, samples, args.steps)
    if args.overhead:
        overhead(llava, sea, samples)
    with tempfile.TemporaryDirectory() as out_dir:
        last = with_trainer(llava, sea, samples, args.steps, out_dir)
    print(f"L_gen={last['L_gen']:.4f} L_align={last['L_align']:.4f} tau={last['tau']:.4f}")


if __name__ == "__main__":
    main()
