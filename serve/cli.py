"""flashmoe-serve: an OpenAI- and Anthropic-compatible HTTP server for a bundle.

    flashmoe-serve BUNDLE|REPO_ID [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--strict-model] ...

It binds to localhost unless --host says otherwise; the port is taken before the model loads (a port in
use is a one-line error, exit 2). With --api-key (or FLASHMOE_API_KEY) every /v1 request needs
`Authorization: Bearer KEY` (or `x-api-key: KEY`). One line per request is logged on stderr unless
--no-request-log. The runtime, engine and sampling flags use the vocabulary every flashmoe CLI shares.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from flashmoe.cli import (add_engine_flags, add_runtime_flags, engine_config_from_args, run_cli,
                          runtime_config_from_args)
from flashmoe.errors import InputError

PROG = "flashmoe-serve"
INSTALL = "pip install 'flashmoe[serve]'"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a flashmoe bundle over the OpenAI and Anthropic "
                                                       "HTTP APIs (chat, completions, messages, tool calls).")
    p.add_argument("bundle", help="bundle directory (from flashmoe-convert or flashmoe-pull) or a Hub repo id")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this bearer token on every /v1 request (default: $FLASHMOE_API_KEY, else none)")
    s.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id /v1/models lists and responses name (default: the bundle's directory name)")
    s.add_argument("--strict-model", action="store_true",
                   help="refuse (404) requests naming another model (default: any name is served by this model)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait beyond a full batch; past it the server answers 429 (default 64)")
    s.add_argument("--max-body-mb", type=float, default=16.0, metavar="MB",
                   help="largest request body accepted, refused (413) before it is read whole (default 16)")
    s.add_argument("--no-request-log", action="store_true",
                   help="do not log one line per request on stderr (method, path, status, tokens, time)")
    s.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's own log level (default warning)")
    add_runtime_flags(p)
    add_engine_flags(p, prompt_cache_gb=2.0)
    g = p.add_argument_group("sampling (defaults for requests that do not set them)")
    g.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="tokens per answer when a request names none, and the most one may ask for (default 4096)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="default temperature (default: the bundle's generation_config.json, else 1)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="default nucleus mass (default: the bundle's generation_config.json, else 1 = off)")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="default top-k (default: the bundle's generation_config.json, else 0 = off)")
    g.add_argument("--seed", type=int, default=None, metavar="N",
                   help="default seed for requests that send none (default: none, a fresh draw each request)")
    g.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="a stop string added to every request (repeatable; default none)")
    return p


def _check_dependencies() -> None:
    """The serve extra: without any of it, one line saying how to install it."""
    missing = []
    for name in ("fastapi", "uvicorn", "pydantic", "llguidance"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise InputError(f"flashmoe-serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                         f"not installed: {INSTALL}")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads; a port in use (or an address not of this
    machine) is an InputError."""
    if not 0 < port < 65536:
        raise InputError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r} cannot be resolved ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} is in use on {host} (another server?); stop it or choose another "
                             "with --port") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _body(args: argparse.Namespace) -> int:
    _check_dependencies()
    for name, lo in (("max_tokens", 1), ("max_queue", 0)):
        if getattr(args, name) < lo:
            raise InputError(f"--{name.replace('_', '-')} must be >= {lo}")
    if not 0 < args.max_body_mb <= 1 << 20:
        raise InputError("--max-body-mb must be a positive number of MiB")
    engine_config = engine_config_from_args(args)  # bad values refused before anything loads
    from flashmoe.runtime.sampling import SamplingParams

    sampling = {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      seed=args.seed, stop=tuple(args.stop or ())).items() if v is not None}
    SamplingParams(**sampling).check()  # the flags' ranges, before anything loads
    api_key = args.api_key if args.api_key is not None else os.environ.get("FLASHMOE_API_KEY") or None
    runtime = runtime_config_from_args(args)
    from flashmoe.runtime.distributed import follow_engine, run_engine, start_from_env

    from .app import ServerConfig, open_server
    from .routes import create_app

    engine_kw = dict(max_batch=args.max_batch, memory_budget_gb=args.memory_budget_gb,
                     prompt_cache_gb=args.prompt_cache_gb)
    dist = start_from_env(PROG)  # under mlx.launch: rank 0 serves, the other ranks mirror its model calls
    if not dist.leader:
        return _leave(follow_engine(dist, args.bundle, dict(config=runtime), engine_kw))
    sock = bind(args.host, args.port)
    dist.check_bundle(args.bundle, runtime.experts_per_token)
    server = open_server(args.bundle, runtime, ServerConfig(
        model_id=args.model_name or "", api_key=api_key, max_tokens=args.max_tokens, max_queue=args.max_queue,
        strict_model=args.strict_model, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        request_log=not args.no_request_log), sampling_overrides=sampling, engine_config=engine_config, dist=dist)
    import uvicorn

    if not args.no_request_log:
        _log_requests()
    print(f"{PROG}: serving {server.config.model_id!r} on http://{args.host}:{args.port}/v1 "
          f"({server.engine.plan.describe()}){'; API key required' if api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server), log_level=args.log_level, access_log=False)
    run_engine(dist, server.engine, lambda engine: _serve(uvicorn.Server(config), sock))
    return _leave(0)


def _serve(server, sock: socket.socket) -> None:
    """uvicorn on the socket bound before loading; Ctrl-C (which uvicorn re-raises once it has stopped
    cleanly) is the normal way to stop it."""
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass


def _log_requests() -> None:
    log = logging.getLogger("flashmoe.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


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
