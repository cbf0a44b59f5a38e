"""flashmoe-batch against a sequential `flashmoe.generate` loop over the same documents, back to back.

    python benchmarks/bench_batch.py BUNDLE --docs 96 --prompt-tokens 1000 --gen-tokens 64 \
        [--gpu-cache-gb 4 | --slots N] [--io direct] [--loop-docs 8] --out DIR

Documents are /v1/completions requests whose prompts are token ids (exact lengths, drawn uniformly within
+-20% of --prompt-tokens, ids from the bundle's byte tokenizer), greedy, --gen-tokens each.

* loop: `flashmoe.generate` per document, in this process with the model loaded once. A real loop of
  `flashmoe-run` commands would also pay a process start and a bundle load per document, so the loop's
  figures are an upper bound for it. With --loop-docs N (>= 8) the loop runs a random sample of N of the
  same documents and reports docs/hour as the median and spread of its per-document rates, labelled so.
* batch: `flashmoe.batch.run_jobs` (what flashmoe-batch runs: journal writes and fsyncs included) on all
  the documents, through an Engine whose every step is metered (bench.batch.StepMeter): rows, experts
  touched, records and bytes read (runtime counter and /proc/self/io), read time, compute time, overlap, and
  the step's bound max(disk time for its bytes at the disk limit, compute time). Each step is logged: its
  layer-major prefill passes, read time (wall time some read was in flight, background reads included)
  and the part the model waited for, and compute split into attention, routing, expert math and head, with
  the expert-block calls and (token, expert) pairs behind the expert math.
* expert-block probe (--no-kernel-probe: skip): every expert of layer 0 resident, no reads, the seconds
  of one expert-block call at T = 1, the batch size and the engine's prefill chunk (MLX's gather_qmm with
  T x K pairs), to set beside the prefill steps' expert math per call: whether a prefill's compute is the
  kernel's or something around it.

The model is loaded with a RuntimeConfig carrying --gpu-cache-gb / --slots / --io, and the settings in
effect are read back from it into the JSON (metadata.settings): the cache the report names is the one used.
The disk limit is measured in the same run (bench.method.qd_sweep, O_DIRECT, 1..64 reads in flight).

Both arms start from the same state: after an untimed warm-up document (MLX compiles its kernels) the
bundle's pages are evicted and the expert cache emptied before each arm (--no-evict: keep them). Byte
counters are per arm: the runtime's and the disk's, each a difference over that arm alone. Routing: the
model's own router by default; --routing uniform|calibrated installs bench.routing's synthetic routers (one
stream per batch row). JSON goes to DIR/bench_batch.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flashmoe.bench import method, probe
from flashmoe.bench.batch import StepMeter, format_phase, format_step, summarize_steps

MIN_LOOP_SAMPLE = 8


def documents(n: int, prompt_tokens: int, gen_tokens: int, seed: int, lo_id: int, hi_id: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(int(prompt_tokens * 0.8), int(prompt_tokens * 1.2) + 1))
        ids = rng.integers(lo_id, hi_id, size=length).tolist()
        out.append(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "bench", "prompt": ids, "max_tokens": gen_tokens}}))
    return out


def loop_sample(n_docs: int, loop_docs: int | None, seed: int) -> list[int]:
    """Indices of the documents the loop runs: all, or a random sample of `loop_docs` (>= 8) of them."""
    if loop_docs is None or loop_docs >= n_docs:
        return list(range(n_docs))
    if loop_docs < MIN_LOOP_SAMPLE:
        raise SystemExit(f"bench_batch: --loop-docs must be at least {MIN_LOOP_SAMPLE} (a spread needs them)")
    return sorted(np.random.default_rng(seed + 7).choice(n_docs, size=loop_docs, replace=False).tolist())


def set_routing(model, routing: str, rows: int, seed: int):
    if routing == "own":
        return None
    from flashmoe.bench.batch import BatchRouter, install
    from flashmoe.bench.routing import make_router

    cfg = model.config
    br = BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts, model.experts_per_token, seed=seed),
                     rows)
    install(model, br)
    return br


def fresh_start(model, files, evict: bool) -> None:
    if evict:
        probe.evict(files)
        model.experts.clear_cache()


class ArmBytes:
    """The runtime's expert bytes and the disk's read bytes over one arm (differences, not totals)."""

    def __init__(self, model):
        self.model = model
        self.e0, self.d0, self.t0 = model.stats.expert_bytes, probe.disk_read_bytes(), model.stats.expert_io

    def done(self) -> dict:
        d1 = probe.disk_read_bytes()
        return {"expert_bytes": self.model.stats.expert_bytes - self.e0,
                "disk_bytes": d1 - self.d0 if d1 is not None and self.d0 is not None else None,
                "read_s": self.model.stats.expert_io - self.t0}


def run_loop(model, tok, docs: list[str], log) -> dict:
    import flashmoe

    res = dict(docs=0, prompt_tokens=0, generated_tokens=0, prefill_s=0.0, decode_s=0.0, expert_bytes=0, read_s=0.0)
    per_doc = []
    d0 = probe.disk_read_bytes()  # flashmoe.generate resets model.stats per document: its own figures are summed
    t0 = time.perf_counter()
    for i, line in enumerate(docs):
        body = json.loads(line)["body"]
        t = time.perf_counter()
        *_, last = flashmoe.generate(model, tok, body["prompt"], max_tokens=body["max_tokens"], chat_template=False)
        per_doc.append(time.perf_counter() - t)
        s = last.stats
        res["docs"] += 1
        res["prompt_tokens"] += s["prompt_tokens"]
        res["generated_tokens"] += s["generated_tokens"]
        res["prefill_s"] += s["prefill_s"]
        res["decode_s"] += s["decode_s"]
        res["expert_bytes"] += s["expert_bytes"]
        res["read_s"] += s["prefill"]["expert_io"] + s["decode"]["expert_io"]
        if (i + 1) % max(1, len(docs) // 10) == 0:
            log(f"loop: {i + 1}/{len(docs)} docs, {time.perf_counter() - t0:.0f} s")
    res["wall_s"] = time.perf_counter() - t0
    d1 = probe.disk_read_bytes()
    res["disk_bytes"] = d1 - d0 if d0 is not None and d1 is not None else None
    res["docs_per_hour_per_doc"] = method.spread([3600 / s for s in per_doc])
    return finish(res)


def finish(r: dict) -> dict:
    r["docs_per_hour"] = r["docs"] / r["wall_s"] * 3600 if r["wall_s"] else 0.0
    r["prefill_tps"] = r["prompt_tokens"] / r["prefill_s"] if r["prefill_s"] else 0.0
    r["decode_tps"] = r["generated_tokens"] / r["decode_s"] if r["decode_s"] else 0.0
    r["expert_bytes_per_doc"] = r["expert_bytes"] / r["docs"] if r["docs"] else 0.0
    return r


def metered_engine(model, tok, batch_size, meter: StepMeter):
    """An Engine whose step() records each step in `meter` (phase: prefill when the step took in prompts)."""
    from flashmoe.runtime.engine import Engine

    class MeteredEngine(Engine):
        def step(self):
            rows, prompts = len(self.runner.rows), self.counters["prompt_tokens"]
            t = time.perf_counter()
            events = super().step()
            meter.record(max(rows, len(self.runner.rows)), time.perf_counter() - t,
                         "prefill" if self.counters["prompt_tokens"] != prompts else "decode")
            return events

    return MeteredEngine(model, tok, max_batch=batch_size)


def run_batch(model, tok, docs: list[str], batch_size: int | None, workdir: Path, progress: bool, router,
              disk_gbps) -> dict:
    from flashmoe.batch import JobOptions, run_jobs

    out = workdir / "answers.jsonl"
    meter = StepMeter(model, router, disk_gbps)
    engine = metered_engine(model, tok, batch_size, meter)
    arm = ArmBytes(model)
    s = run_jobs(model, tok, docs, out, JobOptions(batch_size=batch_size, progress=progress), engine=engine)
    d = s.as_dict()
    if s.failed:
        raise SystemExit(f"bench_batch: {s.failed} requests failed; see {out}")
    read = arm.done()
    return {"expert_bytes_per_doc": read["expert_bytes"] / s.done if s.done else 0.0, "docs": s.done, "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "wall_s": s.wall_s, "docs_per_hour": d["docs_per_hour"], "prefill_s": s.prefill_s,
            "decode_s": s.decode_s, "prefill_tps": d["prefill_tps"], "decode_tps": d["decode_tps"],
            "decode_only_tokens": s.decode_only_tokens, **read,
            "max_batch": s.max_batch, "plan": s.plan,
            "phases": {ph: summarize_steps(meter.steps, ph) for ph in ("prefill", "decode")}, "steps": meter.steps}


def kernel_probe(bundle, model, batch: dict, log) -> list[dict]:
    """Seconds of one expert-block call with every expert of layer 0 resident (no reads), at T = 1, the
    largest batch and the engine's prefill chunk, beside the batch arm's expert math per call."""
    from flashmoe.bench.batch import compute_ceiling, resident_table
    from flashmoe.runtime.runner import PREFILL_TOKENS

    cfg, k = bundle.config, model.experts_per_token
    table = resident_table(bundle)
    rows = []
    for T in sorted({1, max(1, batch["max_batch"] or 1), PREFILL_TOKENS}):
        tok_s = compute_ceiling(bundle, table, "uniform", T, k, prefill=T > 1, reps=3)
        rows.append({"tokens": T, "pairs": T * k, "s_per_call": T / (tok_s * cfg.num_hidden_layers)})
    del table
    measured = ", ".join(f"{ph} {t['stages']['expert_compute'] / t['expert_calls'] * 1e3:.1f} ms per call "
                         f"({t['expert_pairs'] / t['expert_calls']:.0f} pairs)"
                         for ph, t in batch["phases"].items() if t["expert_calls"])
    log("expert block, every expert of a layer resident (no reads): " + ", ".join(
        f"T={r['tokens']} ({r['pairs']} pairs) {r['s_per_call'] * 1e3:.2f} ms" for r in rows)
        + f" per layer call; the batch arm's expert math: {measured or '-'}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (e.g. from flashmoe-bench make)")
    p.add_argument("--docs", type=int, default=96, help="documents in the job (default 96)")
    p.add_argument("--loop-docs", type=int, default=None,
                   help=f"run the sequential loop on a random sample of N (>= {MIN_LOOP_SAMPLE}) of the same documents "
                        "(default: all of them)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="mean prompt length (default 1000, +-20%%)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per document (default 64)")
    p.add_argument("--batch-size", default="auto", help="flashmoe-batch --batch-size: auto or N (default auto)")
    p.add_argument("--experts-per-token", type=int, default=None, help="routed experts per token (default: model's)")
    p.add_argument("--gpu-cache-gb", type=float, default=None, help="GPU expert cache size (CUDA); read back")
    p.add_argument("--slots", type=int, default=None, help="expert cache slots; read back")
    p.add_argument("--io", default=None, help="expert reads: pread, mmap, direct (O_DIRECT; needs a runtime with it)")
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default=None,
                   help="reads ahead of compute (speculative prefetch in decode, the next layer's union in a "
                        "layer-major prefill); default $FLASHMOE_PREFETCH or auto (on with a CUDA expert cache)")
    p.add_argument("--read-threads", type=int, default=None,
                   help="expert read threads (reads in flight); default the runtime's (16 with the pinned upload)")
    p.add_argument("--routing", choices=("own", "uniform", "calibrated"), default="own",
                   help="the model's own router (default) or a synthetic routing model")
    p.add_argument("--no-evict", action="store_true", help="keep the page cache and expert cache between arms")
    p.add_argument("--no-stage-times", action="store_true",
                   help="no per-stage timing (it adds a sync per stage; steps then report no compute time)")
    p.add_argument("--no-kernel-probe", action="store_true",
                   help="skip the expert-block probe (it reads every expert of layer 0 into memory once)")
    p.add_argument("--sweep-seconds", type=float, default=1.0, help="seconds per queue depth of the disk sweep")
    p.add_argument("--order", choices=("loop-first", "batch-first"), default="loop-first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/bench_batch.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    import flashmoe
    from flashmoe.bench.run import runtime_config
    from flashmoe.format import Bundle

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    sample = loop_sample(a.docs, a.loop_docs, a.seed)  # before any work: a bad sample size fails at once
    bundle = Bundle.open(a.bundle)
    files = probe.file_list(bundle)
    sweep = method.bundle_qd_sweep(bundle, seconds=a.sweep_seconds, seed=a.seed)
    disk_gbps = sweep["limit_gbps"] if sweep["direct"] else None
    log(method.format_sweep(sweep))
    t_load = time.perf_counter()
    model, tok = flashmoe.load(a.bundle, runtime_config(experts_per_token=a.experts_per_token, io=a.io,
                                                         gpu_cache_gb=a.gpu_cache_gb, slots=a.slots,
                                                         prefetch=a.prefetch, threads=a.read_threads))
    model.stats.enabled = not a.no_stage_times
    md = method.metadata(a.bundle, model)
    st = md["settings"]
    st["prefetch"] = model.experts.prefetcher is not None  # reads ahead of compute, in effect
    log(f"loaded {a.bundle} in {time.perf_counter() - t_load:.1f} s: {st['expert_slots']} slots "
        f"({st['expert_slot_bytes'] / 1e9:.2f} GB), io {st['io']}, upload {st['upload']}, K={st['experts_per_token']}, "
        f"{st['read_threads']} read threads, reads ahead {'on' if st['prefetch'] else 'off'}")
    lo, hi = 3, min(tok.vocab_size, 259)  # byte tokens of the synthetic tokenizer, no special tokens
    docs = documents(a.docs, a.prompt_tokens, a.gen_tokens, a.seed, lo, hi)
    batch_size = None if a.batch_size == "auto" else int(a.batch_size)

    warm = documents(1, a.prompt_tokens, 2, a.seed + 1, lo, hi)
    set_routing(model, a.routing, 1, a.seed + 1)
    run_loop(model, tok, warm, lambda m: None)  # compile; the pages it read are dropped again below
    log("warm-up done")
    results = {}
    with tempfile.TemporaryDirectory() as td:
        for side in (("loop", "batch") if a.order == "loop-first" else ("batch", "loop")):
            fresh_start(model, files, not a.no_evict)
            if side == "loop":
                set_routing(model, a.routing, 1, a.seed)
                log(f"loop: {len(sample)} of the {len(docs)} documents, one at a time")
                results["loop"] = run_loop(model, tok, [docs[i] for i in sample], log)
                results["loop"]["documents"] = sample
                results["loop"]["sampled"] = len(sample) < len(docs)
            else:
                router = set_routing(model, a.routing, batch_size or 256, a.seed)
                log(f"batch: {len(docs)} documents through flashmoe-batch (batch size {a.batch_size})")
                results["batch"] = run_batch(model, tok, docs, batch_size, Path(td), not a.quiet, router, disk_gbps)
            r = results[side]
            gb = (r["disk_bytes"] if r["disk_bytes"] is not None else r["expert_bytes"]) / 1e9
            log(f"{side}: {r['docs']} docs in {r['wall_s']:.1f} s = {r['docs_per_hour']:.1f} docs/hour; prefill "
                f"{r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} tok/s; read {gb:.3f} GB from disk, "
                f"{r['expert_bytes_per_doc'] / 1e9:.3f} GB of records per doc")
    batch = results["batch"]
    for step in batch["steps"]:
        if step["phase"] == "prefill" or step is batch["steps"][-1]:
            log("batch step: " + format_step(step))
    probe_rows = [] if a.no_kernel_probe else kernel_probe(bundle, model, batch, log)
    model.experts.close()
    loop = results["loop"]
    speedup = results["batch"]["docs_per_hour"] / loop["docs_per_hour"] if loop["docs_per_hour"] else None
    cfg = model.config
    rep = {"metadata": md, "disk": sweep, "bundle": str(a.bundle), "layers": cfg.num_hidden_layers,
           "num_experts": cfg.num_experts, "experts_per_token": model.experts_per_token, "args": vars(a),
           "bundle_bytes": sum(f.stat().st_size for f in files), "results": results, "expert_block_probe": probe_rows,
           "batch_vs_loop_docs_per_hour": speedup,
           "loop_label": (f"loop: a random sample of {len(sample)} of the {len(docs)} documents; docs/hour per "
                          "document, median (min-max)") if loop["sampled"] else "loop: every document"}
    rep["bundle_vs_cache"] = rep["bundle_bytes"] / st["expert_slot_bytes"] if st["expert_slot_bytes"] else None
    checks = [method.check_bound(f"batch {ph}: 1/wall vs 1/(sum of step bounds)", 1 / t["wall_s"], 1 / t["bound_s"])
              for ph, t in results["batch"]["phases"].items() if t["bound_s"] and t["wall_s"]]
    rep["bound_checks"], rep["bound_violations"] = checks, method.violations(checks)
    print(json.dumps({k: rep[k] for k in ("batch_vs_loop_docs_per_hour", "loop_label", "bundle_vs_cache")}, indent=1))
    log(f"loop docs/hour per document: {method.fmt_spread(loop['docs_per_hour_per_doc'], '{:.1f}')}")
    log(f"batch / loop documents per hour: {speedup:.2f}x" if speedup else "no loop figure")
    for ph, t in results["batch"]["phases"].items():
        if t["steps"]:
            log("batch " + format_phase(ph, t))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out) / ".bench_batch.json.tmp"
        tmp.write_text(json.dumps(rep, indent=1, default=float))
        tmp.replace(Path(a.out) / "bench_batch.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
