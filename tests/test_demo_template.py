"""The demo model's chat template (demo/conversations.py TEMPLATE, shipped as demo/model/chat_template.jinja):
Qwen3.5's tool rendering, rendered by flashmoe (runtime tokenizer, serve/chat.py) exactly as transformers
renders it, and a chat without tools rendered as the first demo's template did (so its answers hold)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from flashmoe.runtime.tokenizer import Tokenizer
from flashmoe.serve.chat import force_from_tool_choice, openai_messages, openai_tools, render

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
sys.path.insert(0, str(ROOT / "demo"))
import conversations  # noqa: E402

# the first demo's template (before tools): what chats without tools must still render as
FIRST = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": 'Tell me about the "for" statement.'},
        {"role": "assistant", "content": 'The "for" statement\n*******************'},
        {"role": "user", "content": "What is the \"while\" statement?"}]
TOOL_CHAT = [{"role": "user", "content": "What is the weather like in Oslo?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
             {"role": "tool", "content": '{"temperature": 3}'},
             {"role": "assistant", "content": "It is 3 degrees celsius in Oslo."},
             {"role": "user", "content": "Set a timer for 5 minutes."}]
TOOLS = [conversations.TOOLS["get_weather"], conversations.TOOLS["set_timer"]]


def _hf(template: str, msgs, tools=None) -> str:
    from tokenizers import Tokenizer as Tok, models
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=Tok(models.BPE()), chat_template=template)
    return t.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)


def test_the_shipped_template_is_the_one_in_conversations():
    assert (DEMO / "chat_template.jinja").read_text() == conversations.TEMPLATE
    assert json.loads((DEMO / "tokenizer_config.json").read_text())["chat_template"] == conversations.TEMPLATE
    assert Tokenizer(DEMO).chat_template == conversations.TEMPLATE


@pytest.mark.parametrize("msgs", [CHAT, CHAT[1:], CHAT[1:2]])
def test_chats_without_tools_render_as_before(msgs):
    tok = Tokenizer(DEMO)
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == _hf(FIRST, msgs)
    assert render(tok, openai_messages(msgs), None).text == _hf(FIRST, msgs)


def test_tools_render_as_transformers_and_qwen35():
    tok = Tokenizer(DEMO)
    want = _hf(conversations.TEMPLATE, TOOL_CHAT, TOOLS)
    p = render(tok, TOOL_CHAT, openai_tools(TOOLS))
    assert p.text == want and not p.reasoning and p.forced == ""
    assert want.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
                           + json.dumps(TOOLS[0], ensure_ascii=False) + "\n" + json.dumps(TOOLS[1], ensure_ascii=False)
                           + "\n</tools>")
    assert ("<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n{\"temperature\": 3}\n</tool_response><|im_end|>\n") in want
    assert want.endswith("<|im_start|>user\nSet a timer for 5 minutes.<|im_end|>\n<|im_start|>assistant\n")
    # the same template without thinking is the one the serve tests use (one copy of the text)
    assert conversations.QWEN35_TEMPLATE.startswith(conversations.TEMPLATE[:conversations.TEMPLATE.rindex("{%- if add_")])


def test_a_forced_call_starts_right_after_the_generation_prompt():
    tok = Tokenizer(DEMO)
    _, force = force_from_tool_choice({"type": "function", "function": {"name": "set_timer"}}, openai_tools(TOOLS))
    p = render(tok, TOOL_CHAT, openai_tools(TOOLS), force)
    assert p.text.endswith("<|im_start|>assistant\n<tool_call>\n<function=set_timer>\n") and not p.reasoning
    _, force = force_from_tool_choice("required", openai_tools(TOOLS))
    assert render(tok, TOOL_CHAT, openai_tools(TOOLS), force).text.endswith("<|im_start|>assistant\n<tool_call>\n<function=")
