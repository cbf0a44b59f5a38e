"""Text generation for one prompt: a one-sequence client of the engine (runtime/engine.py), so it prefills,
decodes (pipelined where the expert cache allows), samples and stops exactly as a batched run does.
Streamed as text chunks that never split a UTF-8 character."""

from __future__ import annotations

from typing import Iterator

from .config import EngineConfig
from .engine import Engine
from .runner import PromptCache
from .sampling import SamplingParams, make_sampler  # noqa: F401  (make_sampler: public API)
from .text import GenerationChunk, eos_ids, peak_rss_bytes, prompt_ids  # noqa: F401  (public API)
from .tokenizer import Tokenizer

PREFILL_CHUNK = 1024  # tokens per prefill forward; each layer reads its chunk's expert union once


def generate(model, tokenizer: Tokenizer, prompt, max_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | str | None = None,
             chat_template: bool = True, prefill_chunk: int = PREFILL_CHUNK,
             session: PromptCache | None = None, params: SamplingParams | None = None,
             engine: Engine | None = None) -> Iterator[GenerationChunk]:
    """Yield GenerationChunk per generated token, then a final chunk with finish_reason and stats.
    `params` (a SamplingParams) replaces the individual sampling arguments when given. `session`: a
    PromptCache that keeps the state between calls (a chat: a prompt that extends an earlier call's
    tokens prefills only the rest); `engine`: run on this Engine instead of a new one (its prompt cache
    is the session; a distributed leader's, flashmoe-run under mlx.launch)."""
    ids = prompt_ids(tokenizer, prompt, chat_template)
    if params is None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=stops)
    if engine is None:
        engine = Engine(model, tokenizer, EngineConfig(max_batch=1, prefill_tokens=prefill_chunk),
                        prompt_cache=session)
    yield from stream(engine, ids, params)


def stream(engine: Engine, ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
    """Run one sequence on `engine` to its end, as chunks. Closing the iterator early (a chat's Ctrl-C)
    cancels the sequence; with a prompt cache, the tokens it fed stay there for the next call."""
    sid = engine.add(ids, params)
    try:
        while True:
            for ev in engine.step():
                if ev.seq_id != sid:
                    continue
                if ev.finish_reason is not None:
                    yield GenerationChunk(ev.text, None, ev.finish_reason, ev.stats)
                    return
                yield GenerationChunk(ev.text, ev.token)
    except GeneratorExit:  # closed early: cancel now, keeping what the sequence holds in the prompt cache
        engine.cancel(sid)
        while engine.has_work():
            engine.step()
        raise


__all__ = ["generate", "stream", "GenerationChunk", "prompt_ids", "eos_ids", "peak_rss_bytes", "make_sampler"]
