"""Request bodies -> the chat template's inputs: OpenAI and Anthropic messages and tools are checked and
normalised into the messages/tools shape Hugging Face chat templates read (Qwen3.5's included), then
rendered through the bundle's own template.

Normalised messages: {"role": "system"|"user"|"assistant"|"tool", "content": str} plus, on assistant
turns, "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": dict}}] and
"reasoning_content"; tools: [{"type": "function", "function": {"name", "description", "parameters"}}].
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import bad
from .toolcalls import CALL_OPEN, THINK_CLOSE, THINK_OPEN


def _text_parts(content, where: str) -> str:
    """A message content: a string, or a list of text parts (OpenAI {"type": "text", "text"} / Anthropic
    {"type": "text", "text"}); images and other media are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}[{i}]: content part of type {kind!r} is not supported; send text parts only",
                          where)
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}[{i}].text must be a string", where)
            out.append(part["text"])
        return "".join(out)
    raise bad(f"{where} must be a string or a list of text parts", where)


def _arguments(raw, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str):
        try:
            v = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise bad(f"{where} is not valid JSON ({e})", where) from None
        if isinstance(v, dict):
            return v
    raise bad(f"{where} must be a JSON object (or a string holding one)", where)


def openai_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with a role and content", where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad(f"{where}.role {role!r} is not one of system, developer, user, assistant, tool", where)
        msg = {"role": role, "content": _text_parts(m.get("content"), f"{where}.content")}
        if role == "assistant":
            calls = []
            for j, c in enumerate(m.get("tool_calls") or []):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"{where}.tool_calls[{j}] needs function.name and function.arguments", where)
                calls.append({"id": c.get("id") or f"call_{i}_{j}", "type": "function",
                              "function": {"name": fn["name"],
                                           "arguments": _arguments(fn.get("arguments", {}),
                                                                   f"{where}.tool_calls[{j}].function.arguments")}})
            if calls:
                msg["tool_calls"] = calls
            if isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
        elif role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def openai_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                      "\"parameters\": {...}}}}", "tools")
        if not isinstance(fn.get("parameters", {}), dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        out.append({"type": "function", "function": fn})  # as sent: the template renders it verbatim
    return out or None


def anthropic_messages(system, messages) -> list[dict]:
    """Anthropic Messages -> normalised messages: tool_use blocks become assistant tool_calls, tool_result
    blocks become tool messages, thinking blocks become reasoning_content."""
    out = []
    if system is not None:
        s = _text_parts(system, "system")
        if s:
            out.append({"role": "system", "content": s})
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"{where}.role must be user or assistant", where)
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content must be a string or a list of content blocks", where)
        text, calls, reasoning = [], [], None
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            bw = f"{where}.content[{j}]"
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_result" and m["role"] == "user":
                c = b.get("content")
                body = _text_parts(c, f"{bw}.content") if c is not None else ""
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")), "content": body})
            elif kind == "tool_use" and m["role"] == "assistant":
                if not isinstance(b.get("name"), str):
                    raise bad(f"{bw}: tool_use needs a name", bw)
                calls.append({"id": str(b.get("id", f"toolu_{i}_{j}")), "type": "function",
                              "function": {"name": b["name"], "arguments": _arguments(b.get("input", {}), f"{bw}.input")}})
            elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
                reasoning = b.get("thinking") if isinstance(b.get("thinking"), str) else reasoning
            else:
                raise bad(f"{bw}: content block of type {kind!r} is not supported in a {m['role']} message", bw)
        if text or calls or m["role"] == "assistant":
            msg = {"role": m["role"], "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            out.append(msg)
    return out


def anthropic_tools(tools) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools must be a list of {\"name\", \"description\", \"input_schema\"}", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise bad(f"tools[{i}] needs a name (and an input_schema)", "tools")
        schema = t.get("input_schema") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise bad(f"tools[{i}].input_schema must be a JSON schema object", "tools")
        f = {"name": t["name"]}
        if t.get("description"):
            f["description"] = str(t["description"])
        f["parameters"] = schema
        out.append({"type": "function", "function": f})
    return out or None


@dataclass
class Prompt:
    text: str  # the rendered prompt, including any forced start of the answer
    reasoning: bool  # the prompt leaves the model inside a <think> block
    forced: str  # text appended after the template's generation prompt (the parser reads it first)


def render(tokenizer, messages: list[dict], tools: list[dict] | None, force_call: str | None = None,
           template_kwargs: dict | None = None, answer_only: bool = False) -> Prompt:
    """Render through the bundle's chat template. force_call: None, "" (some tool must be called) or a
    function name: the answer is started with `<tool_call>\\n<function=` (and the name), after closing
    an open <think> block, so the model can only continue the call. answer_only: an open <think> block is
    closed too (a constrained answer, JSON, starts at once)."""
    reserved = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token")
    kw = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
    if tools:
        kw["tools"] = tools
    from flashmoe.errors import BundleError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kw)
    except BundleError as e:  # the template rejected these messages (raise_exception) or there is none
        raise bad(" ".join(str(e).split()), "messages") from None
    forced = ""
    reasoning = text.rstrip().endswith(THINK_OPEN)
    if force_call is not None or answer_only:
        if reasoning:
            forced += "\n" + THINK_CLOSE + "\n\n"
            reasoning = False
    if force_call is not None:
        forced += CALL_OPEN + "\n<function=" + (force_call + ">\n" if force_call else "")
    return Prompt(text + forced, reasoning, forced)


def force_from_tool_choice(choice, tools: list[dict] | None, style: str = "openai") -> tuple[bool, str | None]:
    """tool_choice -> (use_tools, force_call). OpenAI: "none" | "auto" | "required" |
    {"type": "function", "function": {"name"}}; Anthropic: {"type": "auto"|"any"|"none"|"tool", "name"}."""
    names = [t["function"]["name"] for t in tools or []]
    if choice is None:
        return bool(tools), None
    if style == "anthropic":
        kind = choice.get("type") if isinstance(choice, dict) else None
        name = choice.get("name") if isinstance(choice, dict) else None
        kind = {"any": "required", "tool": "function"}.get(kind, kind)
    elif isinstance(choice, str):
        kind, name = choice, None
    elif isinstance(choice, dict) and choice.get("type") == "function":
        kind, name = "function", (choice.get("function") or {}).get("name")
    else:
        kind, name = None, None
    if kind == "none":
        return False, None
    if kind == "auto":
        return bool(tools), None
    if kind in ("required", "function") and not tools:
        raise bad("tool_choice asks for a tool call but the request has no tools", "tool_choice")
    if kind == "required":
        return True, ""
    if kind == "function":
        if name not in names:
            raise bad(f"tool_choice names {name!r}, which is not among the request's tools {names}", "tool_choice")
        return True, name
    raise bad(f"tool_choice {choice!r} is not understood; use none, auto, required or a named function",
              "tool_choice")
