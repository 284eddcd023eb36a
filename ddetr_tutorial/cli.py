"""Command line: `python -m ddetr_tutorial <command> ...` (`--help` on each)."""

from __future__ import annotations

import argparse
import sys
import time


def build_ops(args) -> int:
    """Build (or find cached) the compiled backends so later runs start at once."""
    import torch

    from .ops import loader

    wanted = list(loader.BACKENDS) if args.backend == "all" else [args.backend]
    failed = 0
    for backend in wanted:
        if backend == "cuda" and torch.version.cuda is None and args.backend == "all":
            print(f"cuda: skipped (torch {torch.__version__} has no CUDA)")
            continue
        start = time.perf_counter()
        try:
            module = loader.load_extension(backend)
        except loader.BuildError as err:
            print(f"{backend}: FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        print(f"{backend}: ready in {time.perf_counter() - start:.1f} s ({module.__file__})")
    return 1 if failed else 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddetr_tutorial",
                                     description="Deformable DETR, built piece by piece.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build-ops", help="compile the C++/CUDA kernels of ms_deform_attn",
                            description="Compile the C++ CPU and CUDA kernels of ms_deform_attn "
                            "into the extension cache ($TORCH_EXTENSIONS_DIR), or find them "
                            "there. Exits non-zero if a requested backend fails to build.")
    p.add_argument("--backend", choices=["cpu", "cuda", "all"], default="all",
                   help="which kernel to build (default: all; cuda is skipped when torch "
                   "has no CUDA)")
    p.set_defaults(func=build_ops)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)
