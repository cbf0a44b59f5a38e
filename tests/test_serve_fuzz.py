"""flashmoe-serve under fuzzed request bodies (hypothesis): for /v1/chat/completions, /v1/completions,
/v1/messages and /v1/responses, streaming and not, no body gets a 5xx (or an error event inside a stream) and the server
keeps answering. Fast by default; FLASHMOE_FUZZ_EXAMPLES=N runs N examples per endpoint."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import MODEL, LiveServer, _server

EXAMPLES = int(os.environ.get("FLASHMOE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("FLASHMOE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
anything = st.recursive(scalars, lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=6), x, max_size=3),
                        max_leaves=8)
text = st.text(max_size=12)  # hypothesis' text includes lone surrogates
small = st.integers(-3, 6) | anything


def maybe(strategy):
    return strategy | anything


schema = st.fixed_dictionaries({"type": st.just("object")}, optional={
    "properties": st.dictionaries(st.text(max_size=4), st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "integer", "number", "boolean", "array", "object", "nonsense"])}), max_size=3),
    "required": st.lists(st.text(max_size=4), max_size=2)}) | anything
sampling = {"temperature": maybe(st.floats(0, 3)), "top_p": maybe(st.floats(0, 1)), "top_k": small,
            "seed": maybe(st.integers(-1, 2**64)), "stream_options": maybe(st.fixed_dictionaries(
                {}, optional={"include_usage": maybe(st.booleans())}))}

openai_part = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "input_text", "image_url"])),
                                     "text": maybe(text)})
openai_call = st.fixed_dictionaries({"function": maybe(st.fixed_dictionaries(
    {"name": maybe(st.sampled_from(["f", "g"])), "arguments": maybe(st.sampled_from(['{"a": 1}', "{", "[]"]))}))},
    optional={"id": maybe(text), "type": maybe(st.just("function"))})
openai_message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"]))},
    optional={"content": maybe(text | st.lists(openai_part, max_size=2)),
              "tool_calls": maybe(st.lists(openai_call, max_size=2)), "tool_call_id": maybe(text),
              "reasoning_content": maybe(text)})
openai_tool = st.fixed_dictionaries({"type": maybe(st.just("function")), "function": maybe(st.fixed_dictionaries(
    {"name": maybe(st.sampled_from(["f", "g", ""]))}, optional={"parameters": schema, "description": text}))})
chat_body = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from([MODEL, "gpt-4o", ""])), "messages": maybe(st.lists(openai_message, max_size=3))},
    optional={"max_tokens": small, "max_completion_tokens": small, "stop": maybe(text | st.lists(text, max_size=3)),
              "tools": maybe(st.lists(openai_tool, max_size=2)),
              "tool_choice": maybe(st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
                  {"type": maybe(st.just("function")), "function": maybe(st.fixed_dictionaries(
                      {"name": maybe(st.sampled_from(["f", "g", "h"]))}))})),
              "response_format": maybe(st.fixed_dictionaries(
                  {"type": maybe(st.sampled_from(["text", "json_object", "json_schema"]))},
                  optional={"json_schema": maybe(st.fixed_dictionaries({"name": text, "schema": schema}))})),
              "n": small, "logprobs": maybe(st.booleans()), "chat_template_kwargs": anything, **sampling})
completion_body = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from([MODEL, "x"])),
     "prompt": maybe(text | st.lists(st.integers(-2, 600), max_size=5) | st.lists(text, max_size=2))},
    optional={"max_tokens": small, "stop": maybe(text), "echo": anything, "suffix": anything, "best_of": small,
              "logprobs": small, **sampling})
block = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image"]))},
                              optional={"text": maybe(text), "name": maybe(st.sampled_from(["f", ""])), "id": text,
                                        "input": anything, "tool_use_id": maybe(text), "content": anything,
                                        "thinking": maybe(text)})
anthropic_message = st.fixed_dictionaries({"role": maybe(st.sampled_from(["user", "assistant", "system"])),
                                           "content": maybe(text | st.lists(block, max_size=3))})
messages_body = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from([MODEL, "claude"])), "max_tokens": small,
     "messages": maybe(st.lists(anthropic_message, max_size=3))},
    optional={"system": maybe(text), "stop_sequences": maybe(st.lists(text, max_size=2)),
              "tools": maybe(st.lists(st.fixed_dictionaries({"name": maybe(st.sampled_from(["f", "g"]))},
                                                            optional={"input_schema": schema}), max_size=2)),
              "tool_choice": maybe(st.fixed_dictionaries({"type": maybe(st.sampled_from(["auto", "any", "tool", "none"]))},
                                                         optional={"name": maybe(st.sampled_from(["f", "h"]))})),
              "thinking": maybe(st.fixed_dictionaries({"type": maybe(st.sampled_from(["enabled", "disabled"]))})),
              **sampling})

responses_item = maybe(st.fixed_dictionaries({"role": maybe(st.sampled_from(["user", "assistant", "developer"])),
                                              "content": maybe(text | st.lists(openai_part, max_size=2))})
                       | st.fixed_dictionaries({"type": st.sampled_from(["function_call", "function_call_output"]),
                                                "call_id": maybe(text)},
                                               optional={"name": maybe(text), "arguments": maybe(text),
                                                         "output": maybe(text)}))
responses_body = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from([MODEL, "x"])), "input": maybe(text | st.lists(responses_item, max_size=3))},
    optional={"instructions": maybe(text), "max_output_tokens": small, "previous_response_id": anything,
              "tools": maybe(st.lists(st.fixed_dictionaries({"type": maybe(st.just("function")),
                                                             "name": maybe(st.sampled_from(["f", ""]))},
                                                            optional={"parameters": schema}), max_size=2)),
              "tool_choice": maybe(st.sampled_from(["auto", "required", "none"])),
              "text": maybe(st.fixed_dictionaries({"format": maybe(st.fixed_dictionaries(
                  {"type": maybe(st.sampled_from(["text", "json_object", "json_schema"]))},
                  optional={"schema": schema}))})),
              **sampling})


@pytest.fixture(scope="module")
def live(loaded):
    s = LiveServer(_server(loaded, max_tokens=4))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(live):
    import httpx

    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def _post(client, path, body, stream):
    if isinstance(body, dict) and stream is not None:
        body = dict(body, stream=stream)
    raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \\udXXX escapes
    with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        text = r.read().decode("utf-8", "replace")
    assert r.status_code < 500, (r.status_code, text[:500], body)
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in text and '"api_error"' not in text, text[:500]
    assert client.get("/health").status_code == 200


@FUZZ
@given(body=chat_body, stream=st.sampled_from([None, True, False, "yes"]))
def test_fuzz_chat_completions(client, body, stream):
    _post(client, "/v1/chat/completions", body, stream)


@FUZZ
@given(body=completion_body, stream=st.sampled_from([None, True, False]))
def test_fuzz_completions(client, body, stream):
    _post(client, "/v1/completions", body, stream)


@FUZZ
@given(body=messages_body, stream=st.sampled_from([None, True, False]))
def test_fuzz_messages(client, body, stream):
    _post(client, "/v1/messages", body, stream)


@FUZZ
@given(body=responses_body, stream=st.sampled_from([None, True, False]))
def test_fuzz_responses(client, body, stream):
    _post(client, "/v1/responses", body, stream)


@FUZZ
@given(body=anything, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages",
                                            "/v1/responses"]))
def test_fuzz_any_json(client, body, path):
    _post(client, path, body, None)
