"""flashmoe-serve faults (#21): every client mistake is a 4xx with a one-line message, on a connection that
stays usable; request bodies are bounded before they are buffered; any model name is served unless
strict; the typed request model (flashmoe.request) on its own."""

from __future__ import annotations

import json
import socket

import pytest
from flashmoe.errors import InputError
from flashmoe.request import ChatRequest, CompletionRequest, MessagesRequest, parse_json, validate
from test_serve import MODEL, LiveServer, _server

HI = [{"role": "user", "content": "hi"}]
CHAT, COMP, MSG = "/v1/chat/completions", "/v1/completions", "/v1/messages"

FAULTS = [  # path, raw body, words in the message
    (CHAT, b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper"),
    (CHAT, b'{"a": ' + b'{"b": ' * 100_000 + b"1" + b"}" * 100_001, "nested deeper"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "x\\ud800y"}]}', "surrogate"),
    (MSG, b'{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "\\udfff"}]}', "surrogate"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}).encode(),
     "tool_calls"),
    (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "", "tool_calls": 7}]}).encode(),
     "tool_calls"),
    (CHAT, json.dumps({"model": MODEL, "messages": HI, "stream": True, "stream_options": "yes"}).encode(),
     "stream_options"),
    (CHAT, json.dumps({"model": MODEL, "messages": HI, "stream_options": [1]}).encode(), "stream_options"),
    (CHAT, json.dumps({"model": MODEL, "messages": HI, "tool_choice": {"type": "function", "function": "f"}}).encode(),
     "tool_choice"),
    (CHAT, json.dumps({"model": MODEL, "messages": HI, "tool_choice": 3}).encode(), "tool_choice"),
    (MSG, json.dumps({"model": MODEL, "max_tokens": 3, "messages": HI, "tool_choice": "any"}).encode(), "tool_choice"),
    (MSG, json.dumps({"model": MODEL, "max_tokens": 3, "messages": HI, "tool_choice": {"type": "tool", "name": 5}}
                     ).encode(), "tool_choice"),
    (MSG, json.dumps({"model": MODEL, "max_tokens": 3, "messages": HI, "tool_choice": {"kind": "x"}}).encode(),
     "tool_choice"),
    (COMP, json.dumps({"model": MODEL, "prompt": [1, -3]}).encode(), "prompt"),
    (COMP, json.dumps({"model": MODEL, "prompt": [[1], [2]]}).encode(), "prompt"),
    (COMP, json.dumps({"model": MODEL, "prompt": "hi", "seed": 10 ** 30}).encode(), "seed"),
    (CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (CHAT, b"\xff\xfe{}", "UTF-8"),
    (CHAT, json.dumps({"model": MODEL, "messages": HI, "top_logprobs": 21}).encode(), "top_logprobs"),
]


@pytest.fixture(scope="module")
def live(loaded):
    s = LiveServer(_server(loaded, max_tokens=8))
    yield s
    s.close()


def _http(sock, method, path, body=b"", headers=()):
    """One HTTP/1.1 request on an open socket (keep-alive); returns (status, headers dict, json body)."""
    head = [f"{method} {path} HTTP/1.1", "host: x", f"content-length: {len(body)}", "content-type: application/json",
            *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return _read_response(sock)


def _read_response(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    hdrs = dict(line.lower().split(": ", 1) for line in lines[1:])
    n = int(hdrs["content-length"])
    while len(rest) < n:
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), hdrs, json.loads(rest[:n])


@pytest.mark.parametrize("path, raw, words", FAULTS, ids=[f"{i}" for i in range(len(FAULTS))])
def test_client_mistakes_are_400_on_a_connection_that_stays_open(live, path, raw, words):
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        status, hdrs, j = _http(sock, "POST", path, raw)
        assert status == 400, j
        err = j["error"]
        assert words in err["message"] and err["type"] == "invalid_request_error", err
        assert "\n" not in err["message"] and hdrs.get("connection") != "close"
        # the same connection answers the next request
        status, _, j = _http(sock, "GET", "/health")
        assert status == 200 and j["status"] == "ok"


def test_405_is_a_client_error(live):
    import httpx

    r = httpx.get(live.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live.url + "/v1/messages", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_any_model_name_is_served_and_named_for_what_it_is(live):
    r = live.openai().chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert r.model == MODEL
    m = live.anthropic().messages.create(model="claude-x", max_tokens=2, messages=HI)
    assert m.model == MODEL


def test_strict_model_refuses_other_names(loaded):
    import anthropic
    import openai

    s = LiveServer(_server(loaded, strict_model=True))
    try:
        with pytest.raises(openai.NotFoundError):
            s.openai().chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
        with pytest.raises(anthropic.NotFoundError):
            s.anthropic().messages.create(model="claude-x", max_tokens=2, messages=HI)
        assert s.openai().chat.completions.create(model=MODEL, messages=HI, max_tokens=2).model == MODEL
    finally:
        s.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_declared_400_mib_body_refused_before_it_is_read(live):
    port = int(live.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {400 << 20}\r\n\r\n".encode())  # and not one byte of the body
        status, hdrs, j = _read_response(sock)
    assert status == 413 and "limit" in j["error"]["message"] and hdrs["connection"] == "close"


def test_chunked_400_mib_body_is_cut_off_without_growing_memory(live):
    """No Content-Length: the body is counted as it streams and refused past the limit (16 MiB here); the
    server (this process) must not grow by anything near the 400 MiB sent at it."""
    port = int(live.url.rsplit(":", 1)[1])
    before = _rss()
    piece = b"x" * (1 << 20)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     "transfer-encoding: chunked\r\n\r\n".encode())
        try:
            while sent < 400 << 20:
                sock.sendall(chunk)
                sent += len(piece)
        except OSError:  # the server answered and closed: the rest cannot be sent
            pass
        status, _, j = _read_response(sock)
    assert status == 413 and "limit" in j["error"]["message"]
    assert sent < 400 << 20
    assert _rss() - before < 100 << 20


def test_request_model_on_its_own():
    req = validate(ChatRequest, {"model": "m", "messages": HI, "stop": "x", "max_completion_tokens": 3, "extra": 1})
    assert req.stops == ["x"] and req.answer_tokens == 3
    c = validate(CompletionRequest, {"model": "m", "prompt": [[5, 9]]}, vocab_size=10)
    assert c.one_prompt == [5, 9]
    with pytest.raises(InputError, match=r"token ids must be in \[0, 10\)"):
        validate(CompletionRequest, {"model": "m", "prompt": [5, 10]}, vocab_size=10)
    with pytest.raises(InputError, match="max_tokens: Field required"):
        validate(MessagesRequest, {"model": "m", "messages": HI})
    with pytest.raises(InputError, match="temperature"):
        validate(ChatRequest, {"model": "m", "messages": HI, "temperature": True})  # a bool is not a number
    with pytest.raises(InputError, match="nested deeper than 64"):
        parse_json(b"[" * 65 + b"]" * 65)
    deep = parse_json(b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}")["a"]  # 64 levels in all: accepted
    for _ in range(62):
        deep = deep[0]
    assert deep == []
