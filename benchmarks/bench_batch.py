"""flashmoe-batch against a sequential `flashmoe-run` loop over the same documents, back to back.

    python benchmarks/bench_batch.py BUNDLE --docs 200 --prompt-tokens 1000 --gen-tokens 64 --out DIR

Documents are /v1/completions requests whose prompts are token ids (exact lengths, drawn uniformly within
+-20% of --prompt-tokens, ids from the bundle's byte tokenizer), greedy, --gen-tokens each.

* loop: `flashmoe.generate` per document, in this process with the model loaded once. A real loop of
  `flashmoe-run` commands would also pay a process start and a bundle load per document, so the loop's
  figures here are an upper bound for it.
* batch: `flashmoe.batch.run_jobs` (what flashmoe-batch runs: journal writes and fsyncs included) with
  --batch-size rows through the continuous-batching engine.

Both sides start from the same state: after an untimed warm-up document (MLX compiles its kernels; the
pages it reads stay cached) or, with --evict, with the bundle's pages evicted and the expert cache emptied
(cold: every expert read comes from the disk). Routing: the model's own router by default (random
weights: no structure, so nothing is shared between consecutive tokens); --routing uniform|calibrated
installs bench.routing's synthetic routers instead (one stream per batch row, as flashmoe-bench run --batch).

Reported per side: documents per hour, prefill and decode tok/s, expert bytes read per document. The
batch's prefill tok/s counts the engine steps that prefilled (they also decode the running rows), its
decode tok/s the steps that only decoded. JSON goes to DIR/bench_batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def documents(n: int, prompt_tokens: int, gen_tokens: int, seed: int, lo_id: int, hi_id: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(int(prompt_tokens * 0.8), int(prompt_tokens * 1.2) + 1))
        ids = rng.integers(lo_id, hi_id, size=length).tolist()
        out.append(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "bench", "prompt": ids, "max_tokens": gen_tokens}}))
    return out


def set_routing(model, routing: str, rows: int, seed: int) -> None:
    if routing == "own":
        return
    from flashmoe.bench.batch import BatchRouter, install
    from flashmoe.bench.routing import make_router

    cfg = model.config
    install(model, BatchRouter(make_router(routing, cfg.num_hidden_layers, cfg.num_experts,
                                           model.experts_per_token, seed=seed), rows))


def fresh_start(model, bundle_dir: str, evict: bool) -> None:
    if not evict:
        return
    from flashmoe.bench import probe

    probe.evict([p for p in Path(bundle_dir).rglob("*") if p.is_file()])
    clear = getattr(model.experts, "clear_cache", None)
    if clear:
        clear()


def run_loop(model, tok, docs: list[str], log) -> dict:
    import flashmoe

    res = dict(docs=0, prompt_tokens=0, generated_tokens=0, prefill_s=0.0, decode_s=0.0, expert_bytes=0)
    t0 = time.perf_counter()
    for i, line in enumerate(docs):
        body = json.loads(line)["body"]
        *_, last = flashmoe.generate(model, tok, body["prompt"], max_tokens=body["max_tokens"], chat_template=False)
        s = last.stats
        res["docs"] += 1
        res["prompt_tokens"] += s["prompt_tokens"]
        res["generated_tokens"] += s["generated_tokens"]
        res["prefill_s"] += s["prefill_s"]
        res["decode_s"] += s["decode_s"]
        res["expert_bytes"] += s["expert_bytes"]
        if (i + 1) % max(1, len(docs) // 10) == 0:
            log(f"loop: {i + 1}/{len(docs)} docs, {time.perf_counter() - t0:.0f} s")
    res["wall_s"] = time.perf_counter() - t0
    return finish(res)


def finish(r: dict) -> dict:
    r["docs_per_hour"] = r["docs"] / r["wall_s"] * 3600 if r["wall_s"] else 0.0
    r["prefill_tps"] = r["prompt_tokens"] / r["prefill_s"] if r["prefill_s"] else 0.0
    r["decode_tps"] = r["generated_tokens"] / r["decode_s"] if r["decode_s"] else 0.0
    r["expert_bytes_per_doc"] = r["expert_bytes"] / r["docs"] if r["docs"] else 0.0
    return r


def run_batch(model, tok, docs: list[str], batch_size: int | None, workdir: Path, progress: bool) -> dict:
    from flashmoe.batch import JobOptions, run_jobs

    out = workdir / "answers.jsonl"
    if out.exists():
        out.unlink()
    s = run_jobs(model, tok, docs, out, JobOptions(batch_size=batch_size, progress=progress))
    d = s.as_dict()
    if s.failed:
        raise SystemExit(f"bench_batch: {s.failed} requests failed; see {out}")
    return {"docs": s.done, "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
            "wall_s": s.wall_s, "docs_per_hour": d["docs_per_hour"], "prefill_s": s.prefill_s,
            "decode_s": s.decode_s, "prefill_tps": d["prefill_tps"], "decode_tps": d["decode_tps"],
            "decode_only_tokens": s.decode_only_tokens, "expert_bytes": s.expert_bytes,
            "expert_bytes_per_doc": d["expert_bytes_per_doc"], "max_batch": s.max_batch, "plan": s.plan}


def machine() -> dict:
    import mlx.core as mx

    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "mlx": getattr(mx, "__version__", "?"), "device": str(mx.default_device())}
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))}
    except Exception:  # noqa: BLE001 - not every backend reports
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="bundle directory (e.g. from flashmoe-bench make)")
    p.add_argument("--docs", type=int, default=200, help="documents in the job (default 200)")
    p.add_argument("--loop-docs", type=int, default=None,
                   help="run the sequential loop over only the first N documents (docs/hour is a rate; default: all)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="mean prompt length (default 1000, +-20%%)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per document (default 64)")
    p.add_argument("--batch-size", default="auto", help="flashmoe-batch --batch-size: auto or N (default auto)")
    p.add_argument("--experts-per-token", type=int, default=None, help="routed experts per token (default: model's)")
    p.add_argument("--routing", choices=("own", "uniform", "calibrated"), default="own",
                   help="the model's own router (default) or a synthetic routing model")
    p.add_argument("--evict", action="store_true", help="start each side cold: evict the bundle's pages first")
    p.add_argument("--order", choices=("loop-first", "batch-first"), default="loop-first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write DIR/bench_batch.json")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    import flashmoe

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t_load = time.perf_counter()
    model, tok = flashmoe.load(a.bundle, experts_per_token=a.experts_per_token)
    log(f"loaded {a.bundle} in {time.perf_counter() - t_load:.1f} s")
    lo, hi = 3, min(tok.vocab_size, 259)  # byte tokens of the synthetic tokenizer, no special tokens
    docs = documents(a.docs, a.prompt_tokens, a.gen_tokens, a.seed, lo, hi)
    loop_docs = docs[: a.loop_docs] if a.loop_docs else docs
    batch_size = None if a.batch_size == "auto" else int(a.batch_size)

    warm = documents(1, a.prompt_tokens, 2, a.seed + 1, lo, hi)
    set_routing(model, a.routing, 1, a.seed + 1)
    run_loop(model, tok, warm, lambda m: None)  # compile; with --evict the pages are dropped again below
    log("warm-up done")
    results = {}
    with tempfile.TemporaryDirectory() as td:
        for side in (("loop", "batch") if a.order == "loop-first" else ("batch", "loop")):
            fresh_start(model, a.bundle, a.evict)
            if side == "loop":
                set_routing(model, a.routing, 1, a.seed)
                log(f"loop: {len(loop_docs)} documents, one at a time")
                results["loop"] = run_loop(model, tok, loop_docs, log)
            else:
                set_routing(model, a.routing, batch_size or 256, a.seed)
                log(f"batch: {len(docs)} documents through flashmoe-batch (batch size {a.batch_size})")
                results["batch"] = run_batch(model, tok, docs, batch_size, Path(td), not a.quiet)
            r = results[side]
            log(f"{side}: {r['docs']} docs in {r['wall_s']:.1f} s = {r['docs_per_hour']:.1f} docs/hour; prefill "
                f"{r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.2f} tok/s, "
                f"{r['expert_bytes_per_doc'] / 1e9:.3f} GB experts per doc")
    cfg = model.config
    speedup = results["batch"]["docs_per_hour"] / results["loop"]["docs_per_hour"] \
        if results["loop"]["docs_per_hour"] else None
    rep = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "bundle": str(a.bundle), "layers": cfg.num_hidden_layers,
           "full_layers_in_model": getattr(cfg, "full_layers_in_model", None), "num_experts": cfg.num_experts,
           "experts_per_token": model.experts_per_token, "args": vars(a), "results": results,
           "batch_vs_loop_docs_per_hour": speedup}
    print(json.dumps({k: rep[k] for k in ("results", "batch_vs_loop_docs_per_hour")}, indent=1))
    log(f"batch / loop documents per hour: {speedup:.2f}x" if speedup else "no loop figure")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_batch.json").write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
