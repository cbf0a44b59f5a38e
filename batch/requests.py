"""Input lines of a batch job -> Request (or BadLine, which becomes an error line in the output).

Two forms, one JSON object per line:

    OpenAI Batch API:  {"custom_id": "doc-1", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "...", "messages": [...], "max_tokens": 64}}
                       {"custom_id": "doc-2", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "...", "prompt": "raw text", "max_tokens": 64}}
    simple:            {"id": "doc-3", "prompt": "Summarise: ..."}     (a user turn, chat template)
                       {"messages": [...], "max_tokens": 64, "temperature": 0.7}

/v1/completions prompts are raw text (no chat template); everything else is rendered through the
bundle's chat template. A line's sampling fields override the job's defaults (`Defaults`). Range checks
of sampling values are the engine's (SamplingParams.check); this module checks shapes and types.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

# OpenAI body fields that do not change what a single greedy/sampled text answer is; accepted and ignored
_IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls",
            "reasoning_effort", "safety_identifier", "prompt_cache_key", "verbosity"}
# fields accepted only at their neutral value: field -> test that the value is neutral
_NEUTRAL = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "stream": lambda v: v in (None, False),
    "echo": lambda v: v in (None, False),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "suffix": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v in (None, {"type": "text"}),
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_SIMPLE_KEYS = {"id", "custom_id", "prompt", "messages", "system", *_SAMPLING}
MAX_TOKEN_ID = 2 ** 31 - 1  # past any vocabulary; the model's own size is checked when the line is tokenized
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class Defaults:
    """The job's defaults (CLI flags); a line's own fields override the sampling ones."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system_prompt: str | None = None  # added to chat requests that carry no system message
    prompt_template: str | None = None  # simple-form "prompt" goes in at {document} (or after it)


@dataclass
class Request:
    line: int  # 1-based line number in the input: the request's key in the output
    custom_id: str
    chat: bool  # True: /v1/chat/completions (chat template); False: /v1/completions (raw text)
    prompt: object  # chat: list of {"role", "content"}; completion: str or a list of token ids
    sampling: dict = field(default_factory=dict)  # max_tokens, temperature, top_p, top_k, seed, stop


@dataclass
class BadLine:
    line: int
    custom_id: str | None
    code: str  # invalid_json | invalid_request | unsupported | prompt_too_long | ... (BatchError.code)
    message: str
    param: str | None = None


class _Bad(Exception):
    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def default_custom_id(line: int) -> str:
    return f"line-{line}"


def parse_lines(lines, defaults: Defaults = Defaults()) -> list[Request | BadLine]:
    """Every non-blank line (str or bytes, 1-based numbering over all lines) -> Request or BadLine.
    A custom_id used twice makes the later line a BadLine."""
    out: list[Request | BadLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        if not raw.strip():
            continue
        try:
            r = parse_line(n, raw, defaults)
        except Exception as e:  # a shape the checks above did not foresee: this line's error, never the job's
            r = BadLine(n, None, "invalid_request", f"line {n} cannot be read ({type(e).__name__}: {e})")
        if isinstance(r, Request) and r.custom_id in seen:
            r = BadLine(n, r.custom_id, "duplicate_custom_id",
                        f"line {n}: custom_id {r.custom_id!r} is already used on line {seen[r.custom_id]}; "
                        "give every line a unique custom_id", "custom_id")
        if r.custom_id is not None:
            seen.setdefault(r.custom_id, n)
        out.append(r)
    return out


def parse_line(n: int, raw: str, defaults: Defaults = Defaults()) -> Request | BadLine:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return BadLine(n, None, "invalid_json", f"line {n} is not valid JSON ({e}); each line must be one JSON object")
    if not isinstance(obj, dict):
        return BadLine(n, None, "invalid_json", f"line {n} is JSON but not an object ({type(obj).__name__}); "
                                                "each line must be one JSON object")
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return BadLine(n, None, "invalid_json", f"line {n} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                                "without its pair), which is not text")
    openai = "url" in obj or "body" in obj or "method" in obj
    cid = obj.get("custom_id") if openai else obj.get("custom_id", obj.get("id"))
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    try:
        if cid is not None and not isinstance(cid, str):
            cid = None
            raise _Bad("invalid_request", "custom_id must be a string", "custom_id")
        if openai:
            return _openai(n, obj, cid, defaults)
        return _simple(n, obj, cid if cid is not None else default_custom_id(n), defaults)
    except _Bad as e:
        cid = cid if cid is not None or openai else default_custom_id(n)
        return BadLine(n, cid, e.code, f"line {n}: {e.message}", e.param)


def _openai(n: int, obj: dict, cid: str | None, d: Defaults) -> Request:
    if cid is None:
        raise _Bad("invalid_request", "an OpenAI Batch request needs a string custom_id", "custom_id")
    extra = set(obj) - {"custom_id", "method", "url", "body"}
    if extra:
        raise _Bad("invalid_request", f"unknown top-level field(s) {', '.join(sorted(extra))}; an OpenAI Batch "
                                      "line has custom_id, method, url and body")
    if obj.get("method", "POST") != "POST":
        raise _Bad("invalid_request", f"method must be POST (got {obj.get('method')!r})", "method")
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise _Bad("unknown_url", f"unknown url {url!r}; flashmoe-batch serves {CHAT_URL} and {COMPLETIONS_URL}",
                   "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Bad("invalid_request", "body must be a JSON object with the request's parameters", "body")
    chat = url == CHAT_URL
    allowed = {"messages" if chat else "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
    if chat:
        allowed.add("max_completion_tokens")
    for k, v in body.items():
        if k in allowed or k in _IGNORED:
            continue
        if k in _NEUTRAL:
            if not _NEUTRAL[k](v):
                raise _Bad("unsupported", f"{k}={json.dumps(v)} is not supported by flashmoe-batch; remove it", k)
            continue
        raise _Bad("invalid_request", f"unknown body field {k!r} for {url}", k)
    if chat:
        if body.get("max_completion_tokens") is not None:
            body = dict(body, max_tokens=body["max_completion_tokens"])
        return Request(n, cid, True, _messages(body.get("messages"), d.system_prompt), _sampling(body, d))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # ["text"] or [[ids]]: one prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < MAX_TOKEN_ID), None)
        if bad is not None:
            raise _Bad("invalid_prompt", f"token id {bad} is out of range; token ids are integers from 0 to the "
                                         "model's vocabulary size - 1", "prompt")
        prompt = [int(t) for t in prompt]
    elif not isinstance(prompt, str):
        raise _Bad("missing_prompt", "body.prompt must be a string (or one list of token ids); "
                                     "a batch line carries exactly one prompt", "prompt")
    if isinstance(prompt, str) and not prompt.strip():
        raise _Bad("missing_prompt", "body.prompt is empty", "prompt")
    return Request(n, cid, False, prompt, _sampling(body, d))


def _simple(n: int, obj: dict, cid: str, d: Defaults) -> Request:
    extra = set(obj) - _SIMPLE_KEYS
    if extra:
        raise _Bad("invalid_request", f"unknown field(s) {', '.join(sorted(extra))}; a simple line has "
                                      f"{', '.join(sorted(_SIMPLE_KEYS))}")
    if ("prompt" in obj) == ("messages" in obj):
        raise _Bad("missing_prompt", "give exactly one of \"prompt\" (text) or \"messages\" (a chat)", "prompt")
    system = obj.get("system", d.system_prompt)
    if system is not None and not isinstance(system, str):
        raise _Bad("invalid_request", "system must be a string", "system")
    if "prompt" in obj:
        p = obj["prompt"]
        if not isinstance(p, str) or not p.strip():
            raise _Bad("missing_prompt", "prompt must be a non-empty string", "prompt")
        if d.prompt_template is not None:
            t = d.prompt_template
            p = t.replace("{document}", p) if "{document}" in t else f"{t.rstrip()}\n\n{p}"
        msgs = [{"role": "user", "content": p}]
    else:
        msgs = obj["messages"]
    return Request(n, cid, True, _messages(msgs, system), _sampling(obj, d))


def _messages(msgs, system_prompt: str | None) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("missing_prompt", "messages must be a non-empty list of {\"role\", \"content\"}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise _Bad("invalid_request", f"messages[{i}] needs a role of {', '.join(_ROLES)}", "messages")
        c = m.get("content")
        if isinstance(c, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise _Bad("unsupported", f"messages[{i}].content has non-text parts; only text is supported",
                           "messages")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise _Bad("invalid_request", f"messages[{i}].content must be a string", "messages")
        out.append({"role": _ROLES[m["role"]], "content": c})
    if not any(m["content"].strip() for m in out):
        raise _Bad("missing_prompt", "every message is empty", "messages")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _number(body: dict, key: str, integer: bool):
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float) and not v.is_integer()):
        raise _Bad("invalid_sampling", f"{key} must be {'an integer' if integer else 'a number'} (got {json.dumps(v)})",
                   key)
    if isinstance(v, float) and not math.isfinite(v):
        raise _Bad("invalid_sampling", f"{key} must be finite (got {v})", key)
    return int(v) if integer else float(v)


def _sampling(body: dict, d: Defaults) -> dict:
    s = {"max_tokens": d.max_tokens, "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
         "seed": d.seed, "stop": tuple(d.stop)}
    for key, integer in (("max_tokens", True), ("temperature", False), ("top_p", False), ("top_k", True),
                         ("seed", True)):
        if body.get(key) is not None:
            s[key] = _number(body, key, integer)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _Bad("invalid_sampling", "stop must be a string or a list of strings", "stop")
        s["stop"] = tuple(x for x in stop if x)
    return s
