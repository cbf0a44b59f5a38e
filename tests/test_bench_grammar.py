"""Grammar rows in batched steps (issue #23) on a `flashmoe-bench make` bundle (byte tokenizer, random
weights): each row keeps its own grammar state, a step's masks come from one batch call, rows without a
grammar decode exactly as they do alone; and benchmarks/bench_grammar.py reports every field on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from test_bench import SMALL

from flashmoe.bench.synth import make_bundle

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bg") / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    return out


class CountingMasker:
    def __init__(self, grammars):
        self.grammars, self.calls = grammars, []

    def masks(self, states, generated):
        self.calls.append(len(states))
        return self.grammars.masks(states, generated)


def test_grammar_rows_masked_together_and_plain_rows_untouched(bundle):
    import flashmoe
    from flashmoe.runtime.engine import Engine
    from flashmoe.runtime.sampling import SamplingParams
    from flashmoe.serve.grammar import GrammarMask, Grammars, json_schema_grammar

    model, tok = flashmoe.load(str(bundle))
    engine = Engine(model, tok, max_batch=8)
    grammars = Grammars((Path(bundle) / "tokenizer.json").read_text(), int(model.config.vocab_size),
                        sorted(engine.eos))
    grammar = grammars.compile(json_schema_grammar(SCHEMA), "t")
    counting = CountingMasker(grammars)
    prompts = [tok.encode(t) for t in ("alpha beta", "gamma", "delta epsilon", "zeta")]

    def run(with_grammar: list[bool]) -> list[list[int]]:
        sids = [engine.add(ids, SamplingParams(max_tokens=24, grammar=GrammarMask(
            grammars.mask(grammar).matcher, counting) if g else None)) for ids, g in zip(prompts, with_grammar)]
        out = {}
        while engine.has_work():
            for ev in engine.step():
                if ev.finish_reason:
                    out[ev.seq_id] = (ev.tokens, ev.finish_reason)
        return [out[s] for s in sids]

    alone = run([False] * 4)
    mixed = run([False, True, False, True])
    assert [mixed[0], mixed[2]] == [alone[0], alone[2]]  # rows without a grammar: the same greedy tokens
    for tokens, finish in (mixed[1], mixed[3]):
        assert finish == "stop"  # the grammar completed, then only EOS was allowed
        jsonschema.validate(json.loads(tok.decode(tokens)), SCHEMA)
    assert counting.calls and max(counting.calls) == 2  # both grammar rows' masks in one call per step
    assert mixed[1] != alone[1] or mixed[3] != alone[3]  # the random model alone writes no such JSON


def test_bench_grammar_reports_every_field(bundle, tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_grammar.py"), str(bundle), "--batch", "1,3",
           "--tokens", "8", "--prompt-tokens", "6", "--passes", "5", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["metadata"]["cpu"] and d["metadata"]["git_commit"] is not None and "settings" in d["metadata"]
    for b in ("1", "3"):
        row = d["batches"][b]
        for k in ("plain_step_ms", "grammar_step_ms", "mask_compute_ms", "mask_apply_ms", "overhead",
                  "compute_over_step", "apply_over_step", "mask_compute_ms_per_token", "mask_apply_ms_per_token"):
            assert row[k]["n"] == 5 and row[k]["enough"], (b, k)
        assert row["mask_compute_ms"]["min"] > 0 and row["mask_apply_ms"]["min"] > 0
        assert row["grammar_finish"] == {"length": int(b)}  # every grammar row decoded all its tokens
        assert row["plain_tokens"] == row["grammar_tokens"] == [int(b) * 6] * 5  # 8 - the 2 of the first step
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # never overwrites a file
    assert again.returncode == 2 and "exists" in again.stderr
