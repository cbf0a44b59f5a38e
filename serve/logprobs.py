"""logprobs: the log-softmax of the logits each token was sampled from (after a grammar's mask, before
temperature and top-p/top-k), the chosen token's and the `top` most likely.

LogprobRecorder is the last logits processor of a sequence (after a grammar's mask): on the engine thread it turns each step's
logits into log-probabilities (float32) and keeps the top ones; the chosen token is known at the next step
(or, for the last token, when the handler asks). The handler calls take(i, token) for the i-th output
token, in order, from the event loop."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # most likely first


class LogprobRecorder:
    def __init__(self, top: int):
        self.top = top
        self._lock = threading.Lock()
        self._done: dict[int, TokenLogprob] = {}
        self._pending: tuple[int, np.ndarray] | None = None  # (position, log-probs) awaiting its token
        self._taken: set[int] = set()

    def __call__(self, generated: list[int], logits: mx.array) -> mx.array:
        x = logits.astype(mx.float32)
        lp = np.array(x - mx.logsumexp(x, axis=-1, keepdims=True))
        with self._lock:
            if self._pending is not None:
                i, prev = self._pending
                if i not in self._taken and i < len(generated):
                    self._done[i] = self._entry(prev, generated[i])
            self._pending = (len(generated), lp)
        return logits

    def take(self, i: int, token: int) -> TokenLogprob:
        with self._lock:
            if i in self._done:
                return self._done.pop(i)
            pos, lp = self._pending
            assert pos == i, (pos, i)
            self._taken.add(i)
            return self._entry(lp, token)

    def _entry(self, lp: np.ndarray, token: int) -> TokenLogprob:
        top = []
        if self.top:
            idx = np.argpartition(-lp, self.top - 1)[: self.top]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(int(t), float(lp[t])) for t in idx]
        return TokenLogprob(int(token), float(lp[token]), top)


def openai_chat(entries: list[TokenLogprob], tokenizer) -> dict:
    """choices[].logprobs in the Chat Completions shape."""
    def one(t: int, lp: float) -> dict:
        s = tokenizer.decode([t], skip_special_tokens=False)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(one(e.token, e.logprob), top_logprobs=[one(t, lp) for t, lp in e.top])
                        for e in entries], "refusal": None}


def openai_completion(entries: list[TokenLogprob], tokenizer, offset: int = 0) -> dict:
    """choices[].logprobs in the (legacy) Completions shape."""
    tokens = [tokenizer.decode([e.token], skip_special_tokens=False) for e in entries]
    offsets, at = [], offset
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tokenizer.decode([t], skip_special_tokens=False): lp for t, lp in e.top}
                             for e in entries], "text_offset": offsets}
