"""Warm decode, every expert resident, against mlx-lm on the same weights in the same process.

    python benchmarks/bench_warm.py BUNDLE [--prompt-tokens 512] [--tokens 256] [--passes 10] \
        [--batch 8,32] [--batch-tokens 64] [--batch-passes 3] --json OUT

* single stream: `flashmoe.generate` (greedy: optimistic and pipelined, the path users get) and mlx-lm's
  generate_step, each decoding --tokens after the same --prompt-tokens random prompt, in --passes
  interleaved passes (flashmoe, mlx-lm, flashmoe, ...) after one untimed pass of each. Reported: each
  engine's tok/s and the per-pass ratio (pass i of flashmoe over pass i of mlx-lm) as median and spread.
* agreement: the greedy tokens of both engines (share equal, first position that differs), and the logits of
  one teacher-forced forward over prompt + flashmoe's tokens on both engines (max |difference|, against the
  largest |logit|; the share of positions whose argmax agrees).
* batches: B sequences of --prompt-tokens each, --batch-tokens generated, through flashmoe's Engine and
  mlx-lm's BatchGenerator, both sampling one fixed non-EOS token (same work on both sides), decode tok/s
  after every sequence has its first token; --batch-passes passes each, alternating.

The expert cache holds every expert (--slots default: layers x experts), read once in the untimed pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def mlx_lm_batch(peer, prompts: list[list[int]], tokens: int, fixed: int) -> float:
    """Decode tok/s of mlx-lm's BatchGenerator for these prompts, `tokens` each, sampling `fixed`."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    B = len(prompts)
    gen = BatchGenerator(peer, max_tokens=tokens, completion_batch_size=B, prefill_batch_size=B,
                         sampler=lambda lp: mx.full((lp.shape[0],), fixed, dtype=mx.uint32))
    gen.insert(prompts, [tokens] * B)
    seen, done, after = set(), 0, 0
    t_first = None
    while done < B:
        _, responses = gen.next()
        for r in responses:
            if t_first is not None:
                after += 1
            seen.add(r.uid)
            done += r.finish_reason is not None
        if t_first is None and len(seen) == B:
            t_first = time.perf_counter()
    dt = time.perf_counter() - t_first
    gen.close()
    return after / dt if dt > 0 else float("nan")


def logits_check(model, peer, ids: list[int]) -> dict:
    """Teacher-forced logits of both engines over `ids`."""
    import mlx.core as mx

    a = model(mx.array([ids]), model.make_cache()).astype(mx.float32)
    b = peer(mx.array([ids])).astype(mx.float32)
    diff = float(mx.max(mx.abs(a - b)).item())
    scale = float(mx.max(mx.abs(b)).item())
    agree = float(mx.mean((mx.argmax(a, -1) == mx.argmax(b, -1)).astype(mx.float32)).item())
    return {"positions": len(ids), "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "relative": diff / scale if scale else None, "argmax_agreement": agree}


def agreement(ours: list[int], theirs: list[int]) -> dict:
    n = min(len(ours), len(theirs))
    first = next((i for i in range(n) if ours[i] != theirs[i]), None)
    return {"compared": n, "equal_share": sum(a == b for a, b in zip(ours, theirs)) / n if n else None,
            "first_difference": first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="decoded tokens per single-stream pass (default 256)")
    ap.add_argument("--passes", type=int, default=10, help="interleaved single-stream passes (default 10)")
    ap.add_argument("--batch", type=_sizes, default=[8, 32], help="batch sizes against BatchGenerator (default 8,32)")
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--batch-passes", type=int, default=3)
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots (default: every expert)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import mlx.core as mx
    from mlx_lm.utils import load_model

    import flashmoe
    from flashmoe.bench import method
    from flashmoe.bench.batch import time_engine
    from flashmoe.bench.peer import export_mlx_lm, mlx_lm_decode
    from flashmoe.format import Bundle

    b = Bundle.open(a.bundle)
    cfg = b.config
    slots = a.slots or cfg.num_hidden_layers * cfg.num_experts
    model, tok = flashmoe.load(a.bundle, slots=slots)
    model.stats.enabled = False
    md = method.metadata(a.bundle, model)
    tmp = tempfile.TemporaryDirectory(prefix="flashmoe-peer-", dir=Path(a.bundle).parent)
    export_mlx_lm(b, Path(tmp.name))
    peer, _ = load_model(Path(tmp.name))
    rng = np.random.default_rng(a.seed)
    prompt = rng.integers(3, min(cfg.vocab_size, 259), size=a.prompt_tokens).tolist()

    def ours_once():
        chunks = list(flashmoe.generate(model, tok, prompt, max_tokens=a.tokens + 1, chat_template=False))
        return chunks[-1].stats["decode_tps"], [c.token for c in chunks if c.token is not None]

    def theirs_once():
        return mlx_lm_decode(peer, mx.array(prompt), a.tokens)

    rows = {"flashmoe": [], "mlx-lm": []}
    toks = {}
    for p in range(a.passes + 1):  # pass 0 is untimed: kernels compile, experts are read into the cache
        for name, fn in (("flashmoe", ours_once), ("mlx-lm", theirs_once)):
            tps, t = fn()
            toks.setdefault(name, t)
            if p:
                rows[name].append(tps)
            print(f"pass {p} {name:9s} {tps:8.1f} tok/s", file=sys.stderr, flush=True)
    out = {"metadata": md, "bundle": a.bundle, "layers": cfg.num_hidden_layers, "prompt_tokens": a.prompt_tokens,
           "tokens": a.tokens, "passes": a.passes,
           "tok_s": {k: method.spread(v) for k, v in rows.items()},
           "ratio_vs_mlx_lm": method.spread([x / y for x, y in zip(rows["flashmoe"], rows["mlx-lm"])]),
           "greedy_tokens": agreement(toks["flashmoe"], toks["mlx-lm"]),
           "logits": logits_check(model, peer, prompt + toks["flashmoe"][:-1])}
    print(f"single stream: flashmoe {method.fmt_spread(out['tok_s']['flashmoe'], '{:.1f}')} tok/s, mlx-lm "
          f"{method.fmt_spread(out['tok_s']['mlx-lm'], '{:.1f}')}; ratio {method.fmt_spread(out['ratio_vs_mlx_lm'])}; "
          f"greedy tokens equal {out['greedy_tokens']['equal_share']:.0%} (first difference at "
          f"{out['greedy_tokens']['first_difference']}); max logit difference {out['logits']['max_abs_logit_diff']:.3g} "
          f"of {out['logits']['max_abs_logit']:.3g}", flush=True)
    fixed = next(t for t in range(3, cfg.vocab_size) if t not in (cfg.eos_token_id if isinstance(cfg.eos_token_id, list)
                                                                     else [cfg.eos_token_id]))
    out["batch"] = []
    for B in a.batch:
        prompts = [rng.integers(3, min(cfg.vocab_size, 259), size=a.prompt_tokens).tolist() for _ in range(B)]
        ours, theirs = [], []
        for p in range(a.batch_passes + 1):
            r = time_engine(model, tok, B, a.prompt_tokens, a.batch_tokens, cfg.vocab_size, a.seed + B)
            t = mlx_lm_batch(peer, prompts, a.batch_tokens, fixed)
            if p:
                ours.append(r["decode_tok_s"])
                theirs.append(t)
        row = {"batch": B, "flashmoe": method.spread(ours), "mlx-lm BatchGenerator": method.spread(theirs),
               "ratio": method.spread([x / y for x, y in zip(ours, theirs)])}
        out["batch"].append(row)
        print(f"B={B}: flashmoe {method.fmt_spread(row['flashmoe'], '{:.1f}')} tok/s, mlx-lm BatchGenerator "
              f"{method.fmt_spread(row['mlx-lm BatchGenerator'], '{:.1f}')}; ratio {method.fmt_spread(row['ratio'])}",
              flush=True)
    tmp.cleanup()
    model.experts.close()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
