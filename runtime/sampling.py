"""One sequence's choices: sampling parameters, the sampler, and the text side of decoding (EOS, stop
strings, max tokens, UTF-8-safe streaming). Shared by `generate` (one prompt) and the batched Engine, so
both pick and stop the same way."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from flashmoe.errors import InputError

from .tokenizer import StreamingDetokenizer

MAX_SEED = (1 << 63) - 1


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass; 1 = off
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per sequence: the same seed gives the same sample whatever else is batched
    stop: tuple[str, ...] = ()
    logits_processor: Callable | None = None  # (generated ids, logits [V]) -> logits [V]
    sampler: Callable | None = None  # (logits [V], generated ids) -> token id; replaces the built-in one
    # one sequence's grammar state (serve/grammar.py GrammarMask): the engine masks every grammar row of a
    # step together (mask_logits), before logits_processor and the sampler; without those two, its rows are
    # pipelined like the others (the mask is computed on the host while the device runs the step)
    grammar: object | None = None

    def check(self) -> "SamplingParams":
        def num(name, v, lo, hi, lo_open=False):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (lo_open and v == lo):
                rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise InputError(f"{name} must be a number in {rng} (got {v!r})")

        def whole(name, v, lo, hi):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InputError(f"{name} must be a whole number from {lo} to {hi} (got {v!r})")

        num("temperature", self.temperature, 0, 1e4)
        num("top-p", self.top_p, 0, 1, lo_open=True)
        whole("top-k", self.top_k, 0, 1 << 31)
        whole("max tokens", self.max_tokens, 0, 1 << 31)
        if self.seed is not None:
            whole("seed", self.seed, 0, MAX_SEED)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not all(isinstance(s, str) for s in self.stop):
            raise InputError(f"stop must be a list of strings (got {self.stop!r})")
        self.stop = tuple(s for s in self.stop if s)
        return self


class Sampler:
    """logits [V] -> token id. temperature 0 is greedy; otherwise top-k then top-p (nucleus) filtering,
    drawn from this sampler's own random key (seeded: reproducible per sequence). `draw` gives the token
    lazily (the engine launches the next decode step on it before the host waits); `redraw` draws again
    with the same random key from other logits (a decode step that was run again)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed).check()
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.key = None if temperature == 0 else mx.random.key(
            seed if seed is not None else random.SystemRandom().randrange(1 << 62))
        self.last_key = None

    def __call__(self, logits: mx.array) -> int:
        return int(self.draw(logits).item())

    def draw(self, logits: mx.array) -> mx.array:
        """The token as a lazy int32 scalar."""
        if self.key is None:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        self.key, self.last_key = mx.random.split(self.key)
        return self._sample(logits, self.last_key)

    def redraw(self, logits: mx.array) -> int:
        if self.key is None:
            return int(mx.argmax(logits, axis=-1).item())
        return int(self._sample(logits, self.last_key).item())

    def _sample(self, logits: mx.array, key) -> mx.array:
        top_k, top_p = self.top_k, self.top_p
        x = logits.astype(mx.float32) / self.temperature  # [V]
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
        return mx.random.categorical(x, key=key).astype(mx.int32)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Sampler:
    """logits [V] -> token id (a Sampler; see there)."""
    return Sampler(temperature, top_p, top_k, seed)


def mask_logits(seqs: list["Sequence"], logits: mx.array) -> mx.array:
    """logits [B, V] with each grammar row's disallowed tokens at -inf; rows without a grammar untouched.
    The rows' masks are computed together (one `masks` call per masker, in practice one for the batch:
    `masker.masks(states, generated)` -> int32 [n, W] bit-packed, token t is bit t % 32 of word t // 32)
    and applied in one operation (apply_token_masks)."""
    rows = [i for i, s in enumerate(seqs) if s.params.grammar is not None]
    if not rows:
        return logits
    B, V = logits.shape
    words = np.full((B, (V + 31) // 32), -1, np.int32)  # all bits set: every token allowed
    groups: dict[int, tuple[object, list[int]]] = {}
    for i in rows:
        masker = seqs[i].params.grammar.masker
        groups.setdefault(id(masker), (masker, []))[1].append(i)
    for masker, idx in groups.values():
        m = masker.masks([seqs[i].params.grammar for i in idx], [seqs[i].generated for i in idx])
        w = min(words.shape[1], m.shape[1])
        words[idx, :w] = m[:, :w]
        words[idx, w:] = 0  # tokens past the grammar's vocabulary: never
    return apply_token_masks(logits, words)


def apply_token_masks(logits: mx.array, words: np.ndarray) -> mx.array:
    """logits [B, V] where the bit-packed masks `words` int32 [B, >= V/32] allow them, else -inf: the
    packed words go to the device (V/8 bytes a row) and are unpacked there, one where over the batch."""
    return _masked(mx.array(words), logits)


@mx.compile
def _masked(words: mx.array, logits: mx.array) -> mx.array:
    """apply_token_masks on the device, fused into one kernel where the backend can (mx.compile)."""
    B, V = logits.shape
    bits = (words[:, :, None] >> mx.arange(32, dtype=mx.int32)) & 1  # [B, W, 32]
    return mx.where(bits.reshape(B, -1)[:, :V].astype(mx.bool_), logits, -mx.inf)


def _stop_hold(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


@dataclass
class Sequence:
    """The text side of one sequence being generated: choose a token from logits, accept it (EOS, stop
    strings, max tokens), and hand out text that never splits a UTF-8 character or shows a stop string."""

    prompt: list[int]
    params: SamplingParams
    tokenizer: object
    eos: frozenset
    generated: list[int] = field(default_factory=list)
    finish: str | None = None  # None while running; "stop" or "length"
    fed: int = 0  # generated tokens already fed to the model (its cache holds prompt + generated[:fed])

    def __post_init__(self):
        p = self.params
        self.base = Sampler(p.temperature, p.top_p, p.top_k, p.seed) if p.sampler is None else None
        # the next token can be drawn on the device without the host (`draw`): no Python callable involved
        self.lazy = p.sampler is None and p.logits_processor is None and p.grammar is None
        # a grammar row whose choice can still be made on the device once the host has its mask (which
        # depends only on the tokens already taken): pipelined like a lazy row
        self.device_grammar = p.sampler is None and p.logits_processor is None and p.grammar is not None
        # the choice is the argmax of its logits (a grammar row's masked): the engine takes the batch's in one
        self.argmax = p.sampler is None and p.logits_processor is None and p.temperature == 0
        self.greedy = self.lazy and self.argmax
        self.detok = StreamingDetokenizer(self.tokenizer)
        self.pending = ""
        if p.max_tokens == 0:
            self.finish = "length"

    def choose(self, logits: mx.array) -> int:
        """logits [V] (a grammar row's already masked: mask_logits) -> the next token id."""
        p = self.params
        if p.logits_processor is not None:
            logits = p.logits_processor(self.generated, logits)
        if p.sampler is not None:
            return int(p.sampler(logits, self.generated))
        return self.base(logits)

    def draw(self, logits: mx.array) -> mx.array:
        """The next token as a lazy int32 scalar (only when `lazy`)."""
        return self.base.draw(logits)

    def redraw(self, logits: mx.array) -> int:
        """The token `draw` gave, drawn again with the same random key from these logits."""
        return self.base.redraw(logits)

    def accept(self, token: int) -> tuple[str, bool]:
        """Take the chosen token. Returns (text to show now, whether the token counts as output);
        sets `finish` when the sequence ends (an EOS token is not output)."""
        if token in self.eos:
            self.finish = "stop"
            return "", False
        self.generated.append(token)
        self.pending += self.detok.add(token)
        stops = self.params.stop
        if stops:
            hits = [self.pending.find(s) for s in stops if s in self.pending]
            if hits:
                out, self.pending = self.pending[: min(hits)], ""
                self.finish = "stop"
                return out, True
            hold = _stop_hold(self.pending, stops)
        else:
            hold = 0
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        if len(self.generated) >= self.params.max_tokens:
            self.finish = "length"
        return out, True

    def tail(self) -> str:
        """The text still held back, once the sequence has ended."""
        stopped_by_string = self.finish == "stop" and self.params.stop
        return self.pending + ("" if stopped_by_string else self.detok.flush())

    def cached_ids(self) -> list[int]:
        """Every token the model's cache holds for this sequence."""
        return self.prompt + self.generated[: self.fed]
