"""Warm decode, every expert resident, against mlx-lm on the same weights in the same process (issue #18).

    python benchmarks/bench_warm.py BUNDLE [--prompt-tokens 512] [--tokens 256] [--passes 10] [--batch 8,32] \
        [--batch-tokens 64] [--batch-passes 5] [--budget-s S] [--peer-dir DIR] --json OUT
    python benchmarks/bench_warm.py BUNDLE --peer-dir DIR --export-only     # the mlx-lm copy, once per machine

* single stream: `flashmoe.generate` (greedy: optimistic and pipelined, the path users get) and mlx-lm's
  generate_step, each decoding --tokens after the same --prompt-tokens random prompt, in --passes
  interleaved passes after one untimed pass of each (pass 0: kernels compile, experts are read into the cache).
  The order alternates (flashmoe first in odd passes, mlx-lm first in even ones). Reported: each engine's
  decode and prefill tok/s and the per-pass ratio (pass i of flashmoe over pass i of mlx-lm), median and
  spread (bench/method.py).
* agreement (after pass 0): the logits of one teacher-forced forward over prompt + flashmoe's tokens on both
  engines: max |difference| D (against the largest |logit|), and each engine's top-2 margin at every
  generated position. The greedy tokens agree when they are equal up to the first position where either
  engine's margin is at most D (past it the two may rightly differ: a different argmax at a position needs
  one engine's margin <= the logit difference there).
* batches: B sequences of --prompt-tokens random ids, --batch-tokens each, greedy (both stop at an EOS
  token alike), through flashmoe's Engine and mlx-lm's BatchGenerator, same prompts and weights; aggregate
  decode tok/s after every sequence has its first token, one untimed pass then --batch-passes passes, the
  batch sizes interleaved within a pass and the order alternating between passes; per-pass ratio.
* --budget-s: seconds from this process's start. The first min(5, --passes) single-stream passes run while
  they fit at all; then the batch sizes' untimed passes (each measures what a timed pass costs); further
  single-stream passes run only while they leave room for every timed batch pass; batch passes run while
  they fit. What a budget cut is said in `notes` and on stderr.
* The JSON is written (by a rename) after every pass with "partial": true until the run is complete, so a
  run stopped from outside still leaves its raw figures.

The expert cache holds every expert (--slots default: layers x experts). Time on an H200 at the 40-layer 35B
shapes (~30-36 tok/s both): ~8 s per arm per pass (512-token prompt, 256 tokens), so 10 passes + pass 0 take
~3 minutes; the B=8/B=32 rows (64 tokens, 1 + 5 passes) ~1.5-2 minutes; loading both models and reading the
20 GB of experts ~1 minute; exporting the mlx-lm copy (20 GB written) is done beforehand with --export-only.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T0 = time.monotonic()  # --budget-s counts from here


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


class Budget:
    """Seconds left of --budget-s (None: no limit), counted from the process's start."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - T0

    def fits(self, cost: float) -> bool:
        return self.seconds is None or self.elapsed() + cost <= self.seconds


class Report:
    """The run's JSON, written whole by a rename after every change worth keeping (`save`)."""

    def __init__(self, path: str | None, data: dict):
        self.path = Path(path) if path else None
        self.data = data

    def save(self) -> None:
        from flashmoe.format.files import write_file

        if self.path is None:
            return
        self.data["elapsed_s"] = round(time.monotonic() - T0, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_file(self.path, (json.dumps(self.data, indent=1, default=float) + "\n").encode())


# ---- the two engines ------------------------------------------------------------------------------
def flashmoe_single(model, tok, prompt: list[int], tokens: int) -> dict:
    import flashmoe

    chunks = list(flashmoe.generate(model, tok, prompt, max_tokens=tokens + 1, chat_template=False))
    st = chunks[-1].stats
    return {"decode_tps": st["decode_tps"], "prefill_tps": st["prefill_tps"],
            "tokens": [c.token for c in chunks if c.token is not None]}


def mlx_lm_single(peer, prompt: list[int], tokens: int) -> dict:
    import mlx.core as mx

    from flashmoe.bench.peer import mlx_lm_decode

    r = mlx_lm_decode(peer, mx.array(prompt), tokens)
    return {"decode_tps": r["decode_tps"], "prefill_tps": len(prompt) / r["prefill_s"], "tokens": r["tokens"]}


def flashmoe_batch(model, tok, prompts: list[list[int]], tokens: int) -> dict:
    """Aggregate decode tok/s of flashmoe's Engine over these prompts (greedy, `tokens` each): tokens made
    after every sequence has its first one, over the time since."""
    from flashmoe.runtime.engine import Engine, EngineConfig, SamplingParams

    B = len(prompts)
    engine = Engine(model, tok, EngineConfig(max_batch=B))
    t0 = time.perf_counter()
    for p in prompts:
        engine.add(p, SamplingParams(max_tokens=tokens))
    started, after, t_first = set(), 0, None
    while engine.has_work():
        for ev in engine.step():
            if ev.token is None:
                continue
            after += t_first is not None
            started.add(ev.seq_id)
        if t_first is None and len(started) == B:
            t_first = time.perf_counter()
    dt = time.perf_counter() - t_first
    return {"decode_tok_s": after / dt if dt > 0 else None, "tokens": after, "prefill_s": t_first - t0}


def mlx_lm_batch(peer, prompts: list[list[int]], tokens: int, eos: list[int]) -> dict:
    """The same for mlx-lm's BatchGenerator (greedy, stopping at the same EOS ids; an EOS is not counted,
    as flashmoe does not output it)."""
    from mlx_lm.generate import BatchGenerator

    B = len(prompts)
    gen = BatchGenerator(peer, max_tokens=tokens, stop_tokens=[[e] for e in eos], completion_batch_size=B,
                         prefill_batch_size=B)
    t0 = time.perf_counter()
    gen.insert(prompts, [tokens] * B)
    seen, done, after, t_first = set(), 0, 0, None
    while done < B:
        _, responses = gen.next()
        for r in responses:
            after += t_first is not None and r.token not in eos
            seen.add(r.uid)
            done += r.finish_reason is not None
        if t_first is None and len(seen) == B:
            t_first = time.perf_counter()
    dt = time.perf_counter() - t_first
    gen.close()
    return {"decode_tok_s": after / dt if dt > 0 else None, "tokens": after, "prefill_s": t_first - t0}


# ---- agreement ------------------------------------------------------------------------------------
def logits_check(model, peer, ids: list[int], start: int) -> tuple[dict, np.ndarray]:
    """Teacher-forced logits of both engines over `ids`: max |difference| over every position, and each
    position's smaller top-2 margin of the two engines from `start` on (returned apart)."""
    import mlx.core as mx

    a = model(mx.array([ids]), model.make_cache()).astype(mx.float32)[0]
    b = peer(mx.array([ids])).astype(mx.float32)[0]
    diff = float(mx.max(mx.abs(a - b)).item())
    scale = float(mx.max(mx.abs(b)).item())
    agree = float(mx.mean((mx.argmax(a, -1) == mx.argmax(b, -1)).astype(mx.float32)).item())

    def margin(x):
        top = mx.topk(x[start:], 2, axis=-1)
        return mx.max(top, -1) - mx.min(top, -1)

    margins = np.array(mx.minimum(margin(a), margin(b)))
    return {"positions": len(ids), "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "relative": diff / scale if scale else None, "argmax_agreement": agree}, margins


def agreement(ours: list[int], theirs: list[int], margins: np.ndarray, diff: float) -> dict:
    """Greedy tokens of both engines, equal up to the first position whose margin (the smaller of the two
    engines' top-2 margins, teacher-forced) is at most the logit difference `diff`."""
    n = min(len(ours), len(theirs), len(margins))
    first = next((i for i in range(n) if ours[i] != theirs[i]), None)
    low = next((i for i in range(n) if margins[i] <= diff), None)
    return {"lengths": [len(ours), len(theirs)], "compared": n, "equal_share": sum(a == b for a, b in zip(ours[:n], theirs[:n])) / n if n else None,
            "first_difference": first, "first_margin_at_most_diff": low,
            "min_margin": float(margins[:n].min()) if n else None,
            "checked_positions": n if low is None else low,
            "agree": first is None or (low is not None and low <= first)}


# ---- the run --------------------------------------------------------------------------------------
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="decoded tokens per single-stream pass (default 256)")
    ap.add_argument("--passes", type=int, default=10, help="interleaved single-stream passes (default 10)")
    ap.add_argument("--batch", type=_sizes, default=[8, 32], help="batch sizes against BatchGenerator (default 8,32)")
    ap.add_argument("--batch-tokens", type=int, default=64)
    ap.add_argument("--batch-passes", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting passes that would end past this many "
                    "seconds from the start (default: no limit)")
    ap.add_argument("--peer-dir", default=None, help="keep the mlx-lm copy here and reuse it (default: a temporary "
                    "directory beside the bundle, removed at the end)")
    ap.add_argument("--export-only", action="store_true", help="write --peer-dir and stop")
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots (default: every expert)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    for name in ("prompt_tokens", "tokens", "passes", "batch_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.batch_passes < 0 or any(b < 1 for b in a.batch):
        ap.error("--batch sizes must be >= 1 and --batch-passes >= 0")
    if a.export_only and not a.peer_dir:
        ap.error("--export-only needs --peer-dir")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    # `timeout` stops a run with SIGTERM: exit through the finally blocks (an unfinished export is removed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from flashmoe.bench.peer import export_once
    from flashmoe.errors import FlashmoeError
    from flashmoe.format import Bundle

    try:
        b = Bundle.open(a.bundle)
        if a.export_only:
            path, reused = export_once(b, Path(a.peer_dir))
            log(f"mlx-lm copy {'already in' if reused else 'written to'} {path}")
            return 0
        tmp = None if a.peer_dir else tempfile.TemporaryDirectory(prefix="flashmoe-peer-", dir=Path(a.bundle).parent)
        try:
            return run(a, b, Path(a.peer_dir) if a.peer_dir else Path(tmp.name) / "peer")
        finally:
            if tmp is not None:
                tmp.cleanup()
    except FlashmoeError as e:
        print(f"bench_warm: {e}", file=sys.stderr)
        return 2


def run(a, b, peer_dir: Path) -> int:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    import flashmoe
    from flashmoe.bench import method
    from flashmoe.bench.peer import export_once
    from flashmoe.runtime.text import eos_ids

    budget = Budget(a.budget_s)
    cfg = b.config
    slots = a.slots or cfg.num_hidden_layers * cfg.num_experts
    model, tok = flashmoe.load(a.bundle, slots=slots)
    model.stats.enabled = False
    log(f"flashmoe loaded ({cfg.num_hidden_layers} layers, {slots} expert slots)")
    _, reused = export_once(b, peer_dir)
    log(f"mlx-lm copy {'reused from' if reused else 'exported to'} {peer_dir}")
    peer, _ = load_model(peer_dir)
    mx.eval(peer.parameters())
    log("mlx-lm loaded")
    eos = sorted(eos_ids(tok, cfg))
    rng = np.random.default_rng(a.seed)
    hi = min(cfg.vocab_size, 259)  # ids every tokenizer of a synthetic bundle has
    prompt = rng.integers(3, hi, size=a.prompt_tokens).tolist()
    batch_prompts = {B: rng.integers(3, hi, size=(B, a.prompt_tokens)).tolist() for B in a.batch}
    rep = Report(a.json, {
        "partial": True, "metadata": method.metadata(a.bundle, model), "bundle": a.bundle,
        "layers": cfg.num_hidden_layers, "prompt_tokens": a.prompt_tokens, "tokens": a.tokens,
        "passes": a.passes, "passes_run": 0, "batch_tokens": a.batch_tokens, "batch_passes": a.batch_passes,
        "budget_s": a.budget_s, "peer_export_reused": reused, "notes": [], "phase_s": {"load": budget.elapsed()}})
    out = rep.data
    arms = {"flashmoe": lambda: flashmoe_single(model, tok, prompt, a.tokens),
            "mlx-lm": lambda: mlx_lm_single(peer, prompt, a.tokens)}
    rows = {k: [] for k in arms}

    first: dict = {}  # pass 0's results per arm

    def single(p: int) -> float:
        t = time.monotonic()
        got = {}
        for name in (("flashmoe", "mlx-lm") if p % 2 else ("mlx-lm", "flashmoe")):
            got[name] = arms[name]()
        if p:
            for name in arms:
                rows[name].append(got[name])
            summarize_single(out, rows)
            out["passes_run"] = p
            rep.save()
        ours, theirs = got["flashmoe"]["decode_tps"], got["mlx-lm"]["decode_tps"]
        log(f"pass {p}{' (untimed)' if not p else ''}: flashmoe {ours:.1f} tok/s, mlx-lm {theirs:.1f} tok/s "
            f"(ratio {ours / theirs:.2f})")
        if not p:
            first.update(got)
            check, margins = logits_check(model, peer, prompt + got["flashmoe"]["tokens"][:-1], a.prompt_tokens - 1)
            out["logits"] = check
            out["greedy_tokens"] = agreement(got["flashmoe"]["tokens"], got["mlx-lm"]["tokens"], margins,
                                             check["max_abs_logit_diff"])
            rep.save()
            g = out["greedy_tokens"]
            log(f"agreement: greedy tokens {'agree' if g['agree'] else 'DISAGREE'} (first difference at "
                f"{g['first_difference']}, first margin <= the logit difference at {g['first_margin_at_most_diff']}); "
                f"max logit difference {check['max_abs_logit_diff']:.3g} of {check['max_abs_logit']:.3g}")
        return time.monotonic() - t

    pass0 = single(0)
    out["phase_s"]["pass0_and_agreement"] = pass0
    timed: list[float] = []
    # a pass's cost: the slowest timed pass so far; before any, pass 0's decode rates (its wall time also holds
    # the kernels' compilation, the first reads of every expert and the logits check: minutes on a GPU)
    guess = 1.5 * sum(a.tokens / g["decode_tps"] + 2.0 for g in first.values())
    cost = lambda: max(timed) if timed else min(pass0, guess)  # noqa: E731
    p = 1
    while p <= min(method.MIN_PASSES, a.passes) and budget.fits(cost()):
        timed.append(single(p))
        p += 1
    batch_cost = {}
    for B in a.batch:  # untimed: compiles the batch shapes and measures what a pass costs
        if not budget.fits(cost()):  # (a guess: no worse than a single-stream pass)
            note(out, f"budget: no B={B} pass fits in --budget-s {a.budget_s:g}")
            continue
        t = time.monotonic()
        flashmoe_batch(model, tok, batch_prompts[B], a.batch_tokens)
        mlx_lm_batch(peer, batch_prompts[B], a.batch_tokens, eos)
        batch_cost[B] = time.monotonic() - t
        log(f"B={B}: untimed pass {batch_cost[B]:.1f} s")
    out["phase_s"]["batch_untimed"] = batch_cost
    reserve = a.batch_passes * sum(batch_cost.values())
    if p <= a.passes:
        log(f"plan: a single-stream pass takes <= {cost():.1f} s, the timed batch passes {reserve:.0f} s"
            + (f", {a.budget_s - budget.elapsed():.0f} s of the budget left" if a.budget_s else ""))
    while p <= a.passes and budget.fits(cost() + reserve):
        timed.append(single(p))
        p += 1
    if out["passes_run"] < a.passes:
        note(out, f"budget: {out['passes_run']} of {a.passes} single-stream passes fit in --budget-s {a.budget_s:g}")
    timed_batches(a, out, rep, budget, batch_prompts, batch_cost, model, tok, peer, eos)
    out["partial"] = False
    rep.save()
    print(summary(out), flush=True)
    model.experts.close()
    return 0


def timed_batches(a, out, rep, budget, prompts, cost, model, tok, peer, eos) -> None:
    from flashmoe.bench import method

    got = {B: {"flashmoe": [], "mlx-lm BatchGenerator": []} for B in cost}
    out["batch"] = []
    for p in range(1, a.batch_passes + 1):
        for B in cost:
            if not budget.fits(cost[B]):
                continue
            arms = {"flashmoe": lambda: flashmoe_batch(model, tok, prompts[B], a.batch_tokens),
                    "mlx-lm BatchGenerator": lambda: mlx_lm_batch(peer, prompts[B], a.batch_tokens, eos)}
            for name in (list(arms) if p % 2 else list(arms)[::-1]):
                got[B][name].append(arms[name]()["decode_tok_s"])
            ours, theirs = got[B]["flashmoe"], got[B]["mlx-lm BatchGenerator"]
            log(f"B={B} pass {p}: flashmoe {ours[-1]:.1f} tok/s, mlx-lm BatchGenerator {theirs[-1]:.1f} tok/s")
            out["batch"] = [{"batch": n, "passes_run": len(g["flashmoe"]),
                             "flashmoe": method.spread(g["flashmoe"]),
                             "mlx-lm BatchGenerator": method.spread(g["mlx-lm BatchGenerator"]),
                             "ratio": method.spread([x / y for x, y in zip(g["flashmoe"], g["mlx-lm BatchGenerator"])])}
                            for n, g in got.items()]
            rep.save()
    for row in out["batch"]:
        if row["passes_run"] < a.batch_passes:
            note(out, f"budget: {row['passes_run']} of {a.batch_passes} B={row['batch']} passes fit in --budget-s "
                      f"{a.budget_s:g}")


def summarize_single(out: dict, rows: dict) -> None:
    from flashmoe.bench import method

    out["tok_s"] = {k: method.spread([r["decode_tps"] for r in v]) for k, v in rows.items()}
    out["prefill_tok_s"] = {k: method.spread([r["prefill_tps"] for r in v]) for k, v in rows.items()}
    out["ratio_vs_mlx_lm"] = method.spread([x["decode_tps"] / y["decode_tps"]
                                            for x, y in zip(rows["flashmoe"], rows["mlx-lm"])])
    out["prefill_ratio_vs_mlx_lm"] = method.spread([x["prefill_tps"] / y["prefill_tps"]
                                                    for x, y in zip(rows["flashmoe"], rows["mlx-lm"])])


def note(out: dict, text: str) -> None:
    out["notes"].append(text)
    log(text)


def summary(out: dict) -> str:
    from flashmoe.bench import method

    f1 = "{:.1f}"
    lines = []
    if "tok_s" in out:
        tps = out["tok_s"]
        lines.append(f"single stream: flashmoe {method.fmt_spread(tps['flashmoe'], f1)} tok/s, mlx-lm "
                     f"{method.fmt_spread(tps['mlx-lm'], f1)}; ratio {method.fmt_spread(out['ratio_vs_mlx_lm'])}; "
                     f"prefill ratio {method.fmt_spread(out['prefill_ratio_vs_mlx_lm'])}")
    g, lg = out["greedy_tokens"], out["logits"]
    share = "-" if g["equal_share"] is None else f"{g['equal_share']:.0%}"
    lines.append(f"greedy tokens {'agree' if g['agree'] else 'DISAGREE'}: equal {share} of "
                 f"{g['compared']}, first difference at {g['first_difference']}, first margin <= the logit difference "
                 f"at {g['first_margin_at_most_diff']}; max logit difference {lg['max_abs_logit_diff']:.3g} of "
                 f"{lg['max_abs_logit']:.3g}")
    for row in out["batch"]:
        lines.append(f"B={row['batch']}: flashmoe {method.fmt_spread(row['flashmoe'], f1)} tok/s, mlx-lm "
                     f"BatchGenerator {method.fmt_spread(row['mlx-lm BatchGenerator'], f1)}; "
                     f"ratio {method.fmt_spread(row['ratio'])}")
    return "\n".join(lines + out["notes"])


if __name__ == "__main__":
    sys.exit(main())
