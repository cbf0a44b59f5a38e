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

from flashmoe.cli import (add_common_arguments, add_engine_flags, add_runtime_flags, add_sampling_flags,
                          engine_config_from_args, run_cli, runtime_config_from_args)
from flashmoe.errors import InputError
from flashmoe.hub.common import Terminated, sigterm_as_interrupt, write_new

from .requests import Defaults

PROG = "flashmoe-batch"


def _parser() -> argparse.ArgumentParser:
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
    add_sampling_flags(p, max_tokens=d.max_tokens)  # a line's own values override these
    add_engine_flags(p)
    add_runtime_flags(p)
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


def _body(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        return _job(args)


def _job(args: argparse.Namespace) -> int:
    import flashmoe

    from .journal import OutputLog
    from .runner import JobOptions, run_jobs

    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    from flashmoe.runtime.distributed import follow_engine, make_engine, run_engine, start_from_env

    engine_config = engine_config_from_args(args)  # a bad budget is refused before anything loads
    engine_kw = dict(max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                     prompt_cache_gb=args.prompt_cache_gb)
    dist = start_from_env(PROG)  # under mlx.launch: rank 0 runs the jobs, the other ranks mirror its model calls
    if not dist.leader:  # (before any input is read: only rank 0 reads it); loaded as rank 0 loads it below
        return follow_engine(dist, args.bundle, {"config": runtime_config_from_args(args)}, engine_kw)
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
    config = runtime_config_from_args(args)
    source = sys.stdin.buffer.read() if args.input == "-" else args.input
    opts = JobOptions(defaults=defaults, batch_size=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                      model_name=Path(str(args.bundle).rstrip("/")).name, progress=not args.quiet)
    try:
        with OutputLog(args.output) as log:  # locked before loading: a second run on this output is refused at once
            if log.dropped_bytes:
                print(f"{PROG}: removed a torn last line ({log.dropped_bytes} bytes) that an interrupted run left",
                      file=sys.stderr)
            dist.check_bundle(args.bundle, args.experts_per_token)
            model, tokenizer = flashmoe.load(args.bundle, config, shard=dist.expert_shard())
            dist.attach(model)
            engine = make_engine(dist, model, tokenizer, engine_config)
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
