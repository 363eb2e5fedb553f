"""The `wanlite` command (installed as `wanlite.cli`; `python cli.py ...` from a clone behaves the same)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# torchao's CUDA-only extensions print load failures on every import on machines without CUDA.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "0" if os.environ.get("CUDA_VISIBLE_DEVICES") else "1")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def cmd_info(args) -> int:
    from wanlite.archs import ARCHS, manifest
    from wanlite.errors import WanliteError
    from wanlite.quant import FORMATS, weight_bytes

    if args.arch not in ARCHS:
        raise WanliteError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    shapes = manifest(args.arch)
    params = sum(math.prod(s) for s in shapes.values())
    sizes = {fmt: weight_bytes(shapes, fmt) for fmt in FORMATS}
    if args.json:
        print(json.dumps({"arch": args.arch, "parameters": params, "keys": len(shapes), "bytes": sizes,
                          "manifest": {k: list(v) for k, v in shapes.items()}}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.arch}: {params:,} parameters, {len(shapes)} tensors")
    table.add_column("weights")
    table.add_column("size", justify="right")
    table.add_column("notes")
    for fmt, spec in FORMATS.items():
        table.add_row(fmt, _gb(sizes[fmt]), spec.note)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from wanlite import __version__

    parser = argparse.ArgumentParser(prog="wanlite", description="Wan2.2 video generation on consumer GPUs.")
    parser.add_argument("--version", action="version", version=f"wanlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="sizes and state-dict manifest of a full-size architecture (no memory used)")
    info.add_argument("--arch", required=True, help="t2v-A14B, i2v-A14B, ti2v-5B, vae2.1, vae2.2, umt5-xxl-encoder")
    info.add_argument("--json", action="store_true", help="print JSON including the full {key: shape} manifest")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from wanlite.errors import WanliteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WanliteError as exc:
        print(f"wanlite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wanlite: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
