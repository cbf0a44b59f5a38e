"""Text generation: batched (chunked) prefill, then token-by-token decode with greedy or sampled choice,
stop on EOS or stop strings, streamed as text chunks that never split a UTF-8 character."""

from __future__ import annotations

import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx

from flashmoe.format import BundleError

from .tokenizer import StreamingDetokenizer, Tokenizer

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
            raise BundleError("the prompt is empty: give some text")
        ids = tokenizer.encode(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True))
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise BundleError("the prompt is empty: give some text")
        if chat_template and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer.encode(text)
    else:
        raise BundleError(f"unsupported prompt type {type(prompt).__name__}: give a string, messages or token ids")
    if not ids:
        raise BundleError("the prompt is empty after tokenization: give some text")
    return ids


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
    """logits [V] -> token id. temperature 0 is greedy; otherwise top-k then top-p (nucleus) filtering."""
    if temperature < 0:
        raise BundleError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise BundleError(f"top-p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise BundleError(f"top-k must be >= 0 (got {top_k})")
    if temperature == 0:
        return lambda logits: int(mx.argmax(logits, axis=-1).item())
    state = {"key": mx.random.key(seed if seed is not None else random.SystemRandom().randrange(1 << 62))}

    def sample(logits: mx.array) -> int:
        x = logits.astype(mx.float32) / temperature  # [V]
        if 0 < top_k < x.shape[-1]:
            kth = mx.sort(x)[-top_k]
            x = mx.where(x < kth, -mx.inf, x)
        if top_p < 1.0:
            order = mx.argsort(-x)
            p = mx.softmax(x[order], axis=-1)
            cum = mx.cumsum(p, axis=-1)
            drop_sorted = (cum - p) >= top_p  # keep the smallest prefix whose mass reaches top_p
            threshold = mx.min(mx.where(drop_sorted, mx.inf, x[order]))  # smallest kept logit
            x = mx.where(x < threshold, -mx.inf, x)
        state["key"], sub = mx.random.split(state["key"])
        return int(mx.random.categorical(x, key=sub).item())

    return sample


def _stop_hold(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


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
             session: Session | None = None) -> Iterator[GenerationChunk]:
    """Yield GenerationChunk per generated token, then a final chunk with finish_reason and stats."""
    ids = prompt_ids(tokenizer, prompt, chat_template)
    cfg = model.config
    limit = cfg.max_position_embeddings
    if len(ids) >= limit:
        raise BundleError(f"the prompt is {len(ids)} tokens, past the model's context limit of {limit}; shorten it")
    if max_tokens < 0:
        raise BundleError(f"max tokens must be >= 0 (got {max_tokens})")
    max_tokens = min(max_tokens, limit - len(ids))
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
    sampler = make_sampler(temperature, top_p, top_k, seed)
    eos = set(tokenizer.eos_token_ids) | set(cfg.eos_token_id)

    stats = model.stats
    stats.reset()
    reuse = (session is not None and session.cache is not None and len(session.ids) < len(ids)
             and ids[: len(session.ids)] == session.ids)
    cache = session.cache if reuse else model.make_cache()
    cached = len(session.ids) if reuse else 0
    if session is not None:
        session.reset()  # re-armed below only if this call completes
    fed = list(ids)  # every token the cache holds
    t0 = time.perf_counter()
    logits = None
    for i in range(cached, len(ids), prefill_chunk):
        logits = model(mx.array([ids[i : i + prefill_chunk]]), cache, last_only=True)  # [1, 1, V]
        mx.eval(logits)
    t_prefill = time.perf_counter() - t0
    prefill_stats = stats.snapshot()
    stats.reset()

    detok = StreamingDetokenizer(tokenizer)
    pending = ""  # decoded text not yet yielded (it may be the start of a stop string)
    finish = "length"
    n_gen = 0
    t1 = time.perf_counter()
    while n_gen < max_tokens:
        token = sampler(logits[0, -1])
        if token in eos:
            finish = "stop"
            break
        n_gen += 1
        pending += detok.add(token)
        if stops:
            hits = [pending.find(s) for s in stops if s in pending]
            if hits:
                yield GenerationChunk(pending[: min(hits)], token)
                pending = ""
                finish = "stop"
                break
            hold = _stop_hold(pending, stops)
        else:
            hold = 0
        out, pending = pending[: len(pending) - hold], pending[len(pending) - hold:]
        yield GenerationChunk(out, token)
        if n_gen < max_tokens:
            logits = model(mx.array([[token]]), cache, last_only=True)
            fed.append(token)
    t_decode = time.perf_counter() - t1
    tail = pending + (detok.flush() if finish != "stop" or not stops else "")
    decode_stats = stats.snapshot()
    io_s = prefill_stats["expert_io"] + decode_stats["expert_io"]
    nbytes = prefill_stats["expert_bytes"] + decode_stats["expert_bytes"]
    summary = {
        "prompt_tokens": len(ids),
        "cached_prompt_tokens": cached,
        "generated_tokens": n_gen,
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "prefill_tps": (len(ids) - cached) / t_prefill if t_prefill > 0 else 0.0,
        # decode steps: one forward per generated token after the first (which prefill produced)
        "decode_tps": (n_gen - 1) / t_decode if n_gen > 1 and t_decode > 0 else 0.0,
        "prefill": prefill_stats,
        "decode": decode_stats,
        "expert_bytes": nbytes,
        "expert_gbps": nbytes / io_s / 1e9 if io_s > 0 else 0.0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if session is not None:
        session.cache, session.ids = cache, fed
    yield GenerationChunk(tail, None, finish, summary)
