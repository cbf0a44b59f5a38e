"""Warm decode on a GPU with real (router-chosen) routing: Model.decode with optimistic lookups vs the
host-routed path, same bundle, same tokens. Usage: python benchmarks/gpu_optimistic.py BUNDLE [TOKENS]"""
import sys
import time

import mlx.core as mx

import flashmoe


def run(model, n):
    cache = model.make_cache()
    logits = model(mx.array([[1, 2, 3, 4]]), cache, last_only=True)
    mx.eval(logits)
    toks = []
    t = time.perf_counter()
    for _ in range(n):
        nxt = mx.argmax(logits[:, -1], axis=-1)[:, None]
        logits = model.decode(nxt, cache)
        toks.append(int(nxt.item()))
    return n / (time.perf_counter() - t), toks


model, tok = flashmoe.load(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
ex = model.experts
for rep in range(3):
    for opt in (False, True):
        ex.optimistic = opt
        h, m = ex.optimistic_hits, ex.optimistic_misses
        tps, toks = run(model, n)
        print(f"pass {rep} optimistic={opt}: {tps:.1f} tok/s  hits {ex.optimistic_hits - h} misses "
              f"{ex.optimistic_misses - m}  first tokens {toks[:6]}", flush=True)
