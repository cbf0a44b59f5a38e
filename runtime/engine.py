"""The batched engine: many sequences decoded together, so that one expert read serves every token that
routed to that expert.

    engine = Engine(model, tokenizer)                    # max batch from the memory plan
    sid = engine.add(ids, SamplingParams(max_tokens=64))   # thread-safe; queued
    while engine.has_work():
        for ev in engine.step():                         # one thread calls step()
            ...                                          # ev.seq_id, ev.text, ev.finish_reason, ...

Three parts, one job each:
  * MemoryPlan: how many sequences fit a memory budget (per-sequence state: delta-net state + KV cache).
  * BatchRunner: the model forwards over the running batch (left-padded rows, runtime/model.py): batched
    chunked prefill of joining sequences, one decode forward for every running row, rows leaving. It is
    deterministic given its calls, which is what lets other ranks of a distributed run mirror it.
  * Engine: the scheduler. Sequences wait in a queue, join between steps when the plan has room (all
    joiners prefill together: each layer reads their expert union once), decode together, and leave when
    done; each has its own sampler, stop strings, max tokens and stats (runtime/sampling.py).

A prompt cache (prompt_cache_gb > 0) keeps finished sequences' state, keyed by the tokens it holds; a
new sequence whose prompt extends one of them prefills only the rest (chat turns, agents' growing
conversations). Delta-net state cannot be rolled back, so only exact prefixes are reused.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np

from flashmoe.format.errors import CapacityError

from .experts import device_memory_bytes
from .generate import GenerationChunk, eos_ids, prompt_ids
from .integrity import check_logits
from .model import Cache
from .sampling import SamplingParams, Sequence

PREFILL_TOKENS = 2048  # tokens per prefill forward (all joining rows together)
MAX_BATCH = 256  # rows at once unless the caller says otherwise (the memory budget usually binds first)
REFERENCE_CONTEXT = 4096  # context length at which the plan quotes sequences per budget


# ----------------------------------------------------------------------------------------------
# memory plan


def available_memory() -> int:
    """Bytes the engine may plan with: free GPU memory on CUDA, else the OS's available memory."""
    try:
        from flashmoe.metal.dispatch import gpu_backend

        if gpu_backend() == "cuda":
            total = device_memory_bytes()
            if total:
                return max(0, total - int(mx.get_active_memory()))
    except Exception:  # noqa: BLE001 - no GPU info: fall back to the host
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # macOS and others: physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass
class MemoryPlan:
    """Per-sequence state: every delta-net layer holds a recurrent state [Hv, Dv, Dk] float32 and W-1 conv
    inputs; every full-attention layer holds keys and values for each token of the sequence. Rows of a
    batch are left-padded to the longest, so a batch of B rows costs B x (state + KV x longest)."""

    state_bytes: int  # fixed per sequence
    kv_bytes_per_token: int  # per token of context
    budget_bytes: int
    max_batch: int  # sequences that fit at the reference context, capped by the caller's max_batch
    reference_context: int

    @staticmethod
    def for_model(model, budget_bytes: int, max_batch: int | None = None,
                  reference_context: int = REFERENCE_CONTEXT) -> "MemoryPlan":
        cfg = model.config
        act = (model.compute_dtype or model.embed_tokens.weight.dtype).size  # bytes per activation element
        n_lin = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_linear(i))
        n_full = cfg.num_hidden_layers - n_lin
        state = n_lin * (cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4
                         + (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * act)
        kv = n_full * 2 * cfg.num_key_value_heads * cfg.head_dim * act
        ctx = min(reference_context, cfg.max_position_embeddings)
        fit = max(0, budget_bytes // (state + kv * ctx))
        cap = fit if max_batch is None else min(fit, max_batch)
        return MemoryPlan(state, kv, budget_bytes, cap, ctx)

    @property
    def per_sequence_bytes(self) -> int:
        return self.state_bytes + self.kv_bytes_per_token * self.reference_context

    def bytes_for(self, rows: int, tokens: int) -> int:
        return rows * (self.state_bytes + self.kv_bytes_per_token * tokens)

    def describe(self) -> str:
        mb = 1 << 20
        return (f"memory plan: {self.per_sequence_bytes / mb:.1f} MiB per sequence at {self.reference_context} "
                f"tokens ({self.state_bytes / mb:.1f} MiB delta-net state + {self.kv_bytes_per_token / 1024:.1f} KiB "
                f"KV per token); budget {self.budget_bytes / mb:.0f} MiB -> up to {self.max_batch} sequences at once")


# ----------------------------------------------------------------------------------------------
# prompt cache


class PromptCache:
    """Finished sequences' single-row caches, keyed by the tokens they hold; least recently used out first
    past a byte budget. `take` hands out (and removes) the longest entry that is a proper prefix."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[tuple, Cache] = OrderedDict()
        self.bytes = 0
        self.hits = 0

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
        best = None
        for key in self.entries:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and tuple(ids[: len(key)]) == key:
                best = key
        if best is None:
            return None
        cache = self.entries.pop(best)
        self.bytes -= cache.nbytes()
        self.hits += 1
        return len(best), cache


# ----------------------------------------------------------------------------------------------
# the forwards


class BatchRunner:
    """The running batch's cache and the model calls on it. `rows[i]` is the sequence id of row i."""

    def __init__(self, model, prefill_tokens: int = PREFILL_TOKENS, prompt_cache: PromptCache | None = None):
        self.model = model
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.prompt_cache = prompt_cache
        self.cache: Cache | None = None
        self.rows: list[int] = []

    def _forward_rows(self, seqs: list[list[int]], cache: Cache) -> mx.array:
        """Left-pad `seqs` (the tokens to add to each row of `cache`), run them in chunks; the last
        position's logits [B, V]."""
        B = len(seqs)
        L = max(len(s) for s in seqs)
        grid = np.zeros((B, L), np.int32)
        for i, s in enumerate(seqs):
            grid[i, L - len(s):] = s
        chunk = max(1, self.prefill_tokens // B)
        logits = None
        for c0 in range(0, L, chunk):
            logits = self.model(mx.array(grid[:, c0 : c0 + chunk]), cache, last_only=True)
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

    def decode(self, tokens: list[int]) -> mx.array:
        """One token for every row (in row order) -> next-token logits [B, V]."""
        logits = self.model.decode(mx.array(np.asarray(tokens, np.int32)[:, None]), self.cache)  # checked there
        return logits[:, -1]

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

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()


# ----------------------------------------------------------------------------------------------
# the scheduler


@dataclass
class Event:
    seq_id: int
    tag: object
    text: str  # new text; may be "" (incomplete UTF-8, or held back as a possible stop-string prefix)
    token: int | None  # the token this text came from; None on the final event
    finish_reason: str | None = None  # None while running; "stop", "length" or "cancelled"
    tokens: list[int] = field(default_factory=list)  # on the final event: every generated id
    stats: dict = field(default_factory=dict)  # on the final event


@dataclass
class _Entry:
    seq_id: int
    seq: Sequence
    tag: object
    t_added: float
    t_first: float | None = None
    t_prefill: float = 0.0
    cached: int = 0
    expert_bytes: float = 0.0
    next_token: int | None = None


class Engine:
    def __init__(self, model, tokenizer, max_batch: int | None = None, memory_budget_gb: float | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, prompt_cache_gb: float = 0.0,
                 runner: BatchRunner | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        if memory_budget_gb is not None and not (memory_budget_gb > 0):
            raise CapacityError(f"memory budget {memory_budget_gb!r} GB: give a positive number of gigabytes")
        budget = int(memory_budget_gb * 1e9) if memory_budget_gb is not None else available_memory() // 2
        self.plan = MemoryPlan.for_model(model, budget, max_batch)
        need = self.plan.bytes_for(1, 1)
        if need > budget:
            raise CapacityError(f"the memory budget ({budget / 1e6:.3g} MB) cannot hold even one sequence "
                                f"({need / 1e6:.3g} MB of state); raise --memory-budget")
        # rows at once: the caller's cap; admission then checks the real sizes against the budget
        self.max_batch = int(max_batch) if max_batch is not None else MAX_BATCH
        if self.max_batch < 1:
            raise CapacityError(f"max batch must be >= 1 (got {max_batch})")
        pc = PromptCache(int(prompt_cache_gb * 1e9)) if prompt_cache_gb and prompt_cache_gb > 0 else None
        self.runner = runner or BatchRunner(model, prefill_tokens, pc)
        self.prompt_cache = self.runner.prompt_cache
        self.eos = eos_ids(tokenizer, self.config)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: deque[_Entry] = deque()
        self._cancel: set[int] = set()
        self._running: dict[int, _Entry] = {}
        self.counters = {"running": 0, "waiting": 0, "finished": 0, "cancelled": 0, "prompt_tokens": 0,
                         "generated_tokens": 0, "expert_bytes": 0, "steps": 0}

    # ---- intake (any thread) ----------------------------------------------------------------
    def add(self, ids: list[int], params: SamplingParams | None = None, tag=None) -> int:
        params = (params or SamplingParams()).check()
        ids = [int(t) for t in ids]
        limit = self.config.max_position_embeddings
        if not ids:
            raise CapacityError("the prompt is empty")
        if len(ids) >= limit:
            raise CapacityError(f"the prompt is {len(ids)} tokens, past the model's context limit of {limit}; "
                                "shorten it")
        params.max_tokens = min(params.max_tokens, limit - len(ids))
        need = self.plan.bytes_for(1, len(ids) + params.max_tokens)
        if need > self.plan.budget_bytes:
            raise CapacityError(f"one sequence of {len(ids) + params.max_tokens} tokens needs {need / 1e9:.2f} GB "
                                f"of state, over the memory budget of {self.plan.budget_bytes / 1e9:.2f} GB; "
                                "lower max tokens, shorten the prompt or raise the budget")
        with self._lock:
            sid = next(self._ids)
            self._waiting.append(_Entry(sid, Sequence(ids, params, self.tokenizer, self.eos), tag,
                                        time.perf_counter()))
            self.counters["waiting"] = len(self._waiting)
        return sid

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._cancel.add(seq_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._cancel)

    # ---- one step (one thread) --------------------------------------------------------------
    def _fits(self, entries: list[_Entry]) -> bool:
        longest = max(len(e.seq.prompt) + e.seq.params.max_tokens for e in entries)
        return self.plan.bytes_for(len(entries), longest) <= self.plan.budget_bytes

    def _admit(self) -> tuple[list[_Entry], list[Event]]:
        events = []
        with self._lock:
            cancels, self._cancel = self._cancel, set()
            if cancels:
                keep = deque()
                for e in self._waiting:
                    if e.seq_id in cancels:
                        events.append(Event(e.seq_id, e.tag, "", None, "cancelled", [], {}))
                        self.counters["cancelled"] += 1
                    else:
                        keep.append(e)
                self._waiting = keep
            gone = [sid for sid in cancels if sid in self._running]
            joining: list[_Entry] = []
            running = list(self._running.values())
            while self._waiting and len(running) - len(gone) + len(joining) < self.max_batch:
                cand = self._waiting[0]
                if running or joining:
                    if not self._fits([e for e in running if e.seq_id not in gone] + joining + [cand]):
                        break
                joining.append(self._waiting.popleft())
            self.counters["waiting"] = len(self._waiting)
        if gone:
            self.runner.remove(gone)
            for sid in gone:
                e = self._running.pop(sid)
                events.append(self._final(e, "cancelled"))
                self.counters["cancelled"] += 1
        return joining, events

    def _final(self, e: _Entry, reason: str | None = None) -> Event:
        s = e.seq
        now = time.perf_counter()
        stats = {
            "prompt_tokens": len(s.prompt), "cached_prompt_tokens": e.cached, "generated_tokens": len(s.generated),
            "ttft_s": (e.t_first - e.t_added) if e.t_first else None, "prefill_s": e.t_prefill,
            "decode_s": (now - e.t_first) if e.t_first else 0.0, "expert_bytes": int(e.expert_bytes),
        }
        return Event(e.seq_id, e.tag, s.tail() if reason != "cancelled" else "", None, reason or s.finish,
                     list(s.generated), stats)

    def _take_tokens(self, entries: list[_Entry], logits: mx.array, events: list[Event]) -> list[_Entry]:
        """Choose and accept each row's next token; returns the entries that finished."""
        now = time.perf_counter()
        greedy = [i for i, e in enumerate(entries) if e.seq.greedy]
        picks = {}
        if greedy:
            arg = np.array(mx.argmax(logits[mx.array(np.asarray(greedy, np.int32))], axis=-1)).tolist()
            picks = dict(zip(greedy, arg))
        done = []
        for i, e in enumerate(entries):
            token = picks[i] if i in picks else e.seq.choose(logits[i])
            text, output = e.seq.accept(token)
            if e.t_first is None:
                e.t_first = now
            if output:
                events.append(Event(e.seq_id, e.tag, text, token))
            if e.seq.finish is not None:
                done.append(e)
            else:
                e.next_token = token
        return done

    def _finish(self, done: list[_Entry], events: list[Event]) -> None:
        if not done:
            return
        keep = {e.seq_id: e.seq.cached_ids() for e in done} if self.prompt_cache is not None else None
        self.runner.remove([e.seq_id for e in done if e.seq_id in self._running], keep)
        for e in done:
            self._running.pop(e.seq_id, None)
            events.append(self._final(e))
            self.counters["finished"] += 1

    def step(self) -> list[Event]:
        """One scheduler step. If a model call fails (a corrupt record, a lost rank, a bug), every running
        sequence is dropped with the batch state it shared, so the engine stays usable; the error is
        raised to the caller, and sequences still waiting run in later steps."""
        joining, events = self._admit()
        try:
            return self._step(joining, events)
        except BaseException:
            for e in joining:
                self._running.setdefault(e.seq_id, e)
            self.counters["failed"] = self.counters.get("failed", 0) + len(self._running)
            self._running.clear()
            self.runner.rows, self.runner.cache = [], None
            self.counters["running"] = 0
            raise

    def _step(self, joining: list[_Entry], events: list[Event]) -> list[Event]:
        stats = self.model.stats
        if joining:
            b0, t0 = stats.expert_bytes, time.perf_counter()
            logits, cached = self.runner.prefill([(e.seq_id, e.seq.prompt) for e in joining])
            dt, db = time.perf_counter() - t0, stats.expert_bytes - b0
            for e, c in zip(joining, cached):
                e.cached, e.t_prefill, e.expert_bytes = c, dt, db / len(joining)
                self._running[e.seq_id] = e
                self.counters["prompt_tokens"] += len(e.seq.prompt) - c
            zero = [e for e in joining if e.seq.finish is not None]  # max_tokens 0
            rest = [e for e in joining if e.seq.finish is None]
            idx = [i for i, e in enumerate(joining) if e.seq.finish is None]
            done = zero + (self._take_tokens(rest, logits[mx.array(np.asarray(idx, np.int32))], events) if rest else [])
            self._finish(done, events)
        rows = [self._running[sid] for sid in self.runner.rows]
        if rows:
            b0 = stats.expert_bytes
            logits = self.runner.decode([e.next_token for e in rows])
            for e in rows:
                e.seq.fed += 1
                e.expert_bytes += (stats.expert_bytes - b0) / len(rows)
            self._finish(self._take_tokens(rows, logits, events), events)
        self.counters["expert_bytes"] = stats.expert_bytes
        self.counters["generated_tokens"] += sum(1 for ev in events if ev.token is not None)
        self.counters["running"] = len(self._running)
        self.counters["steps"] += 1
        return events


# ----------------------------------------------------------------------------------------------
# convenience API


@dataclass
class BatchResult:
    text: str
    tokens: list[int]
    finish_reason: str
    stats: dict


def _params_of(kw: dict) -> SamplingParams:
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logits_processor", "sampler")
    p = {k: kw.pop(k) for k in names if k in kw}
    if isinstance(p.get("stop"), str):
        p["stop"] = (p["stop"],)
    elif p.get("stop") is not None:
        p["stop"] = tuple(p["stop"])
    return SamplingParams(**p)


def stream_batch_generate(model, tokenizer, prompts, chat_template: bool = True, params=None,
                          **kw) -> Iterator[tuple[int, GenerationChunk]]:
    """Yield (index into prompts, GenerationChunk) as tokens arrive; each prompt's last chunk has its
    finish_reason and stats. `params`: one SamplingParams for all, or a list with one per prompt; or give
    max_tokens=, temperature=, ... as keywords. Other keywords go to Engine (max_batch, memory_budget_gb, ...)."""
    base = _params_of(kw)
    plist = params if isinstance(params, (list, tuple)) else [params or base] * len(prompts)
    if len(plist) != len(prompts):
        raise CapacityError(f"{len(plist)} sampling params for {len(prompts)} prompts")
    engine = Engine(model, tokenizer, **kw)
    index = {}
    for i, (prompt, p) in enumerate(zip(prompts, plist)):
        one = SamplingParams(**{f: getattr(p, f) for f in p.__dataclass_fields__})  # each sequence its own copy
        index[engine.add(prompt_ids(tokenizer, prompt, chat_template), one)] = i
    while engine.has_work():
        for ev in engine.step():
            yield index[ev.seq_id], GenerationChunk(ev.text, ev.token, ev.finish_reason, ev.stats)


def batch_generate(model, tokenizer, prompts, chat_template: bool = True, **kw) -> list[BatchResult]:
    """Generate for every prompt together; one BatchResult per prompt, in order (greedy output equals
    flashmoe.generate on each prompt alone)."""
    texts = [[] for _ in prompts]
    toks = [[] for _ in prompts]
    out: list[BatchResult | None] = [None] * len(prompts)
    for i, ch in stream_batch_generate(model, tokenizer, prompts, chat_template, **kw):
        texts[i].append(ch.text)
        if ch.token is not None:
            toks[i].append(ch.token)
        if ch.finish_reason is not None:
            out[i] = BatchResult("".join(texts[i]), toks[i], ch.finish_reason, ch.stats)
    return out


__all__ = ["Engine", "Event", "MemoryPlan", "BatchRunner", "PromptCache", "BatchResult", "batch_generate",
           "stream_batch_generate", "SamplingParams"]
