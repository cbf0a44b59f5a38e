"""flashmoe-serve: an OpenAI- and Anthropic-compatible HTTP server for a bundle.

    flashmoe-serve BUNDLE|REPO_ID [--host 127.0.0.1] [--port 8080] [--api-key KEY]

It binds to localhost unless --host says otherwise. With --api-key (or FLASHMOE_API_KEY) every /v1
request needs `Authorization: Bearer KEY` (or `x-api-key: KEY`).
"""

from __future__ import annotations

import argparse
import os
import sys

from flashmoe.format.errors import InputError

from flashmoe.cli import run_cli

PROG = "flashmoe-serve"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a flashmoe bundle over the OpenAI and Anthropic "
                                                       "HTTP APIs (chat, completions, messages, tool calls).")
    p.add_argument("bundle", help="bundle directory (from flashmoe-convert or flashmoe-pull) or a Hub repo id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this bearer token on every /v1 request (default: $FLASHMOE_API_KEY, else none)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the bundle's directory name)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="tokens per answer when a request names none, and the most one may ask for (default 4096)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="sequences decoded together (default: what the memory budget fits)")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="GB",
                   help="memory for sequence state (default: the engine's share of free memory)")
    p.add_argument("--prompt-cache-gb", type=float, default=2.0, metavar="GB",
                   help="memory for finished conversations' state, reused when a request extends one "
                        "(LRU; 0 = off; default 2)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait beyond a full batch; past it the server answers 429 (default 64)")
    p.add_argument("--experts-per-token", type=int, default=None, metavar="K",
                   help="routed experts per token (default: the model's own)")
    p.add_argument("--io", choices=("pread", "mmap"), default=None, help="expert read method (default pread)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")
    from flashmoe.metal.dispatch import add_cli_argument

    add_cli_argument(p)  # --kernels auto|builtin|custom
    return p


def _body(args: argparse.Namespace) -> int:
    from flashmoe.runtime.config import RuntimeConfig

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port (1-65535)")
    for name in ("max_tokens", "max_queue"):
        if getattr(args, name) < (1 if name == "max_tokens" else 0):
            raise InputError(f"--{name.replace('_', '-')} must be >= {1 if name == 'max_tokens' else 0}")
    if args.prompt_cache_gb < 0:
        raise InputError("--prompt-cache-gb must be >= 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get("FLASHMOE_API_KEY") or None
    runtime = RuntimeConfig.from_env(io=args.io, kernels=args.kernels, experts_per_token=args.experts_per_token)
    from flashmoe.runtime.distributed import follow_engine, run_engine, start_from_env

    from .app import ServerConfig, create_app, open_server

    engine_kw = dict(max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                     prompt_cache_gb=args.prompt_cache_gb)
    dist = start_from_env(PROG)  # under mlx.launch: rank 0 serves, the other ranks mirror its model calls
    if not dist.leader:
        return _leave(follow_engine(dist, args.bundle, dict(config=runtime), engine_kw))
    dist.check_bundle(args.bundle, runtime.experts_per_token)
    server = open_server(args.bundle, runtime, ServerConfig(
        model_id=args.model_name or "", api_key=api_key, max_tokens=args.max_tokens, max_queue=args.max_queue),
        **engine_kw)
    dist.attach(server.model)
    import uvicorn

    print(f"{PROG}: serving {server.config.model_id!r} on http://{args.host}:{args.port}/v1 "
          f"({server.engine.plan.describe()}){'; API key required' if api_key else ''}", file=sys.stderr, flush=True)
    run_engine(dist, server.engine, lambda engine: uvicorn.run(create_app(server), host=args.host, port=args.port,
                                                              log_level=args.log_level))
    return _leave(0)


def _leave(code: int) -> int:
    """End the process once the server has stopped cleanly, without the interpreter's teardown. MLX's C++
    teardown at exit, after the engine thread has used MLX, aborted about 1 in 5 shutdowns on the CPU
    ("terminate called without an active exception", exit status -6). A stopped server has nothing left
    to write, so it flushes its streams and leaves with its own exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> int:
    return run_cli(PROG, _parser(), _body, argv)
