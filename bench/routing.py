"""A synthetic router for benchmarks on random weights, where the model's own router would pick
experts with no temporal structure at all (consecutive tokens would share ~K/E of their experts).

Model ("sticky uniform"): for each layer, each of the previous token's K experts is kept with
probability `stickiness`; the remaining slots are filled uniformly at random from the other experts.
The expected overlap between consecutive tokens is therefore `stickiness` (default 0.2, inside the
8-34% Flash-MoE measured on the real 397B), and coverage over a window follows from it: at K=10 and
E=512, 30 tokens touch ~38% of a layer's experts (the real model: 43-57%, its popularity being
somewhat flatter than this model's draws). `route_stats` measures both on the routes actually used,
and the benchmark report prints them next to its numbers.
"""

from __future__ import annotations

import numpy as np


class StickyRouter:
    def __init__(self, num_layers: int, num_experts: int, k: int, stickiness: float = 0.2, seed: int = 0):
        self.E, self.k, self.p = num_experts, k, stickiness
        self.rng = np.random.default_rng(seed)
        self.prev: list[np.ndarray | None] = [None] * num_layers
        self.history: list[list[np.ndarray]] = [[] for _ in range(num_layers)]

    def next(self, layer: int) -> np.ndarray:
        k, prev = self.k, self.prev[layer]
        keep = prev[self.rng.random(k) < self.p] if prev is not None else np.empty(0, dtype=np.int64)
        rest = np.setdiff1d(np.arange(self.E), keep, assume_unique=False)
        new = self.rng.choice(rest, size=k - len(keep), replace=False)
        ids = np.concatenate([keep, new]).astype(np.int64)
        self.prev[layer] = ids
        self.history[layer].append(ids)
        return ids

    def route(self, layer: int, tokens: int) -> np.ndarray:
        """[tokens, K] expert ids for `tokens` consecutive tokens of `layer`."""
        return np.stack([self.next(layer) for _ in range(tokens)])


def route_stats(history: list[list[np.ndarray]], num_experts: int, window: int = 30) -> dict:
    """Mean share of a layer's experts touched over `window` consecutive tokens, and mean overlap
    between consecutive tokens' expert sets."""
    touched, overlap = [], []
    for h in history:
        for i in range(0, len(h) - window + 1, window):
            touched.append(len(set(np.concatenate(h[i:i + window]).tolist())) / num_experts)
        for a, b in zip(h, h[1:]):
            overlap.append(len(set(a.tolist()) & set(b.tolist())) / len(a))
    return {"touched_per_window": float(np.mean(touched)) if touched else None, "window": window,
            "consecutive_overlap": float(np.mean(overlap)) if overlap else None}
