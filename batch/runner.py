"""run_jobs: a batch job through the continuous-batching Engine, resumable from its output file.

    import flashmoe
    from flashmoe.batch import JobOptions, run_jobs
    model, tokenizer = flashmoe.load(bundle)
    summary = run_jobs(model, tokenizer, "in.jsonl", "out.jsonl", JobOptions(batch_size=None))

Every request is tokenized up front (bad ones become error lines at once), then submitted to the Engine
longest prompt first in waves (batch.passes): as many documents as the engine's memory plan admits
prefill together and decode together, so that the job needs as few passes over the experts as it can;
rows that finish early are refilled by the next wave once half the batch is free. Each sequence's output
does not depend on its batch mates (the engine's guarantee) nor on the order, so the order is free.
Before starting, the job prints how many passes over the experts it needs at most; the progress bar
counts them and, from the time the passes took so far, says when the job will end.
"""

from __future__ import annotations

import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flashmoe.errors import CapacityError, FlashmoeError, InputError

from .journal import OutputLog
from .output import answer_record, error_record
from .passes import Plan, PrefillCost, Room, Waves, plan
from .progress import JobProgress, PassClock
from .requests import BadLine, Defaults, Request, parse_lines


@dataclass(frozen=True)
class JobOptions:
    defaults: Defaults = field(default_factory=Defaults)  # sampling defaults, system prompt, prompt template
    batch_size: int | None = None  # sequences decoded together; None: the engine's memory plan
    memory_budget_gb: float | None = None  # None: the engine's default share of free memory
    model_name: str = "flashmoe"  # the "model" field of each response body
    progress: bool = True  # the tqdm bar on stderr


@dataclass
class JobSummary:
    total: int = 0  # requests in the input
    done: int = 0  # answered by this run
    failed: int = 0  # error lines written by this run
    skipped: int = 0  # already in the output from an earlier run
    dropped_bytes: int = 0  # a torn last line an interrupted run left, removed
    wall_s: float = 0.0
    prompt_tokens: int = 0  # prefilled by this run
    generated_tokens: int = 0
    expert_bytes: int = 0  # expert bytes read by this run
    prefill_s: float = 0.0  # engine steps that prefilled (they decode running rows too)
    decode_s: float = 0.0  # engine steps that only decoded
    decode_only_tokens: int = 0  # tokens generated in decode-only steps
    max_batch: int = 0  # the engine's cap on rows at once (its memory plan admits within it)
    plan: str = ""
    planned: Plan = Plan(0, 0, 0)  # passes over the experts this run needs at most (batch.passes)
    prefill_passes: int = 0  # passes this run made: prefill forwards
    decode_passes: int = 0  # and decode steps

    @property
    def passes(self) -> int:
        return self.prefill_passes + self.decode_passes

    @property
    def docs_per_hour(self) -> float:
        return self.done / self.wall_s * 3600 if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["planned"] = dict(d["planned"], passes=self.planned.passes)
        d.update(passes=self.passes, docs_per_hour=self.docs_per_hour,
                 prefill_tps=self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0,
                 decode_tps=self.decode_only_tokens / self.decode_s if self.decode_s > 0 else 0.0,
                 expert_bytes_per_doc=self.expert_bytes / self.done if self.done else 0.0)
        return d

    def line(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.skipped} skipped (answered earlier) of {self.total}"
                f" in {self.wall_s:.1f} s ({self.docs_per_hour:.0f} docs/hour, {self.passes} passes of at most "
                f"{self.planned.passes} planned)")


def read_lines(source) -> list[bytes]:
    """A path, raw bytes, or a list of str/bytes lines."""
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes().split(b"\n")
    if isinstance(source, bytes):
        return source.split(b"\n")
    return list(source)


def _prepare(req: Request, tokenizer, limit: int, vocab: int):
    """(token ids, SamplingParams) for a request, or a BadLine saying what is wrong with it: every failure
    (validation, tokenization, the chat template) is this line's error line, never the job's."""
    try:
        return _prepare_checked(req, tokenizer, limit, vocab)
    except Exception as e:
        return _bad(req, f"cannot be tokenized ({type(e).__name__}: {e})", "invalid_prompt")


def _prepare_checked(req: Request, tokenizer, limit: int, vocab: int):
    from flashmoe.runtime.engine import SamplingParams
    from flashmoe.runtime.generate import prompt_ids

    s = req.sampling
    try:
        params = SamplingParams(max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                top_k=s["top_k"], seed=s["seed"], stop=tuple(s["stop"]))
        params.check()
    except FlashmoeError as e:
        return _bad(req, e, "invalid_sampling")
    if req.chat and not tokenizer.chat_template:
        return _bad(req, "the bundle has no chat template; send /v1/completions requests (raw text) instead",
                    "no_chat_template")
    try:
        ids = prompt_ids(tokenizer, req.prompt, chat_template=req.chat)
    except FlashmoeError as e:
        return _bad(req, e, "invalid_prompt")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        return _bad(req, f"token id {bad} is not in the model's vocabulary (ids 0 to {vocab - 1})", "invalid_prompt")
    if len(ids) >= limit:
        return _bad(req, f"the prompt is {len(ids)} tokens, past the context limit of {limit} tokens; "
                         "shorten it", "context_length_exceeded")
    return array("i", ids), params


def _bad(req: Request, e, code: str) -> BadLine:
    return BadLine(req.line, req.custom_id, code, f"line {req.line}: {' '.join(str(e).split())}")


def _check_same_input(log: OutputLog, by_line: dict[int, Request | BadLine]) -> None:
    for n, cid in log.done.items():
        item = by_line.get(n)
        if item is None or item.custom_id != cid:
            have = "no request" if item is None else f"custom_id {item.custom_id!r}"
            raise InputError(f"{log.path} was written for a different input: it answers line {n} with custom_id "
                             f"{cid!r}, but the input has {have} there. Resume with the same input, or give a new -o")


def run_jobs(model, tokenizer, source, output, options: JobOptions = JobOptions(), engine=None) -> JobSummary:
    """Answer every request of `source` (a JSONL path, bytes or a list of lines) into `output` (a path, or an
    OutputLog already open; JSONL in the OpenAI Batch output format), resuming whatever an earlier run on
    the same output finished. `engine`: an Engine built on `model` to use instead of a new one."""
    if isinstance(output, OutputLog):
        return _run(model, tokenizer, source, output, options, engine)
    with OutputLog(output) as log:
        return _run(model, tokenizer, source, log, options, engine)


def _run(model, tokenizer, source, log: OutputLog, options: JobOptions, engine) -> JobSummary:
    t0 = time.perf_counter()
    items = parse_lines(read_lines(source), options.defaults, model.config.vocab_size)
    by_line = {it.line: it for it in items}
    _check_same_input(log, by_line)
    todo = [it for it in items if it.line not in log.done]
    summary = JobSummary(total=len(items), skipped=len(items) - len(todo), dropped_bytes=log.dropped_bytes)
    if engine is None:
        from flashmoe.runtime.engine import Engine

        engine = Engine(model, tokenizer, max_batch=options.batch_size, memory_budget_gb=options.memory_budget_gb)
    summary.max_batch, summary.plan = engine.max_batch, engine.plan.describe()
    limit = model.config.max_position_embeddings

    errors, ready = [], []
    for it in todo:
        if isinstance(it, BadLine):
            errors.append(it)
            continue
        r = _prepare(it, tokenizer, limit, model.config.vocab_size)
        if isinstance(r, BadLine):
            errors.append(r)
        else:
            ready.append((it, *r))
    # longest first: similar lengths prefill together, and the longest documents do not form the tail
    ready.sort(key=lambda r: -len(r[1]))
    log.append([error_record(b) for b in errors])
    summary.failed = len(errors)

    room = Room(engine.max_batch, engine.plan)
    cost = engine.runner.prefill_passes  # the runner's prefill: passes of a wave's prompts
    summary.planned = plan([(len(ids), min(params.max_tokens, limit - len(ids))) for _, ids, params in ready],
                           room, cost)  # (the engine's cap on max_tokens: the context)
    if options.progress and ready:
        p = summary.planned
        print(f"flashmoe-batch: {len(ready)} documents to answer in {p.waves} wave(s), at most {p.passes} passes over "
              f"the experts ({p.prefill} prefill, {p.decode} decode; fewer when answers stop early); estimated "
              "finish: estimating until a pass is timed. The bar counts passes", file=sys.stderr, flush=True)
    progress = JobProgress(summary, PassClock(), enabled=options.progress)
    total = lambda r: len(r[1]) + min(r[2].max_tokens, limit - len(r[1]))  # noqa: E731 - a row's size in the plan
    try:
        _drive(engine, deque(ready), Waves(room, total), cost, log, summary, progress, options.model_name)
    finally:
        progress.close()
        summary.wall_s = time.perf_counter() - t0
    return summary


def _drive(engine, queue: deque, waves: Waves, cost: PrefillCost, log: OutputLog, summary: JobSummary,
           progress: JobProgress, model_name: str) -> None:
    """Documents join in waves (prefilled together, then decoded with the rows already running); every
    finished answer is written (and fsync'd) in the step it finishes."""
    running: dict[int, tuple[Request, int, list[str]]] = {}  # in the engine: waiting or running
    totals: dict[int, int] = {}  # each one's size in the memory plan (prompt + max_tokens)
    waiting: deque[tuple[int, int]] = deque()  # (seq id, prompt tokens) added and not yet prefilled
    c0 = dict(engine.counters)
    while queue or running:
        records = []
        for doc in waves.take(queue, list(totals.values())):
            req, ids, params = doc
            try:
                sid = engine.add(ids.tolist(), params, tag=req.line)
            except Exception as e:  # the engine's own checks (one sequence past the memory budget): this line's
                code = "capacity" if isinstance(e, CapacityError) else "invalid_request"  # error, not the job's
                records.append(error_record(_bad(req, e if isinstance(e, FlashmoeError) else
                                                 f"{type(e).__name__}: {e}", code)))
                summary.failed += 1
                continue
            running[sid] = (req, len(ids), [])
            totals[sid] = waves.total(doc)
            waiting.append((sid, len(ids)))
        if running:
            was_running = len(running) - len(waiting)
            before = engine.counters["prompt_tokens"]
            gen_before = engine.counters["generated_tokens"]
            t = time.perf_counter()
            events = engine.step()
            dt = time.perf_counter() - t
            c = engine.counters
            joined = [waiting.popleft() for _ in range(len(waiting) - c["waiting"])]  # the engine admits in order
            if c["prompt_tokens"] > before:
                summary.prefill_s += dt
            else:
                summary.decode_s += dt
                summary.decode_only_tokens += c["generated_tokens"] - gen_before
            finals = {ev.seq_id: ev for ev in events if ev.finish_reason is not None}
            joined_ids = {sid for sid, _ in joined}
            decoded = int(was_running > 0 or any(sid not in finals or len(finals[sid].tokens) > 1
                                                 for sid in joined_ids))
            prefill = cost([n for _, n in joined]) if joined else 0
            summary.prefill_passes += prefill
            summary.decode_passes += decoded
            progress.clock.record(prefill, decoded, dt)
            for ev in events:
                req, n_prompt, texts = running[ev.seq_id]
                texts.append(ev.text)
                if ev.finish_reason is not None:
                    del running[ev.seq_id], totals[ev.seq_id]
                    records.append(answer_record(req, "".join(texts), ev.finish_reason, n_prompt, len(ev.tokens),
                                                 model_name))
                    summary.done += 1
        log.append(records)
        c = engine.counters
        summary.prompt_tokens = c["prompt_tokens"] - c0["prompt_tokens"]
        summary.generated_tokens = c["generated_tokens"] - c0["generated_tokens"]
        summary.expert_bytes = c["expert_bytes"] - c0["expert_bytes"]
        progress.update(len(records))
