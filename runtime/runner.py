"""The model forwards of a running batch (left-padded rows, runtime/model.py), and the prompt cache.

BatchRunner is deterministic given its calls, which is what lets the other ranks of a distributed run
mirror it (runtime/distributed.py): every forward of every front end goes through one of its methods.

  * `prefill`: sequences join (the fresh prompts left-padded together, fed layer-major so that each layer
    reads the union of all their tokens' experts once per pass, runtime/prefill.py; prompt-cache hits
    continue from their own state); `prefill_passes` says how many passes a prefill needs.
    `forward_chunks` is the chunk-after-chunk loop of whole-model forwards (flashmoe-eval's perplexity,
    which needs every position's logits).
  * `launch` / `finish` / `cancel`: one decode step for every row (runtime/pipeline.py), so the engine
    can launch the next step before the host waits for this one.
  * `remove`: rows leave (optionally kept in the prompt cache); `reset`: drop every row (a failed step).
  * `store`: feed tokens into the prompt cache without generating (the chat's prefill with progress);
    `forget`: empty the prompt cache.

PromptCache keeps finished sequences' state, keyed by the tokens it holds; a new sequence whose prompt
extends one of them prefills only the rest (chat turns, agents' growing conversations). Delta-net state
cannot be rolled back, so only exact prefixes are reused.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import mlx.core as mx
import numpy as np

from . import pipeline, prefill
from .cache import Cache
from .integrity import check_logits

PREFILL_TOKENS = 2048  # tokens per prefill forward (all joining rows together)


def forward_chunks(model, cache: Cache, rows: list[list[int]], tokens: int,
                   last_only: bool = True) -> Iterator[tuple[int, mx.array]]:
    """Feed `rows` (the tokens to add to each row of `cache`, left-padded to the longest) through the model
    in chunks of about `tokens` tokens (all rows together). Yields (columns fed so far, logits) after
    each chunk: the last position's [B, 1, V], or every position's [B, S, V] with last_only=False."""
    grid = prefill.left_padded(rows)
    B, L = grid.shape
    chunk = prefill.chunk_columns(tokens, B)
    for c0 in range(0, L, chunk):
        yield min(c0 + chunk, L), model(mx.array(grid[:, c0 : c0 + chunk]), cache, last_only=last_only)


class PromptCache:
    """Finished sequences' single-row caches, keyed by the tokens they hold; least recently used out first
    past a byte budget (None: no limit, e.g. one chat's conversation). `take` hands out (and removes) the
    longest entry that is a proper prefix of the tokens asked for."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget = math.inf if budget_bytes is None else int(budget_bytes)
        self.entries: OrderedDict[tuple, Cache] = OrderedDict()
        self.bytes = 0

    def put(self, ids: list[int], cache: Cache) -> None:
        n = cache.nbytes()
        if n > self.budget or not ids:
            return
        key = tuple(ids)
        if key in self.entries:
            self.bytes -= self.entries.pop(key).nbytes()
        self.entries[key] = cache
        self.bytes += n
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes()

    def take(self, ids: list[int]) -> tuple[int, Cache] | None:
        n = self.prefix(ids)
        if n == 0:
            return None
        cache = self.entries.pop(tuple(ids[:n]))
        self.bytes -= cache.nbytes()
        return n, cache

    def prefix(self, ids: list[int]) -> int:
        """Tokens of `ids` that `take` would hand out from the cache (its longest proper-prefix entry)."""
        return max((len(k) for k in self.entries if len(k) < len(ids) and tuple(ids[: len(k)]) == k), default=0)

    def holds(self, ids: list[int]) -> bool:
        """Whether an entry holds exactly these tokens."""
        return tuple(ids) in self.entries

    def longest(self) -> list[int]:
        """The tokens of the longest entry ([] if none)."""
        return list(max(self.entries, key=len, default=()))

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class BatchRunner:
    """The running batch's cache and the model calls on it. `rows[i]` is the sequence id of row i."""

    def __init__(self, model, prefill_tokens: int = PREFILL_TOKENS, prompt_cache: PromptCache | None = None,
                 hidden_budget_bytes: int = prefill.HIDDEN_BUDGET_BYTES):
        self.model = model
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.hidden_budget = max(1, int(hidden_budget_bytes))  # hidden states one prefill pass may hold
        self.prompt_cache = prompt_cache
        self.cache: Cache | None = None
        self.rows: list[int] = []

    @property
    def pipelined(self) -> bool:
        """Whether decode steps run without a host round trip per layer, so that launching the next step
        before syncing this one pays (the GPU expert cache's optimistic path)."""
        return bool(self.model.experts.optimistic)

    def prefill_passes(self, rows_tokens: list[int]) -> int:
        """Passes over the model's layers (each reads every layer's expert union once) of one prefill of
        fresh rows holding these many tokens each: layer-major (runtime/prefill.py), 1 unless their hidden
        states exceed the budget; a model that does not run layer-major, one per chunk."""
        if not rows_tokens:
            return 0
        return prefill.plan(self.model, len(rows_tokens), max(rows_tokens), self.prefill_tokens,
                            self.hidden_budget).passes

    def _forward_rows(self, seqs: list[list[int]], cache: Cache) -> mx.array:
        """The last position's logits [B, V] after feeding `seqs` into `cache` (checked): layer-major where
        the model runs so, else chunk after chunk."""
        if prefill.supports(self.model):
            logits = prefill.prefill(self.model, cache, seqs, self.prefill_tokens, self.hidden_budget)
        else:
            for _, logits in forward_chunks(self.model, cache, seqs, self.prefill_tokens):
                pass
        check_logits(logits[:, -1])
        return logits[:, -1]

    def prefill(self, seqs: list[tuple[int, list[int]]]) -> tuple[mx.array, list[int]]:
        """Sequences (id, prompt ids) join the batch. Returns each one's last logits [n, V] (in the
        order given) and how many of its prompt tokens came from the prompt cache."""
        hits: dict[int, tuple[int, Cache]] = {}
        if self.prompt_cache is not None:
            for sid, ids in seqs:
                got = self.prompt_cache.take(ids)
                if got is not None:
                    hits[sid] = got
        parts: list[Cache] = []
        order: list[int] = []
        out: dict[int, mx.array] = {}
        fresh = [(sid, ids) for sid, ids in seqs if sid not in hits]
        if fresh:  # every fresh prompt in one left-padded batch: each layer reads their expert union once
            lens = np.array([len(ids) for _, ids in fresh])
            cache = self.model.make_cache(left_pad=lens.max() - lens)
            lg = self._forward_rows([ids for _, ids in fresh], cache)
            parts.append(cache)
            for i, (sid, _) in enumerate(fresh):
                out[sid] = lg[i]
                order.append(sid)
        for sid, ids in seqs:  # prefix hits continue from their own state, one row each
            if sid in hits:
                n, cache = hits[sid]
                out[sid] = self._forward_rows([ids[n:]], cache)[0]
                parts.append(cache)
                order.append(sid)
        if self.cache is not None and self.rows:
            parts.insert(0, self.cache)
        self.cache = parts[0] if len(parts) == 1 else Cache.concat(parts)
        self.rows = self.rows + order
        logits = mx.stack([out[sid] for sid, _ in seqs])
        return logits, [hits[sid][0] if sid in hits else 0 for sid, _ in seqs]

    # ---- decode ---------------------------------------------------------------------------------
    def launch(self, tokens) -> pipeline.PendingDecode:
        """Start the decode step of one token per row (ints, or a lazy [B] array) without waiting."""
        ids = tokens if isinstance(tokens, mx.array) else mx.array(np.asarray(tokens, np.int32))
        return pipeline.launch(self.model, ids[:, None], self.cache)

    def finish(self, p: pipeline.PendingDecode, after: pipeline.PendingDecode | None = None):
        """Sync a launched step: (logits [B, V], argmax [B] on the host, whether it was run again)."""
        logits, choice, redone = pipeline.finish(self.model, p, self.cache, after)
        return logits[:, -1], choice, redone

    def cancel(self, p: pipeline.PendingDecode) -> None:
        pipeline.cancel(p, self.cache)

    # ---- rows leaving ---------------------------------------------------------------------------
    def remove(self, seq_ids: list[int], keep: dict[int, list[int]] | None = None) -> None:
        """Rows leave the batch; `keep[sid]` (the tokens the row holds) stores it in the prompt cache."""
        gone = set(seq_ids)
        if not gone:
            return
        if keep and self.prompt_cache is not None:
            for sid, ids in keep.items():
                if sid in self.rows:
                    self.prompt_cache.put(ids, self.cache.rows([self.rows.index(sid)]))
        stay = [i for i, sid in enumerate(self.rows) if sid not in gone]
        self.rows = [self.rows[i] for i in stay]
        self.cache = self.cache.rows(stay) if stay else None

    def reset(self) -> None:
        """Drop every row (after a failed step: their shared state may be half-updated)."""
        self.rows, self.cache = [], None

    def forget(self) -> None:
        """Empty the prompt cache (a chat's /reset)."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def store(self, ids: list[int]) -> int:
        """Feed `ids` into the prompt cache without generating: continue its longest entry that is a prefix
        (or start fresh), and keep the result under `ids`. Returns the tokens taken from the cache."""
        pc = self.prompt_cache
        if pc is None or pc.holds(ids):
            return len(ids) if pc is not None else 0
        got = pc.take(ids)
        n, cache = got if got is not None else (0, self.model.make_cache())
        self._forward_rows([ids[n:]], cache)
        pc.put(ids, cache)
        return n

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()
