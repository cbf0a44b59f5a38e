"""Input lines of a batch job -> Request (or BadLine, which becomes an error line in the output).

Two forms, one JSON object per line:

    OpenAI Batch API:  {"custom_id": "doc-1", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "...", "messages": [...], "max_tokens": 64}}
                       {"custom_id": "doc-2", "method": "POST", "url": "/v1/completions",
                        "body": {"model": "...", "prompt": "raw text", "max_tokens": 64}}
    simple:            {"id": "doc-3", "prompt": "Summarise: ..."}     (a user turn, chat template)
                       {"messages": [...], "max_tokens": 64, "temperature": 0.7}

/v1/completions prompts are raw text (no chat template); everything else is rendered through the
bundle's chat template. A line's sampling fields override the job's defaults (`Defaults`). Every body (a
simple line as the chat body it stands for) is validated by the server's request model
(flashmoe.request: ChatRequest, CompletionRequest), so a mistake gets the same message in both front
ends; this module checks the line around the body and refuses what a batch job does not do (tools, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from flashmoe.errors import InputError
from flashmoe.request import ChatRequest, CompletionRequest, MAX_DEPTH, check_tree, describe

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
BATCH_MODEL = "flashmoe-batch"  # the body's "model" where a line names none (the bundle answers every line)

# OpenAI body fields outside the request model that do not change a text answer: accepted and ignored
_IGNORED = {"metadata", "store", "service_tier", "reasoning_effort", "safety_identifier", "prompt_cache_key",
            "verbosity"}
# what a batch job does not do (the server does some): accepted only at its neutral value
_NEUTRAL = {
    "stream": lambda v: v in (None, False),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v in (None, {"type": "text"}),
    "chat_template_kwargs": lambda v: not v,
    "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
}
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_SIMPLE_KEYS = {"id", "custom_id", "prompt", "messages", "system", *_SAMPLING}
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


def parse_lines(lines, defaults: Defaults = Defaults(), vocab_size: int | None = None) -> list[Request | BadLine]:
    """Every non-blank line (str or bytes, 1-based numbering over all lines) -> Request or BadLine.
    A custom_id used twice makes the later line a BadLine. vocab_size: token ids of a prompt must be below it."""
    out: list[Request | BadLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", errors="replace")
        if not raw.strip():
            continue
        try:
            r = parse_line(n, raw, defaults, vocab_size)
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


def parse_line(n: int, raw: str, defaults: Defaults = Defaults(), vocab_size: int | None = None) -> Request | BadLine:
    try:
        obj = json.loads(raw)
    except RecursionError:
        return BadLine(n, None, "invalid_json", f"line {n} is nested deeper than {MAX_DEPTH} levels")
    except ValueError as e:
        return BadLine(n, None, "invalid_json", f"line {n} is not valid JSON ({e}); each line must be one JSON object")
    try:
        check_tree(obj)  # the server's rule: nesting depth, lone surrogates
    except InputError as e:
        return BadLine(n, None, "invalid_json", f"line {n}: {e}")
    if not isinstance(obj, dict):
        return BadLine(n, None, "invalid_json", f"line {n} is JSON but not an object ({type(obj).__name__}); "
                                                "each line must be one JSON object")
    openai = "url" in obj or "body" in obj or "method" in obj
    cid = obj.get("custom_id") if openai else obj.get("custom_id", obj.get("id"))
    if isinstance(cid, int) and not isinstance(cid, bool):
        cid = str(cid)
    try:
        if cid is not None and not isinstance(cid, str):
            cid = None
            raise _Bad("invalid_request", "custom_id must be a string", "custom_id")
        if openai:
            return _openai(n, obj, cid, defaults, vocab_size)
        return _simple(n, obj, cid if cid is not None else default_custom_id(n), defaults)
    except _Bad as e:
        cid = cid if cid is not None or openai else default_custom_id(n)
        return BadLine(n, cid, e.code, f"line {n}: {e.message}", e.param)


def _openai(n: int, obj: dict, cid: str | None, d: Defaults, vocab_size: int | None) -> Request:
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
    cls = ChatRequest if url == CHAT_URL else CompletionRequest
    unknown = sorted(set(body) - set(cls.model_fields) - _IGNORED - set(_NEUTRAL))
    if unknown:
        raise _Bad("invalid_request", f"unknown body field {unknown[0]!r} for {url}", unknown[0])
    req = _validated(cls, {"model": BATCH_MODEL, **body}, vocab_size)
    for k, v in body.items():
        if k in _NEUTRAL and not _NEUTRAL[k](v):
            raise _Bad("unsupported", f"{k}={json.dumps(v)} is not supported by flashmoe-batch; remove it", k)
    if cls is ChatRequest:
        return Request(n, cid, True, _messages(req, d.system_prompt), _sampling(req, req.answer_tokens, d))
    prompt = req.one_prompt
    if isinstance(prompt, str) and not prompt.strip():
        raise _Bad("missing_prompt", "body.prompt is empty", "prompt")
    return Request(n, cid, False, prompt, _sampling(req, req.max_tokens, d))


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
    chat = {"model": BATCH_MODEL, "messages": msgs, **{k: obj[k] for k in _SAMPLING if k in obj}}
    req = _validated(ChatRequest, chat, None)
    return Request(n, cid, True, _messages(req, system), _sampling(req, req.answer_tokens, d))


def _validated(cls: type[BaseModel], body: dict, vocab_size: int | None):
    """body -> cls by the server's request model; a mistake -> _Bad with the server's message."""
    try:
        return cls.model_validate(body, context={"vocab_size": vocab_size})
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise _Bad(_code(param, first["type"]), describe(e), param) from None


def _code(param: str | None, kind: str) -> str:
    if param in _SAMPLING or param == "max_completion_tokens":
        return "invalid_sampling"
    if param in ("messages", "prompt") and kind in ("missing", "too_short"):
        return "missing_prompt"
    if param == "prompt" and kind == "value_error":  # a token id out of range
        return "invalid_prompt"
    return "invalid_request"


def _messages(req: ChatRequest, system_prompt: str | None) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES or m.tool_calls:
            raise _Bad("unsupported", f"messages[{i}] is a tool call or result; flashmoe-batch answers text chats "
                                      "only (roles system, developer, user, assistant)", "messages")
        c = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or ())
        out.append({"role": _ROLES[m.role], "content": c})
    if not any(m["content"].strip() for m in out):
        raise _Bad("missing_prompt", "every message is empty", "messages")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _sampling(req: ChatRequest | CompletionRequest, max_tokens: int | None, d: Defaults) -> dict:
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return {"max_tokens": pick(max_tokens, d.max_tokens), "temperature": float(pick(req.temperature, d.temperature)),
            "top_p": float(pick(req.top_p, d.top_p)), "top_k": pick(req.top_k, d.top_k), "seed": pick(req.seed, d.seed),
            "stop": tuple(d.stop) if req.stop is None else tuple(x for x in req.stops if x)}
