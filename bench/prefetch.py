"""Speculative expert prefetch (#20) in the bench: measured on the runtime (`Guesser`, `arm_summary`), and the
older simulated curve (`curve`), kept as a labelled estimate for runs without a measured arm.

The measured arm (`flashmoe-bench run --prefetch-recall R[,R...]`). The bench's bundles have random weights and
a synthetic router (bench.routing), so the model's own guess (layer L+1's router on the state leaving layer L)
says nothing about the routes taken, and the model skips it where a tool replaced the routing. `Guesser` takes
the guess's place at the same call site, `Model._prefetch(L+1, x, stats)`, which the model calls right after
layer L's forward: it does the work the model's guess does (evaluates the state leaving layer L and layer L+1's
router on it, whose answer it drops), draws layer L+1's synthetic route for the token ahead of time
(`StickyRouter.ahead`: the same routes as without a guess), keeps each of its K experts with probability R and
replaces the rest with wrong ones (`guess`), and hands that to the runtime through the public entry
`model.experts.prefetch(layer, indices, scores)`. So the guess is issued at the model's own point, not earlier
(GUESS_EARLIER_THAN_MODEL_S = 0), with uniform scores in random order (the runtime reads the most likely first;
a random order does not favour the right guesses). The recall of the guesses is measured and reported beside
the runtime's own hit count.

The default recall, MEASURED_RECALL = 0.84: bench/recall.py's "leaving" guess (layer L+1's router on the state
leaving layer L, what the runtime uses) on the trained demo model over 512 held-out tokens
(benchmarks/results/2026-12/recall-demo-heldout.json: 82/79/92% by layer); the tests' trained tiny model gives
0.89, and the runtime's own hit rate was 83% (demo) and 87% (tiny). Those models have 16 experts and K=4; no
figure exists for a 512-expert top-10 router, hence the sweep (--prefetch-recall 0,0.5,0.84,1.0).

The simulated curve (what cold decode would gain at each recall, from a run's measured per-record read time and
per-layer compute; nothing here assumes a recall). While layer L-1 runs, the runtime would read the K experts its
guess names for layer L. A share `recall` of layer L's experts is guessed right; wrong guesses are read too
(they cost disk time, and evict other records from the shared LRU expert cache). Per layer and token, with tau =
seconds the disk takes per record (measured, cold) and C = the layer's time on everything but reads (measured,
cold):

    without prefetch:  C + needed x tau                     (today: reads, then compute, one after the other)
    with prefetch:     max(C + demand x tau, (needed_prefetched + demand + wasted) x tau)

demand = records still missing when layer L starts (needed, not guessed, not cached), wasted = guessed
records layer L did not use that were not cached already; the first term is the layer's own chain, the
second the disk's busy time. The reads and evictions are simulated with the bench's synthetic routing
(bench.routing) over the model's layers and cache slots: `simulate` gives the counts per layer per token.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from . import method
from .routing import make_router

RECALLS = tuple(round(x, 1) for x in np.linspace(0.0, 1.0, 11))
MEASURED_RECALL = 0.84  # see the module's docstring for where it was measured
GUESS_EARLIER_THAN_MODEL_S = 0.0  # the guess is issued at the model's own call site (Model._prefetch)
GUESS_POINT = ("Model._prefetch(L+1, x, stats), called by the model right after layer L's forward (attention, "
               "routing, expert reads and math); the guess evaluates that state and layer L+1's router on it, "
               "as the model's own guess does, then issues the synthetic guess")
PREFETCHER_COUNTERS = ("needed", "hits", "ready", "prefetched", "dropped")


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
    return {"kind": "simulated estimate", "routing": routing, "layers": layers, "slots": slots,
            "read_s_per_record": read_s_per_record,
            "compute_s_per_layer": compute_s_per_layer, "no_prefetch": {**base, "s_per_layer": t0}, "by_recall": rows}


def gain_at(c: dict, recall: float) -> float:
    """The curve's gain at `recall`, interpolated linearly between its points."""
    xs = [r["recall"] for r in c["by_recall"]]
    return float(np.interp(recall, xs, [r["gain"] for r in c["by_recall"]]))


def format_curve(c: dict) -> str:
    cells = ", ".join(f"{r['recall']:.1f}: {r['gain']:.2f}x" for r in c["by_recall"])
    return (f"prefetch  ESTIMATE, not measured (no --prefetch-recall arm ran): cold decode with speculative prefetch, "
            f"simulated ({c['routing']} routing, {c['layers']} layers, {c['slots']} slots), gain by prediction recall: "
            f"{cells} (1.0 is perfect foresight, an upper end, not a forecast; flashmoe-bench recall measures a model's)")


# ---- the measured arm ------------------------------------------------------------------------------------
class Guesser:
    """Stands in for the model's guess of layer L+1's experts (see the module's docstring): called as
    Model._prefetch(layer, x, stats); draws the layer's synthetic route ahead from `router` and hands the runtime
    a guess of recall `recall` (each right expert kept with that probability, the rest wrong, K in all). Keeps
    each guess's measured recall (|guess & route| / K)."""

    def __init__(self, model, router, recall: float, seed: int = 0):
        if not callable(getattr(type(model), "_prefetch", None)):
            from flashmoe.errors import InputError

            raise InputError("--prefetch-recall needs a runtime whose model makes its own prefetch guess "
                             "(Model._prefetch, speculative prefetch); update flashmoe")
        self.model, self.router, self.recall = model, router, float(recall)
        self.rng = np.random.default_rng(seed)
        self.overlaps: list[float] = []  # per guessed row: share of the route's experts the guess named

    def __call__(self, layer: int, x, stats) -> None:
        import mlx.core as mx

        if x.shape[1] != 1:  # the model's own condition: decode steps guess (a prefill reads ahead its own way)
            return
        rows = x.shape[0]
        t0 = time.perf_counter()
        block = self.model.layers[layer]
        # the work of the model's own guess: the state leaving layer L, layer L+1's router on it (answer unused)
        mx.eval(type(block.mlp).route(block.mlp, block.post_attention_layernorm(x).reshape(rows, x.shape[-1])))
        routes = self.router.ahead(layer, rows)  # [rows, K]: what layer L+1 will route to
        g = np.stack([self.rng.permutation(guess(r, self.recall, self.router.E, self.rng)) for r in routes])
        self.overlaps += [len(set(a.tolist()) & set(b.tolist())) / len(a) for a, b in zip(routes, g)]
        self.model.experts.prefetch(layer, mx.array(g.astype(np.int32)), mx.full(g.shape, 1.0 / g.shape[1]))
        stats.routing += time.perf_counter() - t0  # where the model counts its guess


def install_guesser(model, guesser: Guesser) -> None:
    """The model calls `guesser` where it would make its own guess (after each layer but the last)."""
    object.__setattr__(model, "_prefetch", guesser)


def prefetcher_counters(model) -> dict:
    """The runtime's prefetch counters, summed over layers (read back from model.experts.prefetcher)."""
    pf = model.experts.prefetcher
    return {name: int(sum(getattr(pf, name).values())) for name in PREFETCHER_COUNTERS}


def arm_pass(off: dict, on: dict, tokens: int, record_size: int, limit_gbps: float | None) -> dict:
    """One interleaved pair of cold passes over the same routes, without (off) and with (on) prefetch. Needed
    bytes = what the routes needed with these slots and no guess (the off pass's reads); wasted = records the
    on pass read beyond that (wrong guesses, and records their slots pushed out that were read again), over-read
    apart; useful = prefetch reads that took a demand read's place."""
    c = on["prefetcher"]
    done = c["prefetched"] - c["dropped"]  # guesses read (queued ones still waiting when the layer routed: dropped)
    wasted = on["expert_reads"] - off["expert_reads"]
    need = off["expert_bytes"] / tokens
    rf = method.roofline(on["tok_s"], need, limit_gbps, on["disk_bytes"] / tokens if on["disk_bytes"] is not None
                         else None) if need > 0 and limit_gbps else None
    return {"tok_s": on["tok_s"], "gain": on["tok_s"] / off["tok_s"], "needed_bytes_per_token": need,
            "bytes_read_per_token": on["expert_bytes"] / tokens, "disk_bytes": on["disk_bytes"],
            "roofline_ratio": rf["ratio"] if rf else None, "roofline_tok_s": rf["roofline_tok_s"] if rf else None,
            "over_read": on["expert_bytes"] / off["expert_bytes"] - 1.0 if off["expert_bytes"] else None,
            "guess_recall": float(np.mean(on["guess_overlaps"])) if on["guess_overlaps"] else None,
            "guesses": len(on["guess_overlaps"]), "runtime_hit_rate": c["hits"] / c["needed"] if c["needed"] else None,
            "prefetch_reads": done, "prefetch_dropped": c["dropped"], "wasted_reads": wasted,
            "wasted_bytes": wasted * record_size, "useful_prefetch_reads": done - wasted,
            "hits_ready": c["ready"], "tokens_equal": on["token_ids"] == off["token_ids"], "seconds": on["seconds"],
            "expert_io": on["expert_io"], "expert_bytes": on["expert_bytes"]}


def read_wait_ms(passes: list[dict], tokens: int, layers: int) -> dict:
    """Milliseconds per layer per token the model waited for expert reads, per pass (median and spread)."""
    return method.spread([p["expert_io"] / tokens / layers * 1e3 for p in passes])


def arm_summary(off_passes: list[dict], on_by_recall: dict[float, list[dict]], tokens: int, layers: int,
                record_size: int, limit_gbps: float | None, settings_off: dict,
                settings_on: dict) -> tuple[dict, list[dict]]:
    """The measured arm: per recall, its passes paired with the off passes of the same index, each figure as
    per-pass median and spread; and the bound checks (no pass above the disk roofline on the bytes it read)."""
    off_rf = [method.roofline(p["tok_s"], p["expert_bytes"] / tokens, limit_gbps)["ratio"]
              if p["expert_bytes"] and limit_gbps else None for p in off_passes]
    rows, checks = [], []
    for recall, on_passes in on_by_recall.items():
        pairs = [arm_pass(a, b, tokens, record_size, limit_gbps) for a, b in zip(off_passes, on_passes)]
        row = {"recall": float(recall), "passes": pairs, "read_wait_ms_per_layer": read_wait_ms(on_passes, tokens, layers)}
        for key in ("tok_s", "gain", "roofline_ratio", "over_read", "guess_recall", "runtime_hit_rate",
                    "wasted_reads", "useful_prefetch_reads", "prefetch_dropped"):
            row[key] = method.spread([p[key] for p in pairs])
        row["tokens_equal"] = all(p["tokens_equal"] for p in pairs)
        rows.append(row)
        for i, (p, on) in enumerate(zip(pairs, on_passes)):
            read = min(on["expert_bytes"], on["disk_bytes"]) if on["disk_bytes"] is not None else on["expert_bytes"]
            if read > 0 and limit_gbps:
                checks.append(method.check_bound(f"prefetch {recall:g} pass {i} tok/s vs the disk roofline on bytes "
                                                 "from disk", p["tok_s"], limit_gbps * 1e9 / (read / tokens)))
    out = {"kind": "measured", "guess_point": GUESS_POINT, "guess_earlier_than_model_s": GUESS_EARLIER_THAN_MODEL_S,
           "passes": len(off_passes), "settings": {"off": settings_off, "on": settings_on},
           "off": {"tok_s": method.spread([p["tok_s"] for p in off_passes]), "roofline_ratio": method.spread(off_rf),
                   "read_wait_ms_per_layer": read_wait_ms(off_passes, tokens, layers)},
           "by_recall": rows}
    return out, checks


def _m(sp: dict, fmt: str = "{:.2f}") -> str:
    """'median (min-max)' of a spread."""
    if not sp or sp.get("median") is None:
        return "-"
    return f"{fmt.format(sp['median'])} ({fmt.format(sp['min'])}-{fmt.format(sp['max'])})"


def format_arm(a: dict) -> str:
    """The measured arm in plain words: prefetch off, then one line per recall (per-pass median (min-max))."""
    off, n = a["off"], a["passes"]
    few = "" if n >= method.MIN_PASSES else f", fewer than {method.MIN_PASSES}!"
    lines = [f"prefetch  measured, cold, {n} passes each{few}, interleaved over the same routes; per-pass median "
             f"(min-max). Off (runtime prefetch {a['settings']['off']['prefetch']}): {_m(off['tok_s'])} tok/s, "
             f"{_m(off['roofline_ratio'])} of the needed-bytes roofline, waits for reads "
             f"{_m(off['read_wait_ms_per_layer'])} ms/layer. On (runtime prefetch "
             f"{a['settings']['on']['prefetch']}), guesses issued where the model makes its own (after each layer's "
             f"forward; {a['guess_earlier_than_model_s']:g} s earlier):"]
    for r in a["by_recall"]:
        lines.append(f"prefetch  recall {r['recall']:g} (guesses measured {_m(r['guess_recall'])}, runtime hit rate "
                     f"{_m(r['runtime_hit_rate'])}): {_m(r['tok_s'])} tok/s = {_m(r['gain'])}x off, "
                     f"{_m(r['roofline_ratio'])} of the needed-bytes roofline, waits for reads "
                     f"{_m(r['read_wait_ms_per_layer'])} ms/layer; over-read {_m(r['over_read'], '{:.0%}')}: "
                     f"{_m(r['wasted_reads'], '{:.0f}')} wasted and {_m(r['useful_prefetch_reads'], '{:.0f}')} useful "
                     f"prefetch reads a pass; tokens {'identical' if r['tokens_equal'] else 'DIFFERENT'} to prefetch off")
    return "\n".join(lines)
