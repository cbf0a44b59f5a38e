"""flashmoe-serve: the HTTP server driven by the official `openai` and `anthropic` clients against a uvicorn
server on 127.0.0.1 (the trained tiny model). The parser and template tests: tests/test_serve_parsing.py."""

from __future__ import annotations

import hashlib
import json

import pytest
from flashmoe.serve.chat import openai_messages, render
from flashmoe.serve.toolcalls import OutputParser, tool_schemas

from test_serve_parsing import CALL_ARGS, CALL_TEXT, QWEN35_TEMPLATE, WEATHER, _split  # noqa: F401  (also used by other test files)

# ----------------------------------------------------------------------------------------------
# the server, through real clients

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "A journey of a thousand", "To be or not to be", "All that glitters",
           "The early bird catches", "The second mouse gets", "jumps over the lazy", "begins with a single"]


class LiveServer:
    """uvicorn serving create_app(server) on 127.0.0.1 (a free port), in a thread of this process."""

    def __init__(self, server):
        import socket
        import threading
        import time

        import uvicorn
        from flashmoe.serve.routes import create_app

        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.uv.started:
            assert time.time() - t0 < 30 and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def openai(self, key="none"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def anthropic(self, key="none"):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=key, timeout=120, max_retries=0)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(30)


def _server(loaded, server_cls=None, bits=None, engine_kw=None, **config):
    from flashmoe.runtime.engine import Engine
    from flashmoe.serve.app import Server, ServerConfig

    model, tok = loaded(bits)
    engine = Engine(model, tok, **(engine_kw or {}))
    cfg = ServerConfig(model_id=MODEL, sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0}, **config)
    return (server_cls or Server)(model, tok, engine, cfg)


@pytest.fixture(scope="module")
def live(loaded):
    s = LiveServer(_server(loaded))
    yield s
    s.close()


def _reference(loaded, prompt, max_tokens, chat=True):
    import flashmoe

    model, tok = loaded(None)
    chunks = list(flashmoe.generate(model, tok, prompt, max_tokens=max_tokens, chat_template=chat))
    return "".join(c.text for c in chunks), chunks[-1].stats["generated_tokens"]


def test_models_health_and_greedy_chat_equals_generate(live, loaded):
    import httpx

    oa = live.openai()
    assert [m.id for m in oa.models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    want, n = _reference(loaded, msgs, 24)
    r = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason in ("stop", "length")
    stream = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [r.choices[0].finish_reason]


def test_completions_raw_text_equals_generate(live, loaded):
    want, _ = _reference(loaded, PROMPTS[1], 20, chat=False)
    oa = live.openai()
    r = oa.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0)
    assert r.choices[0].text == want
    s = oa.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == want


def test_anthropic_messages_equal_generate(live, loaded):
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    want, n = _reference(loaded, [{"role": "system", "content": "Be brief."}] + msgs, 20)
    ac = live.anthropic()
    r = ac.messages.create(model=MODEL, system="Be brief.", messages=msgs, max_tokens=20)
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == want
    assert r.usage.output_tokens == n and r.stop_reason in ("end_turn", "max_tokens")
    with ac.messages.stream(model=MODEL, system="Be brief.", messages=msgs, max_tokens=20) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == want and final.content[0].text == want and final.stop_reason == r.stop_reason


# ---- tool calls: scripted model output through the Qwen3.5 template ----------------------------


class ScriptedServer:
    """A Server whose model 'writes' self.script (its tokens, then EOS) through SamplingParams.sampler:
    a tiny model cannot choose tools, so the tool-call path is driven with forced output."""

    @staticmethod
    def of(base_cls):
        class Scripted(base_cls):
            script = ""

            def make_params(self, **kw):
                p = super().make_params(**kw)
                ids, eos = self.tokenizer.encode(self.script), min(self.engine.eos)
                p.sampler = lambda logits, gen: ids[len(gen)] if len(gen) < len(ids) else eos
                return p

        return Scripted


@pytest.fixture(scope="module")
def qwen_bundle(bundles, tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("qwen35") / "bundle"
    shutil.copytree(bundles[None], d)
    (d / "chat_template.jinja").write_text(QWEN35_TEMPLATE)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN35_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    manifest = json.loads((d / "flashmoe.json").read_text())
    for f in manifest["files"]:  # the manifest records every file's size and sha256
        if f["path"] in ("chat_template.jinja", "tokenizer_config.json"):
            data = (d / f["path"]).read_bytes()
            f["size"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (d / "flashmoe.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture(scope="module")
def qwen_live(qwen_bundle):
    """Two servers on the Qwen3.5-template bundle: one scripted, one running the model itself."""
    from flashmoe.runtime.engine import Engine
    from flashmoe.serve.app import Server, ServerConfig

    import flashmoe

    model, tok = flashmoe.load(qwen_bundle)
    cfg = ServerConfig(model_id=MODEL, sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0})
    scripted = LiveServer(ScriptedServer.of(Server)(model, tok, Engine(model, tok), cfg))
    real = LiveServer(Server(model, tok, Engine(model, tok), cfg))
    yield scripted, real
    scripted.close()
    real.close()


def _accumulate_openai_stream(chunks):
    content, reasoning, calls, reasons = [], [], {}, []
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        content.append(d.content or "")
        reasoning.append((d.model_extra or {}).get("reasoning_content") or "")
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        if c.choices[0].finish_reason:
            reasons.append(c.choices[0].finish_reason)
    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], reasons


def test_tool_calls_openai_structured_and_streamed(qwen_live):
    scripted, _ = qwen_live
    scripted.server.script = CALL_TEXT
    oa = scripted.openai()
    msgs = [{"role": "user", "content": "Weather in New York?"}]
    r = oa.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=400)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content == "Let me check." and m.model_extra["reasoning_content"] == "The user wants weather."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == \
        [("get_weather", a) for a in CALL_ARGS]
    assert len({c.id for c in m.tool_calls}) == 2
    content, reasoning, calls, reasons = _accumulate_openai_stream(
        oa.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=400, stream=True))
    assert (content, reasoning, reasons) == ("Let me check.", "The user wants weather.", ["tool_calls"])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", a) for a in CALL_ARGS]
    assert all(c["id"] for c in calls)
    # the reply goes back into the conversation: assistant tool_calls + tool results render and run
    follow = msgs + [m.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in m.tool_calls]
    scripted.server.script = "</think>\n\nIt is sunny."
    r2 = oa.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=50)
    assert r2.choices[0].message.content == "It is sunny." and r2.choices[0].finish_reason == "stop"


def test_tool_arguments_stream_through_both_clients_helpers(qwen_live):
    scripted, _ = qwen_live
    scripted.server.script = CALL_TEXT
    msgs = [{"role": "user", "content": "Weather in New York?"}]
    deltas, done = [], []
    with scripted.openai().chat.completions.stream(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=400) as st:
        for ev in st:
            if ev.type == "tool_calls.function.arguments.delta":
                deltas.append((ev.index, ev.arguments_delta))
            elif ev.type == "tool_calls.function.arguments.done":
                done.append((ev.name, json.loads(ev.arguments)))
    assert done == [("get_weather", a) for a in CALL_ARGS]
    assert len([d for i, d in deltas if i == 0 and d]) == len(CALL_ARGS[0]) + 1  # one per parameter + the brace
    tools = [{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}]
    partial, snapshots = [], []
    with scripted.anthropic().messages.stream(model=MODEL, messages=msgs, tools=tools, max_tokens=400) as st:
        for ev in st:
            if ev.type == "input_json":
                partial.append(ev.partial_json)
                snapshots.append(ev.snapshot)
        final = st.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == CALL_ARGS
    assert len(partial) == len(CALL_ARGS[0]) + 1 + len(CALL_ARGS[1]) + 1
    assert snapshots[0] == {"city": "New York"}  # the first parameter, before the call is complete


def test_tool_choice_forces_a_call(qwen_live, qwen_bundle):
    scripted, _ = qwen_live
    scripted.server.script = "<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>"
    oa = scripted.openai()
    msgs = [{"role": "user", "content": "Weather?"}]
    r = oa.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=100,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    m = r.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert not m.content and "reasoning_content" not in (m.model_extra or {})
    tok = scripted.server.tokenizer
    forced = render(tok, openai_messages(msgs), [WEATHER], "get_weather")
    assert r.usage.prompt_tokens == len(tok.encode(forced.text))


def test_tool_use_anthropic_structured_and_streamed(qwen_live):
    scripted, _ = qwen_live
    scripted.server.script = CALL_TEXT
    ac = scripted.anthropic()
    tools = [{"name": "get_weather", "description": "Weather for a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    msgs = [{"role": "user", "content": "Weather in New York?"}]
    r = ac.messages.create(model=MODEL, messages=msgs, tools=tools, max_tokens=400)
    assert [b.type for b in r.content] == ["text", "tool_use", "tool_use"] and r.stop_reason == "tool_use"
    assert r.content[0].text == "Let me check." and [b.input for b in r.content[1:]] == CALL_ARGS
    think = ac.messages.create(model=MODEL, messages=msgs, tools=tools, max_tokens=400,
                               thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in think.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert think.content[0].thinking == "The user wants weather."
    with ac.messages.stream(model=MODEL, messages=msgs, tools=tools, max_tokens=400) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[0].text == "Let me check." and [b.input for b in final.content[1:]] == CALL_ARGS
    # tool results go back as tool_result blocks
    follow = msgs + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "sunny"}
                                                  for b in r.content[1:]]}]
    scripted.server.script = "</think>\n\nIt is sunny."
    r2 = ac.messages.create(model=MODEL, messages=follow, tools=tools, max_tokens=50)
    assert [b.type for b in r2.content] == ["text"] and r2.content[0].text == "It is sunny."
    assert r2.stop_reason == "end_turn"


def test_end_to_end_real_template_with_tools(qwen_live):
    """The model itself (greedy) behind the Qwen3.5 template with tools: the prompt is the template's
    rendering with the tools block, and the answer is the model's own output, parsed."""
    import flashmoe

    _, real = qwen_live
    tok, model = real.server.tokenizer, real.server.model
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}]
    prompt = render(tok, openai_messages(msgs), [WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER) in prompt.text and prompt.reasoning
    ids = tok.encode(prompt.text)
    text = "".join(c.text for c in flashmoe.generate(model, tok, ids, max_tokens=24))
    p = OutputParser(True, tool_schemas([WEATHER]))
    want_r, want_c, want_calls = _split(p.feed(text) + p.close())
    r = real.openai().chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=24,
                                              temperature=0)
    m = r.choices[0].message
    assert r.usage.prompt_tokens == len(ids)
    assert (m.model_extra or {}).get("reasoning_content", "") == want_r and (m.content or "") == want_c
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls or []] == want_calls


# ---- concurrency, disconnects, errors, keys ------------------------------------------------------


def _stream_text(live, prompt, max_tokens):
    s = live.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in s if c.choices)


def test_16_concurrent_streams_each_get_their_alone_text(live):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(PROMPTS[i % len(PROMPTS)], 8 + 2 * i) for i in range(16)]
    alone = {}
    for p, n in jobs:
        alone[p, n] = _stream_text(live, p, n)
    steps0 = live.server.engine.counters["steps"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: _stream_text(live, *j), jobs))
    assert together == [alone[j] for j in jobs]
    # they really ran batched: far fewer engine steps than the tokens generated
    assert live.server.engine.counters["steps"] - steps0 < sum(n for _, n in jobs) / 2


def test_20_clients_disconnecting_mid_stream_leave_nothing_behind(live):
    import threading
    import time

    import httpx

    engine, worker = live.server.engine, live.server.worker
    _stream_text(live, PROMPTS[0], 4)  # warm: the expert reader's thread pool starts on first use
    threads0, cancelled0 = threading.active_count(), engine.counters["cancelled"]
    got = []

    def client(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 3000, "stream": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line and '"content": ""' not in line:
                    got.append(i)
                    break  # leave mid-stream: the connection closes

    ts = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(got) == list(range(20))
    t0 = time.time()
    while (engine.counters["running"] or engine.counters["waiting"] or worker.in_flight) and time.time() - t0 < 30:
        time.sleep(0.05)
    assert engine.counters["running"] == engine.counters["waiting"] == worker.in_flight == 0
    assert engine.counters["cancelled"] - cancelled0 == 20
    assert engine.runner.rows == [] and engine.runner.cache_bytes() == 0  # no sequence state left
    assert not engine.has_work()
    assert threading.active_count() == threads0, [t.name for t in threading.enumerate()]
    assert time.time() - t0 < 30  # cancelled at once, not run to 3000 tokens


BAD = [  # path, body (dict, or raw bytes), status, words in the message
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model: Field required"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1},
     400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5},
     400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": -2},
     400, "top_k"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": -5},
     400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
     400, "limit"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n: "),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [1]},
     400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
     400, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tool_choice": "required"}, 400, "no tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
     400, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (17 << 20)}]},
     413, "over the server's limit"),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(3, 200)) * 25}, 413, "context"),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/messages", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ("/v1/messages", {"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}, 400, "role"),
    ("/v1/nothing", {}, 404, "no route"),
]


@pytest.mark.parametrize("path, body, status, words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_their_4xx(live, path, body, status, words):
    import httpx

    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    j = r.json()
    err = j["error"] if path != "/v1/messages" else (j["type"] == "error" and j["error"])
    assert words in err["message"] and "Traceback" not in r.text and err["type"]


def test_bad_requests_through_the_clients(live):
    import anthropic
    import openai

    with pytest.raises(openai.BadRequestError):
        live.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=7)
    with pytest.raises(anthropic.BadRequestError):
        live.anthropic().messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_full_queue_answers_429(loaded):
    import threading

    import httpx
    import openai

    s = LiveServer(_server(loaded, engine_kw={"max_batch": 1}, max_queue=0))
    try:
        started, stop = threading.Event(), threading.Event()

        def hold():
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "stream": True}
            with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/chat/completions", json=body) as r:
                for _ in r.iter_lines():
                    started.set()
                    if stop.is_set():
                        break

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(30)
        with pytest.raises(openai.RateLimitError):
            s.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        stop.set()
        t.join(60)
    finally:
        s.close()


def test_api_key(loaded):
    import httpx
    import openai

    s = LiveServer(_server(loaded, api_key="sekrit"))
    try:
        with pytest.raises(openai.AuthenticationError):
            s.openai("wrong").models.list()
        assert httpx.get(s.url + "/v1/models", timeout=10).status_code == 401
        assert httpx.post(s.url + "/v1/chat/completions", json={}, timeout=10).status_code == 401
        assert [m.id for m in s.openai("sekrit").models.list().data] == [MODEL]
        r = s.anthropic("sekrit").messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "x"}])
        assert r.type == "message"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200  # health stays open
    finally:
        s.close()


def test_prompt_cache_reuses_an_earlier_conversation(loaded):
    s = LiveServer(_server(loaded, engine_kw={"prompt_cache_gb": 0.5}))
    try:
        oa = s.openai()
        msgs = [{"role": "user", "content": PROMPTS[0]}]
        r1 = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": PROMPTS[1]}]
        r2 = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    finally:
        s.close()


def test_cli_serves_with_key_from_env_and_refuses_bad_flags(bundles):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    cmd = [sys.executable, "-c", "import sys; from flashmoe.serve.cli import main; sys.exit(main())"]
    bad = subprocess.run(cmd + [str(bundles[None]), "--port", "70000"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "--port 70000" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, FLASHMOE_API_KEY="from-env")
    p = subprocess.Popen(cmd + [str(bundles[None]), "--port", str(port), "--model-name", "m", "--max-tokens", "8"],
                         env=env, stderr=subprocess.PIPE, text=True)
    try:
        url, t0 = f"http://127.0.0.1:{port}", time.time()
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert p.poll() is None and time.time() - t0 < 120, "flashmoe-serve did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        import openai

        oa = openai.OpenAI(base_url=url + "/v1", api_key="from-env", timeout=60, max_retries=0)
        assert [m.id for m in oa.models.list().data] == ["m"]
        r = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert r.usage.completion_tokens <= 8
        r = oa.chat.completions.create(model="any-name", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.model == "m" and r.usage.completion_tokens <= 3
        # the port is taken: a one-line error before anything loads
        taken = subprocess.run(cmd + [str(bundles[None]), "--port", str(port)], capture_output=True, text=True,
                               timeout=120, check=False)
        assert taken.returncode == 2 and taken.stderr.strip().splitlines() == [
            f"flashmoe-serve: error: port {port} is in use on 127.0.0.1 (another server?); stop it or choose "
            "another with --port"], taken.stderr
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and "serving 'm' on http://127.0.0.1" in err and "API key required" in err
    log = [line for line in err.splitlines() if "POST /v1/chat/completions" in line]
    assert len(log) == 2 and " 200 in=" in log[0] and log[0].startswith("flashmoe-serve: 127.0.0.1 POST"), err
    assert " out=3 " in log[1] or " out=2 " in log[1] or " out=1 " in log[1], log
    assert any("GET /v1/models 401 in=0 out=0" in line for line in err.splitlines()), err


def test_cli_without_fastapi_names_the_install_command(bundles):
    import subprocess
    import sys

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "from flashmoe.serve.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, str(bundles[None])], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "flashmoe-serve: error: flashmoe-serve needs fastapi, uvicorn, which are not installed: "
        "pip install 'flashmoe[serve]'"], r.stderr
