"""`flashmoe-bench run --batch B1,B2,...`: many sequences decoded together through the batched engine
(flashmoe.runtime.engine.Engine), stepped one engine step at a time so that every step reports, from the
same run: rows, distinct experts touched, records and bytes read (the runtime's counters, and the bytes the
disk delivered per /proc/self/io), read time, compute time (attention, routing, expert math, head), their
overlap (read + compute - wall, 0 when the stages run one after the other), and the step's bound:
max(disk time for the bytes read at the disk limit measured in the same run, compute time). A step cannot
beat its bound; the bench checks it (method.check_bound).

Two reference rates, neither a bound, labelled for what they are:

* read-sharing estimate = B*K / union x single-stream tok/s: what B sequences would reach if a step cost a
  single-stream step times union / K (the distinct experts per layer per step over a single token's K).
  Decode with a warm cache reads nothing, so it can and does beat this; it is an estimate, not a bound.
* MLX expert-block rate = tok/s of `flashmoe.metal.dispatch.expert_block` (MLX's gather_qmm on the CPU and
  the built-in GPU kernels) with every expert of a layer resident (no reads), B tokens routed by the same
  routing model, scaled to the bundle's layers; beside it, the share of the GPU's dense bf16 peak that rate
  is (method.hardware_peak_flops), so nobody mistakes it for the hardware's ceiling.

Per batch size and routing model (bench.routing: `uniform` and `calibrated`) it reports aggregate decode
and prefill tok/s and the per-step figures above. Each batch size starts cold (pages evicted, expert cache
emptied) after a throwaway compile pass. Prefill time is the wall time until every sequence has its first
token (it includes the engine's first decode step).

Synthetic routing: decode rows are the running sequences, one routing stream each; prefill rows (more
rows than sequences, since every prompt is longer than the largest batch) are routed as consecutive
tokens. Sampling is scripted (a fixed non-EOS token), so every sequence runs its full length.
"""

from __future__ import annotations

import time

import numpy as np

from . import method, probe
from .routing import make_router


class BatchRouter:
    """Routes a forward's rows: decode rows (at most `max_streams`) continue one stream per row,
    longer (prefill) inputs are consecutive tokens of a prefill stream. Records each decode step's union."""

    def __init__(self, router, max_streams: int):
        self.router, self.max_streams = router, max_streams
        self.decode_unions: list[int] = []  # distinct experts per layer per decode step
        self.prefill_unions: list[int] = []
        # host time spent inventing routes (~45 us a token in Python): the bench's own cost, not the engine's,
        # so time_engine takes it out of the phases it times (a 64k-token prefill spends ~12 s here)
        self.seconds = 0.0

    def __call__(self, layer: int, rows: int) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return self._route(layer, rows)
        finally:
            self.seconds += time.perf_counter() - t0

    def _route(self, layer: int, rows: int) -> np.ndarray:
        if rows <= self.max_streams:
            ids = self.router.route_streams(layer, range(rows))
            self.decode_unions.append(len(np.unique(ids)))
        else:
            ids = self.router.route(layer, rows, stream=-1)
            self.prefill_unions.append(len(np.unique(ids)))
        return ids


def install(model, route_rows) -> None:
    """Replace each layer's routing decision with `route_rows(layer, rows) -> [rows, K]` (uniform scores)."""
    import mlx.core as mx

    for layer in model.layers:
        mlp = layer.mlp

        def route(x, _layer=mlp.layer):
            ids = route_rows(_layer, x.shape[0])
            scores = mx.full(ids.shape, 1.0 / ids.shape[1], dtype=x.dtype)
            return mx.array(ids.astype(np.int32)), scores

        object.__setattr__(mlp, "route", route)


def resident_table(bundle) -> dict:
    """Every expert of layer 0 as one resident table {component: [E, ...]} (what the compute ceiling runs on)."""
    import mlx.core as mx

    from flashmoe.format import record_views

    f = bundle.expert_file(0)
    info = f.info
    buf = np.zeros(info.record_stride, dtype=np.uint8)
    stacks = {n: np.empty((info.num_experts, *v.shape), dtype=v.dtype) for n, v in record_views(info, buf).items()}
    for e in range(info.num_experts):
        f.read_into(e, buf)
        for n, v in record_views(info, buf).items():
            stacks[n][e] = v
    f.close()
    typed = {"bfloat16": mx.bfloat16, "float16": mx.float16}
    table = {}
    for c in info.components:
        a = stacks.pop(c.name)
        table[c.name] = mx.array(a.view(np.uint16)).view(typed[c.dtype]) if c.dtype in typed else mx.array(a)
    mx.eval(table)
    return table


def compute_ceiling(bundle, table: dict, router_model: str, rows: int, k: int, prefill: bool = False, seed: int = 0,
                    reps: int = 5) -> float:
    """Tokens/s of the bundle's layers if expert compute were all there is: `rows` tokens per forward
    (decode: one per sequence, one routing stream each; prefill: consecutive tokens of one stream),
    through expert_block over `table` (every expert resident), per layer, scaled to the bundle's layers."""
    import mlx.core as mx

    from flashmoe.metal.dispatch import expert_block

    cfg = bundle.config
    q = bundle.expert_quant
    r = make_router(router_model, 1, cfg.num_experts, k, seed=seed)
    draw = (lambda: r.route(0, rows)) if prefill else (lambda: r.route_streams(0, range(rows)))
    steps = [mx.array(draw().astype(np.int32)) for _ in range(4 if prefill else 8)]
    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32  # the runtime's activation dtype
    x = mx.random.normal((rows, cfg.hidden_size)).astype(dtype)
    sc = mx.full((rows, k), 1.0 / k, dtype=dtype)
    mx.eval(x, sc, *steps)
    for idx in steps[:2]:  # compile
        mx.eval(expert_block(x, table, idx, sc, q.bits, q.group_size))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([expert_block(x, table, idx, sc, q.bits, q.group_size) for idx in steps])
        times.append((time.perf_counter() - t) / len(steps))
    return rows / (float(np.median(times)) * cfg.num_hidden_layers)


STAGES = ("attention", "routing", "expert_io", "expert_compute", "head")
COMPUTE_STAGES = ("attention", "routing", "expert_compute", "head")
PROFILE = ("io_busy", "experts_touched", "expert_calls", "expert_pairs", "prefill_passes")  # runtime Stats counters


class StepMeter:
    """Per engine step, from the runtime's own counters (runtime/model.py Stats): rows, layer-major
    prefill passes, distinct experts touched (per MoE layer call: a layer-major pass counts each layer's
    union once), records and bytes read, bytes the disk delivered, read time (wall time some read was in
    flight, the model's own or a background one) and the part of it the model waited for, compute time
    (attention, routing, expert math, head; each reported), expert-block calls and the (token, expert)
    pairs they computed, overlap (read + compute - wall), and the step's bound max(disk time for the bytes
    read at `disk_gbps`, compute time)."""

    def __init__(self, model, router=None, disk_gbps: float | None = None):
        self.model, self.router, self.disk_gbps = model, router, disk_gbps
        self.steps: list[dict] = []
        self._last = self._snap()

    def _snap(self) -> dict:
        st = self.model.stats
        out = {k: getattr(st, k) for k in (*STAGES, *PROFILE, "expert_bytes", "expert_reads")}
        out["router"] = self.router.seconds if self.router is not None else 0.0
        out["disk"] = probe.disk_read_bytes()
        return out

    def record(self, rows: int, wall: float, phase: str) -> dict:
        now = self._snap()
        d = {k: (now[k] - self._last[k]) if now[k] is not None and self._last[k] is not None else None for k in now}
        self._last = now
        stages = {k: d[k] for k in COMPUTE_STAGES}
        stages["routing"] = max(0.0, d["routing"] - d["router"])  # the engine's routing, not the bench's router
        compute = sum(stages.values())
        wall = wall - d["router"]
        read_bytes = d["disk"] if d["disk"] is not None else d["expert_bytes"]
        disk_s = read_bytes / (self.disk_gbps * 1e9) if self.disk_gbps else None
        bound_s = max(disk_s, compute) if disk_s is not None else None
        read_s = max(d["io_busy"], d["expert_io"])  # busy time; the wait, where a tool's reads bypass the clock
        step = {"phase": phase, "rows": rows, "prefill_passes": d["prefill_passes"], "wall_s": wall,
                "experts_touched": d["experts_touched"], "records_read": d["expert_reads"],
                "expert_bytes": d["expert_bytes"], "disk_bytes": d["disk"], "read_s": read_s,
                "read_wait_s": d["expert_io"], "compute_s": compute, "stages": stages,
                "expert_calls": d["expert_calls"], "expert_pairs": d["expert_pairs"],
                "overlap_s": max(0.0, read_s + compute - wall), "disk_s": disk_s, "bound_s": bound_s}
        self.steps.append(step)
        return step


def summarize_steps(steps: list[dict], phase: str) -> dict:
    """Totals of one phase's steps and how close the phase came to the sum of its steps' bounds."""
    mine = [s for s in steps if s["phase"] == phase]
    tot = {k: sum(s[k] or 0 for s in mine) for k in ("wall_s", "records_read", "expert_bytes", "read_s", "read_wait_s",
                                                       "compute_s", "overlap_s", "prefill_passes", "expert_calls",
                                                       "expert_pairs", "experts_touched")}
    tot["stages"] = {k: sum(s["stages"][k] for s in mine) for k in COMPUTE_STAGES}
    for key in ("disk_bytes", "disk_s", "bound_s"):
        tot[key] = sum(s[key] for s in mine) if mine and all(s[key] is not None for s in mine) else None
    tot["steps"] = len(mine)
    tot["wall_vs_bound"] = tot["bound_s"] / tot["wall_s"] if tot["bound_s"] and tot["wall_s"] else None
    return tot


def format_step(s: dict) -> str:
    """One metered step on one line: what it read, how long reading and each compute stage took, the bound."""
    gb = (s["disk_bytes"] if s["disk_bytes"] is not None else s["expert_bytes"]) / 1e9
    st = ", ".join(f"{k} {v:.2f}" for k, v in s["stages"].items())
    passes = f", {s['prefill_passes']} layer-major passes" if s.get("prefill_passes") else ""
    bound = "-" if s["bound_s"] is None else f"{s['bound_s']:.2f}"
    disk = "-" if s.get("disk_s") is None else f"{s['disk_s']:.2f}"
    return (f"{s['phase']} B={s['rows']}{passes}: {s['wall_s']:.2f} s; {s['experts_touched']} experts touched, "
            f"{s['records_read']} records = {gb:.2f} GB read in {s['read_s']:.2f} s (waited {s['read_wait_s']:.2f} s; "
            f"disk time at the limit {disk} s); compute {s['compute_s']:.2f} s ({st}; {s['expert_calls']} expert "
            f"calls, {s['expert_pairs']} pairs); overlap {s['overlap_s']:.2f} s; bound {bound} s")


def time_engine(model, tokenizer, batch: int, prompt_tokens: int, tokens: int, vocab: int, seed: int,
                 router: BatchRouter | None = None, disk_gbps: float | None = None) -> dict:
    """B sequences of `prompt_tokens` random ids, `tokens` generated each, added at once; wall time of the
    steps until every sequence has its first token (prefill) and of the rest (decode), less the time the
    synthetic `router` spent inventing routes (also taken out of the routing stage); every step metered."""
    from flashmoe.runtime.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=batch)
    rng = np.random.default_rng(seed)
    fixed = next(t for t in range(3, vocab) if t not in set(engine.eos))  # never an end-of-sequence token
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop=(), sampler=lambda logits, ids: fixed)
    for _ in range(batch):
        engine.add(rng.integers(3, vocab, size=prompt_tokens).tolist(), params)
    started: set[int] = set()
    meter = StepMeter(model, router, disk_gbps)
    finished = 0
    phase = "prefill"
    gen = {"prefill": 0, "decode": 0}
    while engine.has_work():
        rows = len(engine.runner.rows)
        t = time.perf_counter()
        for ev in engine.step():
            if ev.token is not None:
                started.add(ev.seq_id)
                gen[phase] += 1
            finished += ev.finish_reason is not None
        meter.record(rows, time.perf_counter() - t, phase)
        if len(started) == batch:
            phase = "decode"
    split = {ph: summarize_steps(meter.steps, ph) for ph in ("prefill", "decode")}
    gen_decode = gen["decode"]
    prefill_s, decode_s = split["prefill"]["wall_s"], split["decode"]["wall_s"]
    return {"prefill_s": prefill_s, "prompt_tokens": batch * prompt_tokens,
            "prefill_tok_s": batch * prompt_tokens / prefill_s if prefill_s > 0 else None,
            "decode_s": decode_s, "decode_tokens": gen_decode,
            "decode_tok_s": gen_decode / decode_s if decode_s > 0 else None,
            "synthetic_router_s": router.seconds if router is not None else 0.0,
            # per phase, not cumulative: each phase's own steps
            "expert_bytes_prefill": split["prefill"]["expert_bytes"], "expert_bytes_decode": split["decode"]["expert_bytes"],
            "disk_bytes_prefill": split["prefill"]["disk_bytes"], "disk_bytes_decode": split["decode"]["disk_bytes"],
            "finished": finished, "phases": split, "steps": meter.steps}


def run_batches(bundle, model, tokenizer, files, batch_sizes, routing_models, tokens: int, prompt_tokens: int,
                k: int, seed: int = 0, cold: bool = True, log=print, disk_gbps: float | None = None) -> dict:
    """The --batch table: one row per (routing model, batch size), every engine step metered; B=1 is always
    measured (the read-sharing estimate needs it). `disk_gbps`: the disk limit measured in the same run
    (method.qd_sweep), for each step's bound."""
    cfg = bundle.config
    sizes = sorted(set(batch_sizes) | {1})
    if prompt_tokens <= max(sizes):
        raise ValueError(f"--batch-prompt-tokens ({prompt_tokens}) must exceed the largest batch ({max(sizes)}): "
                         "the synthetic router tells prefill rows from decode rows by their count")
    from flashmoe.runtime.engine import PREFILL_TOKENS

    record = bundle.expert_info(0).record_size
    flops = method.expert_flops_per_token(cfg, k)
    peak = method.hardware_peak_flops()
    table = resident_table(bundle)
    rows, checks = [], []
    for routing in routing_models:
        # throwaway pass of the largest shapes, so MLX compiles outside the timed runs
        br = BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts, k, seed=seed + 99), max(sizes))
        install(model, br)
        log(f"batch: compiling ({routing} routing, B={max(sizes)}, not timed)")
        time_engine(model, tokenizer, max(sizes), prompt_tokens, 2, cfg.vocab_size, seed + 99, br)
        single = None
        for B in sizes:
            br = BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts, k, seed=seed), B)
            install(model, br)
            if cold:
                probe.evict(files)
            model.experts.clear_cache()
            r = time_engine(model, tokenizer, B, prompt_tokens, tokens, cfg.vocab_size, seed, br, disk_gbps)
            union = float(np.mean(br.decode_unions)) if br.decode_unions else None
            steps = len(br.decode_unions) / cfg.num_hidden_layers
            row = {"routing": routing, "batch": B, **r, "distinct_experts_per_layer_step": union,
                   "records_read_per_layer_step": (r["expert_bytes_decode"] / record / cfg.num_hidden_layers / steps)
                   if steps else None,
                   "expert_bytes_per_generated_token": r["expert_bytes_decode"] / r["decode_tokens"]
                   if r["decode_tokens"] else None}
            if B == 1:
                single = r["decode_tok_s"]
            if union and single:
                row["read_sharing_estimate_tok_s"] = B * k / union * single
            row["mlx_expert_block_tok_s"] = compute_ceiling(bundle, table, routing, B, k, seed=seed)
            chunk_rows = B * min(prompt_tokens, max(1, PREFILL_TOKENS // B))  # the engine's prefill forward
            row["prefill_mlx_expert_block_tok_s"] = compute_ceiling(bundle, table, routing, chunk_rows, k,
                                                                    prefill=True, seed=seed)
            if peak:
                row["hardware_peak_flops"] = peak
                for key in ("mlx_expert_block_tok_s", "prefill_mlx_expert_block_tok_s"):
                    row[key.replace("_tok_s", "_share_of_hw_peak")] = row[key] * flops * cfg.num_hidden_layers / peak
            for ph in ("prefill", "decode"):
                tot = r["phases"][ph]
                if tot["bound_s"]:  # the phase cannot take less than the sum of its steps' bounds
                    checks.append(method.check_bound(f"{routing} B={B} {ph}: 1/wall vs 1/(sum of step bounds)",
                                                     1.0 / tot["wall_s"], 1.0 / tot["bound_s"]))
            rows.append(row)
            log(format_batch_row(row))
    del table
    return {"tokens": tokens, "prompt_tokens": prompt_tokens, "cold": cold, "disk_limit_gbps": disk_gbps,
            "rows": rows, "bound_checks": checks, "bound_violations": method.violations(checks)}


def format_batch_row(b: dict) -> str:
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    peak = (f" = {b['mlx_expert_block_share_of_hw_peak']:.2%} of the GPU's bf16 peak"
            if b.get("mlx_expert_block_share_of_hw_peak") is not None else "")
    out = (f"batch     {b['routing']:<10} B={b['batch']:<4} decode {f(b['decode_tok_s'])} tok/s, prefill "
           f"{f(b['prefill_tok_s'])} tok/s (references, not bounds: read-sharing estimate "
           f"{f(b.get('read_sharing_estimate_tok_s'))}, MLX expert block with all experts resident "
           f"{f(b.get('mlx_expert_block_tok_s'))}{peak}); {f(b['distinct_experts_per_layer_step'])} distinct experts "
           f"per layer per step, {f(b['records_read_per_layer_step'])} read; "
           f"{f((b['expert_bytes_per_generated_token'] or 0) / 1e6)} MB read per generated token")
    for ph in ("prefill", "decode"):
        t = b["phases"][ph]
        if t["steps"]:
            out += "\n          " + format_phase(ph, t)
    return out


def format_phase(ph: str, t: dict) -> str:
    """A phase's totals on one line (format_step's fields summed over its steps)."""
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)  # noqa: E731
    gb = (t["disk_bytes"] if t["disk_bytes"] is not None else t["expert_bytes"]) / 1e9
    st = ", ".join(f"{k} {v:.2f}" for k, v in t["stages"].items())
    passes = f", {t['prefill_passes']} layer-major passes" if t["prefill_passes"] else ""
    return (f"{ph}: {t['steps']} steps{passes}, {t['wall_s']:.2f} s; {t['experts_touched']} experts touched, read "
            f"{gb:.2f} GB in {t['read_s']:.2f} s (waited {t['read_wait_s']:.2f} s), compute {t['compute_s']:.2f} s "
            f"({st}; {t['expert_calls']} expert calls, {t['expert_pairs']} pairs), overlap {t['overlap_s']:.2f} s; "
            f"bound max(disk, compute) summed over steps {f(t['bound_s'])} s = {f(t['wall_vs_bound'], '{:.0%}')} "
            "of the wall time")
