"""`flashmoe-bench run DIR`: decode through the real runtime, cold and warm, with the machine's raw
limits measured on the same files in the same run; report, JSON and chart.

Routing uses bench.routing (random weights have no useful router); everything else is the production
path: flashmoe.load, the model, the expert streamer, the kernels.

Honest cold timing: MLX compiles its GPU kernels the first time each is used, which would land inside
the first timed pass. So every timed pass is preceded by a throwaway pass of the same shapes (other
routes), then the bundle's pages are evicted and the expert cache emptied, and only then is the cold
pass timed.

Speculative prefetch (--prefetch-recall R[,R...]): the model's own guess needs its own router, so the main
model runs with prefetch off; a second model of the same settings with prefetch on decodes each cold pass
again right after it, over the same routes, with guesses of recall R from bench.prefetch.Guesser (issued where
the model makes its own). Without the flag the report carries bench.prefetch's simulated curve, labelled an
estimate.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from flashmoe.errors import InputError
from flashmoe.format import Bundle
from flashmoe.format.cli import token_reads
from flashmoe.format.tables import parse_tables

from . import method, probe
from .batch import format_batch_row
from .routing import MODELS as ROUTING_MODELS
from .routing import StickyRouter, route_stats, simulated_lru_hits, simulated_reads_per_token

STAGES = ("attention", "routing", "expert_io", "expert_compute", "head")
# Fewer timed tokens than this: run-to-run differences of tens of percent (two identical 4-token runs
# differed by 40% on the CPU machine), so the report says the figures are noise.
MIN_TOKENS = 16
# What the report says about each target, in plain words: (sentence with {v}, goal, pass test).
TARGETS = {
    "cold_vs_disk_roofline": ("cold decode ran at {v:.0%} of what this disk allows (its limit, measured at 1-64 "
                              "reads in flight, divided by the expert bytes each token needed; per-pass median)",
                              "at least 85%", lambda v: v >= 0.85),
    "cold_io_vs_disk_limit": ("cold expert reads moved the bytes the model needed at {v:.0%} of this disk's limit "
                              "(per-pass median)", "at least 85%", lambda v: v >= 0.85),
    "warm_vs_mlx_lm": ("warm decode ran at {v:.2f}x the speed of mlx-lm holding the same weights in memory "
                       "(per-pass median)", "at least 0.8x", lambda v: v >= 0.8),
    "gpu_per_layer_non_io_ms": ("each layer spent {v:.2f} ms on work other than reading experts (warm, on the GPU)",
                                "at most 1.0 ms", lambda v: v <= 1.0),
}


def install_router(model, router: StickyRouter) -> None:
    """Replace each layer's routing decision with the synthetic router's (uniform scores)."""
    import mlx.core as mx

    for layer in model.layers:
        mlp = layer.mlp

        def route(x, _layer=mlp.layer, _mlp=mlp):
            T = x.shape[0]
            ids = router.route(_layer, T)  # [T, K]
            scores = mx.full(ids.shape, 1.0 / ids.shape[1], dtype=x.dtype)
            return mx.array(ids.astype(np.int32)), scores

        object.__setattr__(mlp, "route", route)


def forget_experts(model) -> None:
    """Empty the runtime's expert slots (the GPU expert cache), so the next pass reads every record again."""
    model.experts.clear_cache()


def compile_pass(model, cfg, k: int, tokens: int = 2, prompt: int = 1, seed: int = 12345,
                 recall: float | None = None) -> None:
    """A throwaway pass with the shapes of the timed one (its own routes), so that MLX compiles its
    kernels here and not inside the timed pass; with `recall`, the prefetch guesses too (bench.prefetch)."""
    router = StickyRouter(cfg.num_hidden_layers, cfg.num_experts, k, 0.0, seed)
    install_router(model, router)
    if recall is not None:
        from .prefetch import Guesser, install_guesser

        install_guesser(model, Guesser(model, router, recall, seed))
    if prompt > 1:
        import mlx.core as mx

        ids = mx.array(np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(1, prompt)))
        mx.eval(model(ids, model.make_cache(), last_only=True))
    else:
        decode(model, tokens)


def decode(model, tokens: int, fast: bool = False, quiesce=None) -> dict:
    """Greedy-decode `tokens` tokens after a 1-token prompt; returns seconds, stage stats and the token ids.
    fast=True runs the production decode path (Model.decode: optimistic lookups when the expert cache allows)
    with stage timing off, since timing each stage adds a host sync per stage per layer. quiesce: called
    before the stats are reset and again after the clock stops, before they are read (the prefetch arm waits
    there for background reads, so that the counters cover exactly the timed tokens)."""
    import mlx.core as mx

    cache = model.make_cache()
    ids = mx.array([[1]])
    logits = model(ids, cache, last_only=True)  # prefill of the 1-token prompt (not timed)
    mx.eval(logits)
    if quiesce is not None:
        quiesce()
    was = model.stats.enabled
    model.stats.enabled = not fast
    model.stats.reset()
    ex = model.experts
    misses0 = getattr(ex, "optimistic_misses", 0)
    tables = getattr(model, "tables", None)  # Qwen4-Exp's n-gram tables (runtime/table_reader.py); None otherwise
    if tables is not None:
        tables.stats.reset()
    fed = []
    t = time.perf_counter()
    for _ in range(tokens):
        nxt = mx.argmax(logits[:, -1], axis=-1)[:, None]
        fed.append(nxt)
        logits = model.decode(nxt, cache) if fast else model(nxt, cache, last_only=True)
        mx.eval(logits)
    dt = time.perf_counter() - t
    if quiesce is not None:
        quiesce()
    model.stats.enabled = was
    # optimistic steps (a GPU expert cache) that missed and were run again: each also draws one more route
    # from the synthetic router, so the routes after it differ from the timed pass's and may need reads
    redone = getattr(ex, "optimistic_misses", 0) - misses0
    out = {"seconds": dt, "tok_s": tokens / dt, "redone_tokens": redone, **model.stats.snapshot(),
           "token_ids": [int(v.item()) for v in fed] + [int(mx.argmax(logits[0, -1]).item())]}
    if tables is not None:  # read after the pass: the bytes pread from the table files during it
        out["table_bytes"] = tables.stats.bytes
    return out


def timed_pass(model, cfg, k: int, stickiness: float, seed: int, tokens: int, files, cold: bool,
               recall: float | None = None, guess_seed: int = 0) -> dict:
    """One timed decode pass over the routes of `seed`. cold: the files' pages evicted and the expert slots
    emptied first; warm: the same routes again, every record they need in the page cache (and, on a discrete
    GPU, in the GPU expert cache as far as it holds them). recall: the model makes prefetch guesses of that
    recall (bench.prefetch.Guesser; the model must have prefetch on), their measured recall and the runtime's
    prefetch counters go into the pass."""
    router = StickyRouter(cfg.num_hidden_layers, cfg.num_experts, k, stickiness, seed)
    install_router(model, router)
    guesser, marks = None, []
    if recall is not None:
        from .prefetch import Guesser, install_guesser, prefetcher_counters

        guesser = Guesser(model, router, recall, guess_seed)
        install_guesser(model, guesser)

    def edge():  # no background read crosses the timed window's edges; counters and guesses at each edge
        model.experts.prefetcher.drain()
        marks.append((prefetcher_counters(model), len(guesser.overlaps)))

    if cold:
        probe.evict(files)
        forget_experts(model)
    d0 = probe.disk_read_bytes()
    r = decode(model, tokens, quiesce=edge if guesser is not None else None)
    d1 = probe.disk_read_bytes()
    r["disk_bytes"] = d1 - d0 if d0 is not None else None
    r["routes"] = route_stats(router.history, cfg.num_experts)
    if guesser is not None:
        (c0, g0), (c1, g1) = marks
        r["prefetcher"] = {key: c1[key] - c0[key] for key in c1}
        r["guess_overlaps"] = guesser.overlaps[g0:g1]  # the timed tokens' guesses
    return r


def measure_prefill(model, files, cfg, k: int, n: int, stickiness: float, seed: int, cold: bool,
                    full_layers: int) -> dict:
    """One batched forward over an n-token prompt, from a cold page cache where possible: each layer reads
    the union of the experts its n tokens route to, once."""
    import mlx.core as mx

    compile_pass(model, cfg, k, prompt=min(n, 1024))  # same kernels; a long prompt need not be read twice
    install_router(model, StickyRouter(cfg.num_hidden_layers, cfg.num_experts, k, stickiness, seed + 1))
    if cold:
        probe.evict(files)
    forget_experts(model)
    model.stats.reset()
    cache = model.make_cache()
    ids = mx.array(np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(1, n)))
    t = time.perf_counter()
    mx.eval(model(ids, cache, last_only=True))
    dt = time.perf_counter() - t
    st = model.stats.snapshot()
    return {"tokens": n, "cold": cold, "seconds": dt, "tok_s": n / dt, **st,
            "experts_read_per_layer": st["expert_reads"] / cfg.num_hidden_layers,
            "projected_full_model_seconds": (dt - st["head"]) / cfg.num_hidden_layers * full_layers + st["head"]}


def check_peer(cfg) -> None:
    """mlx-lm builds the Qwen3.5 layer pattern itself (full attention every 4th layer) and needs at least
    one full-attention layer: refuse bundles it would build differently, before any work is done."""
    import importlib.util

    want = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(cfg.num_hidden_layers)]
    if cfg.num_hidden_layers < 4 or list(cfg.layer_types) != want:
        raise InputError(f"--peer needs a bundle of 4 or more layers with full attention on every 4th layer "
                         f"(mlx-lm builds that pattern itself); this one has {cfg.num_hidden_layers} layer(s). "
                         "Make one with: flashmoe-bench make --layers 4 ...")
    if importlib.util.find_spec("mlx_lm") is None:
        raise InputError("--peer needs mlx-lm: pip install mlx-lm")


def run(bundle_dir: str | Path, tokens: int = 32, experts_per_token: int | None = None, io: str = "pread",
        stickiness: float = 0.2, seed: int = 0, peer: bool = False, prefill: int = 0, batch=None,
        batch_tokens: int = 16, batch_prompt_tokens: int = 256, routing=("uniform", "calibrated"), log=None,
        passes: int = method.MIN_PASSES, sweep_seconds: float = 1.0, gpu_cache_gb: float | None = None,
        slots: int | None = None, prefetch_recalls=()) -> dict:
    """The whole report (see the module's docstring). prefetch_recalls: recalls of the measured prefetch arm
    (bench.prefetch; empty: none, and the report carries the simulated curve, labelled an estimate)."""
    import mlx.core as mx

    import flashmoe

    log = log or (lambda m: print(m, file=sys.stderr))
    b = Bundle.open(bundle_dir)
    cfg = b.config
    if peer:
        check_peer(cfg)
    if batch:
        if batch_prompt_tokens <= max(batch):
            raise InputError(f"--batch-prompt-tokens ({batch_prompt_tokens}) must be larger than the largest batch "
                             f"({max(batch)}): the synthetic router tells prompts from decode steps by their length")
        try:
            import flashmoe.runtime.engine  # noqa: F401
        except ImportError:
            raise InputError("--batch needs the batched engine (flashmoe.runtime.engine), which this install "
                             "lacks; update flashmoe") from None
    files = probe.file_list(b)
    info = b.expert_info(0)
    reads = token_reads(b)
    table_files = [b.path / rel for rel, _ in parse_tables(b.manifest)]  # evicted with the experts before a cold pass
    full_layers = b.manifest.get("source", {}).get("full_layers") or cfg.num_hidden_layers
    k = experts_per_token or cfg.num_experts_per_tok
    rep: dict = {"machine": probe.machine(), "date": time.strftime("%Y-%m-%d"), "bundle": str(b.path),
                 "preset": b.manifest.get("source", {}).get("preset"), "layers": cfg.num_hidden_layers,
                 "full_model_layers": full_layers, "bits": b.expert_quant.bits, "experts_per_token": k,
                 "tokens": tokens, "io": io, "record_bytes": info.record_size,
                 "table_bytes_per_token_layout": reads["tables"]}  # None: no tables; else cold/warm from the layout

    # refused before any work; prefetch off: the synthetic routes leave the model's own guess nothing to go on
    # (the measured arm below is a second model with prefetch on and the bench's guesses)
    rc = runtime_config(experts_per_token=k, io=io, gpu_cache_gb=gpu_cache_gb, slots=slots, prefetch="off")
    recalls = [float(v) for v in prefetch_recalls]
    if any(not 0.0 <= v <= 1.0 for v in recalls):
        raise InputError(f"--prefetch-recall {recalls}: a recall is a share between 0 and 1")

    # ---- raw limits on the same files ----------------------------------------------------------
    log("measuring the disk's limit (record reads at 1..64 in flight, O_DIRECT) and memory bandwidth")
    cold_ok = probe.can_evict()
    seq_files = files[: max(1, min(len(files), (2 << 30) // max(1, info.file_size)))]
    lim = {}
    if cold_ok:
        probe.evict(seq_files)
        lim["seq_read_cold_gbps"] = probe.seq_read(seq_files)
    lim["seq_read_warm_gbps"] = probe.seq_read(seq_files)
    lim["disk"] = method.bundle_qd_sweep(b, seconds=sweep_seconds, seed=seed)
    lim["disk_limit_gbps"] = lim["disk"]["limit_gbps"] if lim["disk"]["direct"] else None
    lim["cpu_mem_gbps"] = probe.cpu_mem_bandwidth()
    lim["gpu_mem_gbps"] = probe.gpu_mem_bandwidth()
    rep["limits"] = lim
    log(method.format_sweep(lim["disk"]))

    # ---- decode through the runtime --------------------------------------------------------------

    model, tokenizer = flashmoe.load(b.path, rc)
    model.stats.enabled = True
    rep["metadata"] = method.metadata(b.path, model)
    st = rep["metadata"]["settings"]
    rep["io"], rep["expert_slots"], rep["upload"], rep["kernels"] = st["io"], st["expert_slots"], st["upload"], st["kernels"]
    rep["expert_slot_bytes"] = st["expert_slot_bytes"]
    # the regime: how many times larger the bundle's experts are than the cache that holds them (>= 3: disk-bound,
    # provided the page cache cannot hold them either: io direct, or a bundle larger than RAM)
    rep["bundle_expert_bytes"] = sum(Path(p).stat().st_size for p in files)
    rep["bundle_vs_cache"] = rep["bundle_expert_bytes"] / st["expert_slot_bytes"]
    # how often an LRU cache of this many slots would hit, per routing model (slots shared by all layers)
    share = min(1.0, model.experts.slots / cfg.num_hidden_layers / cfg.num_experts)
    rep["expert_cache_share_per_layer"] = share
    rep["expert_cache_hit_rate_by_routing"] = {m: simulated_lru_hits(m, cfg.num_experts, k, [share])[share]
                                               for m in ROUTING_MODELS}
    # what the same routing reads per token over all the model's layers with these slots, against this bundle's
    # depth (slots are shared by every layer: a deeper model keeps less of each layer)
    sim = {n: simulated_reads_per_token("uniform", n, cfg.num_experts, k, model.experts.slots, tokens=tokens,
                                        warmup=0, stickiness=stickiness) / n
           for n in sorted({cfg.num_hidden_layers, full_layers})}
    rep["simulated_cold_reads_per_layer_token"] = {str(n): v for n, v in sim.items()}
    rep["simulated_read_factor_full_vs_bundle"] = sim[full_layers] / sim[cfg.num_hidden_layers]
    log("compiling (a throwaway pass, not timed)")
    compile_pass(model, cfg, k)
    on_model = None
    if recalls and cold_ok:  # the measured prefetch arm: the same runtime with prefetch on, and the bench's guesses
        on_model, _ = flashmoe.load(b.path, rc.with_(prefetch="on"))
        on_model.stats.enabled = True
        log(f"compiling the prefetch arm (prefetch on, guesses of recall {', '.join(f'{v:g}' for v in recalls)})")
        compile_pass(on_model, cfg, k, recall=recalls[0])
    elif recalls:
        log("no prefetch arm: this OS cannot evict the bundle's pages, so there is no cold pass to measure it on")
    results, arm, arm_checks = {}, {v: [] for v in recalls if on_model is not None}, []
    need_rec = info.record_size
    for phase in (["cold"] if cold_ok else []) + ["warm"]:
        runs = []
        for i in range(passes):
            runs.append(timed_pass(model, cfg, k, stickiness, seed, tokens, files + table_files, phase == "cold"))
            for v, on_runs in (arm.items() if phase == "cold" else ()):  # interleaved: same routes, same pass
                on_runs.append(timed_pass(on_model, cfg, k, stickiness, seed, tokens, files + table_files, True,
                                          recall=v, guess_seed=seed + 1 + i))
        results[phase] = summarize_passes(runs, tokens, cfg.num_hidden_layers, full_layers, need_rec, k)
        if phase == "cold":  # the full model's cache keeps less of each layer: its reads scaled by the simulation
            r = results[phase]
            io_extra = r["expert_io"] / tokens / cfg.num_hidden_layers * (rep["simulated_read_factor_full_vs_bundle"] - 1)
            r["projected_full_model_tok_s_read_adjusted"] = 1.0 / (1.0 / r["projected_full_model_tok_s"]
                                                                   + io_extra * full_layers)
        r = results[phase]
        log(f"{phase}: {method.fmt_spread(r['tok_s_spread'])} tok/s over {cfg.num_hidden_layers} layers; projected "
            f"{r['projected_full_model_tok_s']:.2f} tok/s for {full_layers} layers")
        if on_model is not None and phase == "cold":  # the arm's figures, then its model's memory back
            from .prefetch import arm_summary, format_arm

            rep["prefetch"], arm_checks = arm_summary(
                results["cold"]["passes"], arm, tokens, cfg.num_hidden_layers, need_rec, lim["disk_limit_gbps"],
                method.settings(model), method.settings(on_model))
            on_model.experts.close()
            on_model = None
            log(format_arm(rep["prefetch"]))
    if "warm" in results:  # the same routes once more per pass, timed as a user sees it (no per-stage syncs)
        fast = []
        for _ in range(passes):
            install_router(model, StickyRouter(cfg.num_hidden_layers, cfg.num_experts, k, stickiness, seed))
            fast.append(decode(model, tokens, fast=True))
        w = results["warm"]
        w["untimed_stages_spread"] = method.spread([f["tok_s"] for f in fast])
        w["tok_s_untimed_stages"] = w["untimed_stages_spread"]["median"]
        w["untimed_redone_tokens"] = max(f["redone_tokens"] for f in fast)
        redo = (f" (up to {w['untimed_redone_tokens']} of {tokens} tokens missed the GPU expert cache and ran again; "
                "the figure then includes reads)") if w["untimed_redone_tokens"] else ""
        log(f"warm, stage timing off: {method.fmt_spread(w['untimed_stages_spread'])} tok/s{redo}")
    rep["decode"] = results
    cold = results.get("cold")
    if "prefetch" not in rep and cold and cold["expert_reads"]:
        from .prefetch import curve

        # what speculative prefetch would gain at each prediction recall, from this run's cold per-record read
        # time and per-layer compute, over all the model's layers with these slots (simulated reads)
        rep["prefetch"] = curve(cold["expert_io"] / cold["expert_reads"], cold["per_layer_non_io_ms"] / 1e3,
                                "uniform", full_layers, cfg.num_experts, k, model.experts.slots,
                                tokens=min(tokens, 16), seed=seed, stickiness=stickiness)
    if prefill:
        rep["prefill"] = measure_prefill(model, files, cfg, k, prefill, stickiness, seed, cold_ok, full_layers)
        log(f"prefill: {prefill} tokens in {rep['prefill']['seconds']:.2f} s ({rep['prefill']['tok_s']:.1f} tok/s)")
    if batch:
        from .batch import run_batches

        rep["batch"] = run_batches(b, model, tokenizer, files, batch, routing, batch_tokens, batch_prompt_tokens, k,
                                   seed=seed, cold=cold_ok, log=log, disk_gbps=lim["disk_limit_gbps"])
    model.experts.close()
    del model

    # ---- ratios, each per pass from this run, and the bounds checked -------------------------------------
    t, ratios, checks = {}, {}, []
    cold = results.get("cold")
    limit = lim["disk_limit_gbps"]
    if cold and limit:
        per_pass = []
        for p in cold["passes"]:
            need = p["expert_bytes"] / tokens
            disk = p["disk_bytes"] / tokens if p["disk_bytes"] is not None else None
            per_pass.append(method.roofline(p["tok_s"], need, limit, disk) if need > 0 else None)
        good = [(p, rf) for p, rf in zip(cold["passes"], per_pass) if rf]
        if good:
            ratios["cold_vs_disk_roofline"] = method.spread([rf["ratio"] for _, rf in good])
            ratios["cold_io_vs_disk_limit"] = method.spread(
                [p["expert_bytes"] / p["expert_io"] / 1e9 / limit for p, _ in good if p["expert_io"]])
            ratios["cold_over_read"] = method.spread([rf["over_read"] for _, rf in good])
            cold["disk_roofline_tok_s"] = method.spread([rf["roofline_tok_s"] for _, rf in good])["median"]
            for i, (p, rf) in enumerate(good):
                # the bound: the bytes that had to come from the disk (needed ones, or fewer where the page cache
                # served some: pread re-reads within a pass) at the disk's limit
                from_disk = min(p["expert_bytes"], p["disk_bytes"]) if p["disk_bytes"] is not None else p["expert_bytes"]
                if from_disk > 0:
                    checks.append(method.check_bound(f"cold pass {i} tok/s vs the disk roofline on bytes from disk",
                                                     p["tok_s"], limit * 1e9 / (from_disk / tokens)))
                if p["expert_io"] and p["disk_bytes"]:
                    checks.append(method.check_bound(f"cold pass {i} disk GB/s during reads vs the disk limit",
                                                     p["disk_bytes"] / p["expert_io"] / 1e9, limit))
    if mx.default_device() == mx.gpu:
        t["gpu_per_layer_non_io_ms"] = results["warm"]["per_layer_non_io_ms"]

    # ---- peer: mlx-lm in memory on the same weights --------------------------------------------------
    if peer:
        import tempfile

        from .peer import export_mlx_lm, mlx_lm_decode_tps

        with tempfile.TemporaryDirectory(prefix="flashmoe-peer-", dir=b.path.parent) as d:
            log("exporting the same weights as an mlx-lm checkpoint and decoding with mlx-lm")
            export_mlx_lm(b, Path(d))
            peer_runs = mlx_lm_decode_tps(Path(d), tokens, passes=passes)
        ours = results["warm"]["untimed_stages_spread"]["passes"]
        rep["peer"] = {"engine": "mlx-lm", "tok_s_spread": method.spread(peer_runs),
                       "tok_s": method.spread(peer_runs)["median"]}
        # pass i of ours over pass i of mlx-lm (run after ours: one model in memory at a time)
        ratios["warm_vs_mlx_lm"] = method.spread([a / p for a, p in zip(ours, peer_runs)])
    for name, sp in ratios.items():
        if name in TARGETS:
            t[name] = sp["median"]
    rep["ratios"] = ratios
    rep["targets"] = t
    checks += arm_checks
    rep["bound_checks"] = checks
    rep["bound_violations"] = method.violations(checks)
    rep["warnings"] = warnings_for(rep)
    return rep


def runtime_config(**kw):
    """The RuntimeConfig of a bench run (FLASHMOE_* environment, then flags), with a clear refusal where this
    runtime lacks the io mode asked for."""
    from flashmoe.runtime.config import IO_MODES, RuntimeConfig

    if kw.get("io") and kw["io"] not in IO_MODES:
        raise InputError(f"--io {kw['io']}: this runtime reads experts by {', '.join(IO_MODES)} only "
                         "(io=direct, O_DIRECT reads, needs a newer flashmoe)")
    return RuntimeConfig.from_env(**kw)


def summarize_passes(runs: list[dict], tokens: int, layers: int, full_layers: int, record_size: int, k: int) -> dict:
    """One phase's passes: each pass kept (tok/s, bytes, stage seconds), the figures reported as the
    per-pass median (stage times, bytes) and tok/s as median with its spread."""
    keys = ("seconds", "tok_s", *STAGES, "expert_bytes", "expert_reads")
    r = {key: float(np.median([p[key] for p in runs])) for key in keys}
    disk = [p["disk_bytes"] for p in runs if p.get("disk_bytes") is not None]
    r["disk_bytes"] = float(np.median(disk)) if disk else None
    r["passes"] = [{key: p[key] for key in (*keys, "disk_bytes", "token_ids")} for p in runs]
    r["tok_s_spread"] = method.spread([p["tok_s"] for p in runs])
    if r["disk_bytes"] is not None and r["expert_bytes"]:
        r["page_cache_hit_rate"] = max(0.0, 1.0 - r["disk_bytes"] / r["expert_bytes"])
    r["expert_bytes_per_token"] = r["expert_bytes"] / tokens  # records fetched (after the slots' cache hits)
    r["expert_bytes_routed_per_token"] = k * layers * record_size  # what the routes name, before any cache
    if all("table_bytes" in p for p in runs):  # a model with n-gram tables: their bytes, measured per pass
        r["table_bytes"] = float(np.median([p["table_bytes"] for p in runs]))
        r["table_bytes_per_token"] = r["table_bytes"] / tokens
        for kept, p in zip(r["passes"], runs):
            kept["table_bytes"] = p["table_bytes"]
    r["expert_gbps"] = r["expert_bytes"] / r["expert_io"] / 1e9 if r["expert_io"] else None
    per_layer = {s: r[s] / tokens / layers for s in STAGES if s != "head"}
    r["per_layer_ms"] = {s: v * 1e3 for s, v in per_layer.items()}
    r["per_layer_non_io_ms"] = sum(v for s, v in per_layer.items() if s != "expert_io") * 1e3
    # a projection: per-layer time x all layers (method.projection_check validates it against a deeper run)
    r["projected_full_model_tok_s"] = 1.0 / (sum(per_layer.values()) * full_layers + r["head"] / tokens)
    r["routes"] = runs[0]["routes"]
    return r


def warnings_for(rep: dict) -> list[str]:
    """Plain-language cautions about figures too small to trust."""
    out = []
    if rep["tokens"] < MIN_TOKENS:
        out.append(f"only {rep['tokens']} tokens were timed: figures this short vary by tens of percent from "
                   f"run to run; use --tokens {2 * MIN_TOKENS} or more before comparing numbers")
    return out


def format_table(rep: dict) -> str:
    lim = rep["limits"]
    f = lambda v, fmt="{:.2f}": "-" if v is None else fmt.format(v)  # noqa: E731
    L = rep["full_model_layers"]
    md = rep.get("metadata", {})
    lines = [f"machine   {rep['machine']}; CPU {md.get('cpu')}; GPU {md.get('gpu') or 'none'}; "
             f"disk {md.get('disk', {}).get('device')} ({md.get('disk', {}).get('fs')}); commit {md.get('git_commit')}",
             f"bundle    {rep['bundle']} ({rep.get('preset') or 'custom'}, {rep['layers']} of {L} layers, "
             f"{rep['bits']}-bit, {rep['experts_per_token']} experts per token, {rep['tokens']} tokens timed, "
             f"reads by {rep['io']}{', uploads ' + rep['upload'] if rep.get('upload') else ''})",
             f"files     whole files {f(lim.get('seq_read_cold_gbps'))} GB/s from disk, "
             f"{f(lim.get('seq_read_warm_gbps'))} GB/s from the page cache",
             method.format_sweep(lim["disk"]) + ("" if lim["disk"]["direct"] else
                                                 " (not O_DIRECT here: not a limit, no roofline reported)"),
             f"memory    {f(lim.get('cpu_mem_gbps'))} GB/s CPU copy"
             + (f", {f(lim.get('gpu_mem_gbps'))} GB/s GPU copy" if lim.get("gpu_mem_gbps") else ""), "",
             "decode    cold = experts read from the disk (pages evicted first); warm = the same routes again",
             f"{'':<6}{'tok/s':>8}{f'{L} layers':>11}{'attn':>8}{'route':>8}{'read':>8}{'experts':>9}{'MB/tok':>8}"
             f"{'read GB/s':>10}{'cached':>8}{'RSS MB':>8}"]
    for phase, r in rep["decode"].items():  # per-pass medians
        pl = r["per_layer_ms"]
        lines.append(f"{phase:<6}{r['tok_s']:>8.2f}{r['projected_full_model_tok_s']:>11.2f}{pl['attention']:>8.2f}"
                     f"{pl['routing']:>8.2f}{pl['expert_io']:>8.2f}{pl['expert_compute']:>9.2f}"
                     f"{r['expert_bytes_per_token'] / 1e6:>8.1f}{f(r.get('expert_gbps')):>10}"
                     f"{f(r.get('page_cache_hit_rate'), '{:.0%}'):>8}{rep.get('peak_rss_mb', 0):>8.0f}")
    layout = rep.get("table_bytes_per_token_layout")
    for phase, r in rep["decode"].items():
        if "table_bytes_per_token" in r:
            lines.append(f"{phase:<6}tables {r['table_bytes_per_token']:,.0f} bytes/tok read from the n-gram tables "
                         f"(measured, median of passes; a block is CRC-checked whole once per process, so only rows "
                         f"after that) beside {r['expert_bytes_per_token']:,.0f} bytes/tok of experts"
                         + (f"; the layout needs at most {layout['cold']:,} bytes/tok cold (whole blocks), "
                            f"{layout['warm']:,} warm (rows)" if layout else ""))
    for phase, r in rep["decode"].items():
        lines.append(f"{phase:<6}tok/s per pass: {method.fmt_spread(r['tok_s_spread'])}"
                     + (f"; stage timing off: {method.fmt_spread(r['untimed_stages_spread'])}"
                        if r.get("untimed_stages_spread") else ""))
    lines.append(f"          (tok/s over the {rep['layers']} layers in the bundle (median of passes), then projected to all {L}; "
                 "then milliseconds per layer per token: attention, routing, reading experts, expert math; "
                 "expert megabytes read per token, their read speed, share found in the page cache)")
    lines.append(f"regime    the bundle's experts are {rep['bundle_vs_cache']:.1f}x the expert cache "
                 f"({rep['expert_slot_bytes'] / 1e9:.2f} GB, {rep['expert_slots']} slots; reads by {rep['io']})")
    routes = next(iter(rep["decode"].values()))["routes"]
    lines.append(f"routing   synthetic (uniform, sticky): consecutive tokens share {f(routes['consecutive_overlap'], '{:.0%}')} "
                 f"of their experts; {routes['window']} tokens touch {f(routes['touched_per_window'], '{:.0%}')} "
                 "of a layer's experts")
    hits = rep.get("expert_cache_hit_rate_by_routing")
    if hits:
        lines.append(f"cache     the expert cache ({rep['expert_slots']} slots) holds {rep['expert_cache_share_per_layer']:.0%} "
                     f"of each layer's experts; it would serve {hits['uniform']:.0%} of reads under uniform routing, "
                     f"{hits['calibrated']:.0%} under routing calibrated to real models")
    if rep.get("prefill"):
        p = rep["prefill"]
        lines.append(f"prefill   {p['tokens']} prompt tokens{' from a cold disk' if p['cold'] else ''}: {p['seconds']:.2f} s = "
                     f"{p['tok_s']:.1f} tok/s; {p['experts_read_per_layer']:.0f} experts read per layer "
                     f"({p['expert_bytes'] / 1e9:.2f} GB); about {p['projected_full_model_seconds']:.1f} s "
                     f"for all {L} layers")
    if rep.get("peer"):
        lines.append(f"peer      mlx-lm with every weight in memory: {method.fmt_spread(rep['peer']['tok_s_spread'])} tok/s")
    if rep.get("prefetch"):
        from .prefetch import format_arm, format_curve

        lines.append(format_arm(rep["prefetch"]) if rep["prefetch"].get("kind") == "measured"
                     else format_curve(rep["prefetch"]))
    for b in rep.get("batch", {}).get("rows", []):
        lines.append(format_batch_row(b))
    for name, v in rep["targets"].items():
        text, goal, ok = TARGETS[name]
        sp = rep.get("ratios", {}).get(name)
        rng = f"; passes {sp['min']:.2f}-{sp['max']:.2f}, {sp['n']} of them" if sp else ""
        lines.append(f"check     {'OK  ' if ok(v) else 'LOW '} {text.format(v=v)}{rng} (goal: {goal})")
    over = rep.get("ratios", {}).get("cold_over_read")
    if over and over["median"] is not None:
        lines.append(f"over-read the disk delivered {over['median']:.0%} more bytes than the model needed "
                     f"(passes {over['min']:.0%} to {over['max']:.0%}); the roofline above counts only the needed ones")
    for c in rep.get("bound_violations", []):
        lines.append(f"BOUND     {c['name']}: measured {c['measured']:.3g} is {c['ratio']:.2f}x its bound "
                     f"{c['bound']:.3g}: that bound is not one")
    for w in rep.get("warnings", []):
        lines.append(f"warning   {w}")
    return "\n".join(lines)


def chart(rep: dict, path: str | Path) -> None:
    """PNG: per-layer ms by stage, cold vs warm (needs matplotlib: pip install 'flashmoe[bench]')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = list(rep["decode"])
    stages = ["attention", "routing", "expert_io", "expert_compute"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    left = np.zeros(len(phases))
    for s in stages:
        vals = np.array([rep["decode"][p]["per_layer_ms"][s] for p in phases])
        ax.barh(phases, vals, left=left, label=s.replace("_", " "))
        left += vals
    ax.set_xlabel("ms per layer per token")
    ax.set_title(f"{rep.get('preset') or 'bundle'} {rep['bits']}-bit K={rep['experts_per_token']}, projected to "
                 f"{rep['full_model_layers']} layers: "
                 + ", ".join(f"{p} {rep['decode'][p]['projected_full_model_tok_s']:.2f} tok/s" for p in phases), fontsize=9)
    # below the axes, so it never covers a bar
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=len(stages), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(rep: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(rep, indent=1, default=float) + "\n")
