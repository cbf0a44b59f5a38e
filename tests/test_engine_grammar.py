"""Grammar rows in the pipelined decode (runtime/engine.py): a grammar row's mask depends only on the tokens
already taken, so the engine computes it on the host while the device runs the step and launches the next
step on the masked choice. The tokens equal the synced path's (host routing), greedy and sampled, alone
and batched with rows that have no grammar, including steps that missed the expert cache and ran again."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from test_engine import prompts_of, run_engine

pytest.importorskip("llguidance")

from flashmoe.runtime.engine import Engine  # noqa: E402
from flashmoe.runtime.sampling import SamplingParams  # noqa: E402

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "n"], "additionalProperties": False}


def _grammars(model, engine):
    from flashmoe.serve.grammar import Grammars, json_schema_grammar

    g = Grammars((Path(model.bundle.path) / "tokenizer.json").read_text(), int(model.config.vocab_size),
                 sorted(engine.eos))
    text = g.compile(json_schema_grammar(SCHEMA), "response_format")
    return lambda: g.mask(text)


def _entries(make_mask, ps):
    """Grammar rows (greedy and seeded sampled) beside rows without one."""
    return [(ps[0], SamplingParams(max_tokens=40, grammar=make_mask())),
            (ps[1], SamplingParams(max_tokens=8)),
            (ps[2], SamplingParams(max_tokens=40, temperature=0.9, seed=5, grammar=make_mask())),
            (ps[3], SamplingParams(max_tokens=8, temperature=0.8, seed=9))]


def test_pipelined_grammar_rows_equal_synced_rows(loaded, corpus_ids):
    plain, tok = loaded(8, slots=16)  # host routing: every step synced
    fast, _ = loaded(8, slots=64)  # the optimistic path: steps launched ahead
    assert fast.experts.optimistic and not plain.experts.optimistic
    ps = prompts_of(corpus_ids)[:4]
    e_plain = Engine(plain, tok)
    want = run_engine(e_plain, _entries(_grammars(plain, e_plain), ps))
    fast.experts.clear_cache()
    e_fast = Engine(fast, tok)
    make = _grammars(fast, e_fast)
    sids = [e_fast.add(ids, p) for ids, p in _entries(make, ps)]
    toks = {s: [] for s in sids}
    texts = {s: [] for s in sids}
    m0, h0, steps, ahead = fast.experts.optimistic_misses, fast.experts.optimistic_hits, 0, 0
    while e_fast.has_work():
        for ev in e_fast.step():
            texts[ev.seq_id].append(ev.text)
            if ev.token is not None:
                toks[ev.seq_id].append(ev.token)
        ahead += e_fast._ahead is not None
        steps += 1
        if steps in (3, 6):  # steps launched from here on miss, run again and choose again
            fast.experts.clear_cache()
    assert [toks[s] for s in sids] == [w[0] for w in want]
    assert ahead >= 3, "grammar rows must not stop the engine from launching ahead"
    assert fast.experts.optimistic_misses > m0 and fast.experts.optimistic_hits > h0
    for i in (0, 2):  # the grammar rows' answers parse and validate
        jsonschema.validate(json.loads("".join(texts[sids[i]])), SCHEMA)


@pytest.mark.parametrize("B,V", [(1, 100), (3, 257), (32, 1000)])
def test_token_masks_match_numpy_bit_order(B, V):
    """apply_token_masks (compiled, on the device) against numpy's unpacking: token t is bit t % 32 of
    word t // 32, little-endian; disallowed tokens are -inf, allowed ones keep their logit."""
    import mlx.core as mx
    import numpy as np

    from flashmoe.runtime.sampling import apply_token_masks

    rng = np.random.default_rng(B * V)
    words = rng.integers(-2**31, 2**31 - 1, size=(B, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal((B, V)).astype(np.float32)
    bits = np.unpackbits(words.view(np.uint8).reshape(B, -1), bitorder="little", axis=1)[:, :V].astype(bool)
    got = np.array(apply_token_masks(mx.array(logits), words))
    assert (got == np.where(bits, logits, -np.inf)).all()
