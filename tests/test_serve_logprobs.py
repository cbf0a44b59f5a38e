"""logprobs and top_logprobs in chat and completions, streaming too: equal to the log-softmax of the
runtime's own logits (a full forward of the prompt and the tokens so far, step by step)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from test_serve import MODEL, PROMPTS, live  # noqa: F401  (live: a fixture)

N = 8


def _reference(model, tok, ids: list[int], n: int, top: int):
    """Greedy steps from a full forward each time: [(token text, its logprob, [(text, logprob)] top)]."""
    out, ids = [], list(ids)
    for _ in range(n):
        logits = model(mx.array([ids]), model.make_cache())[0, -1].astype(mx.float32)
        lp = np.array(logits - mx.logsumexp(logits))
        t = int(np.argmax(lp))
        order = np.argsort(-lp, kind="stable")[:top]
        out.append((tok.decode([t], skip_special_tokens=False), float(lp[t]),
                    [(tok.decode([int(i)], skip_special_tokens=False), float(lp[i])) for i in order]))
        ids.append(t)
    return out


def test_completions_logprobs_equal_the_runtimes_log_softmax(live, loaded):
    model, tok = loaded(None)
    prompt = tok.encode(PROMPTS[0])
    r = live.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    ref = _reference(model, tok, prompt, N, 5)
    assert lp.tokens == [t for t, _, _ in ref] and "".join(lp.tokens) == r.choices[0].text
    np.testing.assert_allclose(lp.token_logprobs, [x for _, x, _ in ref], atol=2e-3)
    for got, (_, _, top) in zip(lp.top_logprobs, ref):
        assert list(got) == [t for t, _ in top]
        np.testing.assert_allclose(list(got.values()), [x for _, x in top], atol=2e-3)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(N)]
    # streamed: the same entries, spread over the chunks
    s = live.openai().completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, logprobs=5,
                                         stream=True)
    toks, lps = [], []
    for c in s:
        if c.choices and c.choices[0].logprobs:
            toks += c.choices[0].logprobs.tokens
            lps += c.choices[0].logprobs.token_logprobs
    assert toks == lp.tokens
    np.testing.assert_allclose(lps, lp.token_logprobs, atol=1e-6)


def test_chat_logprobs_streamed_and_not(live, loaded):
    model, tok = loaded(None)
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    oa = live.openai()
    r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0, logprobs=True,
                                   top_logprobs=20)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    ref = _reference(model, tok, prompt, len(content), 20)
    for e, (t, x, top) in zip(content, ref):
        assert e.token == t and math.isclose(e.logprob, x, abs_tol=2e-3) and bytes(e.bytes) == t.encode()
        assert [p.token for p in e.top_logprobs] == [s for s, _ in top] and len(e.top_logprobs) == 20
        np.testing.assert_allclose([p.logprob for p in e.top_logprobs], [v for _, v in top], atol=2e-3)
    s = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0, logprobs=True,
                                   top_logprobs=2, stream=True)
    streamed = [e for c in s if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
