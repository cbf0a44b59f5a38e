"""flashmoe-serve without a server: the Qwen3.5 tool-call parser (whole and streamed), the chat template's
tool rendering, and request normalisation (OpenAI and Anthropic)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from flashmoe.serve.chat import (
    anthropic_messages,
    anthropic_tools,
    force_from_tool_choice,
    openai_messages,
    openai_tools,
    render,
)
from flashmoe.serve.errors import APIError
from flashmoe.serve.jsonformat import parse_response_format
from flashmoe.serve.toolcalls import OutputParser, convert_value, tool_schemas

# The Qwen3.5 chat template's tool-related behaviour (Qwen/Qwen3.5-35B-A3B chat_template.jinja): the same
# system block, tool-call and tool-response rendering and generation prompt, without the vision parts. One
# copy, in demo/conversations.py (the demo model's template is the same without thinking).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
from conversations import QWEN35_TEMPLATE  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer"}}, "where": {"type": "object"}},
        "required": ["city"]}}}

CALL_TEXT = ("The user wants weather.\n</think>\n\nLet me check.\n\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
             "<parameter=metric>\nTrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
             "<parameter=where>\n{\"lat\": 40.7}\n</parameter>\n</function>\n</tool_call>\n"
             "<tool_call>\n<function=get_weather>\n<parameter=city>\nline one\nline two\n</parameter>\n"
             "</function>\n</tool_call>")
CALL_ARGS = [{"city": "New York", "days": 3, "metric": True, "hours": [1, 2], "where": {"lat": 40.7}},
             {"city": "line one\nline two"}]


def _split(parts):
    r = "".join(x for k, x in parts if k == "reasoning")
    c = "".join(x for k, x in parts if k == "content")
    calls = [(x.name, x.arguments) for k, x in parts if k == "tool_call"]
    return r, c, calls


# ----------------------------------------------------------------------------------------------
# the parser


def test_parser_whole_text():
    p = OutputParser(reasoning=True, tools=tool_schemas([WEATHER]))
    r, c, calls = _split(p.feed(CALL_TEXT) + p.close())
    assert r == "The user wants weather."
    assert c == "Let me check."
    assert calls == [("get_weather", CALL_ARGS[0]), ("get_weather", CALL_ARGS[1])]


def _fed_in_random_pieces(text: str, seed: int) -> list:
    """The parts a reasoning, weather-tool parser gives for `text` fed in random pieces of 1 to 7 characters."""
    rng = random.Random(seed)
    p = OutputParser(reasoning=True, tools=tool_schemas([WEATHER]))
    parts, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        parts += p.feed(text[i:i + n])
        i += n
    return parts + p.close()


@pytest.mark.parametrize("seed", range(30))
def test_parser_streamed_in_random_pieces_equals_whole(seed):
    parts = _fed_in_random_pieces(CALL_TEXT, seed)
    assert _split(parts) == ("The user wants weather.", "Let me check.",
                             [("get_weather", CALL_ARGS[0]), ("get_weather", CALL_ARGS[1])])
    # a call is emitted whole, only once its </tool_call> has arrived
    assert [k for k, _ in parts].count("tool_call") == 2


@pytest.mark.parametrize("seed", range(10))
def test_parser_streams_call_arguments_as_parameters_close(seed):
    parts = _fed_in_random_pieces(CALL_TEXT, seed)
    calls = [x for k, x in parts if k == "tool_call"]
    for call in calls:
        kinds = [k for k, x in parts if getattr(x, "id", None) == call.id or k == "call_delta"]
        start = next(j for j, (k, x) in enumerate(parts) if k == "call_start" and x.id == call.id)
        end = next(j for j, (k, x) in enumerate(parts) if k == "tool_call" and x.id == call.id)
        deltas = [x for k, x in parts[start:end] if k == "call_delta"]
        assert "".join(deltas) == call.arguments_json() and parts[start][1].name == call.name
        assert len(deltas) == len(call.arguments) + 1  # one per parameter, then the closing brace
        assert kinds


def test_parser_plain_text_passes_through_unchanged():
    text = "\n  Hello <b>world</b> a < b > c <tool and <think not closed  \n"
    p = OutputParser(reasoning=False, tools=None)
    out = []
    for ch in text:
        out += p.feed(ch)
    out += p.close()
    assert [k for k, _ in out] == ["content"] * len(out)
    assert "".join(x for _, x in out) == text


def test_parser_without_tools_keeps_tool_call_text_as_content():
    p = OutputParser(reasoning=False, tools=None)
    text = "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    assert _split(p.feed(text) + p.close()) == ("", text, [])


def test_parser_thinking_disabled_prompt_and_model_opened_think():
    # enable_thinking=false: the prompt closed the think block; output is content
    p = OutputParser(reasoning=False, tools=None)
    assert _split(p.feed("Hi there") + p.close()) == ("", "Hi there", [])
    # a model that opens <think> itself
    p = OutputParser(reasoning=False, tools=None)
    assert _split(p.feed("<think>\nhmm\n</think>\n\nAnswer") + p.close()) == ("hmm", "Answer", [])


def test_parser_hermes_json_and_malformed_and_unfinished():
    tools = tool_schemas([WEATHER])
    p = OutputParser(False, tools)
    out = p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>') + p.close()
    assert _split(out) == ("", "", [("get_weather", {"city": "Oslo"})])
    p = OutputParser(False, tools)
    bad = "<tool_call>\nnot a call\n</tool_call>"
    assert _split(p.feed(bad) + p.close()) == ("", bad, [])
    # output cut by max_tokens inside a call: parsed as far as it goes
    p = OutputParser(False, tools)
    out = p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome") + p.close()
    assert _split(out) == ("", "", [("get_weather", {"city": "Rome"})])


def test_convert_value_follows_schema_and_template_str():
    assert convert_value("3", {"type": "integer"}) == 3
    assert convert_value("2.5", {"type": "number"}) == 2.5
    assert convert_value("True", {"type": "boolean"}) is True  # the template writes Python's str(True)
    assert convert_value("false", {"type": "boolean"}) is False
    assert convert_value("007", {"type": "string"}) == "007"
    assert convert_value("[1, 2]", {"type": "array"}) == [1, 2]
    assert convert_value("None", {"type": ["integer", "null"]}) is None
    assert convert_value("x y", None) == "x y"
    assert convert_value("12", None) == 12
    assert convert_value("abc", {"type": "integer"}) == "abc"  # the model's text kept when it is not an int


# ----------------------------------------------------------------------------------------------
# request normalisation and the real template


class _Tok:
    """Just the chat-template part of runtime.tokenizer.Tokenizer, on a given template."""

    def __init__(self, tmp_path, template):
        from flashmoe.bench.synth import write_byte_tokenizer
        from flashmoe.runtime.tokenizer import Tokenizer

        write_byte_tokenizer(tmp_path, 512)
        (tmp_path / "chat_template.jinja").write_text(template)
        self.tok = Tokenizer(tmp_path)


def test_render_qwen35_tools_and_history(tmp_path):
    tok = _Tok(tmp_path, QWEN35_TEMPLATE).tok
    msgs = openai_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    p = render(tok, msgs, openai_tools([WEATHER]))
    assert p.text.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                             + json.dumps(WEATHER, ensure_ascii=False))
    assert "</IMPORTANT>\n\nBe brief.<|im_end|>" in p.text
    assert ("<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n") in p.text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in p.text
    assert p.text.endswith("<|im_start|>assistant\n<think>\n") and p.reasoning and p.forced == ""
    # a named tool_choice starts the call after closing the think block
    _, force = force_from_tool_choice({"type": "function", "function": {"name": "get_weather"}}, openai_tools([WEATHER]))
    p2 = render(tok, msgs, openai_tools([WEATHER]), force)
    assert p2.text.endswith("<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n") and not p2.reasoning
    # enable_thinking=false through template kwargs
    p3 = render(tok, msgs, None, None, {"enable_thinking": False})
    assert p3.text.endswith("<think>\n\n</think>\n\n") and not p3.reasoning and "# Tools" not in p3.text


def test_anthropic_normalisation_matches_openai():
    a = anthropic_messages("Be brief.", [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ])
    assert a == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
    ]
    t = anthropic_tools([{"name": "get_weather", "description": "Weather for a city",
                          "input_schema": WEATHER["function"]["parameters"]}])
    assert t == [WEATHER]
    assert force_from_tool_choice({"type": "any"}, t, "anthropic") == (True, "")
    assert force_from_tool_choice({"type": "tool", "name": "get_weather"}, t, "anthropic") == (True, "get_weather")
    assert force_from_tool_choice({"type": "none"}, t, "anthropic") == (False, None)


@pytest.mark.parametrize("call, message", [
    (lambda: openai_messages([]), "non-empty"),
    (lambda: openai_messages([{"role": "wizard", "content": "x"}]), "role"),
    (lambda: openai_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "image_url"),
    (lambda: openai_messages([{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}]), "not valid JSON"),
    (lambda: openai_tools([{"type": "function", "function": {}}]), "tools[0]"),
    (lambda: force_from_tool_choice("required", None), "no tools"),
    (lambda: force_from_tool_choice({"type": "function", "function": {"name": "nope"}}, [WEATHER]), "nope"),
    (lambda: force_from_tool_choice("sometimes", [WEATHER]), "not understood"),
    (lambda: anthropic_messages(None, [{"role": "user", "content": [{"type": "image"}]}]), "image"),
    (lambda: parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": 5}}}), "valid JSON schema"),
])
def test_bad_requests_raise_400(call, message):
    with pytest.raises(APIError) as e:
        call()
    assert e.value.status == 400 and message in e.value.message
