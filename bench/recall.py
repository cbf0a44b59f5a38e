"""Prediction recall for speculative expert prefetch (issue #20): how often layer L+1's router, applied to a
hidden state available before layer L+1 runs, names layer L+1's actual top-K experts.

    flashmoe-bench recall BUNDLE [--text FILE] [--tokens 512] [--json FILE]

Two sources of the guess for layer L+1, both the residual stream passed through layer L+1's own router
input norm (post_attention_layernorm) and router (gate, softmax, top-K):

* ``entering``: the hidden state entering layer L (known a whole layer ahead: reads could overlap all of
  layer L's attention and experts);
* ``leaving``: the hidden state leaving layer L, i.e. entering L+1 (known only after layer L's experts:
  reads could overlap layer L+1's attention alone).

Recall per layer = mean over tokens of |guess & actual| / K, for layers 1..N-1 (layer 0 has no layer
before it); chance is K / E. One forward over the text's tokens (prefill; routing is per token and causal,
so each token's routes are those decode would give it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SOURCES = ("entering", "leaving")


def _overlap(guess: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per row: |guess & actual| / K."""
    k = actual.shape[1]
    return np.array([len(set(g.tolist()) & set(a.tolist())) / k for g, a in zip(guess, actual)])


def recall_of(model, ids: list[int]) -> dict:
    """Recall of each source for layers 1..N-1 on one forward over `ids` (a loaded flashmoe model; its
    routing is observed, not changed: each layer's route() is wrapped for the forward and then restored)."""
    import mlx.core as mx

    from flashmoe.runtime.model import StepInfo

    layers = model.layers
    actual: dict[int, np.ndarray] = {}
    for i, layer in enumerate(layers):
        mlp = layer.mlp

        def route(x, _i=i, _mlp=mlp):
            inds, scores = type(_mlp).route(_mlp, x)
            actual[_i] = np.array(inds)
            return inds, scores

        object.__setattr__(mlp, "route", route)
    try:
        cache = model.make_cache()
        x = model.embed_tokens(mx.array([ids]))
        if model.compute_dtype is not None:
            x = x.astype(model.compute_dtype)
        step = StepInfo.build(cache, len(ids))
        entering = []
        for layer, c in zip(layers, cache.layers):
            entering.append(x)
            x = layer(x, c, model.experts, model.stats, step)
            mx.eval(x)
        entering.append(x)
    finally:
        for layer in layers:
            object.__delattr__(layer.mlp, "route")
    out = {"entering": [], "leaving": []}
    for nxt in range(1, len(layers)):
        mlp, norm = layers[nxt].mlp, layers[nxt].post_attention_layernorm
        for src, h in (("entering", entering[nxt - 1]), ("leaving", entering[nxt])):
            guess, _ = type(mlp).route(mlp, norm(h).reshape(len(ids), -1))
            out[src].append(float(_overlap(np.array(guess), actual[nxt]).mean()))
    return out


def recall(bundle_dir, text: str, tokens: int = 512, experts_per_token: int | None = None) -> dict:
    """Load the bundle, tokenize `text` (its first `tokens` tokens) and measure recall per layer."""
    import flashmoe

    from .method import metadata

    model, tok = flashmoe.load(bundle_dir, experts_per_token=experts_per_token)
    try:
        ids = tok.encode(text)[:tokens]
        if len(ids) < 2:
            from flashmoe.errors import InputError

            raise InputError(f"the text gives {len(ids)} token(s): give a longer text (--text FILE)")
        by_layer = recall_of(model, ids)
        cfg = model.config
        k = model.experts_per_token
        md = metadata(bundle_dir, model)
    finally:
        model.experts.close()
    return {"bundle": str(bundle_dir), "tokens": len(ids), "experts_per_token": k, "num_experts": cfg.num_experts,
            "chance": k / cfg.num_experts, "layers": cfg.num_hidden_layers,
            "recall_by_layer": {src: {str(L + 1): v for L, v in enumerate(vals)} for src, vals in by_layer.items()},
            "recall_mean": {src: float(np.mean(v)) for src, v in by_layer.items()}, "metadata": md}


def format_recall(r: dict) -> str:
    lines = [f"recall    {r['bundle']}: {r['tokens']} tokens, K={r['experts_per_token']} of {r['num_experts']} "
             f"experts (chance {r['chance']:.0%})"]
    for src, what in (("entering", "entering layer L-1 (a layer ahead)"),
                      ("leaving", "leaving layer L-1 (entering L)")):
        cells = ", ".join(f"L{L} {v:.0%}" for L, v in r["recall_by_layer"][src].items())
        lines.append(f"  {src:<9} layer L's router on the hidden state {what}: {cells}; mean {r['recall_mean'][src]:.0%}")
    return "\n".join(lines)


def write(r: dict, path) -> None:
    Path(path).write_text(json.dumps(r, indent=1) + "\n")
