"""What cold decode would gain from speculative expert prefetch (#20) if it were built, as a function of the
prediction recall (flashmoe-bench recall measures it on trained models); nothing here assumes a recall.

The model: while layer L-1 runs, the runtime would read the K experts its guess names for layer L (a guess
made from the hidden state entering L-1, bench.recall's `entering`). A share `recall` of layer L's experts
is guessed right; wrong guesses are read too (they cost disk time, and evict other records from the shared
LRU expert cache). Per layer and token, with tau = seconds the disk takes per record (measured, cold) and
C = the layer's time on everything but reads (measured, cold):

    without prefetch:  C + needed x tau                     (today: reads, then compute, one after the other)
    with prefetch:     max(C + demand x tau, (needed_prefetched + demand + wasted) x tau)

demand = records still missing when layer L starts (needed, not guessed, not cached), wasted = guessed
records layer L did not use that were not cached already; the first term is the layer's own chain, the
second the disk's busy time. The reads and evictions are simulated with the bench's synthetic routing
(bench.routing) over the model's layers and cache slots: `simulate` gives the counts per layer per token.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .routing import make_router

RECALLS = tuple(round(x, 1) for x in np.linspace(0.0, 1.0, 11))


def guess(actual: np.ndarray, recall: float, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """K guessed experts: each of the actual K kept with probability `recall`, the rest replaced by experts
    drawn from those not chosen (a guess names K distinct experts, so precision equals recall)."""
    keep = actual[rng.random(len(actual)) < recall]
    others = np.setdiff1d(np.arange(num_experts), actual)
    return np.concatenate([keep, rng.choice(others, size=len(actual) - len(keep), replace=False)])


def simulate(routing: str, layers: int, num_experts: int, k: int, slots: int, recall: float | None,
             tokens: int = 32, seed: int = 0, stickiness: float | None = None) -> dict:
    """Per layer per token: needed reads (records the routes name that are not cached), demand reads (still
    missing when the layer starts), wasted reads (guessed, unused, not cached). recall=None: no prefetch.
    Starts from an empty cache (a cold pass)."""
    r = make_router(routing, layers, num_experts, k, seed=seed, stickiness=stickiness)
    rng = np.random.default_rng(seed + 1)
    cache: OrderedDict[tuple[int, int], None] = OrderedDict()
    cap = max(slots, 2 * k)

    def touch(key) -> bool:
        hit = key in cache
        if hit:
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > cap:
                cache.popitem(last=False)
        return hit

    needed = demand = wasted = 0
    for _ in range(tokens):
        for layer in range(layers):
            ids = r.next(layer)
            prefetched = set()
            if recall is not None:
                for e in guess(ids, recall, num_experts, rng).tolist():
                    if not touch((layer, e)):
                        prefetched.add(e)
                        wasted += e not in ids
            for e in ids.tolist():
                was_cached = (layer, e) in cache
                if e in prefetched:
                    needed += 1  # read, but ahead of time
                    touch((layer, e))
                elif not was_cached:
                    needed += 1
                    demand += 1
                    touch((layer, e))
                else:
                    touch((layer, e))
    n = tokens * layers
    return {"needed": needed / n, "demand": demand / n, "wasted": wasted / n}


def curve(read_s_per_record: float, compute_s_per_layer: float, routing: str, layers: int, num_experts: int,
          k: int, slots: int, tokens: int = 32, seed: int = 0, recalls=RECALLS, stickiness: float | None = None) -> dict:
    """Seconds per layer per token and the gain over no prefetch, at each recall in `recalls`."""
    base = simulate(routing, layers, num_experts, k, slots, None, tokens, seed, stickiness)
    t0 = compute_s_per_layer + base["needed"] * read_s_per_record
    rows = []
    for rc in recalls:
        s = simulate(routing, layers, num_experts, k, slots, rc, tokens, seed, stickiness)
        t = max(compute_s_per_layer + s["demand"] * read_s_per_record,
                (s["needed"] + s["wasted"]) * read_s_per_record)
        rows.append({"recall": float(rc), **s, "s_per_layer": t, "gain": t0 / t})
    return {"routing": routing, "layers": layers, "slots": slots, "read_s_per_record": read_s_per_record,
            "compute_s_per_layer": compute_s_per_layer, "no_prefetch": {**base, "s_per_layer": t0}, "by_recall": rows}


def gain_at(c: dict, recall: float) -> float:
    """The curve's gain at `recall`, interpolated linearly between its points."""
    xs = [r["recall"] for r in c["by_recall"]]
    return float(np.interp(recall, xs, [r["gain"] for r in c["by_recall"]]))


def format_curve(c: dict) -> str:
    cells = ", ".join(f"{r['recall']:.1f}: {r['gain']:.2f}x" for r in c["by_recall"])
    return (f"prefetch  cold decode if speculative prefetch were built (simulated, {c['routing']} routing, "
            f"{c['layers']} layers, {c['slots']} slots), gain by prediction recall: {cells} "
            "(1.0 is perfect foresight, an upper end, not a forecast; flashmoe-bench recall measures a model's)")
