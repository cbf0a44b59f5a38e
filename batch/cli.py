"""flashmoe-batch: answer a JSONL file of requests overnight, resumably.

    flashmoe-batch BUNDLE requests.jsonl -o answers.jsonl [--max-tokens 512] [--max-batch auto|N]
                   [--memory-budget-gb GB] [--stop STR ...] [--io MODE] [--kernels KIND]

Input lines: OpenAI Batch API requests ({"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}) or simple lines ({"id"?, "prompt" | "messages", "max_tokens"?, ...});
INPUT "-" reads stdin. Output: the OpenAI Batch output format, a line per request as it finishes.
Killed or interrupted, the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flashmoe.cli import add_common_arguments, run_cli
from flashmoe.format.errors import InputError
from flashmoe.hub.common import Terminated, sigterm_as_interrupt, write_new
from flashmoe.runtime.config import RuntimeConfig

from .requests import Defaults

PROG = "flashmoe-batch"


def _max_batch(v: str) -> int | None:
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer (got {v!r})")
    return n


def _parser() -> argparse.ArgumentParser:
    from flashmoe.runtime.config import IO_MODES, KERNELS

    d = Defaults()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (from flashmoe-convert or flashmoe-pull) or a Hub repo id")
    p.add_argument("input", help="requests, one JSON object per line ('-': read stdin)")
    p.add_argument("-o", "--output", required=True,
                   help="answers (JSONL, OpenAI Batch output format); an existing one is resumed")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message for chat requests that carry none")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="instruction text for simple {\"prompt\": ...} lines: the document goes in at {document}, "
                        "or after the instruction when it has no {document}")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"tokens to generate at most (default {d.max_tokens}; a line's max_tokens overrides)")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"0 = greedy (default {d.temperature:g}; a line may override)")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"nucleus sampling mass (default {d.top_p:g} = off)")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"sample among the k likeliest tokens (default {d.top_k} = off)")
    p.add_argument("--seed", type=int, default=d.seed, help="sampling seed for lines that give none (default none; "
                                                            "with one, a resumed job samples the same answers)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="stop string for lines that give none (repeatable; default none)")
    p.add_argument("--max-batch", type=_max_batch, default=None, metavar="auto|N",
                   help="sequences decoded together (default auto: from the memory plan)")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="memory for the batch's caches (default: the engine's share of free memory)")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own)")
    p.add_argument("--io", choices=IO_MODES, default=None,
                   help=f"expert read method (default {RuntimeConfig.io})")
    p.add_argument("--kernels", choices=KERNELS, default=None,
                   help=f"expert kernels (default {RuntimeConfig.kernels}, or FLASHMOE_KERNELS)")
    p.add_argument("--stats-json", default=None, metavar="FILE", help="write the job's numbers here as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_common_arguments(p)
    return p


def _check_new_file(path: str, what: str) -> None:
    """Refuse at once (before any work) a path a file cannot be written to when the job ends."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {path} is a directory; give a file path")
    parent = p.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: the directory {parent} is not writable")


def _runtime_config(args: argparse.Namespace):
    return RuntimeConfig.from_env(experts_per_token=args.experts_per_token, io=args.io, kernels=args.kernels)


def _body(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        return _job(args)


def _job(args: argparse.Namespace) -> int:
    import flashmoe

    from .journal import OutputLog
    from .runner import JobOptions, run_jobs

    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    if args.memory_budget_gb is not None and not args.memory_budget_gb > 0:
        raise InputError(f"--memory-budget-gb must be a positive number of GB (got {args.memory_budget_gb})")
    from flashmoe.runtime.distributed import follow_engine, run_engine, start_from_env
    from flashmoe.runtime.engine import Engine

    engine_kw = dict(max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb)
    dist = start_from_env(PROG)  # under mlx.launch: rank 0 runs the jobs, the other ranks mirror its model calls
    if not dist.leader:  # (before any input is read: only rank 0 reads it); loaded as rank 0 loads it below
        return follow_engine(dist, args.bundle, {"config": _runtime_config(args)}, engine_kw)
    if args.input == "-" and dist.size > 1:
        raise InputError("input '-' reads stdin to its end, and mlx.launch never passes the end of its input on to "
                         "the ranks: give the input file's path (on rank 0's host)")
    if args.input != "-" and Path(args.input).resolve() == Path(args.output).resolve():
        raise InputError("the output would overwrite the input; give a different -o")
    if args.stats_json:
        _check_new_file(args.stats_json, "--stats-json")
    template = Path(args.prompt_file).read_text() if args.prompt_file else None
    if args.input != "-" and not Path(args.input).is_file():
        raise InputError(f"{args.input}: no such input file")
    defaults = Defaults(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()), system_prompt=args.system_prompt,
                        prompt_template=template)
    from flashmoe.runtime.engine import SamplingParams

    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, stop=defaults.stop).check()  # bad defaults are the user's flags: refuse before loading
    config = _runtime_config(args)
    source = sys.stdin.buffer.read() if args.input == "-" else args.input
    opts = JobOptions(defaults=defaults, batch_size=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                      model_name=Path(str(args.bundle).rstrip("/")).name, progress=not args.quiet)
    try:
        with OutputLog(args.output) as log:  # locked before loading: a second run on this output is refused at once
            if log.dropped_bytes:
                print(f"{PROG}: removed a torn last line ({log.dropped_bytes} bytes) that an interrupted run left",
                      file=sys.stderr)
            dist.check_bundle(args.bundle, args.experts_per_token)
            model, tokenizer = flashmoe.load(args.bundle, config)
            dist.attach(model)
            engine = Engine(model, tokenizer, **{k: v for k, v in engine_kw.items() if v is not None})
            summary = run_engine(dist, engine, lambda e: run_jobs(model, tokenizer, source, log, opts, engine=e))
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{PROG}: {how}; every finished answer is in {args.output}. Run the same command to resume.",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    print(f"{PROG}: {summary.line()}", file=sys.stderr)
    if args.stats_json:
        write_new(args.stats_json, json.dumps(summary.as_dict(), indent=1).encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
