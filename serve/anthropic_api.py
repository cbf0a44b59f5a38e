"""POST /v1/messages: the Anthropic Messages API, with tool_use blocks and its streaming events
(message_start, content_block_start/delta/stop, message_delta, message_stop)."""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from flashmoe.request import MessagesRequest

from .app import Answer, Server, dump
from .chat import anthropic_messages, anthropic_tools, force_from_tool_choice, render
from .errors import APIError
from .jsonformat import parse_response_format
from .toolcalls import OutputParser, tool_schemas
from .worker import EngineFailed


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def tool_use(call) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call.id.removeprefix("call_"), "name": call.name, "input": call.arguments}


def stop_info(server: Server, reason: str, calls: bool, tokens: list[int], stops: tuple[str, ...]):
    """(stop_reason, stop_sequence) for the engine's finish reason."""
    if reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if stops:
        text = server.tokenizer.decode(tokens)
        hits = sorted((text.find(s), s) for s in stops if s in text)
        if hits:
            return "stop_sequence", hits[0][1]
    return "end_turn", None


def register(app: FastAPI, server: Server) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request):
        req: MessagesRequest = await server.read(request, MessagesRequest)
        stream = bool(req.stream)
        msgs = anthropic_messages(dump(req.system), dump(req.messages))
        tools = anthropic_tools(dump(req.tools))
        use_tools, force = force_from_tool_choice(dump(req.tool_choice), tools, style="anthropic")
        kwargs = {} if req.thinking is None else {"enable_thinking": req.thinking.type != "disabled"}
        show_thinking = bool(kwargs.get("enable_thinking"))
        fmt = parse_response_format(dump(req.output_format), "output_format")
        prompt = render(server.tokenizer, msgs, tools if use_tools else None, force, kwargs, answer_only=fmt is not None)
        ids = server.encode(prompt.text)
        params = server.sampling(req, req.max_tokens)
        schemas = tool_schemas(tools) if use_tools else None
        parser = OutputParser(prompt.reasoning, schemas)
        parser.feed(prompt.forced)
        mid, model = "msg_" + uuid.uuid4().hex[:24], server.config.model_id
        ticket = server.submit(ids, params, server.constraint(fmt, schemas, force, "output_format"))

        if not stream:
            a: Answer = await server.answer(request, ticket, parser)
            content = []
            if show_thinking and a.reasoning:
                content.append({"type": "thinking", "thinking": a.reasoning, "signature": ""})
            if a.content or not a.calls:
                content.append({"type": "text", "text": a.content})
            content += [tool_use(c) for c in a.calls]
            reason, seq = stop_info(server, a.finish_reason, bool(a.calls), a.tokens, params.stop)
            return {"id": mid, "type": "message", "role": "assistant", "model": model, "content": content,
                    "stop_reason": reason, "stop_sequence": seq,
                    "usage": {"input_tokens": int(a.stats.get("prompt_tokens", len(ids))),
                              "output_tokens": int(a.stats.get("generated_tokens", 0)),
                              "cache_read_input_tokens": int(a.stats.get("cached_prompt_tokens", 0))}}

        async def events():
            yield event("message_start", {"type": "message_start", "message": {
                "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": len(ids), "output_tokens": 0}}})
            index, open_kind, calls, streaming = -1, None, 0, None

            def close():
                return event("content_block_stop", {"type": "content_block_stop", "index": index})

            def delta(partial_json: str):
                return event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                     "delta": {"type": "input_json_delta", "partial_json": partial_json}})

            try:
                async for kind, x in server.parts(ticket, parser):
                    if kind == "tick" or (kind == "reasoning" and not show_thinking):
                        continue
                    if kind in ("content", "reasoning"):
                        block = "text" if kind == "content" else "thinking"
                        if open_kind != block:
                            if open_kind:
                                yield close()
                            index, open_kind = index + 1, block
                            start = {"type": "text", "text": ""} if block == "text" else \
                                {"type": "thinking", "thinking": "", "signature": ""}
                            yield event("content_block_start", {"type": "content_block_start", "index": index,
                                                                "content_block": start})
                        d = {"type": "text_delta", "text": x} if block == "text" else \
                            {"type": "thinking_delta", "thinking": x}
                        yield event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                            "delta": d})
                    elif kind == "call_start" or (kind == "tool_call" and x.id != streaming):
                        if open_kind:
                            yield close()
                        index, open_kind, streaming = index + 1, None, x.id
                        yield event("content_block_start", {"type": "content_block_start", "index": index,
                                                            "content_block": dict(tool_use(x), input={})})
                        if kind == "tool_call":  # not streamed (JSON inside <tool_call>): whole
                            yield delta(x.arguments_json())
                            calls += 1
                            yield close()
                    elif kind == "call_delta":
                        yield delta(x)
                    elif kind == "tool_call":
                        calls += 1
                        yield close()
                    else:
                        server.finished(request, x.stats)
                        if open_kind:
                            yield close()
                        reason, seq = stop_info(server, x.finish_reason, calls > 0, list(x.tokens), params.stop)
                        yield event("message_delta", {"type": "message_delta",
                                                      "delta": {"stop_reason": reason, "stop_sequence": seq},
                                                      "usage": {"output_tokens": int(x.stats.get("generated_tokens", 0))}})
                        yield event("message_stop", {"type": "message_stop"})
            except EngineFailed as e:
                yield event("error", APIError(500, str(e)).anthropic_body())

        return StreamingResponse(events(), media_type="text/event-stream")

