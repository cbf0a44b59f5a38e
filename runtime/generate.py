"""Text generation for one prompt: chunked prefill, then token-by-token decode with greedy or sampled choice
(runtime/sampling.py), stop on EOS or stop strings, streamed as text chunks that never split a UTF-8
character. Many prompts at once: runtime/engine.py."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from flashmoe.format import CapacityError, InputError

from .integrity import check_logits
from .model import Model
from .sampling import SamplingParams, Sequence, make_sampler  # noqa: F401  (make_sampler: public API)
from .tokenizer import Tokenizer

PREFILL_CHUNK = 1024  # tokens per prefill forward; each layer reads its chunk's expert union once


@dataclass
class GenerationChunk:
    text: str  # new text (may be "" while a multi-byte character is incomplete)
    token: int | None  # the token this chunk came from (None for the final, flushing chunk)
    finish_reason: str | None = None  # None while generating; "stop" (EOS / stop string) or "length"
    stats: dict = field(default_factory=dict)  # filled on the final chunk


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def prompt_ids(tokenizer: Tokenizer, prompt, chat_template: bool = True) -> list[int]:
    """str (wrapped in the chat template as a user turn unless chat_template=False), a list of chat
    messages ({"role", "content"}), or a list of token ids."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        ids = [int(t) for t in prompt]
    elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        if not prompt:
            raise InputError("the prompt is empty: give some text")
        ids = tokenizer.encode(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True))
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("the prompt is empty: give some text")
        if chat_template and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer.encode(text)
    else:
        raise InputError(f"unsupported prompt type {type(prompt).__name__}: give a string, messages or token ids")
    if not ids:
        raise InputError("the prompt is empty after tokenization: give some text")
    return ids


class Session:
    """Keeps the cache between generate() calls (a chat). When the new prompt starts with every token
    already in the cache, only the rest is prefilled; otherwise (an edited history, a template that
    rewrites earlier turns) it starts over, since linear-attention state cannot be rolled back."""

    def __init__(self):
        self.cache = None
        self.ids: list[int] = []

    def reset(self) -> None:
        self.cache, self.ids = None, []


def generate(model, tokenizer: Tokenizer, prompt, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
             chat_template: bool = True, prefill_chunk: int = PREFILL_CHUNK,
             session: Session | None = None, params: SamplingParams | None = None) -> Iterator[GenerationChunk]:
    """Yield GenerationChunk per generated token, then a final chunk with finish_reason and stats.
    `params` (a SamplingParams) replaces the individual sampling arguments when given."""
    ids = prompt_ids(tokenizer, prompt, chat_template)
    cfg = model.config
    limit = cfg.max_position_embeddings
    if len(ids) >= limit:
        raise CapacityError(f"the prompt is {len(ids)} tokens, past the model's context limit of {limit}; shorten it")
    if params is None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stops)
    params.check()
    params.max_tokens = min(params.max_tokens, limit - len(ids))
    seq = Sequence(ids, params, tokenizer, eos_ids(tokenizer, cfg))

    stats = model.stats
    stats.reset()
    # a flashmoe Model launches a step and syncs it later; greedy decoding with the GPU expert cache
    # (optimistic steps) then runs one step ahead. Other models (a distributed leader) decode plainly.
    own = isinstance(model, Model)
    pipelined = own and seq.greedy and getattr(model.experts, "optimistic", False)

    reuse = (session is not None and session.cache is not None and len(session.ids) < len(ids)
             and ids[: len(session.ids)] == session.ids)
    cache = session.cache if reuse else model.make_cache()
    cached = len(session.ids) if reuse else 0
    if session is not None:
        session.reset()  # re-armed below only if this call completes
    t0 = time.perf_counter()
    logits = None
    for i in range(cached, len(ids), prefill_chunk):
        logits = model(mx.array([ids[i : i + prefill_chunk]]), cache, last_only=True)  # [1, 1, V]
    check_logits(logits)
    t_prefill = time.perf_counter() - t0
    prefill_stats = stats.snapshot()
    stats.reset()

    t1 = time.perf_counter()
    pending = None  # pipelined greedy decoding: the step launched ahead, on the device
    try:
        token = seq.choose(logits[0, -1]) if seq.finish is None else None  # None: max_tokens 0
        while token is not None:
            text, output = seq.accept(token)
            if output:
                yield GenerationChunk(text, token)
            if seq.finish is not None:
                break
            ids_in = mx.array([[token]], mx.int32)
            if pipelined:  # launch the next step on this one's (lazy) argmax before waiting for it
                if pending is None:
                    pending = model.launch_decode(ids_in, cache)
                ahead = model.launch_decode(pending.choice[:, None], cache)
                _, choice, redone = model.finish_decode(pending, cache, after=ahead)
                pending = None if redone else ahead  # a redone step voids the one built on it
                token = int(choice[0])
            elif own:  # the step's argmax comes with its one sync
                logits, choice, _ = model.finish_decode(model.launch_decode(ids_in, cache), cache)
                token = int(choice[0]) if seq.greedy else seq.choose(logits[0, -1])
            else:
                token = seq.choose(model.decode(ids_in, cache)[0, -1])
            seq.fed += 1
    except GeneratorExit:  # the caller stopped (Ctrl-C in a chat): the cache is consistent once undone
        if pending is not None:
            model.cancel_decode(pending, cache)
        if session is not None:
            session.cache, session.ids = cache, seq.cached_ids()
        raise
    if pending is not None:
        model.cancel_decode(pending, cache)
    t_decode = time.perf_counter() - t1
    n_gen = len(seq.generated)
    summary = sequence_stats(len(ids), cached, n_gen, t_prefill, t_decode, prefill_stats, stats.snapshot())
    if session is not None:
        session.cache, session.ids = cache, seq.cached_ids()
    yield GenerationChunk(seq.tail(), None, seq.finish, summary)


def eos_ids(tokenizer: Tokenizer, cfg) -> frozenset:
    return frozenset(tokenizer.eos_token_ids) | frozenset(cfg.eos_token_id)


def sequence_stats(prompt_tokens, cached, n_gen, t_prefill, t_decode, prefill_stats, decode_stats) -> dict:
    io_s = prefill_stats["expert_io"] + decode_stats["expert_io"]
    nbytes = prefill_stats["expert_bytes"] + decode_stats["expert_bytes"]
    return {
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached,
        "generated_tokens": n_gen,
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "prefill_tps": (prompt_tokens - cached) / t_prefill if t_prefill > 0 else 0.0,
        # decode steps: one forward per generated token after the first (which prefill produced)
        "decode_tps": (n_gen - 1) / t_decode if n_gen > 1 and t_decode > 0 else 0.0,
        "prefill": prefill_stats,
        "decode": decode_stats,
        "expert_bytes": nbytes,
        "expert_gbps": nbytes / io_s / 1e9 if io_s > 0 else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
