"""Qwen3.5's assistant output syntax, parsed incrementally into reasoning, content and tool calls.

The Qwen3.5 chat template (Qwen/Qwen3.5-*/chat_template.jinja) opens the assistant turn with `<think>\\n`
(thinking on, the default) or `<think>\\n\\n</think>\\n\\n` (enable_thinking=false), and writes tool calls as

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

where VALUE is the raw string for a string argument, JSON for a mapping or a list, and Python's str() of
anything else (so a number reads `3`, a boolean `True`). Several calls follow one another separated by
`\\n`. Older Qwen3 checkpoints put a JSON object {"name", "arguments"} inside <tool_call>; that is
accepted too.

OutputParser.feed(text) takes generated text in arbitrary pieces (as the engine streams it) and returns
the parts completed so far: ("reasoning", str), ("content", str) or ("tool_call", ToolCall); while an XML
call is being written, ("call_start", ToolCall with no arguments yet) once its name is complete and
("call_delta", str) as each parameter closes: pieces of its arguments' JSON that, joined, are the final
ToolCall.arguments_json() (the same id). A text piece
that could be the start of a tag is held back until the next piece decides it, so the concatenation of
what a stream returns equals the parse of the whole text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

_FUNCTION_OPEN = re.compile(r"<function=([^>\n]*)>")
_FUNCTION = re.compile(r"<function=([^>\n]*)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict  # parsed argument values, typed by the tool's JSON schema where one is given

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


def _strip_one_newline(v: str) -> str:
    v = v.removeprefix("\n")
    v = v.removesuffix("\n")
    return v


def convert_value(raw: str, schema: dict | None):
    """A parameter's text, typed by its JSON-schema entry (the template wrote str() or JSON of the value)."""
    types = (schema or {}).get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    low = raw.strip()
    if types == ["string"]:
        return raw
    if low in ("null", "None") and (not types or "null" in types):
        return None
    for t in types or ["any"]:
        if t == "string":
            continue
        if t == "integer":
            try:
                return int(low)
            except ValueError:
                continue
        if t == "number":
            try:
                f = float(low)
                return int(f) if f.is_integer() and "." not in low and "e" not in low.lower() else f
            except ValueError:
                continue
        if t == "boolean":
            if low.lower() in ("true", "false"):
                return low.lower() == "true"
            continue
        if t in ("object", "array", "any"):
            try:
                return json.loads(low)
            except ValueError:
                if t == "any" and low in ("True", "False"):
                    return low == "True"
                continue
    return raw


def parse_call_body(body: str, tools: dict[str, dict], call_id: str | None = None) -> ToolCall | None:
    """The text between <tool_call> and </tool_call> (or up to the end of output): a ToolCall, or None
    when it is not a call at all. `tools` maps a function name to its JSON schema (`parameters`)."""
    call_id = call_id or new_call_id()
    m = _FUNCTION.search(body)
    if m:
        name = m.group(1).strip()
        if not name:
            return None
        props = (tools.get(name) or {}).get("properties") or {}
        args = {}
        for pm in _PARAMETER.finditer(m.group(2)):
            key = pm.group(1).strip()
            args[key] = convert_value(_strip_one_newline(pm.group(2)), props.get(key))
        return ToolCall(call_id, name, args)
    text = body.strip()
    if text.startswith("{"):  # Qwen3 / Hermes style: {"name": ..., "arguments": {...}}
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    return None
            if isinstance(args, dict):
                return ToolCall(call_id, obj["name"], args)
    return None


def _hold(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of one of tags."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class OutputParser:
    """Splits streamed model output into reasoning, content and tool calls (see the module docstring).

    reasoning: True when the prompt already opened a <think> block (the Qwen3.5 generation prompt does),
    so output starts as reasoning until </think>. tools: name -> parameters schema of the request's tools;
    None means tool calls are not parsed (a request without tools gets <tool_call> text as content)."""

    def __init__(self, reasoning: bool = False, tools: dict[str, dict] | None = None):
        self.state = "reasoning" if reasoning else "content"
        self.tools = tools
        self.buf = ""  # text not yet classified
        self.space = ""  # trailing whitespace of content/reasoning, held until more text follows
        self.at_start = reasoning  # after <think>, </think> or a call: leading newlines are dropped
        self.calls: list[ToolCall] = []
        self.open: ToolCall | None = None  # the XML call being written, once its name is known
        self.sent = ""  # its arguments' JSON handed out so far

    def _tags(self) -> tuple[str, ...]:
        if self.state == "reasoning":
            return (THINK_CLOSE,)
        if self.state == "call":
            return (CALL_CLOSE,)
        return (THINK_OPEN, CALL_OPEN) if self.tools is not None else (THINK_OPEN,)

    def _text(self, kind: str, text: str, out: list, final: bool = False) -> None:
        """Emit text of one kind; trailing whitespace waits (dropped before a tag, kept when text follows)."""
        if self.at_start:
            text = text.lstrip("\n")
            if not text:
                return
            self.at_start = False
        body = text.rstrip()
        if body:
            out.append((kind, self.space + body))
            self.space = text[len(body):]
        else:
            self.space += text
        if final and self.space:
            out.append((kind, self.space))
            self.space = ""

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buf += text
        out: list = []
        while self.buf:
            if self.state == "call":
                i = self.buf.find(CALL_CLOSE)
                if i < 0:
                    self._progress(out)
                    break
                self._end_call(self.buf[:i], out)
                self.buf = self.buf[i + len(CALL_CLOSE):]
                continue
            tags = self._tags()
            hits = [(self.buf.find(t), t) for t in tags if t in self.buf]
            if not hits:
                keep = _hold(self.buf, tags)
                self._text(self.state, self.buf[: len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                break
            i, tag = min(hits)
            before, self.buf = self.buf[:i], self.buf[i + len(tag):]
            if tag == THINK_CLOSE:
                self._text("reasoning", before, out)
                self.state, self.space, self.at_start = "content", "", True
            elif tag == THINK_OPEN:
                self._text("content", before, out, final=True)
                self.state, self.space, self.at_start = "reasoning", "", True
            else:  # CALL_OPEN: whitespace before a call separates, it is not content
                self._text("content", before, out)
                self.state, self.space = "call", ""
        return out

    def _progress(self, out: list) -> None:
        """An XML call still open: its start once the name is written, then its arguments' JSON up to the
        last parameter closed (without the final brace)."""
        m = _FUNCTION_OPEN.search(self.buf)
        if not m or not m.group(1).strip():
            return
        if self.open is None:
            self.open, self.sent = ToolCall(new_call_id(), m.group(1).strip(), {}), ""
            out.append(("call_start", self.open))
        last = self.buf.rfind("</parameter>")
        if last < m.end():
            return
        call = parse_call_body(self.buf[: last + len("</parameter>")], self.tools or {}, self.open.id)
        self._delta(call.arguments_json()[:-1], out)

    def _delta(self, j: str, out: list) -> None:
        if j.startswith(self.sent) and len(j) > len(self.sent):
            out.append(("call_delta", j[len(self.sent):]))
            self.sent = j

    def _end_call(self, body: str, out: list, closed: bool = True) -> None:
        opened, self.open = self.open, None
        call = parse_call_body(body, self.tools or {}, opened.id if opened else None)
        self.state = "content"
        if call is None:  # not a call after all: keep the text
            self._text("content", CALL_OPEN + body + (CALL_CLOSE if closed else ""), out)
            return
        if opened is not None:
            self._delta(call.arguments_json(), out)
        self.calls.append(call)
        out.append(("tool_call", call))
        self.at_start = True

    def close(self) -> list[tuple[str, object]]:
        """The end of output: whatever was held back (an unfinished call is parsed as far as it goes)."""
        out: list = []
        if self.state == "call":
            self._end_call(self.buf, out, closed=False)
        else:
            self._text(self.state, self.buf, out)
        self.buf = ""
        if self.state == "content" and self.space:
            out.append(("content", self.space))
        self.space = ""
        return out


def tool_schemas(tools: list[dict] | None) -> dict[str, dict] | None:
    """OpenAI-style tools ([{"type": "function", "function": {"name", "parameters"}}]) -> name -> schema."""
    if not tools:
        return None
    return {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
