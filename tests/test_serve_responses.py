"""POST /v1/responses (stateless) through the openai client's `responses` interface: text equal to the
chat endpoint's greedy answer, streaming events, function tools (calls out, outputs back in), JSON."""

from __future__ import annotations

import json

import pytest
from test_serve import MODEL, PROMPTS, WEATHER, CALL_ARGS, CALL_TEXT, LiveServer, ScriptedServer, _server, live  # noqa: F401

TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": WEATHER["function"]["parameters"]}


def test_text_equals_chat_and_streams(live):
    oa = live.openai()
    msgs = [{"role": "user", "content": PROMPTS[2]}]
    chat = oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    r = oa.responses.create(model=MODEL, input=PROMPTS[2], max_output_tokens=10, temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.status == "incomplete"
    assert r.usage.output_tokens == chat.usage.completion_tokens == 10
    assert r.incomplete_details.reason == "max_output_tokens"
    kinds, deltas = [], []
    with oa.responses.stream(model=MODEL, input=[{"role": "user", "content": PROMPTS[2]}], max_output_tokens=10,
                             temperature=0) as st:
        for ev in st:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert "".join(deltas) == r.output_text and len(deltas) > 1


def test_previous_response_id_refused(live):
    import openai

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        live.openai().responses.create(model=MODEL, input="hi", previous_response_id="resp_1")


def test_function_calls_out_and_outputs_back(loaded):
    from flashmoe.serve.app import Server

    s = LiveServer(_server(loaded, server_cls=ScriptedServer.of(Server)))
    try:
        s.server.script = CALL_TEXT
        oa = s.openai()
        r = oa.responses.create(model=MODEL, input="Weather in New York?", tools=[TOOL], max_output_tokens=400)
        calls = [o for o in r.output if o.type == "function_call"]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", a) for a in CALL_ARGS]
        events = []
        with oa.responses.stream(model=MODEL, input="Weather in New York?", tools=[TOOL],
                                 max_output_tokens=400) as st:
            for ev in st:
                events.append(ev)
            final = st.get_final_response()
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        done = [json.loads(e.arguments) for e in events if e.type == "response.function_call_arguments.done"]
        assert done == CALL_ARGS and "".join(deltas) == "".join(json.dumps(a) for a in CALL_ARGS)
        assert [json.loads(o.arguments) for o in final.output if o.type == "function_call"] == CALL_ARGS
        s.server.script = "It is sunny."
        follow = [{"role": "user", "content": "Weather in New York?"}] + [
            {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls] + [
            {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"} for c in calls]
        r2 = oa.responses.create(model=MODEL, input=follow, tools=[TOOL], max_output_tokens=50)
        assert r2.output_text == "It is sunny." and r2.status == "completed"
    finally:
        s.close()


def test_json_schema_format(live):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    r = live.openai().responses.create(model=MODEL, input="JSON please", max_output_tokens=60, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "x", "schema": schema}})
    import jsonschema

    jsonschema.validate(json.loads(r.output_text), schema)
