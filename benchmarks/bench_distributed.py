"""Expert-parallel ranks (runtime/distributed.py): what the collectives cost, and decode at 1 vs N ranks.

    python benchmarks/bench_distributed.py collective [--ranks 2] [--hidden 4096] [--json F]
        all_sum of one MoE layer's output [T, hidden] (what each layer adds), the plan broadcast of a
        decode step, and an empty all_sum (the latency floor), on N local ranks.
    python benchmarks/bench_distributed.py decode 'DIR{rank}' --ranks 1,2 [--tokens 32] [--json F]
        single-stream decode through the real runtime on 1 and on N ranks, rank r reading its own copy
        DIR{rank} (a synthetic bundle from `flashmoe-bench make`, routed by the benchmark's synthetic
        router so every rank makes the same choices): cold (each rank's expert files evicted from the
        page cache and its expert cache emptied) then warm (the same routes again). Each pass is one run of
        the engine every front end uses (make_engine + run_engine in runtime/distributed.py).

Ranks are started with mlx.launch (--backend ring on loopback by default; nccl on NVIDIA GPUs). Results:
JSON on stdout (and --json FILE). No numbers are asserted; benchmarks/RESULTS.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------------------------
# workers (one per rank, under mlx.launch)


def _timed(fn, n: int, warmup: int = 10) -> dict:
    """Milliseconds of fn() over n runs: min, median, 90th percentile, and this process's CPU time per run
    (user + system: a backend that polls while it waits burns CPU the other ranks may need)."""
    import resource

    for _ in range(warmup):
        fn()
    ts = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n * 1e3
    ts.sort()
    return {"min": round(ts[0], 3), "median": round(statistics.median(ts), 3), "p90": round(ts[int(0.9 * (n - 1))], 3),
            "cpu": round(cpu, 3)}


def worker_collective(a) -> dict:
    import mlx.core as mx
    from flashmoe.runtime.distributed import Dist

    dist = Dist.start(launched=True, timeout=120)
    g = dist.group
    res = {"ranks": dist.size, "hidden": a.hidden, "all_sum_ms": {}}
    floor = mx.zeros((1,), mx.float32)
    res["empty_all_sum_ms"] = _timed(lambda: mx.eval(mx.distributed.all_sum(floor, group=g)), a.iters)
    for dtype in ("float32", "bfloat16"):
        for T in (1, 8, 64, 512):
            x = mx.random.normal((T, a.hidden)).astype(getattr(mx, dtype))
            mx.eval(x)
            res["all_sum_ms"][f"{dtype} T={T}"] = _timed(lambda x=x: mx.eval(mx.distributed.all_sum(x, group=g)),
                                                          max(20, a.iters // max(1, T // 8)))
    plan = json.dumps(["decode", [[1234] * 8]]).encode()  # a decode step of 8 sequences
    res["plan_broadcast_ms"] = _timed(lambda: dist.link.broadcast(plan if dist.leader else None, "bench"), a.iters)
    return res if dist.leader else {}


def engine_decode(engine, tokens: int) -> float:
    """Decode tok/s of one sequence on `engine`: a 1-token prompt, then `tokens` steps timed from its first
    token (which prefill makes) to its last. The sampler picks one fixed non-EOS token (the synthetic router
    ignores the tokens), so every run takes exactly `tokens` steps. A custom sampler's step is never launched
    ahead of the last one (a distributed engine's never is either)."""
    from flashmoe.runtime.sampling import SamplingParams

    fixed = next(t for t in range(3, engine.config.vocab_size) if t not in engine.eos)
    sid = engine.add([1], SamplingParams(max_tokens=tokens + 1, stop=(), sampler=lambda logits, ids: fixed))
    t_first, n = None, 0
    while engine.has_work():
        for ev in engine.step():
            if ev.seq_id != sid or ev.token is None:
                continue
            if t_first is None:
                t_first = time.perf_counter()
            else:
                n += 1
    return n / (time.perf_counter() - t_first)


class PositionRouter:
    """A synthetic router's routes keyed by (layer, position in the sequence): drawn once, and given again
    when a decode step runs a second time (on one rank the runtime takes its optimistic path where the expert
    cache allows, and a step that missed a record is rolled back and run again: the model's own router would
    route it as before). The position is the runner's cache offset, so every rank keys alike."""

    def __init__(self, router, runner):
        self.router, self.runner = router, runner
        self.drawn: dict[tuple[int, int], object] = {}

    def route(self, layer: int, tokens: int):
        cache = self.runner.cache
        key = (layer, 0 if cache is None else cache.offset)
        if key not in self.drawn:
            self.drawn[key] = self.router.route(layer, tokens)
        return self.drawn[key]


# (name, router seed or None for --seed, evict first): a compile pass on other routes, then cold, then warm
PASSES = (("compile", 12345, False), ("cold", None, True), ("warm", None, False))


def worker_decode(a) -> dict:
    """One rank. Each pass is one engine run (runtime/distributed.py: make_engine + run_engine, as flashmoe-run
    does): rank 0 decodes, the other ranks mirror its steps until it releases them. Between passes every rank,
    on its own, installs the pass's synthetic router (the same seed everywhere, so the ranks route alike),
    empties its expert cache and evicts its files from the page cache (cold pass), and keeps its counters.
    One rank decodes as a user's single process does (optimistic where its expert cache allows); several
    ranks never take that path (runtime/experts.py)."""
    from flashmoe.bench import probe
    from flashmoe.bench.routing import StickyRouter
    from flashmoe.bench.run import forget_experts, install_router
    from flashmoe.format import Bundle
    from flashmoe.runtime.config import EngineConfig
    from flashmoe.runtime.distributed import Dist, make_engine, run_engine

    import flashmoe

    dist = Dist.start(launched="MLX_RANK" in os.environ, timeout=600)
    path = a.bundle.replace("{rank}", str(dist.rank))
    dist.check_bundle(path, a.experts_per_token)
    model, tok = flashmoe.load(path, experts_per_token=a.experts_per_token, slots=a.slots, shard=dist.expert_shard())
    dist.attach(model)
    model.stats.enabled = False  # no stage timing (a sync per stage): the path users run; bytes still counted
    cfg = model.config
    k = model.experts_per_token
    files = probe.file_list(Bundle.open(path))
    counters, tok_s, routers = {}, {}, {}
    for name, seed, evict in PASSES:
        engine = make_engine(dist, model, tok, EngineConfig(max_batch=1))
        routers[name] = StickyRouter(cfg.num_hidden_layers, cfg.num_experts, k, 0.2, a.seed if seed is None else seed)
        install_router(model, PositionRouter(routers[name], engine.runner))
        if evict:
            forget_experts(model)
            probe.evict(files)
        model.stats.reset()
        tok_s[name] = run_engine(dist, engine, lambda e: engine_decode(e, 2 if name == "compile" else a.tokens))
        counters[name] = model.stats.snapshot()
    # each layer waits for its busiest rank: K / (that rank's share) per step
    steps = [ids for h in routers["cold"].history for ids in h]
    busiest = sum(max(sum(1 for e in ids if e % dist.size == q) for q in range(dist.size)) for ids in steps)
    # every rank's expert bytes per pass, gathered at rank 0 (KiB, as int32)
    row = [int(counters[p]["expert_bytes"] / 2**10) for p in ("cold", "warm")]
    rows = dist.link.gather(row, "gathering results").tolist() if dist.size > 1 else [row]
    if not dist.leader:
        return {}
    return {"ranks": dist.size, "tokens": a.tokens, "tok_s": {p: tok_s[p] for p in ("cold", "warm")},
            "layers": cfg.num_hidden_layers, "experts_per_token": k,
            "ideal_io_speedup_per_layer_sync": round(len(steps) * k / busiest, 3),
            "expert_kib_per_rank": {"cold": [r[0] for r in rows], "warm": [r[1] for r in rows]},
            "machine": probe.machine()}


# ----------------------------------------------------------------------------------------------
# the parent: start the ranks, collect rank 0's JSON


def free_base(n: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1] if s.getsockname()[1] + n < 65535 else 40000


def launch(n: int, argv: list[str], backend: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r0.json"
        cmd = [sys.executable, str(HERE), *argv, "--worker-out", str(out)]
        if n > 1:
            cmd = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", str(n),
                   "-p", str(free_base(n)), "--backend", backend, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if not out.exists():
            raise SystemExit(f"{n} rank(s) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("collective", help="cost of the collectives per MoE layer and per step")
    c.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    c.add_argument("--hidden", type=int, default=4096, help="hidden size (397B: 4096)")
    c.add_argument("--iters", type=int, default=200, help="timed repetitions per size (median reported)")
    d = sub.add_parser("decode", help="decode tok/s at 1 rank and at N ranks, cold and warm")
    d.add_argument("bundle", help="bundle path; {rank} is replaced by each rank's number (its own copy)")
    d.add_argument("--ranks", default="1,2", help="comma-separated rank counts to run (default 1,2)")
    d.add_argument("--tokens", type=int, default=32, help="decoded tokens per pass (default 32)")
    d.add_argument("--experts-per-token", type=int, default=None, help="K (default: the bundle's)")
    d.add_argument("--seed", type=int, default=0, help="synthetic router seed")
    d.add_argument("--slots", type=int, default=None,
                   help="expert cache slots per rank (default: the runtime's); enough for every record the pass routes "
                        "to makes the warm pass read nothing")
    for q in (c, d):
        q.add_argument("--backend", default="ring", help="mlx.launch backend: ring (default) or nccl")
        q.add_argument("--json", help="also write the results here")
        q.add_argument("--timeout", type=float, default=560, help="seconds per launch (default 560)")
        q.add_argument("--gpu-per-rank", action="store_true",
                       help="bind rank r to GPU r (CUDA_VISIBLE_DEVICES) where the launcher does not (ring on a "
                            "multi-GPU host; mlx.launch --backend nccl does it itself)")
        q.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker_out:  # a rank
        if a.gpu_per_rank and "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("MLX_RANK", "0")  # before MLX starts CUDA
        res = worker_collective(a) if a.mode == "collective" else worker_decode(a)
        if res:
            Path(a.worker_out).write_text(json.dumps(res))
        return 0
    rest = [x for x in (argv if argv is not None else sys.argv[1:])]
    if a.mode == "collective":
        res = launch(a.ranks, rest, a.backend, a.timeout)
    else:
        res = {"runs": [launch(int(n), rest, a.backend, a.timeout) for n in a.ranks.split(",")]}
        base = res["runs"][0]
        for r in res["runs"]:
            r["speedup_vs_1_rank"] = {k: r["tok_s"][k] / base["tok_s"][k] for k in r["tok_s"]}
            r["ideal_io_bound_speedup"] = r["ranks"] / base["ranks"]  # each rank reads 1/N of the bytes
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["load_average"] = os.getloadavg()[0]
    from flashmoe.bench import method

    res["metadata"] = method.metadata()
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
