"""The engine: every generation of flashmoe runs here, one sequence (flashmoe.generate, the chat) or many
decoded together, so that one expert read serves every token that routed to that expert.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=8))
    sid = engine.add(ids, SamplingParams(max_tokens=64))   # thread-safe; queued
    while engine.has_work():
        for ev in engine.step():                         # one thread calls step()
            ...                                          # ev.seq_id, ev.text, ev.finish_reason, ...

Three parts, one job each:
  * MemoryPlan: how many sequences fit a memory budget (per-sequence state: delta-net state + KV cache;
    bench/plan.py turns it into the largest batch a machine holds).
  * BatchRunner (runtime/runner.py): the model forwards over the running batch, and the prompt cache.
  * Engine: the scheduler. Sequences wait in a queue, join between steps when the plan has room (all
    joiners prefill together: each layer reads their expert union once), decode together, and leave when
    done; each has its own sampler, stop strings, max tokens and stats (runtime/sampling.py).

Decode is pipelined when the runner's steps need no host round trip per layer (the GPU expert cache's
optimistic path, runtime/pipeline.py): the next step is launched on this step's lazy choice (greedy
argmax, or a draw with the row's own seeded sampler; a grammar row's masked argmax or draw, its mask
computed on the host while the device runs the step) before the host waits. A step that has to run again
voids the one built on it; the step launched ahead is undone when the batch changes (a row ends, joins or
is cancelled), so the cache always holds exactly the tokens fed.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import numpy as np

from flashmoe.errors import CapacityError, InputError

from .cache import LinearCache
from .config import EngineConfig
from .experts import device_memory_bytes
from .model import Stats
from .runner import PREFILL_TOKENS, BatchRunner, PromptCache
from .sampling import SamplingParams, Sequence, mask_logits
from .text import GenerationChunk, eos_ids, prompt_ids, sequence_stats, stage_delta
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


def cache_state_dtype(model):
    """The dtype the model's caches store the delta-net state in (read back from a cache it makes), checked
    against what its runtime config asked for."""
    linear = [c for c in model.make_cache().layers if isinstance(c, LinearCache)]
    got = linear[0].state_dtype if linear else mx.float32
    want = getattr(model.runtime_config, "state_dtype", None)
    if want is not None and linear and got != getattr(mx, want):
        raise InputError(f"state dtype {want} is not available for {model.config.model_type} models "
                         f"(their caches store {str(got).split('.')[-1]}); leave --state-dtype at its default")
    return got


@dataclass
class MemoryPlan:
    """Per-sequence state: every delta-net layer holds a recurrent state [Hv, Dv, Dk] (float32, or bfloat16:
    RuntimeConfig.state_dtype) and W-1 conv inputs; every full-attention layer holds keys and values for each
    token of the sequence. Rows of a batch are left-padded to the longest, so a batch of B rows costs
    B x (state + KV x longest)."""

    state_bytes: int  # fixed per sequence
    kv_bytes_per_token: int  # per token of context
    budget_bytes: int
    max_batch: int  # sequences that fit at the reference context, capped by the caller's max_batch
    reference_context: int
    recurrent_bytes: int = 0  # of state_bytes: the recurrent state (the rest: conv inputs)
    state_dtype: str = "float32"  # the recurrent state's dtype

    @staticmethod
    def for_model(model, budget_bytes: int, max_batch: int | None = None,
                  reference_context: int = REFERENCE_CONTEXT) -> "MemoryPlan":
        act = model.compute_dtype or model.embed_tokens.weight.dtype
        return MemoryPlan.for_shapes(model.config, act.size, cache_state_dtype(model).size, budget_bytes, max_batch,
                                     reference_context)

    @staticmethod
    def for_shapes(cfg, act_bytes: int, state_elem_bytes: int, budget_bytes: int, max_batch: int | None = None,
                   reference_context: int = REFERENCE_CONTEXT) -> "MemoryPlan":
        """The plan of a model config (format.TextConfig) with activations of `act_bytes` and a recurrent state of
        `state_elem_bytes` per element (4: float32, 2: bfloat16)."""
        n_lin = sum(1 for i in range(cfg.num_hidden_layers) if cfg.is_linear(i))
        n_full = cfg.num_hidden_layers - n_lin
        recurrent = n_lin * cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim \
            * state_elem_bytes
        state = recurrent + n_lin * (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * act_bytes
        kv = n_full * 2 * cfg.num_key_value_heads * cfg.head_dim * act_bytes
        ctx = min(reference_context, cfg.max_position_embeddings)
        fit = max(0, budget_bytes // (state + kv * ctx))
        cap = fit if max_batch is None else min(fit, max_batch)
        return MemoryPlan(state, kv, budget_bytes, cap, ctx, recurrent, {4: "float32", 2: "bfloat16"}[state_elem_bytes])

    @property
    def per_sequence_bytes(self) -> int:
        return self.state_bytes + self.kv_bytes_per_token * self.reference_context

    def bytes_for(self, rows: int, tokens: int) -> int:
        return rows * (self.state_bytes + self.kv_bytes_per_token * tokens)

    def describe(self) -> str:
        mb = 1 << 20
        return (f"memory plan: {self.per_sequence_bytes / mb:.1f} MiB per sequence at {self.reference_context} "
                f"tokens ({self.state_bytes / mb:.1f} MiB delta-net state in {self.state_dtype} + "
                f"{self.kv_bytes_per_token / 1024:.1f} KiB KV per token); budget {self.budget_bytes / mb:.0f} MiB "
                f"-> up to {self.max_batch} sequences at once")


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
    next_token: int | None = None
    prefill_stats: dict = field(default_factory=lambda: Stats().snapshot())
    decode_stats: dict = field(default_factory=lambda: Stats().snapshot())


class Engine:
    """The scheduler over a BatchRunner. `config` (EngineConfig) or its fields as keywords (max_batch=,
    memory_budget_gb=, prompt_cache_gb=, prefill_tokens=); `runner`: the runner to drive (a distributed
    leader's, runtime/distributed.py), by default a BatchRunner of `model`; `prompt_cache`: a PromptCache
    to use (a chat keeps its conversation in one between turns), by default one of prompt_cache_gb."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, runner=None,
                 prompt_cache: PromptCache | None = None, **kw):
        config = (config or EngineConfig()).with_(**kw).check()
        self.engine_config = config
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        budget = int(config.memory_budget_gb * 1e9) if config.memory_budget_gb is not None else available_memory() // 2
        self.plan = MemoryPlan.for_model(model, budget, config.max_batch)
        need = self.plan.bytes_for(1, 1)
        if need > budget:
            raise CapacityError(f"the memory budget ({budget / 1e6:.3g} MB) cannot hold even one sequence "
                                f"({need / 1e6:.3g} MB of state); raise --memory-budget-gb")
        # rows at once: the caller's cap; admission then checks the real sizes against the budget
        self.max_batch = config.max_batch if config.max_batch is not None else MAX_BATCH
        if runner is None:
            if prompt_cache is None and config.prompt_cache_gb > 0:
                prompt_cache = PromptCache(int(config.prompt_cache_gb * 1e9))
            runner = BatchRunner(model, config.prefill_tokens or PREFILL_TOKENS, prompt_cache)
        self.runner = runner
        self.prompt_cache = runner.prompt_cache
        self.eos = eos_ids(tokenizer, self.config)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: deque[_Entry] = deque()
        self._cancel: set[int] = set()
        self._running: dict[int, _Entry] = {}
        self._ahead = None  # the decode step launched ahead for the running rows (pipelined decode)
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
        """Stop a sequence at the next step. With a prompt cache, what it holds is kept there."""
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
            self._settle()
            self.runner.remove(gone, self._keep([self._running[sid] for sid in gone]))
            for sid in gone:
                e = self._running.pop(sid)
                events.append(self._final(e, "cancelled"))
                self.counters["cancelled"] += 1
        return joining, events

    def _keep(self, entries: list[_Entry]) -> dict | None:
        """What leaving rows hold, for the prompt cache (None without one)."""
        if self.prompt_cache is None:
            return None
        return {e.seq_id: e.seq.cached_ids() for e in entries}

    def _final(self, e: _Entry, reason: str | None = None) -> Event:
        s = e.seq
        now = time.perf_counter()
        decode_s = (now - e.t_first) if e.t_first else 0.0
        stats = sequence_stats(len(s.prompt), e.cached, len(s.generated), e.t_prefill, decode_s,
                               e.prefill_stats, e.decode_stats)
        stats["expert_bytes"] = int(stats["expert_bytes"])
        stats["ttft_s"] = (e.t_first - e.t_added) if e.t_first else None
        return Event(e.seq_id, e.tag, s.tail() if reason != "cancelled" else "", None, reason or s.finish,
                     list(s.generated), stats)

    def _take_tokens(self, entries: list[_Entry], tokens: list[int], events: list[Event]) -> list[_Entry]:
        """Accept each row's next token; returns the entries that finished."""
        now = time.perf_counter()
        done = []
        for e, token in zip(entries, tokens):
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
        leaving = [e for e in done if e.seq_id in self._running]
        if leaving:
            self._settle()
            self.runner.remove([e.seq_id for e in leaving], self._keep(leaving))
        for e in done:
            self._running.pop(e.seq_id, None)
            events.append(self._final(e))
            self.counters["finished"] += 1

    def _settle(self) -> None:
        """Undo the step launched ahead (the batch is about to change)."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            self.runner.cancel(ahead)

    def step(self) -> list[Event]:
        """One scheduler step. If a model call fails (a corrupt record, a lost rank, a bug), every running
        sequence is dropped with the batch state it shared (runner.reset()), so the engine stays usable;
        the error is raised to the caller, and sequences still waiting run in later steps."""
        joining, events = self._admit()
        try:
            return self._step(joining, events)
        except BaseException:
            for e in joining:
                self._running.setdefault(e.seq_id, e)
            self.counters["failed"] = self.counters.get("failed", 0) + len(self._running)
            self._running.clear()
            self._ahead = None
            self.runner.reset()
            self.counters["running"] = 0
            raise

    def _step(self, joining: list[_Entry], events: list[Event]) -> list[Event]:
        if joining:
            self._prefill(joining, events)
        rows = [self._running[sid] for sid in self.runner.rows]
        if rows:
            self._decode(rows, events)
        self.counters["expert_bytes"] = self.model.stats.expert_bytes
        self.counters["generated_tokens"] += sum(1 for ev in events if ev.token is not None)
        self.counters["running"] = len(self._running)
        self.counters["steps"] += 1
        return events

    def _prefill(self, joining: list[_Entry], events: list[Event]) -> None:
        self._settle()
        stats = self.model.stats
        s0, t0 = stats.snapshot(), time.perf_counter()
        logits, cached = self.runner.prefill([(e.seq_id, e.seq.prompt) for e in joining])
        dt, spent = time.perf_counter() - t0, stage_delta(s0, stats.snapshot(), 1 / len(joining))
        for e, c in zip(joining, cached):
            e.cached, e.t_prefill, e.prefill_stats = c, dt, dict(spent)
            self._running[e.seq_id] = e
            self.counters["prompt_tokens"] += len(e.seq.prompt) - c
        rest = [i for i, e in enumerate(joining) if e.seq.finish is None]  # not max_tokens 0
        tokens = self._choose([joining[i] for i in rest], logits[mx.array(np.asarray(rest, np.int32))]) if rest else []
        done = [e for e in joining if e.seq.finish is not None]
        done += self._take_tokens([joining[i] for i in rest], tokens, events)
        self._finish(done, events)

    @staticmethod
    def _choose(entries: list[_Entry], logits: mx.array, choice: np.ndarray | None = None) -> list[int]:
        """Each row's next token from its logits [B, V]: grammar rows masked together, then every argmax row
        in one argmax (greedy rows take `choice`, the step's own argmax, when given)."""
        logits = mask_logits([e.seq for e in entries], logits)
        picks = {} if choice is None else {i: int(choice[i]) for i, e in enumerate(entries) if e.seq.greedy}
        arg = [i for i, e in enumerate(entries) if e.seq.argmax and i not in picks]
        if arg:
            picks.update(zip(arg, np.array(mx.argmax(logits[mx.array(np.asarray(arg, np.int32))], axis=-1)).tolist()))
        return [picks[i] if i in picks else e.seq.choose(logits[i]) for i, e in enumerate(entries)]

    def _decode(self, rows: list[_Entry], events: list[Event]) -> None:
        stats, runner = self.model.stats, self.runner
        s0 = stats.snapshot()
        if self._ahead is not None:  # launched last step on these rows' lazy tokens
            p, self._ahead = self._ahead, None
        else:
            p = runner.launch([e.next_token for e in rows])
        ahead = ids = None
        if runner.pipelined and all(e.seq.lazy or e.seq.device_grammar for e in rows):
            # the next step on this one's lazy choices: greedy rows its argmax, sampled rows a draw from
            # its logits with their own sampler (the same random key a synced draw would use). A grammar
            # row's mask depends only on the tokens already taken, so the host computes it while the device
            # runs this step, and the row's choice stays on the device too (one argmax for the batch)
            last = mask_logits([e.seq for e in rows], p.logits[:, -1])
            best = mx.argmax(last, axis=-1) if any(e.seq.device_grammar for e in rows) else p.choice
            ids = best if all(e.seq.argmax for e in rows) else \
                mx.stack([best[i] if e.seq.argmax else e.seq.draw(last[i]) for i, e in enumerate(rows)])
            ahead = runner.launch(ids)
        logits, choice, redone = runner.finish(p, after=ahead)
        if redone:
            ahead = None  # built on a void step
        if ids is None:  # not launched ahead (a Python sampler or logits processor needs the host)
            tokens = self._choose(rows, logits, choice)
        elif not redone:
            drawn = choice if ids is p.choice else np.array(ids)  # one transfer (the step ahead consumed it)
            tokens = [int(drawn[i]) for i in range(len(rows))]
        else:  # the step ran again: the same choice (the same mask, the same draw) from its new logits
            last = mask_logits([e.seq for e in rows], logits)
            tokens = [int(choice[i]) if e.seq.greedy else
                      int(mx.argmax(last[i]).item()) if e.seq.argmax else e.seq.redraw(last[i])
                      for i, e in enumerate(rows)]
        spent = stage_delta(s0, stats.snapshot(), 1 / len(rows))
        for e in rows:
            e.seq.fed += 1
            for k, v in spent.items():
                e.decode_stats[k] += v
        self._ahead = ahead
        self._finish(self._take_tokens(rows, tokens, events), events)


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


__all__ = ["Engine", "EngineConfig", "Event", "MemoryPlan", "BatchRunner", "PromptCache", "BatchResult",
           "batch_generate", "stream_batch_generate", "SamplingParams"]
