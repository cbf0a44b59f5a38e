"""Constrained decoding (serve/grammar.py, llguidance): with the trained tiny model, which knows nothing of
JSON or tools, every response_format json_schema answer parses and validates (OpenAI and Anthropic forms),
and every forced tool call's arguments validate against the tool's schema; schemas the grammar cannot
carry are a 400 naming the part."""

from __future__ import annotations

import json
import threading

import jsonschema
import numpy as np
import pytest
from test_serve import MODEL, WEATHER, LiveServer, _server

S = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -99, "maximum": 99}, "y": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "role": {"enum": ["admin", "guest"]},
        "email": S}, "required": ["id", "role"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "code": {"type": "integer", "minimum": 100,
                                                                                      "maximum": 599}},
     "required": ["status", "code"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": ["integer", "null"], "minimum": 0,
                                                                      "maximum": 9}, "c": S},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"level1": {"type": "object", "properties": {"level2": {"type": "object",
        "properties": {"level3": {"enum": ["deep", "deeper"]}}, "required": ["level3"], "additionalProperties": False}},
        "required": ["level2"], "additionalProperties": False}, "note": S}, "required": ["level1"],
     "additionalProperties": False},
]
ASK = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def live(loaded):
    s = LiveServer(_server(loaded, engine_kw={"max_batch": 16}))
    yield s
    s.close()


def _in_threads(fn, jobs):
    out, errors = [None] * len(jobs), []

    def run(i):
        try:
            out[i] = fn(*jobs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    assert not errors, errors[:3]
    return out


def test_100_json_schema_answers_validate_through_both_apis(live):
    oa, an = live.openai(), live.anthropic()

    def openai_one(schema, seed):
        r = oa.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=1.0, seed=seed,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema, "strict": True}})
        return r.choices[0].finish_reason, r.choices[0].message.content

    def anthropic_one(schema, seed):
        r = an.messages.create(model=MODEL, max_tokens=200, messages=ASK,
                               extra_body={"output_format": {"type": "json_schema", "schema": schema},
                                           "temperature": 1.0})
        return r.stop_reason, r.content[0].text

    jobs = [(s, seed) for s in SCHEMAS for seed in range(5)]
    got = _in_threads(openai_one, jobs) + _in_threads(anthropic_one, jobs)
    schemas = [s for s, _ in jobs] * 2
    valid = 0
    for schema, (reason, text) in zip(schemas, got):
        assert reason in ("stop", "end_turn"), (reason, text)
        jsonschema.validate(json.loads(text), schema)
        valid += 1
    assert valid == 100
    assert len({t for _, t in got}) > 20  # sampled answers, not one string


def test_streamed_json_schema_and_json_object(live):
    oa = live.openai()
    s = oa.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0.8, seed=3, stream=True,
                                   response_format={"type": "json_schema", "json_schema": {"name": "p",
                                                                                           "schema": SCHEMAS[3]}})
    chunks = [c for c in s if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3
    jsonschema.validate(json.loads(text), SCHEMAS[3])
    # any object: its keys are free text, so an answer may run to max_tokens; those that end are objects
    stopped = 0
    for seed in range(4):
        r = oa.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0.8, seed=seed,
                                       response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            stopped += 1
        else:
            assert r.choices[0].message.content.startswith("{")
    assert stopped >= 1


TOOLS = [WEATHER, {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"when": {"enum": ["today", "tomorrow"]}, "seats": {"type": "integer",
                                                                                        "minimum": 1, "maximum": 8},
                                     "names": {"type": "array", "items": S, "maxItems": 2}},
    "required": ["when", "seats"]}}}]
TOOL_SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_forced_tool_calls_follow_their_schema(live):
    oa, an = live.openai(), live.anthropic()
    choices = ["required", {"type": "function", "function": {"name": "book"}},
               {"type": "function", "function": {"name": "get_weather"}}]
    a_tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    a_choices = [{"type": "any"}, {"type": "tool", "name": "book"}, {"type": "tool", "name": "get_weather"}]

    def openai_one(choice, seed):
        r = oa.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300,
                                       temperature=1.0, seed=seed)
        return [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls or []]

    def anthropic_one(choice, seed):
        r = an.messages.create(model=MODEL, max_tokens=300, messages=ASK, tools=a_tools, tool_choice=choice,
                               extra_body={"temperature": 1.0})
        return [(b.name, b.input) for b in r.content if b.type == "tool_use"]

    jobs = [(c, seed) for c in choices for seed in range(6)]
    a_jobs = [(c, seed) for c in a_choices for seed in range(6)]
    got = _in_threads(openai_one, jobs) + _in_threads(anthropic_one, a_jobs)
    wanted = [c if isinstance(c, str) else c["function"]["name"] for c, _ in jobs] + \
             [c.get("name", "required") for c, _ in a_jobs]
    for want, calls in zip(wanted, got):
        assert len(calls) == 1, calls
        name, args = calls[0]
        assert want == "required" or name == want
        jsonschema.validate(args, TOOL_SCHEMA[name])


@pytest.mark.parametrize("body, status, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a+$"}}}}}], "tool_choice": "required"},
     400, "tools[f].properties.s.pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     400, "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}}, 400, "response_format"),
])
def test_schemas_the_grammar_refuses_are_400(live, body, status, words):
    import httpx

    r = httpx.post(live.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_mask_allows_exactly_the_grammar(live):
    """The processor's mask against llguidance's own verdict, token by token, on a JSON answer."""
    from flashmoe.serve.grammar import json_schema_grammar

    import mlx.core as mx

    g = live.server.grammars
    mask = g.mask(g.compile(json_schema_grammar(SCHEMAS[1]), "x"))
    tok = live.server.tokenizer
    ids = tok.encode('{"color":"red","ok":true}')
    for i in range(len(ids) + 1):
        ok = mask.allowed(ids[:i])
        if i < len(ids):
            assert ok[ids[i]], (i, tok.decode(ids[:i + 1]))
        else:
            assert set(np.nonzero(ok)[0]) == set(live.server.engine.eos)  # complete: only EOS
    # the engine's batch path: a grammar row masked, a row without one untouched, in one [B, V] operation
    from flashmoe.runtime.sampling import SamplingParams, Sequence, mask_logits

    part = ids[:5]
    seqs = [Sequence([1], SamplingParams(grammar=g.mask(g.compile(json_schema_grammar(SCHEMAS[1]), "x"))), tok,
                     frozenset(live.server.engine.eos)), Sequence([1], SamplingParams(), tok, frozenset())]
    seqs[0].generated = list(part)
    out = np.array(mask_logits(seqs, mx.zeros((2, g.n_vocab))))
    ok = g.mask(g.compile(json_schema_grammar(SCHEMAS[1]), "x")).allowed(part)  # a fresh matcher
    assert 0 < ok.sum() < g.n_vocab
    assert np.isneginf(out[0][~ok]).all() and (out[0][ok] == 0).all() and (out[1] == 0).all()


def test_tool_call_string_values_close(live):
    """A raw string parameter ends at its closing tag: the value and `\\n</parameter>\\n` are one lazy lexeme
    (as two, the value's open-ended regex swallowed the tag's first bytes and the call could never close, so a
    forced string argument ran to max_tokens). Lengths bound the value; no function tag inside it."""
    import llguidance

    from flashmoe.serve.grammar import tool_call_grammar

    g = live.server.grammars
    tools = {"f": {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"},
                                                     "s": {"type": "string", "maxLength": 5}}, "required": ["city"]},
             "free": {"type": "object"}}

    def accepts(force, text):
        m = llguidance.LLMatcher(g.tokenizer, tool_call_grammar(tools, force))
        return all(m.consume_token(t) for t in g.tokenizer.tokenize_str(text)) and m.is_accepting()

    end = "</function>\n</tool_call>"
    assert accepts("f", f"<parameter=city>\nOslo\n</parameter>\n{end}")
    assert accepts("f", f"<parameter=city>\nOs\nlo\n</parameter>\n<parameter=n>\n3\n</parameter>\n{end}")
    assert accepts("f", f"<parameter=city>\nOslo\n</parameter>\n<parameter=s>\nabcde\n</parameter>\n{end}")
    assert not accepts("f", f"<parameter=city>\nOslo\n</parameter>\n<parameter=s>\nabcdef\n</parameter>\n{end}")
    assert not accepts("f", f"<parameter=city>\nOslo{end}")
    assert accepts("", f"free>\n<parameter=anything>\nx y\n</parameter>\n{end}")
