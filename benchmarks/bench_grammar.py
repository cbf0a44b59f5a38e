"""What constrained decoding costs per decode step (issue #23): B sequences decoded together through the
Engine, without a grammar and with a JSON-schema grammar on every row (serve/grammar.py, llguidance).

    python benchmarks/bench_grammar.py BUNDLE [--batch 1,32] [--tokens 64] [--prompt-tokens 16] \
        [--passes 5] --json OUT

For each B: one untimed pass of each mode, then --passes passes alternating plain, grammar, plain, ...
Each pass adds B prompts of random ids (the same in both modes; drawn again, up to MAX_REDRAWS times, while
some row's plain greedy answer ends before --tokens, so both modes decode full batches), greedy, --tokens
each; its first engine step (the prefill and the first decode) is left out, the decode steps after it
timed. The schema (an array of at least --tokens small objects) cannot be complete within --tokens, so
grammar rows run to their length too.

Reported per B, each as median and spread over the passes (bench.method.spread):
* step_ms: the decode step, plain and grammar (where the runner pipelines, grammar rows are launched
  ahead too: their masks are computed on the host while the device runs the step);
* mask_compute_ms: llguidance filling every row's mask in one call (Grammars.masks), per step;
* mask_apply_ms: the packed masks to the device and one where over [B, V] (apply_token_masks), per step,
  timed apart on this B and the model's vocabulary;
* overhead: (grammar step - plain step) / plain step, per pass pair; and compute and apply over the plain
  step; per-token figures are the per-step ones divided by B.
Plus machine metadata (bench.method.metadata). Issue #23's goal: overhead under 0.05 on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

GOAL = 0.05  # the bound on the grammar's share of a decode step
MAX_REDRAWS = 20  # tries to find prompts whose plain greedy answers all run to --tokens


def schema(tokens: int) -> dict:
    """JSON that needs more than `tokens` tokens to complete (every item is at least 9 characters)."""
    item = {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}
    return {"type": "object", "properties": {"items": {"type": "array", "items": item, "minItems": tokens}},
            "required": ["items"], "additionalProperties": False}


class TimedMasker:
    """A Grammars' `masks`, timed: the engine calls it once per step for every grammar row."""

    def __init__(self, grammars):
        self.grammars, self.seconds, self.calls = grammars, 0.0, 0

    def masks(self, states, generated):
        t0 = time.perf_counter()
        out = self.grammars.masks(states, generated)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_pass(engine, prompts, tokens: int, grammars=None, grammar: str | None = None) -> dict:
    """One pass: decode step seconds (prefill left out), steps, tokens, and with a grammar its mask seconds."""
    from flashmoe.runtime.sampling import SamplingParams
    from flashmoe.serve.grammar import GrammarMask

    timed = TimedMasker(grammars) if grammar is not None else None
    order = {}
    for ids in prompts:
        g = GrammarMask(grammars.mask(grammar).matcher, timed) if timed else None
        order[engine.add(ids, SamplingParams(max_tokens=tokens, temperature=0.0, grammar=g))] = len(order)
    finish = [None] * len(prompts)
    engine.step()  # prefill and the first token of every row
    if timed:
        timed.seconds, timed.calls = 0.0, 0
    steps = produced = 0
    reasons: dict[str, int] = {}
    t0 = time.perf_counter()
    while engine.has_work():
        for ev in engine.step():
            produced += ev.token is not None
            if ev.finish_reason:
                reasons[ev.finish_reason] = reasons.get(ev.finish_reason, 0) + 1
                finish[order[ev.seq_id]] = ev.finish_reason
        steps += 1
    dt = time.perf_counter() - t0
    return {"seconds": dt, "steps": steps, "tokens": produced, "finish": reasons, "rows": finish,
            "mask_seconds": timed.seconds if timed else None, "mask_calls": timed.calls if timed else None}


def apply_seconds(grammars, grammar: str, B: int, V: int, steps: int) -> float:
    """Seconds per step of apply_token_masks on [B, V] (real masks of this grammar), synced each step."""
    import mlx.core as mx

    from flashmoe.runtime.sampling import apply_token_masks

    words = grammars.masks([grammars.mask(grammar) for _ in range(B)], [[] for _ in range(B)])
    logits = mx.random.normal((B, V)).astype(mx.bfloat16)
    mx.eval(apply_token_masks(logits, words))
    t0 = time.perf_counter()
    for _ in range(steps):
        mx.eval(apply_token_masks(logits, words))
    return (time.perf_counter() - t0) / steps


def bench(bundle: str, batches: list[int], tokens: int, prompt_tokens: int, passes: int, log=print) -> dict:
    import flashmoe
    from flashmoe.bench.method import metadata, spread
    from flashmoe.runtime.engine import Engine
    from flashmoe.serve.grammar import Grammars, json_schema_grammar

    model, tok = flashmoe.load(bundle)
    V = int(model.config.vocab_size)
    engine = Engine(model, tok, max_batch=max(batches))
    grammars = Grammars((Path(model.bundle.path) / "tokenizer.json").read_text(), V, sorted(engine.eos))
    grammar = grammars.compile(json_schema_grammar(schema(tokens)), "bench schema")
    rng = np.random.default_rng(0)
    eos = set(engine.eos)
    out = {"bundle": str(bundle), "tokens": tokens, "prompt_tokens": prompt_tokens, "passes": passes,
           "vocab": V, "goal": GOAL, "pipelined": bool(engine.runner.pipelined), "batches": {}}
    for B in batches:
        def draw():
            return [int(t) for t in rng.integers(0, V, prompt_tokens) if int(t) not in eos] or [0]

        prompts = [draw() for _ in range(B)]
        for _ in range(MAX_REDRAWS):  # untimed: warm up; prompts whose greedy answer ends early drawn again
            stopped = [i for i, r in enumerate(run_pass(engine, prompts, tokens)["rows"]) if r != "length"]
            if not stopped:
                break
            for i in stopped:
                prompts[i] = draw()
        run_pass(engine, prompts, tokens, grammars, grammar)
        plain, gram = [], []
        for _ in range(passes):
            plain.append(run_pass(engine, prompts, tokens))
            gram.append(run_pass(engine, prompts, tokens, grammars, grammar))
        apply = [apply_seconds(grammars, grammar, B, V, max(1, p["steps"])) for p in gram]
        ms = 1e3
        p_step = [p["seconds"] / p["steps"] * ms for p in plain]
        g_step = [g["seconds"] / g["steps"] * ms for g in gram]
        compute = [g["mask_seconds"] / max(1, g["mask_calls"]) * ms for g in gram]
        apply_ms = [a * ms for a in apply]
        row = {"B": B,
               "plain_step_ms": spread(p_step), "grammar_step_ms": spread(g_step),
               "mask_compute_ms": spread(compute), "mask_apply_ms": spread(apply_ms),
               "mask_compute_ms_per_token": spread([c / B for c in compute]),
               "mask_apply_ms_per_token": spread([a / B for a in apply_ms]),
               "overhead": spread([(g - p) / p for p, g in zip(p_step, g_step)]),
               "compute_over_step": spread([c / p for p, c in zip(p_step, compute)]),
               "apply_over_step": spread([a / p for p, a in zip(p_step, apply_ms)]),
               "plain_tokens": [p["tokens"] for p in plain], "grammar_tokens": [g["tokens"] for g in gram],
               "grammar_finish": gram[-1]["finish"], "steps": [g["steps"] for g in gram]}
        row["within_goal"] = row["overhead"]["median"] is not None and row["overhead"]["median"] < GOAL
        out["batches"][str(B)] = row
        log(f"B={B}: step {row['plain_step_ms']['median']:.2f} ms plain, {row['grammar_step_ms']['median']:.2f} ms "
            f"grammar (overhead {row['overhead']['median']:+.1%}); mask compute {row['mask_compute_ms']['median']:.3f} ms, "
            f"apply {row['mask_apply_ms']['median']:.3f} ms per step")
    out["metadata"] = metadata(bundle, model)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle")
    p.add_argument("--batch", default="1,32", help="batch sizes, comma separated")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--json", dest="json_out", help="write the report here (a new file)")
    a = p.parse_args(argv)
    try:
        batches = [int(v) for v in a.batch.split(",") if v.strip()]
    except ValueError:
        print(f"error: --batch must be whole numbers separated by commas (got {a.batch!r})", file=sys.stderr)
        return 2
    if not batches or min(batches) < 1 or a.tokens < 2 or a.prompt_tokens < 1 or a.passes < 1:
        print("error: --batch sizes, --prompt-tokens and --passes must be at least 1, --tokens at least 2",
              file=sys.stderr)
        return 2
    if a.json_out and os.path.lexists(a.json_out):
        print(f"error: {a.json_out} exists; give a new path", file=sys.stderr)
        return 2
    out = bench(a.bundle, batches, a.tokens, a.prompt_tokens, a.passes)
    if a.json_out:
        tmp = Path(a.json_out).with_name(Path(a.json_out).name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, a.json_out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
