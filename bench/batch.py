"""`flashmoe-bench run --batch B1,B2,...`: many sequences decoded together through the batched engine
(flashmoe.runtime.engine.Engine), with the two bounds that say what each batch size could reach,
measured in the same run:

* read-sharing bound = B*K / union x single-stream tok/s: one step reads each distinct expert once
  for all B sequences, so a step costs what a single-stream step costs times union / K (the distinct
  experts per layer per step, `union`, over a single token's K);
* compute ceiling = the expert block's tok/s with every expert of a layer resident (no reads at all):
  B tokens routed by the same routing model through `flashmoe.metal.dispatch.expert_block` over a
  table of all E experts, timed per layer and scaled to the bundle's layers. Prefill has its own,
  at the rows of one of the engine's prefill forwards (B prompts x PREFILL_TOKENS // B columns).

Per batch size and routing model (bench.routing: `uniform` and `calibrated`) it reports aggregate
decode and prefill tok/s, the distinct experts needed per layer per step, the records actually read per
layer per step (after the expert cache), and expert bytes read per generated token. Each batch size
starts cold (pages evicted, expert cache emptied) after a throwaway compile pass. Prefill time is the
wall time until every sequence has its first token (it includes the engine's first decode step).

Synthetic routing: decode rows are the running sequences, one routing stream each; prefill rows (more
rows than sequences, since every prompt is longer than the largest batch) are routed as consecutive
tokens. Sampling is scripted (a fixed non-EOS token), so every sequence runs its full length.
"""

from __future__ import annotations

import time

import numpy as np

from . import probe
from .routing import make_router


class BatchRouter:
    """Routes a forward's rows: decode rows (at most `max_streams`) continue one stream per row,
    longer (prefill) inputs are consecutive tokens of a prefill stream. Records each decode step's union."""

    def __init__(self, router, max_streams: int):
        self.router, self.max_streams = router, max_streams
        self.decode_unions: list[int] = []  # distinct experts per layer per decode step
        self.prefill_unions: list[int] = []
        # host time spent inventing routes (~45 us a token in Python): the bench's own cost, not the engine's,
        # so _time_engine takes it out of the phases it times (a 64k-token prefill spends ~12 s here)
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


def _time_engine(model, tokenizer, batch: int, prompt_tokens: int, tokens: int, vocab: int, seed: int,
                 router: BatchRouter | None = None) -> dict:
    """B sequences of `prompt_tokens` random ids, `tokens` generated each, added at once; wall time of the
    steps until every sequence has its first token (prefill) and of the rest (decode), less the time the
    synthetic `router` spent inventing routes (also taken out of the routing stage)."""
    from flashmoe.runtime.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=batch)
    rng = np.random.default_rng(seed)
    fixed = next(t for t in range(3, vocab) if t not in set(engine.eos))  # never an end-of-sequence token
    params = SamplingParams(max_tokens=tokens, temperature=0.0, stop=(), sampler=lambda logits, ids: fixed)
    for _ in range(batch):
        engine.add(rng.integers(3, vocab, size=prompt_tokens).tolist(), params)
    started: set[int] = set()
    bytes0 = engine.counters.get("expert_bytes", 0)
    stages = ("attention", "routing", "expert_io", "expert_compute", "head")
    snap = lambda: {**{k: getattr(model.stats, k) for k in stages},  # noqa: E731
                    "router": router.seconds if router is not None else 0.0}
    s0 = s1 = snap()
    t0 = time.perf_counter()
    t_first = None
    bytes_first = bytes0
    gen_first = 0
    finished = 0
    while engine.has_work():
        for ev in engine.step():
            if ev.token is not None:
                started.add(ev.seq_id)
            finished += ev.finish_reason is not None
        if t_first is None and len(started) == batch:
            t_first = time.perf_counter()
            bytes_first = engine.counters.get("expert_bytes", 0)
            gen_first = engine.counters.get("generated_tokens", batch)
            s1 = snap()
    t_end = time.perf_counter()
    s2 = snap()
    c = engine.counters
    gen_decode = c["generated_tokens"] - gen_first
    router_prefill, router_decode = s1["router"] - s0["router"], s2["router"] - s1["router"]
    prefill_s = t_first - t0 - router_prefill
    decode_s = t_end - t_first - router_decode
    split = {}
    for ph, a, b, r in (("prefill", s0, s1, router_prefill), ("decode", s1, s2, router_decode)):
        split[ph] = {k: b[k] - a[k] for k in stages}
        split[ph]["routing"] = max(0.0, split[ph]["routing"] - r)  # the engine's routing, not the bench's router
    return {"prefill_s": prefill_s, "prompt_tokens": batch * prompt_tokens,
            "prefill_tok_s": batch * prompt_tokens / prefill_s,
            "decode_s": decode_s, "decode_tokens": gen_decode,
            "decode_tok_s": gen_decode / decode_s if decode_s > 0 else None,
            "synthetic_router_s": {"prefill": router_prefill, "decode": router_decode},
            "expert_bytes_prefill": bytes_first - bytes0, "expert_bytes_decode": c.get("expert_bytes", 0) - bytes_first,
            "finished": finished,
            # where the time went (seconds; separable only with model.stats.enabled, as flashmoe-bench sets it);
            # the rest of each phase is the engine's host work (scheduling, sampling, detokenizing)
            "prefill_stages_s": split["prefill"], "decode_stages_s": split["decode"]}


def run_batches(bundle, model, tokenizer, files, batch_sizes, routing_models, tokens: int, prompt_tokens: int,
                k: int, seed: int = 0, cold: bool = True, log=print) -> dict:
    """The --batch table: one row per (routing model, batch size); B=1 is always measured (the
    read-sharing bound needs it)."""
    cfg = bundle.config
    sizes = sorted(set(batch_sizes) | {1})
    if prompt_tokens <= max(sizes):
        raise ValueError(f"--batch-prompt-tokens ({prompt_tokens}) must exceed the largest batch ({max(sizes)}): "
                         "the synthetic router tells prefill rows from decode rows by their count")
    from flashmoe.runtime.engine import PREFILL_TOKENS

    record = bundle.expert_info(0).record_size
    table = resident_table(bundle)
    rows = []
    for routing in routing_models:
        # throwaway pass of the largest shapes, so MLX compiles outside the timed runs
        br = BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts, k, seed=seed + 99), max(sizes))
        install(model, br)
        log(f"batch: compiling ({routing} routing, B={max(sizes)}, not timed)")
        _time_engine(model, tokenizer, max(sizes), prompt_tokens, 2, cfg.vocab_size, seed + 99, br)
        single = None
        for B in sizes:
            br = BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts, k, seed=seed), B)
            install(model, br)
            if cold:
                probe.evict(files)
            model.experts.clear_cache()
            r = _time_engine(model, tokenizer, B, prompt_tokens, tokens, cfg.vocab_size, seed, br)
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
                row["read_sharing_bound_tok_s"] = B * k / union * single
            row["compute_ceiling_tok_s"] = compute_ceiling(bundle, table, routing, B, k, seed=seed)
            chunk_rows = B * min(prompt_tokens, max(1, PREFILL_TOKENS // B))  # the engine's prefill forward
            row["prefill_compute_ceiling_tok_s"] = compute_ceiling(bundle, table, routing, chunk_rows, k,
                                                                   prefill=True, seed=seed)
            bounds = [v for v in (row.get("read_sharing_bound_tok_s"), row["compute_ceiling_tok_s"]) if v]
            if bounds and r["decode_tok_s"]:
                row["decode_vs_smaller_bound"] = r["decode_tok_s"] / min(bounds)
            row["prefill_vs_compute_ceiling"] = r["prefill_tok_s"] / row["prefill_compute_ceiling_tok_s"]
            rows.append(row)
            log(format_batch_row(row))
    del table
    return {"tokens": tokens, "prompt_tokens": prompt_tokens, "cold": cold, "rows": rows}


def format_batch_row(b: dict) -> str:
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    return (f"batch     {b['routing']:<10} B={b['batch']:<4} decode {f(b['decode_tok_s'])} tok/s "
            f"(bounds: read sharing {f(b.get('read_sharing_bound_tok_s'))}, compute {f(b.get('compute_ceiling_tok_s'))}; "
            f"{f(b.get('decode_vs_smaller_bound'), '{:.0%}')} of the smaller), prefill {f(b['prefill_tok_s'])} tok/s "
            f"({f(b.get('prefill_vs_compute_ceiling'), '{:.0%}')} of its compute ceiling "
            f"{f(b.get('prefill_compute_ceiling_tok_s'))}); "
            f"{f(b['distinct_experts_per_layer_step'])} distinct experts per layer per step, "
            f"{f(b['records_read_per_layer_step'])} read; "
            f"{f((b['expert_bytes_per_generated_token'] or 0) / 1e6)} MB read per generated token"
            + "".join(f"\n          {ph} {b[ph + '_s']:.2f} s: " + ", ".join(
                f"{name} {b[ph + '_stages_s'][k]:.2f}" for k, name in
                (("attention", "attention"), ("routing", "routing"), ("expert_io", "reads"),
                 ("expert_compute", "experts"), ("head", "head")))
                + f", other {b[ph + '_s'] - sum(b[ph + '_stages_s'].values()):.2f}"
                + (f" (the synthetic router's own {b['synthetic_router_s'][ph]:.2f} s left out)"
                   if b.get("synthetic_router_s") else "")
                for ph in ("prefill", "decode") if b.get(ph + "_stages_s")))
