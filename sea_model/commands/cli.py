"""The ``sea`` command. Each subcommand imports what it needs when it runs, so ``sea --help`` is instant.

* ``sea demo [--out DIR] [--quick]``: both training stages on a synthetic dataset, on the CPU.
* ``sea train --stage {1,2} --config FILE [--section.key VALUE ...]``: one training stage
  (see :mod:`sea_model.training.run_config` for the configuration and the override syntax).
* ``sea generate --checkpoint DIR --image IMG --prompt TEXT``: answer with a trained model.
* ``sea inspect --checkpoint DIR --image IMG [--image ...] --out DIR``: the paper's Figure 1 for a
  checkpoint (or ``--mm_projector FILE [--config FILE]``): each visual token's nearest LLM word.
* ``sea lab [--out DIR] [--quick] [--full]``: does SEA work? Both arms in a synthetic world with ground truth.
* ``sea selfcheck``: run every op with every available backend.
* ``sea export --format llava-hf CHECKPOINT OUT``: a ``LlavaForConditionalGeneration`` folder.
* ``sea build``: compile the C++ CPU kernels now (they are otherwise compiled on first use).
* ``sea bench [--ops topk,labels,loss,stage1] [--sizes quick|full|NAME,...] [--device cpu|cuda] [--out DIR]``:
  benchmarks against the reference (see :mod:`sea_model.bench`).

Every subcommand runs through :func:`run_command`: a user error (a bad option, configuration,
file or folder) is one line ``sea <cmd>: error: ...`` and exit status 2; ``--debug`` (on every
subcommand) shows the traceback instead. A subcommand is a ``_<name>_parser(sub)`` function
listed in :data:`SUBCOMMANDS` and a ``_<name>(args)`` function that raises on errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import stage_defaults_text
from ..errors import USER_ERRORS, UserError, one_line

TRAIN_EPILOG = """\
configuration: a YAML file with sections model, data, train (fields of sea_model.config.ModelConfig,
DataConfig and TrainConfig), then any field overridden by its dotted name:
  --train.lr 1e-3  --train.global_batch_size 256  --model.sea.enabled false
  --data.json_path data/blip_laion_cc_sbu_558k.json  --data.image_folder data/images
  --model.llm.hidden_size 64   (inside a config dict)   --train.max_steps=100   (= also works)
Values are YAML scalars (true/false, null, numbers, strings, [lists]) converted to the field's type.
Stage defaults (LLaVA-1.5):
  {defaults}
Several GPUs (DDP; --fsdp shards stage 2):
  torchrun --nproc_per_node 8 -m sea_model.commands.cli train --stage 1 --config configs/stage1.yaml
Use --print_config to see the resolved configuration."""


def _selfcheck(args: argparse.Namespace) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from sea_kernels import available_backends, backends
    from sea_kernels._common import DTYPES
    from sea_kernels.dispatch import OPS

    from ..bench import selfcheck

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    print(f"sea selfcheck: torch {torch.__version__}, device {device}, dtype {args.dtype}, size {args.size}")
    rows = selfcheck.run(device, dtype, args.size)
    print(selfcheck.format_table(rows))
    missing = [f"{op}: {b}" for op in OPS for b in backends(op) if b not in available_backends(op, device)]
    if missing:
        print("not run on this device: " + ", ".join(missing) + " (triton needs CUDA, or --interpret on CPU)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_llava_hf

    out = export_llava_hf(args.checkpoint, args.out, overwrite=args.overwrite)  # errors: one line through run_command
    print(f"wrote a LlavaForConditionalGeneration folder: {out}")
    return 0


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="convert a checkpoint for other tools (llava-hf: a Hugging Face Llava folder)")
    p.add_argument("--format", choices=["llava-hf"], required=True)
    p.add_argument("checkpoint", help="a checkpoint or output directory (its latest checkpoint)")
    p.add_argument("out", help="the folder to write (new or empty; never a checkpoint or a run's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT")
    p.set_defaults(func=_export)


def _build(args: argparse.Namespace) -> int:
    from sea_kernels.cpu._build import build_all, cache_root

    built = build_all()
    for name, ok in built.items():
        print(f"{name}: {'ready' if ok else 'NOT available (the cpu backend uses its PyTorch path)'}")
    print(f"cache: {cache_root()}")
    return 0 if all(built.values()) else 1


def _build_parser(sub) -> None:
    p = sub.add_parser("build", help="compile the C++ CPU kernels now (else on first use; for images and CI)")
    p.set_defaults(func=_build)


def _bench(args: argparse.Namespace) -> int:
    from ..bench import run

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    try:
        run(
            ops,
            args.sizes,
            args.device,
            args.out,
            threads=args.threads or None,
            min_runs=args.rounds or None,
            memory=not args.no_memory,
            progress=not args.no_progress,
        )
    except RuntimeError as err:  # no CUDA: a user error (unknown ops are ValueErrors)
        raise UserError(str(err)) from err
    return 0


def _logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from ..training.loop import train
    from ..training.run_config import load_run_config, parse_overrides
    from ..training.run_dir import resume_out_dir

    shortcuts = {
        "stage": "train.stage",
        "resume": "train.resume",
        "init_from": "train.init_from",
        "out": "train.out_dir",
    }
    overrides = parse_overrides(extra)
    overrides += [(key, str(getattr(args, name))) for name, key in shortcuts.items() if getattr(args, name) is not None]
    given = dict(overrides)  # --resume PATH continues in the folder that holds PATH (issue 24)
    holder = resume_out_dir(given.get("train.resume"), given.get("train.out_dir"))
    overrides += [("train.out_dir", holder)] if holder else []
    if args.fsdp:
        overrides.append(("train.fsdp", "true"))
    if args.overwrite:
        overrides.append(("train.overwrite", "true"))
    cfg = load_run_config(args.config, overrides).resolved()
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if not cfg.data.json_path:
        raise UserError("data.json_path is required (--data.json_path FILE or in --config)")
    _logging()
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        _train_summary(result)
    return 0


def _train_summary(result) -> None:
    if result.preempted:
        print(
            f"stopped by {result.preempted} after step {result.step} of {result.total_steps}; checkpoint "
            f"{result.last_checkpoint}; continue with --resume latest"
        )
    elif result.checkpoint is None:
        print(
            f"stopped after step {result.step} of {result.total_steps} (train.stop_after); "
            f"continue with --resume latest"
        )
    else:
        print(f"done: {result.step} steps; checkpoint {result.checkpoint}")
    print(f"metrics: {result.metrics}" + (f", plot {result.plot}" if result.plot else ""))
    if result.skipped_images:
        print(f"skipped images: {result.skipped_images} could not be read and were replaced by other samples")
    if result.mm_projector:
        print(f"LLaVA adapter (--pretrain_mm_mlp_adapter): {result.mm_projector}")


def _generate(args: argparse.Namespace) -> int:
    from ..model import answer
    from ..training.checkpoint import load_for_inference
    from ..training.distributed import resolve_device

    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1; got {args.max_new_tokens}")
    image = _read_image(args.image) if args.image else None  # before the model: a bad path fails fast
    device = resolve_device(args.device, "--device")
    model, tokenizer, info = load_for_inference(args.checkpoint, device=device)
    template = args.template or ("plain" if info["stage"] == 1 else info["run"]["data"].get("template") or "auto")
    print(answer(model, tokenizer, args.prompt, image, template=template, max_new_tokens=args.max_new_tokens))
    return 0


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path}: not an image PIL can read ({type(err).__name__})") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(
        args.out,
        quick=args.quick,
        device=args.device,
        backend=args.backend,
        seed=args.seed,
        threads=args.threads or None,
    )
    return 0


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train both stages on a synthetic dataset (CPU, offline, about a minute)")
    p.add_argument("--out", default="sea-demo", help="output directory (default ./sea-demo)")
    p.add_argument("--quick", action="store_true", help="a few steps only (seconds; for tests)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "triton", "cpu"],
        help="SEA kernel backend (auto: fused kernels; the cpu ones are compiled on first use)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.set_defaults(func=_demo)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run one training stage (stage 1: adapter + SEA; stage 2: adapter + LLM)",
        epilog=TRAIN_EPILOG.format(defaults=stage_defaults_text()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="sea train --stage {1,2} [--config FILE] [--resume DIR|latest] [--init_from DIR] [--out DIR] "
        "[--overwrite] [--fsdp] [--print_config] [--debug] [--section.key VALUE ...]",
    )
    p.add_argument("--stage", type=int, choices=[1, 2], default=None, help="= --train.stage")
    p.add_argument("--config", default=None, help="YAML file with sections model, data, train")
    p.add_argument(
        "--resume", default=None, help="checkpoint or output directory, or 'latest' (under --out): continue exactly"
    )
    p.add_argument(
        "--init_from", default=None, help="stage 2: a stage-1 output directory or checkpoint, or an mm_projector.bin"
    )
    p.add_argument("--out", default=None, help="= --train.out_dir")
    p.add_argument("--fsdp", action="store_true", help="shard stage 2 with FSDP2 when there are several processes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="= --train.overwrite: start afresh in a folder with a run's checkpoints",
    )
    p.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=_train, takes_overrides=True)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt about an image with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint or output directory (its latest checkpoint)")
    p.add_argument("--image", default=None, help="an image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--template", default=None, help="default: plain for stage 1, the training template for stage 2")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(func=_generate)


def _selfcheck_parser(sub) -> None:
    p = sub.add_parser("selfcheck", help="run every op with every available backend and print errors and times")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels on CPU with TRITON_INTERPRET=1 (slow)")
    p.set_defaults(func=_selfcheck)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time and peak memory of every op and backend against the reference, and SEA's share of a Stage-1 step",
        description="Median time (and interquartile range) after warm-up, extra peak memory, ratio to the reference "
        "(SEA off for stage1) and, on a GPU, TFLOP/s and its share of a plain matmul of the same shape. Writes "
        "OUT/bench.json (with machine, versions, git revision), OUT/table.md and one OUT/<op>.png per op.",
    )
    p.add_argument(
        "--ops", default="topk,labels,loss,stage1", help="comma-separated, of topk, labels, loss, stage1 (default: all)"
    )
    p.add_argument(
        "--sizes",
        default="quick",
        help="quick: minutes on a 2-core CPU; full: the paper's shapes; or comma-separated size names "
        "(e.g. llava-cpu: a Stage-1 step at the proportions of a small MLLM on a CPU)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="sea-bench", help="output directory (default ./sea-bench)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--rounds",
        type=_positive_int,
        default=0,
        help="time at least this many rounds of every backend (default: 5 on CPUs, 10 on GPUs); more rounds "
        "narrow the ratio of long steps such as stage1 llava-cpu (about 7.5 s per round here)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_bench)


def _inspect(args: argparse.Namespace) -> int:
    from .figure1 import load_model_config, run

    if (args.checkpoint is None) == (args.mm_projector is None):
        raise ValueError("give --checkpoint DIR or --mm_projector FILE (with --config FILE for its model)")
    if args.config and args.checkpoint:
        raise ValueError("--config is for --mm_projector (a checkpoint carries its own model config)")
    s = run(
        args.image,
        args.out,
        checkpoint=args.checkpoint,
        mm_projector=args.mm_projector,
        config=load_model_config(args.config) if args.config else None,
        top_n=args.top_n,
        negate=args.negate,
        all_tokens=args.all_tokens,
        device=args.device or "cpu",
        seed=args.seed,
    )
    fmt = "-" if s["token_alignment"] is None else f"{s['token_alignment']:.3f}"
    top1 = "-" if s["top1_agreement"] is None else f"{s['top1_agreement']:.3f}"
    print(f"token alignment {fmt}, top-1 agreement {top1} over {s['labelled']} labelled patches of {s['patches']}")
    print(f"written: {args.out}/summary.json, summary.md and one PNG per image")
    return 0


def _lab(args: argparse.Namespace) -> int:
    from .lab.experiment import run

    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers; got {args.seeds!r}") from None
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: each seed once; got {args.seeds}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")
    run(
        args.out,
        quick=args.quick,
        full=args.full,
        seeds=seeds,
        threads=args.threads or None,
        backend=args.backend,
        progress=args.progress,
    )
    return 0


def _inspect_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="the paper's Figure 1 for a checkpoint: each visual token's nearest LLM word vs its CLIP labels",
        description="For every patch: the SEA-vocabulary word nearest to its visual token (cosine against the "
        "words' Eq. 8 LLM embeddings) and its CLIP labels from SEA's labeler (top_n with score > 0). Writes one PNG "
        "per image (green: nearest word among the patch's labels, red: not, grey: unlabelled), summary.json and "
        "summary.md with the token alignment score and top-1 agreement.",
    )
    p.add_argument("--checkpoint", default=None, help="a sea checkpoint or output directory (stage 1 or 2)")
    p.add_argument("--mm_projector", default=None, help="a LLaVA mm_projector.bin (instead of --checkpoint)")
    p.add_argument(
        "--config",
        default=None,
        help="with --mm_projector: the model config (YAML/JSON; a run_config.yaml works); default LLaVA-1.5 7B",
    )
    p.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    p.add_argument("--out", default="sea-inspect", help="output directory (default ./sea-inspect)")
    p.add_argument("--top_n", type=int, default=None, help="CLIP labels per patch (default: the model's SEA top_n)")
    p.add_argument(
        "--negate",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="score patches with -cos (default: the model's SEA setting)",
    )
    p.add_argument("--all_tokens", action="store_true", help="also the nearest token of the LLM's whole table")
    p.add_argument("--seed", type=int, default=0, help="seed the random parts of a config are rebuilt with")
    p.add_argument("--device", default=None, help="default: cpu")
    p.set_defaults(func=_inspect)


def _lab_parser(sub) -> None:
    p = sub.add_parser(
        "lab",
        help="does SEA work? SEA vs lambda=0 in a synthetic world with ground truth (CPU, offline, < 10 min)",
        description="Scenes of coloured shapes with per-patch truth; a tiny CLIP trained on them; a tiny LLM "
        "pretrained on text; stage 1 with SEA and with lambda=0 from the same init/data/steps/seeds, then stage 2; "
        "token alignment against the truth and held-out answer accuracy; ablations. Writes OUT/results.json, "
        "results.md, curves.png, figure1/ and every checkpoint.",
    )
    p.add_argument("--out", default="sea-lab", help="output directory (default ./sea-lab)")
    p.add_argument("--quick", action="store_true", help="2 seeds, a few steps (under 2 minutes; for tests)")
    p.add_argument("--full", action="store_true", help="every ablation, each over every seed")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0,1)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--backend", default="reference", choices=["auto", "reference", "triton", "cpu"])
    p.add_argument("--progress", action="store_true", help="progress bars for every training run")
    p.set_defaults(func=_lab)


SUBCOMMANDS = (
    _demo_parser,
    _train_parser,
    _generate_parser,
    _inspect_parser,
    _lab_parser,
    _selfcheck_parser,
    _bench_parser,
    _build_parser,
    _export_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sea", description="Supervised Embedding Alignment for multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def run_command(args: argparse.Namespace, call) -> int:
    """Run a subcommand: a user error (:data:`sea_model.errors.USER_ERRORS`) becomes one line
    ``sea <cmd>: error: ...`` on stderr and exit status 2 (with ``--debug``, the traceback)."""
    try:
        return call()
    except USER_ERRORS as err:
        if getattr(args, "debug", False):
            raise
        print(f"sea {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops training at the end of its step)
        if getattr(args, "debug", False):
            raise
        print(f"sea {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "takes_overrides", False):
        return run_command(args, lambda: args.func(args, extra))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
