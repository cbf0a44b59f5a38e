"""Layer-major prefill: the rows joining a batch go through layer 0 in every chunk, then layer 1 in every
chunk, ..., so each layer's routed experts are read once per pass however many tokens the rows hold.

The whole-model forward of a chunk (runtime/model.py's Model.__call__, what `forward_chunks` runs) reads
each layer's expert union once per chunk: a prefill of n chunks reads the model's experts up to n times
when the expert cache cannot hold them all (the disk-bound regime, issue #19). Here, within one layer:

  1. every chunk's token mixer runs (in chunk order: each chunk continues the layer's cache from the one
     before) and every chunk is routed (the router is cheap);
  2. the union of all the chunks' experts is read in one go, in expert-id order (the reader turns a
     union that is most of the layer into large sequential reads: runtime/reader.py); a union larger than
     the expert cache goes in groups of `slots` experts, each read once for every chunk
     (RoutedExperts.run_layer);
  3. every chunk's experts are applied, while the next layer's guessed union (`read_ahead`: its router
     on the states leaving this layer's token mixer; the whole layer when that is nearly all of it) is
     read in the background where speculative reads are on (RuntimeConfig.prefetch; runtime/prefetch.py).

Chunks still bound the activations of one layer call (`chunk_tokens` tokens of all rows together); the
hidden states of every token of the pass are held between layers, so they are bounded too: a prefill
whose held states exceed `budget_bytes` is split, along the columns, into as few layer-major passes as
the budget allows (`Plan.passes`). The numerics are those of the chunked forward: the same ops on the
same chunks in a different order (bit-identical on a deterministic device).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .cache import Cache
from .model import DecoderLayer, StepInfo

HIDDEN_BUDGET_BYTES = 1 << 30  # held hidden states of one pass
WHOLE_LAYER = 0.9  # a guessed union this share of a layer reads the whole layer ahead
HELD_STATES = 3  # [B, S, H] arrays held per chunk within a layer: the residual stream, the MoE input, its output


def chunk_columns(chunk_tokens: int, rows: int) -> int:
    """Columns per layer call: about `chunk_tokens` tokens over all `rows` rows together."""
    return max(1, chunk_tokens // max(1, rows))


def left_padded(rows: list[list[int]]) -> np.ndarray:
    """The rows as one [B, L] int32 grid, left-padded with zeros to the longest."""
    L = max(len(s) for s in rows)
    grid = np.zeros((len(rows), L), np.int32)
    for i, s in enumerate(rows):
        grid[i, L - len(s):] = s
    return grid


@dataclass(frozen=True)
class Plan:
    """How a prefill of `rows` rows of `width` columns runs: `chunk` columns per layer call, `span`
    columns per layer-major pass."""

    rows: int
    width: int
    chunk: int
    span: int

    @staticmethod
    def of(rows: int, width: int, chunk_tokens: int, column_bytes: int, budget_bytes: int) -> "Plan":
        """`column_bytes`: the hidden states held per row per column; `budget_bytes`: what a pass may hold."""
        chunk = chunk_columns(chunk_tokens, rows)
        chunks = max(1, budget_bytes // max(1, chunk * rows * column_bytes))  # whole chunks per pass
        return Plan(rows, width, chunk, chunk * chunks)

    @property
    def passes(self) -> int:
        return math.ceil(self.width / self.span) if self.width else 0


def supports(model) -> bool:
    """Whether `model` runs layer-major: its layers are runtime/model.py's DecoderLayers (other families,
    e.g. runtime/qwen4_exp.py, prefill chunk after chunk)."""
    return all(isinstance(layer, DecoderLayer) for layer in model.layers)


def column_bytes(model) -> int:
    """Bytes held per row per column of a pass: HELD_STATES hidden vectors in the compute dtype."""
    dtype = model.compute_dtype if model.compute_dtype is not None else model.embed_tokens.weight.dtype
    return HELD_STATES * model.config.hidden_size * dtype.size


def plan(model, rows: int, width: int, chunk_tokens: int, budget_bytes: int = HIDDEN_BUDGET_BYTES) -> Plan:
    """The plan of a prefill of `rows` rows of `width` columns; a model that does not run layer-major
    passes over its layers once per chunk."""
    if not supports(model):
        chunk = chunk_columns(chunk_tokens, rows)
        return Plan(rows, width, chunk, chunk)
    return Plan.of(rows, width, chunk_tokens, column_bytes(model), budget_bytes)


def prefill(model, cache: Cache, rows: list[list[int]], chunk_tokens: int,
            budget_bytes: int = HIDDEN_BUDGET_BYTES) -> mx.array:
    """Feed `rows` (the tokens to add to each row of `cache`, left-padded to the longest) through the model
    layer-major. Returns the last position's logits [B, 1, V]."""
    grid = left_padded(rows)
    p = plan(model, grid.shape[0], grid.shape[1], chunk_tokens, budget_bytes)
    logits = None
    for a in range(0, p.width, p.span):
        logits = one_pass(model, cache, grid[:, a : a + p.span], p.chunk)
    return logits


def read_ahead(model, layer: int, xs: list[mx.array], routed: list, union: np.ndarray) -> None:
    """Start the background reads of `layer`'s experts while the layer before computes (its `union` is
    resident and kept): the union of `layer`'s router on the real tokens of the states leaving the token
    mixer before it (`xs`, `routed[j].rows`), the whole layer (in expert-id order: sequential reads) when
    that is at least WHOLE_LAYER of it. Where a tool replaced the routing (the bench's synthetic routers)
    the router says nothing: the whole layer when the layer before touched that much of its own, else
    nothing."""
    E, t0 = model.config.num_experts, time.perf_counter()
    nxt = model.layers[layer]
    if "route" in vars(nxt.mlp):
        guess = np.arange(E) if len(union) >= WHOLE_LAYER * E else None
    else:
        picks = []
        for x, r in zip(xs, routed):
            xf = x.reshape(-1, x.shape[-1])
            inds, _ = nxt.mlp.route(nxt.post_attention_layernorm(xf if r.rows is None else xf[r.rows]))
            picks.append(inds.reshape(-1))
        guess = np.unique(np.array(mx.concatenate(picks)))
        if len(guess) >= WHOLE_LAYER * E:
            guess = np.arange(E)
    if guess is not None:
        model.experts.read_ahead(layer, guess, keep_layer=layer - 1)
    model.stats.routing += time.perf_counter() - t0


def one_pass(model, cache: Cache, grid: np.ndarray, chunk: int) -> mx.array:
    """One layer-major pass over the columns of `grid` [B, W] in chunks of `chunk` columns; the cache's
    offset moves by W. Returns the last position's logits [B, 1, V]."""
    stats, experts = model.stats, model.experts
    P, W = cache.offset, grid.shape[1]
    if grid.shape[0] != cache.batch:
        raise ValueError(f"{grid.shape[0]} rows to prefill but the cache has {cache.batch}")
    spans = [(c0, min(c0 + chunk, W)) for c0 in range(0, W, chunk)]
    steps = [StepInfo.build(cache, c1 - c0, offset=P + c0) for c0, c1 in spans]
    xs = [model.embed(mx.array(grid[:, c0:c1])) for c0, c1 in spans]
    for i, (layer, lc) in enumerate(zip(model.layers, cache.layers)):
        routed = []
        for j, step in enumerate(steps):  # the token mixer, chunk after chunk (each continues the cache)
            xs[j], h = layer.mix(xs[j], lc, stats, step)
            routed.append(layer.mlp.select(h, stats, step))
        ahead = (lambda union, i=i, xs=list(xs), routed=routed: read_ahead(model, i + 1, xs, routed, union)) \
            if i + 1 < len(model.layers) else None
        ys = experts.run_layer(i, [(r.x, r.inds, r.scores) for r in routed], ahead)
        t0 = time.perf_counter()
        for j, (r, y) in enumerate(zip(routed, ys)):
            xs[j] = xs[j] + layer.mlp.combine(xs[j].shape, r, y)  # the shared expert, one chunk at a time
            mx.eval(xs[j])
        stats.expert_compute += time.perf_counter() - t0
    cache.offset += W
    stats.prefill_passes += 1
    return model.head(xs[-1], last_only=True)
