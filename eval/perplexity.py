"""Perplexity of a bundle over a text, and how far one bundle's next-token distributions are from another's.

    from flashmoe.eval import perplexity, compare
    model, tok = flashmoe.load("out/b4")
    ids = tok.encode(open("text.txt").read())
    r = perplexity(model, ids)                      # r.ppl, r.nll, r.tokens
    a, ref, d = compare(model, ref_model, ids)      # d.kl: mean KL(ref || model) in nats per token

The text is cut into windows of at most `window` tokens (each starts with a fresh cache) and every window
is fed through the model in chunks of `chunk` tokens with its cache, so memory stays bounded by the
chunk's logits ([chunk, vocab] floats) however long the text is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx

from flashmoe.errors import InputError
from flashmoe.runtime.runner import forward_chunks

CHUNK = 256  # tokens per forward
WINDOW = 4096  # tokens per window (fresh cache), capped by the model's context


@dataclass
class Perplexity:
    tokens: int  # tokens predicted (each window's first token has no prediction)
    nll: float  # mean negative log-likelihood, nats per token
    seconds: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass
class Divergence:
    tokens: int
    kl: float  # mean KL(reference || model), nats per token
    kl_max: float  # largest per-token KL
    top1: float  # fraction of positions where both models' likeliest next token agree


def _windows(n: int, window: int) -> list[tuple[int, int]]:
    return [(s, min(s + window, n)) for s in range(0, n, window) if min(s + window, n) - s >= 2]


def _check(ids: list[int], model, window: int, chunk: int) -> int:
    if chunk < 1:
        raise InputError(f"chunk must be >= 1 (got {chunk})")
    if window < 2:
        raise InputError(f"window must be >= 2 tokens (got {window})")
    if len(ids) < 2:
        raise InputError("the text is too short: it needs at least 2 tokens to measure anything")
    vocab = model.config.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise InputError(f"token id {max(ids)} is outside the model's vocabulary of {vocab}; "
                         "the text was tokenized for another model")
    return min(window, model.config.max_position_embeddings)


def _logprobs(model, ids: list[int], window: int, chunk: int) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield (log-probabilities [S, V], targets [S]) chunk by chunk over the whole text, through the
    runtime's one prefill loop (every position's logits)."""
    for s, e in _windows(len(ids), window):
        i = s
        for fed, logits in forward_chunks(model, model.make_cache(), [ids[s : e - 1]], chunk, last_only=False):
            j = s + fed  # positions i..j-1 predict tokens i+1..j
            logits = logits[0].astype(mx.float32)  # [S, V]
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            yield logp, mx.array(ids[i + 1: j + 1])
            i = j


def _nll_sum(logp: mx.array, targets: mx.array) -> mx.array:
    return -mx.take_along_axis(logp, targets[:, None], axis=-1).sum()


def _timed(gen, t: list[float], i: int):
    """Step `gen`, evaluating each item and adding its time to t[i] (each model timed on its own)."""
    while True:
        t0 = time.perf_counter()
        item = next(gen, None)
        if item is None:
            return
        mx.eval(item[0])
        t[i] += time.perf_counter() - t0
        yield item


def perplexity(model, ids: list[int], window: int = WINDOW, chunk: int = CHUNK,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of `model` over token ids. progress(n) is called with the tokens done after each chunk."""
    window = _check(ids, model, window, chunk)
    t0 = time.perf_counter()
    total, n = 0.0, 0
    for logp, targets in _logprobs(model, ids, window, chunk):
        total += _nll_sum(logp, targets).item()
        n += targets.shape[0]
        if progress:
            progress(targets.shape[0])
    return Perplexity(n, total / n, time.perf_counter() - t0)


def compare(model, reference, ids: list[int], window: int = WINDOW, chunk: int = CHUNK,
            progress: Callable[[int], None] | None = None) -> tuple[Perplexity, Perplexity, Divergence]:
    """Run `model` and `reference` side by side over the same ids (each with its own cache).
    Returns their perplexities and the divergence of model's next-token distributions from reference's."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise InputError(f"the bundles have different vocabularies ({model.config.vocab_size} vs "
                         f"{reference.config.vocab_size}); compare bundles of the same model")
    window = min(_check(ids, model, window, chunk), _check(ids, reference, window, chunk))
    t, nll = [0.0, 0.0], [0.0, 0.0]
    kl_sum, kl_max, agree, n = 0.0, 0.0, 0, 0
    ref_steps = _timed(_logprobs(reference, ids, window, chunk), t, 1)
    for la, targets in _timed(_logprobs(model, ids, window, chunk), t, 0):
        lr, _ = next(ref_steps)
        nll[0] += _nll_sum(la, targets).item()
        nll[1] += _nll_sum(lr, targets).item()
        kl = (mx.exp(lr) * (lr - la)).sum(axis=-1)  # [S]
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item())
        agree += (mx.argmax(la, axis=-1) == mx.argmax(lr, axis=-1)).sum().item()
        n += targets.shape[0]
        if progress:
            progress(targets.shape[0])
    return (Perplexity(n, nll[0] / n, t[0]), Perplexity(n, nll[1] / n, t[1]),
            Divergence(n, kl_sum / n, kl_max, agree / n))
