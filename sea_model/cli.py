"""The ``sea`` command. Each subcommand imports what it needs when it runs, so ``sea --help`` is instant."""

from __future__ import annotations

import argparse
import os
import sys


def _selfcheck(args: argparse.Namespace) -> int:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from sea_kernels import _dispatch, selfcheck

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    print(f"sea selfcheck: torch {torch.__version__}, device {device}, dtype {args.dtype}, size {args.size}")
    rows = selfcheck.run(device, dtype, args.size)
    print(selfcheck.format_table(rows))
    missing = [
        f"{op}: {b}"
        for op in _dispatch._IMPLEMENTATIONS
        for b in _dispatch._IMPLEMENTATIONS[op]
        if b not in _dispatch.available_backends(op, device)
    ]
    if missing:
        print("not run on this device: " + ", ".join(missing) + " (triton needs CUDA, or --interpret on CPU)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sea", description="Supervised Embedding Alignment for multimodal LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("selfcheck", help="run every op with every available backend and print errors and times")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--interpret", action="store_true", help="run Triton kernels on CPU with TRITON_INTERPRET=1 (slow)")
    p.set_defaults(func=_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
