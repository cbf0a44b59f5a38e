"""POST /v1/chat/completions and POST /v1/completions, in the OpenAI shapes (streaming: SSE chunks
ending with `data: [DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from flashmoe.request import ChatRequest, CompletionRequest

from .app import Answer, Server, dump
from .chat import force_from_tool_choice, openai_messages, openai_tools, render
from .errors import APIError, bad
from .jsonformat import parse_response_format
from .logprobs import LogprobRecorder, openai_chat, openai_completion
from .toolcalls import OutputParser, tool_schemas
from .worker import EngineFailed


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(stats: dict) -> dict:
    p, g = int(stats.get("prompt_tokens", 0)), int(stats.get("generated_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g,
            "prompt_tokens_details": {"cached_tokens": int(stats.get("cached_prompt_tokens", 0))}}


def finish(engine_reason: str, calls: bool) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


@dataclass(frozen=True)
class Envelope:
    """The fields that a response object and every chunk of one request's stream repeat."""

    id: str
    object: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, object: str, server: Server) -> Envelope:
        return cls(prefix + uuid.uuid4().hex, object, int(time.time()), server.config.model_id)

    def body(self, choices: list, stats: dict | None = None) -> dict:
        """The object holding `choices`, and the usage of `stats` where given."""
        d = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if stats is not None:
            d["usage"] = usage(stats)
        return d

    def event(self, choices: list, stats: dict | None = None) -> str:
        return sse(self.body(choices, stats))


def event_stream(events) -> StreamingResponse:
    """An SSE response of `events` (an async iterator of strings): an engine failure becomes an error
    event, and the stream ends with `data: [DONE]`."""
    async def frames():
        async with aclosing(events):
            try:
                async for frame in events:
                    yield frame
            except EngineFailed as e:
                yield sse(APIError(500, str(e)).openai_body())
        yield "data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


def tool_call_json(call, index: int | None = None) -> dict:
    d = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json()}}
    if index is not None:
        d["index"] = index
    return d


def register(app: FastAPI, server: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = await server.read(request, ChatRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        recorder = LogprobRecorder(req.top_logprobs or 0) if req.logprobs else None
        stream = bool(req.stream)
        messages = openai_messages(dump(req.messages))
        tools = openai_tools(dump(req.tools))
        use_tools, force = force_from_tool_choice(dump(req.tool_choice), tools)
        fmt = parse_response_format(dump(req.response_format))
        prompt = render(server.tokenizer, messages, tools if use_tools else None, force, req.chat_template_kwargs,
                        answer_only=fmt is not None)
        ids = server.encode(prompt.text)
        params = server.sampling(req, req.answer_tokens,
                                 "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        schemas = tool_schemas(tools) if use_tools else None
        grammar = server.constraint(fmt, schemas, force)
        include_usage = stream and bool(req.stream_options and req.stream_options.include_usage)
        env = Envelope.new("chatcmpl-", "chat.completion.chunk" if stream else "chat.completion", server)

        parser = OutputParser(prompt.reasoning, schemas)
        parser.feed(prompt.forced)  # a forced call start: the parser is now inside the call

        pending: list = []  # logprobs of tokens not yet sent in a chunk

        def chunk(delta: dict, reason: str | None = None) -> str:
            lps = openai_chat(pending, server.tokenizer) if pending else None
            pending.clear()
            return env.event([{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}])

        def message(a: Answer) -> dict:
            m = {"role": "assistant", "content": a.content if a.content or not a.calls else None}
            if a.reasoning:
                m["reasoning_content"] = a.reasoning
            if a.calls:
                m["tool_calls"] = [tool_call_json(c) for c in a.calls]
            return m

        ticket = server.submit(ids, params, grammar, recorder)
        if stream:
            async def events():
                yield chunk({"role": "assistant", "content": ""})
                n_calls, streaming = 0, None
                async for kind, x in server.parts(ticket, parser, recorder):
                    if kind == "logprob":
                        pending.append(x)
                    elif kind == "content":
                        yield chunk({"content": x})
                    elif kind == "tick":  # a token with nothing to show yet
                        yield chunk({"content": ""})
                    elif kind == "reasoning":
                        yield chunk({"reasoning_content": x})
                    elif kind == "call_start":  # the call's name, then its arguments as they are written
                        yield chunk({"tool_calls": [{"index": n_calls, "id": x.id, "type": "function",
                                                     "function": {"name": x.name, "arguments": ""}}]})
                        streaming = x.id
                    elif kind == "call_delta":
                        yield chunk({"tool_calls": [{"index": n_calls, "function": {"arguments": x}}]})
                    elif kind == "tool_call":
                        if x.id != streaming:  # a call not streamed (JSON inside <tool_call>): whole
                            yield chunk({"tool_calls": [tool_call_json(x, n_calls)]})
                        n_calls += 1
                    else:
                        server.finished(request, x.stats)
                        yield chunk({}, finish(x.finish_reason, n_calls > 0))
                        if include_usage:
                            yield env.event([], x.stats)

            return event_stream(events())
        a = await server.answer(request, ticket, parser, recorder)
        lps = openai_chat(a.logprobs, server.tokenizer) if recorder else None
        return env.body([{"index": 0, "message": message(a), "logprobs": lps,
                          "finish_reason": finish(a.finish_reason, bool(a.calls))}], a.stats)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await server.read(request, CompletionRequest)
        stream = bool(req.stream)
        ids = completion_ids(server, req.one_prompt)
        params = server.sampling(req, 16 if req.max_tokens is None else req.max_tokens)  # 16: OpenAI's default
        include_usage = stream and bool(req.stream_options and req.stream_options.include_usage)
        env = Envelope.new("cmpl-", "text_completion", server)
        recorder = LogprobRecorder(req.logprobs) if req.logprobs is not None else None
        ticket = server.submit(ids, params, recorder=recorder)
        pending, sent = [], [0]  # logprobs not yet sent; characters sent so far

        def choice(text: str, reason: str | None) -> dict:
            lps = openai_completion(pending, server.tokenizer, sent[0]) if recorder else None
            pending.clear()
            sent[0] += len(text)
            return {"index": 0, "text": text, "logprobs": lps, "finish_reason": reason}

        if stream:
            async def events():
                async for kind, x in server.parts(ticket, None, recorder):
                    if kind == "logprob":
                        pending.append(x)
                    elif kind in ("content", "tick"):
                        yield env.event([choice(x or "", None)])
                    elif kind == "end":
                        server.finished(request, x.stats)
                        yield env.event([choice("", finish(x.finish_reason, False))])
                        if include_usage:
                            yield env.event([], x.stats)

            return event_stream(events())
        a = await server.answer(request, ticket, None, recorder)
        pending.extend(a.logprobs)
        return env.body([choice(a.content, finish(a.finish_reason, False))], a.stats)


def completion_ids(server: Server, prompt: str | list[int]) -> list[int]:
    """The prompt as raw text (no chat template) or token ids (already checked against the vocabulary)."""
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty: give some text", "prompt")
        return server.encode(prompt)
    return list(prompt)
