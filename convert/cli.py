"""flashmoe-convert SOURCE -o OUT: the command-line face of flashmoe.convert.convert_checkpoint."""

from __future__ import annotations

import argparse
import sys

from flashmoe.cli import add_common_arguments, run_cli

PROG = "flashmoe-convert"

EPILOG = """examples:
  flashmoe-convert Qwen/Qwen3.5-397B-A17B -o ~/models/qwen3.5-397b-q4
  flashmoe-convert Qwen/Qwen3.5-397B-A17B -o ~/models/qwen3.5-397b-q2 --bits 2
  flashmoe-convert ./my-checkpoint -o ./bundle --dry-run

An interrupted conversion resumes when you run the same command again."""


def parse_bits(v: str):
    if v.lower() in ("none", "float", "16"):
        return None
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits takes 2, 3, 4, 5, 6, 8 or none, not {v!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashmoe-convert",
        description="Convert a Qwen3.5-MoE checkpoint (Hub repo id or local directory; bf16/fp16/fp32, FP8 or "
                    "MLX-quantized) into a flashmoe bundle whose experts stream from disk.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="Hub repo id (e.g. Qwen/Qwen3.5-397B-A17B) or checkpoint directory")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="bundle directory to create (new or empty)")
    p.add_argument("--bits", type=parse_bits, default=4, metavar="{2,3,4,5,6,8,none}",
                   help="bits per expert weight (default 4; 2 halves the I/O per token; none keeps float)")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128),
                   help="weights per quantization group (default 64)")
    p.add_argument("--dense-bits", type=parse_bits, default=8, metavar="{4,8,none}",
                   help="bits for the always-resident non-expert Linear weights (default 8; router and "
                        "shared-expert gate never below 8; none keeps them float)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="float dtype for scales and unquantized tensors (default: the source's; bf16 for FP8)")
    p.add_argument("--revision", default=None, help="Hub branch, tag or commit to download")
    p.add_argument("--dry-run", action="store_true", help="print the files that would be written and their sizes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_common_arguments(p)
    return p


def _body(args: argparse.Namespace) -> int:
    from flashmoe.errors import InputError

    try:
        from flashmoe.convert import convert_checkpoint
    except ImportError as e:
        raise InputError(f"{e}. On Linux install MLX's CPU build: pip install 'mlx[cpu]'") from None
    try:
        res = convert_checkpoint(args.source, args.output, bits=args.bits, group_size=args.group_size,
                                 dtype=args.dtype, dense_bits=args.dense_bits, revision=args.revision,
                                 progress=not args.quiet, dry_run=args.dry_run)
    except KeyboardInterrupt:
        print("\nflashmoe-convert: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        total = 0
        for f in res:
            total += f.size
            print(f"{f.size / 1e6:12.3f} MB{'' if f.exact else ' ~'}  {f.path}")
        print(f"{total / 1e9:12.3f} GB    total ({len(res)} files; ~ marks estimates) -> {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, build_parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
