"""flashmoe-batch: input parsing, OpenAI Batch output (checked with the `openai` package's own types), the
locked append-only journal, and whole jobs on the trained tiny model: greedy answers equal
flashmoe.generate on each line alone, malformed lines become error lines, kill -9 + resume answers
every request exactly once with its uninterrupted answer, and two runs on one output are refused."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from flashmoe.batch.journal import OutputLog
from flashmoe.batch.output import answer_record, error_record, line_of
from flashmoe.batch.requests import BadLine, Defaults, Request, parse_lines
from flashmoe.errors import InputError

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
WORDS = ("the quick brown fox jumps over the lazy dog a journey of a thousand miles begins with a single step "
         "to be or not to be that is the question all that glitters is not gold").split()


def oa(cid, url, **body):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n")
    return [json.loads(x) for x in data.split(b"\n")[:-1]]


# ----------------------------------------------------------------------------------------------
# input lines


def test_parse_openai_and_simple_forms():
    d = Defaults(max_tokens=33, temperature=0.5, top_k=7, seed=3, system_prompt="Be brief.",
                 prompt_template="Summarise:\n{document}\nEnd.")
    items = parse_lines([
        oa("a", CHAT, model="m", messages=[{"role": "developer", "content": "Sys."},
                                           {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           max_completion_tokens=5, temperature=0, stop="x", n=1, stream=False, user="u"),
        oa("b", COMPL, model="m", prompt=["raw text"], top_p=0.9, seed=11),
        "",  # blank lines are skipped but counted
        json.dumps({"id": 42, "prompt": "doc text", "max_tokens": 9}),
        json.dumps({"messages": [{"role": "user", "content": "q"}], "system": "Own."}),
        oa("c", COMPL, prompt=[1, 2, 3]),
    ], d)
    a, b, s1, s2, c = items
    assert (a.line, a.custom_id, a.chat) == (1, "a", True)
    assert a.prompt == [{"role": "system", "content": "Sys."}, {"role": "user", "content": "hi"}]  # has its own
    assert a.sampling == dict(max_tokens=5, temperature=0.0, top_p=1.0, top_k=7, seed=3, stop=("x",))
    assert (b.chat, b.prompt, b.sampling["top_p"], b.sampling["seed"], b.sampling["max_tokens"]) == \
        (False, "raw text", 0.9, 11, 33)
    assert (s1.line, s1.custom_id, s1.chat) == (4, "42", True)
    assert s1.prompt == [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Summarise:\ndoc text\nEnd."}]
    assert s1.sampling["max_tokens"] == 9 and s1.sampling["temperature"] == 0.5
    assert s2.custom_id == "line-5" and s2.prompt[0] == {"role": "system", "content": "Own."}
    assert c.prompt == [1, 2, 3]
    # a template without {document}: the document goes after it
    (t,) = parse_lines([json.dumps({"prompt": "D"})], Defaults(prompt_template="Classify this.\n"))
    assert t.prompt == [{"role": "user", "content": "Classify this.\n\nD"}]


@pytest.mark.parametrize("line,code,words", [
    ("{not json", "invalid_json", "not valid JSON"),
    ("[1, 2]", "invalid_json", "not an object"),
    (oa("x", "/v1/embeddings", input="a"), "unknown_url", "unknown url '/v1/embeddings'"),
    (oa("x", CHAT, model="m"), "missing_prompt", "messages: Field required"),
    (oa("x", COMPL, prompt=["a", "b"]), "invalid_request", "prompt: Input should be a valid string"),
    (oa("x", COMPL, prompt="   "), "missing_prompt", "empty"),
    (json.dumps({"id": "x"}), "missing_prompt", "exactly one of"),
    (json.dumps({"prompt": "a", "messages": []}), "missing_prompt", "exactly one of"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], temperature="hot"), "invalid_sampling",
     "temperature: Input should be a valid number"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], max_tokens=2.5), "invalid_sampling",
     "max_tokens: Input should be a valid integer"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], n=3), "invalid_request",
     "n: Input should be less than or equal to 1"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], tools=[{"type": "function", "function": {"name": "f"}}]),
     "unsupported", "tools=[{"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], logprobs=True), "unsupported", "logprobs=true"),
    (oa("x", CHAT, messages=[{"role": "tool", "content": "a"}]), "unsupported", "tool call or result"),
    (oa("x", COMPL, prompt=[5, -3]), "invalid_prompt", "token id -3 is negative"),
    (oa("x", CHAT, messages=[{"role": "user", "content": "a"}], temprature=1), "invalid_request",
     "unknown body field 'temprature'"),
    (oa("x", CHAT, messages=[{"role": "wizard", "content": "a"}]), "invalid_request", "messages.0.role: Input should"),
    (oa("x", CHAT, messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "invalid_request",
     "messages.0.content.0.type: Input should be 'text' or 'input_text'"),
    (json.dumps({"custom_id": "x", "method": "GET", "url": CHAT, "body": {}}), "invalid_request", "POST"),
    (json.dumps({"method": "POST", "url": CHAT, "body": {"messages": []}}), "invalid_request", "custom_id"),
    (json.dumps({"prompt": "a", "temprature": 1}), "invalid_request", "unknown field(s) temprature"),
])
def test_bad_lines_say_what_is_wrong(line, code, words):
    (b,) = parse_lines(["", line])
    assert isinstance(b, BadLine) and b.line == 2
    assert b.code == code, b
    assert words in b.message and b.message.startswith("line 2")


@pytest.mark.parametrize("url,body", [
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "temperature": -1}),
    (CHAT, {"messages": [{"role": 3, "content": "a"}], "top_p": 0}),
    (CHAT, {"messages": [], "max_tokens": 0}),
    (COMPL, {"prompt": [5, 999999], "stop": 7}),
    (COMPL, {"prompt": {"a": 1}, "seed": -1}),
])
def test_the_server_and_batch_say_the_same(url, body):
    """One request model (flashmoe.request) for both front ends: a body's mistake reads the same in each."""
    from flashmoe.errors import InputError
    from flashmoe.request import ChatRequest, CompletionRequest, validate

    with pytest.raises(InputError) as e:
        validate(ChatRequest if url == CHAT else CompletionRequest, {"model": "m", **body}, vocab_size=512)
    (b,) = parse_lines([oa("x", url, model="m", **body)], vocab_size=512)
    assert b.message == f"line 1: {e.value}"
    # a simple line is the chat body it stands for
    if url == CHAT:
        (s,) = parse_lines([json.dumps({"id": "s", **body})], vocab_size=512)
        assert s.message == b.message and s.code == b.code


def test_duplicate_custom_id_is_an_error_line():
    items = parse_lines([oa("a", COMPL, prompt="x"), oa("b", COMPL, prompt="y"), oa("a", COMPL, prompt="z")])
    assert [type(i).__name__ for i in items] == ["Request", "Request", "BadLine"]
    assert items[2].code == "duplicate_custom_id" and "already used on line 1" in items[2].message


# ----------------------------------------------------------------------------------------------
# output records through the official openai types


def test_output_records_validate_as_openai_types():
    from openai.types import BatchError, Completion
    from openai.types.chat import ChatCompletion
    from openai.types.chat.completion_create_params import (
        CompletionCreateParamsNonStreaming,
    )
    from openai.types.completion_create_params import (
        CompletionCreateParamsNonStreaming as LegacyParams,
    )
    from pydantic import TypeAdapter

    chat_body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    compl_body = {"model": "m", "prompt": "raw", "max_tokens": 4}
    TypeAdapter(CompletionCreateParamsNonStreaming).validate_python(chat_body)  # what we accept is OpenAI's
    TypeAdapter(LegacyParams).validate_python(compl_body)
    chat, compl = parse_lines([oa("c1", CHAT, **chat_body), oa("c2", COMPL, **compl_body)])
    rc = answer_record(chat, "hello there", "length", 12, 4, "tiny")
    rt = answer_record(compl, " more", "stop", 3, 1, "tiny")
    for rec, req in ((rc, chat), (rt, compl)):
        rec = json.loads(json.dumps(rec))  # what a reader of the file gets
        assert line_of(rec) == req.line and rec["custom_id"] == req.custom_id and rec["error"] is None
        assert rec["response"]["status_code"] == 200
    cc = ChatCompletion.model_validate(rc["response"]["body"])
    assert cc.choices[0].message.content == "hello there" and cc.choices[0].finish_reason == "length"
    assert (cc.usage.prompt_tokens, cc.usage.completion_tokens, cc.usage.total_tokens) == (12, 4, 16)
    co = Completion.model_validate(rt["response"]["body"])
    assert co.choices[0].text == " more" and co.usage.total_tokens == 4 and co.object == "text_completion"
    (bad,) = parse_lines(["", "", "oops"])
    re_ = json.loads(json.dumps(error_record(bad)))
    e = BatchError.model_validate(re_["error"])
    assert (e.code, e.line) == ("invalid_json", 3) and "not valid JSON" in e.message
    assert re_["response"] is None and line_of(re_) == 3


# ----------------------------------------------------------------------------------------------
# the journal


def _req(n):
    return Request(n, f"r{n}", False, "x")


def test_journal_drops_a_torn_tail_and_reads_what_is_done(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputLog(out) as log:
        assert log.done == {} and log.dropped_bytes == 0
        log.append([answer_record(_req(1), "a", "stop", 1, 1, "m"), answer_record(_req(4), "b", "stop", 1, 1, "m")])
        log.append([error_record(BadLine(2, None, "invalid_json", "line 2 ..."))])
    good = out.read_bytes()
    with open(out, "ab") as f:  # a kill in the middle of a write
        f.write(json.dumps(answer_record(_req(3), "c", "stop", 1, 1, "m")).encode()[:37])
    with OutputLog(out) as log:
        assert log.dropped_bytes == 37 and log.done == {1: "r1", 4: "r4", 2: None} and log.errors == 1
        assert out.read_bytes() == good
        log.append([answer_record(_req(3), "c", "stop", 1, 1, "m")])
    assert [line_of(r) for r in records(out)] == [1, 4, 2, 3]


def test_journal_refuses_foreign_or_doubled_lines(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"hello": 1}\n')
    with pytest.raises(InputError, match="line 1 is not a flashmoe-batch output record"):
        OutputLog(out)
    r = json.dumps(answer_record(_req(1), "a", "stop", 1, 1, "m"))
    out.write_text(r + "\n" + r + "\n")
    with pytest.raises(InputError, match="answers input line 1 twice"):
        OutputLog(out)


def test_journal_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "out.jsonl"
    with OutputLog(out):
        with pytest.raises(InputError, match="in use by another flashmoe-batch run"):
            OutputLog(out)
    OutputLog(out).close()  # released with the first


# ----------------------------------------------------------------------------------------------
# whole jobs on the trained tiny model


def make_job(n, seed=0, max_tokens=(3, 6, 10)):
    """n request lines in every form: simple prompt, simple messages, OpenAI chat, OpenAI completions (raw),
    some with a stop string, a few sampled with a seed."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        mt = rng.choice(max_tokens)
        p = text(rng, rng.randint(2, 40))
        k = i % 5
        if k == 0:
            lines.append(json.dumps({"id": f"s{i}", "prompt": p, "max_tokens": mt}))
        elif k == 1:
            lines.append(json.dumps({"id": f"m{i}", "messages": [{"role": "user", "content": p}],
                                     "max_tokens": mt, "stop": ["the"]}))
        elif k == 2:
            lines.append(oa(f"c{i}", CHAT, model="tiny", max_tokens=mt,
                            messages=[{"role": "system", "content": text(rng, 5)}, {"role": "user", "content": p}]))
        elif k == 3:
            lines.append(oa(f"t{i}", COMPL, model="tiny", prompt=p, max_tokens=mt))
        else:
            lines.append(oa(f"r{i}", COMPL, model="tiny", prompt=p, max_tokens=mt, temperature=0.9, seed=i))
    return lines


def alone(model, tok, req):
    """The request run by itself through flashmoe.generate: (text, finish_reason, generated tokens)."""
    import flashmoe

    s = req.sampling
    chunks = list(flashmoe.generate(model, tok, req.prompt, max_tokens=s["max_tokens"], temperature=s["temperature"],
                                    top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"], stop=list(s["stop"]),
                                    chat_template=req.chat))
    return ("".join(c.text for c in chunks), chunks[-1].finish_reason,
            sum(c.token is not None for c in chunks))


def answer_of(rec):
    body = rec["response"]["body"]
    ch = body["choices"][0]
    return (ch["message"]["content"] if body["object"] == "chat.completion" else ch["text"], ch["finish_reason"],
            body["usage"]["completion_tokens"])


def test_job_answers_equal_each_line_alone(loaded, tmp_path):
    from flashmoe.batch import JobOptions, run_jobs
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    model, tok = loaded(None)
    lines = [ln for ln in make_job(40) if '"temperature"' not in ln]  # greedy only: 32 lines
    lines += [json.dumps({"id": f"g{i}", "prompt": text(random.Random(i), 300), "max_tokens": 8})
              for i in range(8)]  # and 8 long prompts
    assert len(lines) == 40
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = run_jobs(model, tok, src, tmp_path / "out.jsonl", JobOptions(batch_size=6, progress=False))
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (40, 40, 0, 0)
    recs = records(tmp_path / "out.jsonl")
    assert sorted(line_of(r) for r in recs) == list(range(1, 41))
    reqs = {r.line: r for r in parse_lines(lines)}
    for rec in recs:
        req = reqs[line_of(rec)]
        assert rec["custom_id"] == req.custom_id and rec["error"] is None
        (ChatCompletion if req.chat else Completion).model_validate(rec["response"]["body"])
        assert answer_of(rec) == alone(model, tok, req), req
    assert summary.generated_tokens == sum(answer_of(r)[2] for r in recs)


def test_malformed_lines_become_error_lines(bundles, tmp_path, capsys):
    from flashmoe.batch.cli import main

    rng = random.Random(5)
    lines = [json.dumps({"id": f"ok{i}", "prompt": text(rng, 5)}) for i in range(45)]
    bad = {  # line number -> expected error code
        4: ("{\"id\": \"broken\", \"prompt\": ", "invalid_json"),
        11: (oa("u", "/v1/embeddings", input="x"), "unknown_url"),
        20: (json.dumps({"id": "np", "max_tokens": 3}), "missing_prompt"),
        31: (json.dumps({"id": "long", "prompt": "fox " * 5000}), "context_length_exceeded"),
        42: (oa("t", CHAT, messages=[{"role": "user", "content": "a"}], temperature=-1), "invalid_sampling"),
    }
    for n in sorted(bad):
        lines.insert(n - 1, bad[n][0])
    assert len(lines) == 50
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    rc = main([str(bundles[None]), str(src), "-o", str(out), "--max-tokens", "3", "--max-batch", "8", "-q",
               "--stats-json", str(stats)])
    assert rc == 0
    assert "45 done, 5 failed, 0 skipped" in capsys.readouterr().err
    recs = records(out)
    assert len(recs) == 50
    errs = {line_of(r): r["error"] for r in recs if r["error"] is not None}
    assert {n: e["code"] for n, e in errs.items()} == {n: code for n, (_, code) in bad.items()}
    assert "past the context limit of 4096" in errs[31]["message"]
    assert "temperature" in errs[42]["message"]
    assert all(r["response"]["status_code"] == 200 for r in recs if r["error"] is None)
    s = json.loads(stats.read_text())
    assert (s["done"], s["failed"], s["skipped"]) == (45, 5, 0) and s["generated_tokens"] > 0
    # the same command again: nothing to do, nothing written twice
    assert main([str(bundles[None]), str(src), "-o", str(out), "-q"]) == 0
    assert "0 done, 0 failed, 50 skipped" in capsys.readouterr().err
    assert len(records(out)) == 50
    # a different input on the same output is refused
    src.write_text("\n".join(reversed(lines)) + "\n")
    assert main([str(bundles[None]), str(src), "-o", str(out), "-q"]) == 2
    assert "was written for a different input" in capsys.readouterr().err


def _cli(bundle, src, out, *extra):
    return [sys.executable, "-m", "flashmoe.batch.cli", str(bundle), str(src), "-o", str(out), "-q",
            "--max-tokens", "3", "--max-batch", "16", *extra]


def _tail_ok(path):
    """Every complete line is a valid record; returns (lines, torn tail bytes)."""
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    return [json.loads(x) for x in data[:end].split(b"\n")[:-1]], len(data) - end


def test_kill9_at_random_moments_then_resume(loaded, bundles, tmp_path):
    from flashmoe.batch import Defaults, JobOptions, run_jobs

    model, tok = loaded(None)
    rng = random.Random(7)
    lines = [json.dumps({"id": f"d{i}", "prompt": text(rng, rng.randint(1, 6))}) if i % 7 else
             json.dumps({"id": f"d{i}", "prompt": text(rng, 3), "temperature": 0.8, "seed": i}) for i in range(200)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    ref = tmp_path / "ref.jsonl"
    run_jobs(model, tok, src, ref, JobOptions(Defaults(max_tokens=3), batch_size=16, progress=False))
    want = {r["custom_id"]: answer_of(r) for r in records(ref)}
    assert len(want) == 200

    out = tmp_path / "out.jsonl"
    kills, mid_job = 0, 0
    for attempt in range(8):
        before = len(_tail_ok(out)[0])
        p = subprocess.Popen(_cli(bundles[None], src, out), stderr=subprocess.PIPE)
        if attempt == 0:
            time.sleep(rng.uniform(0.2, 1.5))  # during start-up and recovery
        else:  # once it writes answers, at a random moment among them
            t_end = time.time() + 60
            while p.poll() is None and len(_tail_ok(out)[0]) == before and time.time() < t_end:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        done, torn = _tail_ok(out)  # valid JSONL (at most one torn line a resume removes)
        mid_job += 0 < len(done) < 200 and p.returncode == -signal.SIGKILL
        if p.returncode == 0:
            break
    r = subprocess.run(_cli(bundles[None], src, out), stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert kills >= 3 and mid_job >= 2, (kills, mid_job)
    got = records(out)
    assert len(got) == 200 and len({line_of(x) for x in got}) == 200  # each request exactly once
    assert {x["custom_id"]: answer_of(x) for x in got} == want  # each equal to its uninterrupted answer
    m = re.search(r"(\d+) done, 0 failed, (\d+) skipped", r.stderr)
    assert m and int(m.group(1)) + int(m.group(2)) == 200 and int(m.group(2)) > 0, r.stderr


def test_two_runs_on_one_output_are_refused(bundles, tmp_path):
    rng = random.Random(3)
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": text(rng, 4)}) for _ in range(200)) + "\n")
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(_cli(bundles[None], src, out, "--max-tokens", "50"), stderr=subprocess.PIPE)
    try:
        t_end = time.time() + 60
        while True:  # until the first run holds the output
            try:
                OutputLog(out).close()
            except InputError:
                break
            assert first.poll() is None and time.time() < t_end
            time.sleep(0.02)
        size = out.stat().st_size
        second = subprocess.run(_cli(bundles[None], src, out), stderr=subprocess.PIPE, text=True, timeout=120)
        assert second.returncode == 2
        assert "in use by another flashmoe-batch run" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None and out.stat().st_size >= size
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------------------------
# waves and passes


def test_a_wave_is_as_many_documents_as_the_memory_plan_admits(loaded, tmp_path):
    """60 lines, room for 64 rows: one wave, every line prefilled in the first step, then decoded together.
    With a memory budget that holds 16 rows at these lengths, waves of 16 that the engine admits whole (it
    never splits one). The answers are the same either way."""
    from flashmoe.batch import JobOptions, run_jobs
    from flashmoe.runtime.engine import Engine

    model, tok = loaded(None)
    rng = random.Random(11)
    lines = [json.dumps({"id": f"d{i}", "prompt": text(rng, rng.randint(10, 30)), "max_tokens": 3}) for i in range(60)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")

    def job(out, **kw):
        engine = Engine(model, tok, prefill_tokens=64, **kw)
        joins = []
        step = engine.step

        def watched():  # (waiting before the step, after it, running after it)
            waiting = engine.counters["waiting"]
            events = step()
            joins.append((waiting, engine.counters["waiting"], engine.counters["running"]))
            return events

        engine.step = watched
        s = run_jobs(model, tok, src, out, JobOptions(progress=False), engine=engine)
        return s, engine, joins

    s, _, joins = job(tmp_path / "one.jsonl", max_batch=64)
    assert s.done == 60 and s.planned.waves == 1 and joins[0][:2] == (60, 0)  # all 60 joined in the first step
    assert s.passes <= s.planned.passes
    probe = Engine(model, tok, max_batch=64, prefill_tokens=64)
    longest = max(len(probe.tokenizer.encode(x)) for x in lines) + 40  # chat template and max_tokens: a bound
    per_row = probe.plan.bytes_for(1, longest)
    s16, engine, joins = job(tmp_path / "waves.jsonl", max_batch=64, memory_budget_gb=16.5 * per_row / 1e9)
    assert s16.done == 60 and s16.planned.waves >= 3 and s16.passes <= s16.planned.passes
    assert all(left == 0 for _, left, _ in joins)  # every wave admitted whole: the plan's room is the engine's
    assert 16 <= joins[0][2] < 60  # the first wave: at least the 16 rows the budget holds at the longest
    key = lambda path: sorted((r["custom_id"], answer_of(r)) for r in records(path))  # noqa: E731
    assert key(tmp_path / "waves.jsonl") == key(tmp_path / "one.jsonl")


def test_planned_passes_bound_the_job_and_are_exact_without_early_stops(loaded, tmp_path):
    from flashmoe.batch import JobOptions, run_jobs
    from flashmoe.batch.passes import Room, plan
    from flashmoe.runtime.engine import Engine

    assert plan([(10, 3)], Room(4), lambda lens: 1).passes == 1 + 2  # one prefill pass, two decode steps
    model, tok = loaded(None)
    rng = random.Random(12)
    for max_tokens, exact in ((1, True), (6, False)):
        lines = [json.dumps({"prompt": text(rng, rng.randint(5, 60)), "max_tokens": max_tokens}) for _ in range(40)]
        out = tmp_path / f"o{max_tokens}.jsonl"
        s = run_jobs(model, tok, [x.encode() for x in lines], out, JobOptions(progress=False),
                     engine=Engine(model, tok, max_batch=16, prefill_tokens=128))
        assert s.done == 40 and 0 < s.passes <= s.planned.passes, (s.passes, s.planned)
        assert s.as_dict()["passes"] == s.passes == s.prefill_passes + s.decode_passes
        if exact:  # every answer is one token: no decode step, and the plan is the real count
            assert s.passes == s.planned.passes and s.planned.decode == 0


def test_progress_says_the_plan_then_passes_done_of_planned(loaded, tmp_path, capsys):
    from flashmoe.batch import JobOptions, run_jobs
    from flashmoe.runtime.engine import Engine

    model, tok = loaded(None)
    rng = random.Random(13)
    lines = [json.dumps({"prompt": text(rng, 20), "max_tokens": 4}) for _ in range(6)]
    s = run_jobs(model, tok, [x.encode() for x in lines], tmp_path / "o.jsonl", JobOptions(progress=True),
                 engine=Engine(model, tok, max_batch=4, prefill_tokens=64))
    err = capsys.readouterr().err
    p = s.planned
    assert f"6 documents to answer in {p.waves} wave(s), at most {p.passes} passes over the experts " \
           f"({p.prefill} prefill, {p.decode} decode" in err and "estimated finish: estimating" in err
    assert re.search(r"s per decode pass, [0-9.]+ s per prefill pass so far: ETA \d+:\d\d:\d\d \(finish ", err)
    assert f"{s.passes}/{p.passes}" in err and s.passes == p.passes  # no early stop: every pass as planned
