"""Where fused SEA's Stage-1 cost goes: each part of the extra work timed alone, on the model and batch of
``sea bench --ops stage1`` (``sea_model/bench/stage1.py``, backend ``sea-fused``).

Usage (repository root): ``python benchmarks/stage1_regions.py [demo|llava-cpu] [--rounds N]``; prints a
markdown table of medians (torch's default threads, as ``sea bench``). Parts: the tower's blocks after
``select_layer`` plus ``ln_post`` and ``proj`` (SEA off stops at ``select_layer``; the labels need every
patch's joint-space feature), and SEA's own forward (labels, dedup, gathers, loss) and backward, with
the labels call, the dedup draw and the loss over the kept pairs also alone. Each part is timed on the
tensors of one real forward; they do not sum exactly to the step's overhead (caches, allocator, the
optimizer's extra parameter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sea_kernels import alignment  # noqa: E402
from sea_kernels.contrastive import contrastive_loss  # noqa: E402
from sea_kernels.labels import patch_labels  # noqa: E402
from sea_model.bench.stage1 import STAGE1_SIZES, stage1_case  # noqa: E402


def median_ms(fn, rounds: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def parts(size: str) -> dict:
    """name -> function of the parts of one fused Stage-1 step's SEA work."""
    step, (batch,) = stage1_case("sea-fused", **dict(STAGE1_SIZES[size]))
    model = step.state.model
    tower, sea, images = model.tower, model.sea, batch["pixel_values"]
    with torch.no_grad():
        out = tower(images, joint_space=True, pooled=False)
        visual = model.adapter(out.hidden)
    visual.requires_grad_(True)
    table = model.llm.get_input_embeddings().weight
    args = (visual, out.patch_features, model.vocab_features, model.word_token_ids, table)
    gen = torch.Generator().manual_seed(0)
    vocab = sea._vocabulary_for(model.vocab_features, out.patch_features.dtype)
    kw = dict(grid=out.grid, top_n=sea.top_n, generator=gen, validate=False)
    labels = patch_labels(out.patch_features, vocab, **kw)
    keep = sea._keep(labels, gen, None)

    def pairs_and_loss():
        x, t = alignment._kept_pairs(visual, labels, keep, model.word_token_ids, table)
        contrastive_loss(x, t, sea.scale(), validate=False).backward()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {
        "tower, SEA off (to select_layer)": no_grad(lambda: tower(images, joint_space=False)),
        "tower, SEA on (all blocks + ln_post + proj)": no_grad(lambda: tower(images, joint_space=True, pooled=False)),
        "SEA forward": lambda: sea(*args, grid=out.grid, generator=gen),
        "SEA forward + backward": lambda: sea(*args, grid=out.grid, generator=gen).loss.backward(),
        "  patch_labels": no_grad(lambda: patch_labels(out.patch_features, vocab, **kw)),
        "  dedup draw": no_grad(lambda: sea._keep(labels, gen, None)),
        "  kept pairs + loss, forward + backward": pairs_and_loss,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("size", nargs="?", default="demo", choices=["demo", "llava-cpu"])
    p.add_argument("--rounds", type=int, default=None, help="timed calls per part (default 300 demo, 15 llava-cpu)")
    a = p.parse_args()
    rounds = a.rounds or (300 if a.size == "demo" else 15)
    print(f"{a.size}, {torch.get_num_threads()} threads, median of {rounds} calls\n")
    print("| part | ms |\n|---|---|")
    for name, fn in parts(a.size).items():
        print(f"| {name} | {median_ms(fn, rounds):.3f} |")


if __name__ == "__main__":
    main()
