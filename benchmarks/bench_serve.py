"""Load benchmark for flashmoe-serve: N concurrent streaming chat clients against a real server.

    python benchmarks/bench_serve.py BUNDLE [--clients 1 4 16 64] [--max-tokens 32] [--json out.json]
    python benchmarks/bench_serve.py --url http://host:8080 --model NAME ...   # a server already running

Without --url it starts `flashmoe-serve BUNDLE` on a free localhost port (extra flags via --serve-args),
waits for /health, sends one warm-up request, then for each client count sends that many streaming
/v1/chat/completions requests at once (distinct prompts, greedy, stream_options.include_usage) and
reports, per level:

    aggregate tok/s   every completion token of the level / the level's wall time
    TTFT              time from sending a request to its first token's chunk (mean, p50, max)
    per-client tok/s  each client's (tokens - 1) / (last chunk - first chunk), averaged

Tokens are counted from the server's usage numbers, not from chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time

import httpx

from flashmoe.bench import method

WORDS = ("the quick brown fox jumps over the lazy dog while a journey of a thousand miles begins with "
         "one single step and all that glitters is not gold").split()


def prompt_for(i: int, words: int) -> str:
    return f"Client {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_first = t_last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk.get("choices") or []:
                d = ch.get("delta") or {}
                if "role" not in d and any(k in d for k in ("content", "reasoning_content", "tool_calls")):
                    now = time.perf_counter()  # a generated token (the server sends one chunk per token)
                    t_first = t_first or now
                    t_last = now
    t_end = time.perf_counter()
    return {"t0": t0, "ttft": (t_first or t_end) - t0, "tokens": tokens, "t_end": t_end,
            "decode_tps": (tokens - 1) / (t_last - t_first) if tokens > 1 and t_last and t_last > t_first else 0.0}


async def level(url: str, model: str, clients: int, max_tokens: int, words: int, headers: dict) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=30.0), limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[one_request(c, url, model, prompt_for(i, words), max_tokens, headers)
                                     for i in range(clients)])
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in res]
    total = sum(r["tokens"] for r in res)
    return {"clients": clients, "wall_s": wall, "tokens": total, "aggregate_tps": total / wall,
            "ttft_mean_s": statistics.mean(ttft), "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft),
            "per_client_tps": statistics.mean(r["decode_tps"] for r in res)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, max_tokens: int, queue: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", "import sys; from flashmoe.serve.cli import main; sys.exit(main())", bundle,
           "--port", str(port), "--model-name", "bench", "--max-tokens", str(max_tokens),
           "--max-queue", str(queue), *extra]
    p = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        if p.poll() is not None:
            raise SystemExit(f"flashmoe-serve exited with status {p.returncode}")
        if time.time() - t0 > 1800:
            p.kill()
            raise SystemExit("flashmoe-serve did not come up in 30 minutes")
        time.sleep(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", help="bundle to serve (omit with --url)")
    ap.add_argument("--url", help="benchmark a server that is already running at this base URL")
    ap.add_argument("--model", default="bench", help="model id to request (with --url: the server's)")
    ap.add_argument("--api-key", default=None, help="bearer token for --url (default: $FLASHMOE_API_KEY)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens each request asks for (default 32)")
    ap.add_argument("--prompt-words", type=int, default=20, help="words per prompt (default 20)")
    ap.add_argument("--serve-args", default="", help="extra flashmoe-serve flags, e.g. \"--max-batch 16\"")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not args.url and not args.bundle:
        ap.error("give a BUNDLE to serve, or --url of a running server")
    key = args.api_key or os.environ.get("FLASHMOE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args.bundle, args.max_tokens, max(args.clients), shlex.split(args.serve_args))
    try:
        asyncio.run(level(url, args.model, 1, min(4, args.max_tokens), args.prompt_words, headers))  # warm-up
        rows = []
        for n in args.clients:
            r = asyncio.run(level(url, args.model, n, args.max_tokens, args.prompt_words, headers))
            rows.append(r)
            print(f"{n:4d} clients: {r['aggregate_tps']:8.2f} tok/s aggregate, TTFT mean {r['ttft_mean_s']:.2f} s "
                  f"(p50 {r['ttft_p50_s']:.2f}, max {r['ttft_max_s']:.2f}), {r['per_client_tps']:.2f} tok/s per client, "
                  f"{r['tokens']} tokens in {r['wall_s']:.1f} s", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:  # stuck in a long engine step
                proc.kill()
                proc.wait()
    out = {"bundle": args.bundle, "url": args.url, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
           "serve_args": args.serve_args, "machine": platform.platform(), "cpus": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levels": rows,
           "metadata": method.metadata(args.bundle)}
    print("\n| clients | aggregate tok/s | TTFT mean / p50 / max (s) | per-client tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['aggregate_tps']:.2f} | {r['ttft_mean_s']:.2f} / {r['ttft_p50_s']:.2f} / "
              f"{r['ttft_max_s']:.2f} | {r['per_client_tps']:.2f} |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
