"""The lab's results: per-arm lists and summaries over seeds, the Markdown table, the curves, and
Figure 1 of each arm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..figure1 import run as figure1_run
from .arms import Evaluator
from .plan import IMAGE_SIZE, PATCH, LabSize
from .prepare import Clip, World


def table(results: dict) -> str:
    """The Markdown table: mean ± std over seeds (sample std), arms then ablations."""

    def cell(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}"

    lines = [
        "| run | lambda | seeds | token alignment (stage 1) | answer accuracy (stage 2) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    groups = [(k, v) for k, v in results["arms"].items()] + [
        (f"ablation {k}", v) for k, v in results["ablations"].items()
    ]
    for name, r in groups:
        s = r["summary"]
        lines.append(
            f"| {name} | {r['sea']['weight']:g} | {len(r['seeds'])} | {cell(s['token_alignment'])} | "
            f"{cell(s['answer_accuracy'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"sea": "#1a9850", "baseline": "#d73027"}
    for ax, key, title in (
        (axes[0], "token_alignment", "stage 1: token alignment (held-out object patches)"),
        (axes[1], "answer_accuracy", "stage 2: answer accuracy (held-out questions)"),
    ):
        for arm, r in results["arms"].items():
            for k, curve in enumerate(r["curves"][key]):
                steps, values = zip(*curve)
                ax.plot(
                    steps,
                    values,
                    color=colours.get(arm, "grey"),
                    alpha=0.8,
                    marker="o",
                    ms=3,
                    label=f"{arm} (lambda={r['sea']['weight']:g})" if k == 0 else None,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def describe(command: str, seeds: list, size: LabSize, world: World, clip: Clip, ev: Evaluator, groups: dict) -> dict:
    """The results dict (before figures and timing)."""
    return {
        "command": command,
        "seeds": seeds,
        "size": dataclasses.asdict(size),
        "world": {
            "image_size": IMAGE_SIZE,
            "patch": PATCH,
            "train": size.train,
            "val": size.val,
            "heldout": size.heldout,
            "vocabulary": len(world.words),
            "heldout_questions": len(ev.answers),
        },
        "clip": {
            "r_at_1": clip.r_at_1,
            "r_at_1_pool": size.heldout,
            "training": clip.training,
            "labeler": clip.labeler,
            "chosen": {"negate": clip.negate, "top_n": clip.top_n},
        },
        "arms": {"sea": groups.pop("sea"), "baseline": groups.pop("baseline")},
        "ablations": {k.split(":", 1)[1]: v for k, v in groups.items()},
    }


def figure1(results: dict, world: World, out: Path) -> dict:
    """``sea inspect`` of each arm's seed-0 stage-1 checkpoint on the same held-out scene."""
    image = world.images / world.heldout.images[0]
    paths = {}
    for arm, r in results["arms"].items():
        s = figure1_run(
            [image],
            out / arm,
            checkpoint=Path(r["checkpoints"][0]) / "stage1",
            title=f"{arm} (lambda={r['sea']['weight']:g}), seed {r['seeds'][0]}, stage 1",
        )
        paths[arm] = {
            "png": str(out / arm / f"{image.stem}.png"),
            "token_alignment_vs_clip_labels": s["token_alignment"],
        }
    return {"image": str(image), "caption": world.heldout.scenes[0].caption(), **paths}
