"""What goes into a generation and what comes out: prompts to token ids, the end-of-sequence ids, the
chunks a stream yields and the figures of a finished sequence."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field

from flashmoe.format import InputError

from .tokenizer import Tokenizer

STAGES = ("attention", "routing", "expert_io", "expert_compute", "head", "expert_bytes", "expert_reads")


@dataclass
class GenerationChunk:
    text: str  # new text (may be "" while a multi-byte character is incomplete)
    token: int | None  # the token this chunk came from (None for the final, flushing chunk)
    finish_reason: str | None = None  # None while generating; "stop" (EOS / stop string), "length", "cancelled"
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


def eos_ids(tokenizer: Tokenizer, cfg) -> frozenset:
    return frozenset(tokenizer.eos_token_ids) | frozenset(cfg.eos_token_id)


def stage_delta(before: dict, after: dict, share: float = 1.0) -> dict:
    """The stage figures (model.stats.snapshot()) spent between two snapshots, times `share`."""
    return {k: (after[k] - before[k]) * share for k in STAGES}


def sequence_stats(prompt_tokens, cached, n_gen, t_prefill, t_decode, prefill_stats, decode_stats) -> dict:
    """The figures of a finished sequence (the final chunk's and event's `stats`)."""
    prefill_stats, decode_stats = ({k: round(v) if k in ("expert_bytes", "expert_reads") else v for k, v in s.items()}
                                   for s in (prefill_stats, decode_stats))
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
