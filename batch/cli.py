"""flashmoe-batch: answer a JSONL file of requests overnight, resumably.

    flashmoe-batch BUNDLE requests.jsonl -o answers.jsonl [--max-tokens 256] [--batch-size auto|N]

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
import tempfile
from pathlib import Path

from flashmoe.format.errors import InputError

from flashmoe.cli import add_common_arguments, run_cli

PROG = "flashmoe-batch"


def _batch_size(v: str) -> int | None:
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
    p.add_argument("--max-tokens", type=int, default=512, help="tokens to generate at most (default 512; a line's "
                                                              "max_tokens overrides)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default; a line may override)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for lines that give none (then a "
                                                          "resumed job samples the same answers)")
    p.add_argument("--batch-size", type=_batch_size, default=None, metavar="auto|N",
                   help="sequences decoded together (default auto: from the memory plan)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="memory for the batch's caches (default: the engine's share of free memory)")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own)")
    p.add_argument("--stats-json", default=None, metavar="FILE", help="write the job's numbers here as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_common_arguments(p)
    return p


def _write_json(path: str, obj: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _body(args: argparse.Namespace) -> int:
    import flashmoe

    from .journal import OutputLog
    from .requests import Defaults
    from .runner import JobOptions, run_jobs

    if args.max_tokens < 0:
        raise InputError(f"--max-tokens must be >= 0 (got {args.max_tokens})")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise InputError(f"--memory-budget must be a positive number of GB (got {args.memory_budget})")
    from flashmoe.runtime.distributed import follow_engine, run_engine, start_from_env
    from flashmoe.runtime.engine import Engine

    engine_kw = dict(max_batch=args.batch_size, memory_budget_gb=args.memory_budget)
    dist = start_from_env(PROG)  # under mlx.launch: rank 0 runs the jobs, the other ranks mirror its model calls
    if not dist.leader:  # (before any input is read: only rank 0 reads it); loaded as rank 0 loads it below
        from flashmoe.runtime.config import RuntimeConfig

        config = RuntimeConfig.from_env(experts_per_token=args.experts_per_token)
        return follow_engine(dist, args.bundle, {"config": config}, engine_kw)
    if args.input == "-" and dist.size > 1:
        raise InputError("input '-' reads stdin to its end, and mlx.launch never passes the end of its input on to "
                         "the ranks: give the input file's path (on rank 0's host)")
    if args.input != "-" and Path(args.input).resolve() == Path(args.output).resolve():
        raise InputError("the output would overwrite the input; give a different -o")
    template = Path(args.prompt_file).read_text() if args.prompt_file else None
    source = sys.stdin.buffer.read() if args.input == "-" else args.input
    if args.input != "-" and not Path(args.input).is_file():
        raise InputError(f"{args.input}: no such input file")
    defaults = Defaults(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.seed, system_prompt=args.system_prompt, prompt_template=template)
    from flashmoe.runtime.engine import SamplingParams

    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed).check()  # bad defaults are the user's flags: refuse before loading
    opts = JobOptions(defaults=defaults, batch_size=args.batch_size, memory_budget_gb=args.memory_budget,
                      model_name=Path(str(args.bundle).rstrip("/")).name, progress=not args.quiet)
    with OutputLog(args.output) as log:  # locked before loading: a second run on this output is refused at once
        if log.dropped_bytes:
            print(f"{PROG}: removed a torn last line ({log.dropped_bytes} bytes) that an interrupted run left",
                  file=sys.stderr)
        dist.check_bundle(args.bundle, args.experts_per_token)
        from flashmoe.runtime.config import RuntimeConfig

        model, tokenizer = flashmoe.load(args.bundle, RuntimeConfig.from_env(experts_per_token=args.experts_per_token))
        dist.attach(model)
        engine = Engine(model, tokenizer, **{k: v for k, v in engine_kw.items() if v is not None})
        try:
            summary = run_engine(dist, engine, lambda e: run_jobs(model, tokenizer, source, log, opts, engine=e))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; every finished answer is in {args.output}. Run the same command to "
                  "resume.", file=sys.stderr)
            raise
    print(f"{PROG}: {summary.line()}", file=sys.stderr)
    if args.stats_json:
        _write_json(args.stats_json, summary.as_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(PROG, _parser(), _body, argv)


if __name__ == "__main__":
    sys.exit(main())
