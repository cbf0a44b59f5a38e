"""Synthetic routers for benchmarks on random weights, where the model's own router would pick experts
with no structure at all (consecutive tokens would share ~K/E of their experts).

Two models, both drawn by `StickyRouter`, each token choosing K distinct experts per layer:

* ``uniform`` (the default of ``flashmoe-bench run``): each of the previous token's K experts is kept
  with probability `stickiness` (0.2, inside the 8-34% Flash-MoE measured on the real 397B); the rest
  are drawn uniformly. At K=10, E=512, 30 tokens touch ~38% of a layer's experts.
* ``calibrated``: fitted to published measurements of real 512-expert top-10 routing, where a
  least-recently-used cache holding 18% / 36% / 55% of a layer's experts hits 43.5% / 62% / 72% of
  the time. New experts are drawn from a Zipf(0.8) popularity over the layer's experts whose ranking
  is re-drawn every 50 tokens (a change of topic), with stickiness 0.05. Simulated, it gives
  44-45% / 60% / 72-73% (tests/test_bench.py checks it). The uniform model gives 33% / 48% / 63%:
  it understates how well a cache hits.

Batches: every sequence is a stream of its own (its own previous token and its own topic). Sequences
draw their topics independently, which is conservative for read sharing: real models also have
experts that are popular whatever the text, which neither model has.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MODELS = ("uniform", "calibrated")
UNIFORM = dict(stickiness=0.2, popularity=0.0, topic_tokens=0)
CALIBRATED = dict(stickiness=0.05, popularity=0.8, topic_tokens=50)
# (share of a layer's experts an LRU cache holds, hit rate measured on real 512-expert top-10 routing)
PUBLISHED_LRU_HITS = ((0.18, 0.435), (0.36, 0.62), (0.55, 0.72))


class StickyRouter:
    """K distinct experts per token per layer, per stream (one stream per sequence).

    stickiness: chance each of the stream's previous K experts is kept; popularity: Zipf exponent of
    the experts new picks are drawn from (0: uniform); topic_tokens: the popularity ranking is re-drawn
    every this many tokens of a stream (0: never)."""

    def __init__(self, num_layers: int, num_experts: int, k: int, stickiness: float = 0.2, seed: int = 0,
                 popularity: float = 0.0, topic_tokens: int = 0):
        self.L, self.E, self.k, self.p = num_layers, num_experts, k, stickiness
        self.popularity, self.topic_tokens = popularity, topic_tokens
        self.rng = np.random.default_rng(seed)
        self._base = np.arange(1, num_experts + 1, dtype=np.float64) ** -popularity if popularity else None
        self.state: dict[tuple[int, int], dict] = {}  # (layer, stream) -> prev ids, weights, tokens, history
        # (layer, stream) -> routes drawn ahead (`ahead`), handed out in order by `next` before any new draw
        self._ahead: dict[tuple[int, int], list[np.ndarray]] = {}

    def _stream(self, layer: int, stream: int) -> dict:
        s = self.state.get((layer, stream))
        if s is None:
            s = self.state[(layer, stream)] = {"prev": None, "w": None, "n": 0, "history": []}
        return s

    def next(self, layer: int, stream: int = 0) -> np.ndarray:
        """The stream's next route at `layer`: one drawn ahead if any (oldest first), else a new draw."""
        queued = self._ahead.get((layer, stream))
        return queued.pop(0) if queued else self._draw(layer, stream)

    def ahead(self, layer: int, tokens: int = 1, stream: int = 0) -> np.ndarray:
        """[tokens, K]: the stream's next `tokens` routes at `layer`, drawn now and handed out later by `next`
        (a speculative-prefetch guess is made from them before the layer routes). The routes are the ones `next`
        would have drawn as long as draws keep their order: the bench draws layer L+1's route for a token
        after layer L's, as the model asks for them."""
        queued = self._ahead.setdefault((layer, stream), [])
        for _ in range(tokens - len(queued)):
            queued.append(self._draw(layer, stream))
        return np.stack(queued[:tokens])

    def _draw(self, layer: int, stream: int) -> np.ndarray:
        k, s = self.k, self._stream(layer, stream)
        prev = s["prev"]
        keep = prev[self.rng.random(k) < self.p] if prev is not None else np.empty(0, dtype=np.int64)
        if self._base is None:
            rest = np.setdiff1d(np.arange(self.E), keep, assume_unique=False)
            new = self.rng.choice(rest, size=k - len(keep), replace=False)
        else:
            if s["w"] is None or (self.topic_tokens and s["n"] % self.topic_tokens == 0):
                w = self._base[self.rng.permutation(self.E)]
                s["w"] = w / w.sum()
            w = s["w"].copy()
            w[keep] = 0.0
            new = self.rng.choice(self.E, size=k - len(keep), replace=False, p=w / w.sum())
        ids = np.concatenate([keep, new]).astype(np.int64)
        s["prev"] = ids
        s["n"] += 1
        s["history"].append(ids)
        return ids

    def route(self, layer: int, tokens: int, stream: int = 0) -> np.ndarray:
        """[tokens, K] expert ids for `tokens` consecutive tokens of one stream (a prompt being prefilled)."""
        return np.stack([self.next(layer, stream) for _ in range(tokens)])

    def route_streams(self, layer: int, streams) -> np.ndarray:
        """[len(streams), K]: the next token of each stream (one batched decode step)."""
        return np.stack([self.next(layer, s) for s in streams])

    @property
    def history(self) -> list[list[np.ndarray]]:
        """Every (layer, stream)'s routes in order."""
        return [s["history"] for s in self.state.values()]


def make_router(model: str, num_layers: int, num_experts: int, k: int, seed: int = 0,
                stickiness: float | None = None) -> StickyRouter:
    """A router of routing model `model` ('uniform' or 'calibrated'); `stickiness` overrides the uniform
    model's."""
    if model not in MODELS:
        raise ValueError(f"routing model must be one of {MODELS}, not {model!r}")
    kw = dict(UNIFORM if model == "uniform" else CALIBRATED)
    if stickiness is not None and model == "uniform":
        kw["stickiness"] = stickiness
    return StickyRouter(num_layers, num_experts, k, seed=seed, **kw)


def route_stats(history: list[list[np.ndarray]], num_experts: int, window: int = 30) -> dict:
    """Mean share of a layer's experts touched over `window` consecutive tokens, and mean overlap
    between consecutive tokens' expert sets (per stream)."""
    touched, overlap = [], []
    for h in history:
        for i in range(0, len(h) - window + 1, window):
            touched.append(len(set(np.concatenate(h[i:i + window]).tolist())) / num_experts)
        for a, b in zip(h, h[1:]):
            overlap.append(len(set(a.tolist()) & set(b.tolist())) / len(a))
    return {"touched_per_window": float(np.mean(touched)) if touched else None, "window": window,
            "consecutive_overlap": float(np.mean(overlap)) if overlap else None}


def lru_hit_rate(routes: list[np.ndarray], capacity: int, warmup: int = 0) -> float:
    """Share of expert requests an LRU cache of `capacity` experts (one layer) serves, over one stream
    of routes; the first `warmup` tokens fill the cache and are not counted."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = misses = 0
    for i, ids in enumerate(routes):
        for e in ids.tolist():
            if e in cache:
                cache.move_to_end(e)
                hits += i >= warmup
            else:
                misses += i >= warmup
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / max(1, hits + misses)


def simulated_lru_hits(model: str, num_experts: int, k: int, shares, tokens: int = 1500, warmup: int = 300,
                       seed: int = 0) -> dict[float, float]:
    """{cache share: LRU hit rate} for one layer's stream under routing model `model`."""
    r = make_router(model, 1, num_experts, k, seed=seed)
    routes = r.route(0, tokens)
    return {s: lru_hit_rate(routes, max(1, round(s * num_experts)), warmup) for s in shares}


def simulated_batch_union(model: str, num_experts: int, k: int, batch: int, steps: int = 32, seed: int = 0) -> float:
    """Mean distinct experts one layer reads per batched decode step of `batch` sequences."""
    r = make_router(model, 1, num_experts, k, seed=seed)
    return float(np.mean([len(np.unique(r.route_streams(0, range(batch)))) for _ in range(steps)]))


def simulated_reads_per_token(model: str, layers: int, num_experts: int, k: int, slots: int, tokens: int = 300,
                              warmup: int = 100, seed: int = 0, stickiness: float | None = None) -> float:
    """Records read per token over `layers` layers sharing one LRU cache of `slots` records (the runtime's
    expert cache: least recently used across layers and tokens) under routing model `model`. Slots shared
    by more layers keep less of each: the bench's 4-layer bundles read fewer records per layer than the
    full model would with the same cache."""
    r = make_router(model, layers, num_experts, k, seed=seed, stickiness=stickiness)
    cache: OrderedDict[tuple[int, int], None] = OrderedDict()
    misses = 0
    for t in range(tokens):
        for layer in range(layers):
            for e in r.next(layer).tolist():
                key = (layer, e)
                if key in cache:
                    cache.move_to_end(key)
                    continue
                misses += t >= warmup
                cache[key] = None
                if len(cache) > max(slots, k):
                    cache.popitem(last=False)
    return misses / (tokens - warmup)
