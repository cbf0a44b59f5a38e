"""POST /v1/responses: the OpenAI Responses API, stateless (no stored responses: `previous_response_id` is
refused; send the conversation as `input` items). Messages, function tools (function_call items, and
function_call_output items going back), `text.format` JSON, and the streaming events
(response.created ... response.output_text.delta, response.function_call_arguments.delta ...
response.completed)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from flashmoe.request import InputMessage, ResponsesRequest

from .app import Server
from .chat import force_from_tool_choice, openai_messages, openai_tools, render
from .errors import APIError
from .jsonformat import parse_response_format
from .toolcalls import OutputParser, tool_schemas
from .worker import EngineFailed


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """Responses input items -> Chat Completions messages (function calls join the assistant turn)."""
    out = [{"role": "system", "content": req.instructions}] if req.instructions else []
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": _text(item.content)})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


class ResponseEvents:
    """Parsed output parts -> the Responses streaming events, and the response object they build."""

    def __init__(self, base: dict):
        self.base, self.output, self.seq = base, [], 0
        self.message: dict | None = None  # the open output message
        self.calls: dict[str, tuple[int, dict]] = {}  # call id -> (output index, function_call item)

    def response(self, status: str, **extra) -> dict:
        return dict(self.base, status=status, output=list(self.output), **extra)

    def _ev(self, kind: str, **data) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **data}

    def start(self) -> list[dict]:
        r = self.response("in_progress")
        return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]

    def _open_message(self) -> list[dict]:
        if self.message is not None:
            return []
        self.message = {"type": "message", "id": "msg_" + uuid.uuid4().hex, "status": "in_progress",
                        "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": []}]}
        self.output.append(self.message)
        i, mid = len(self.output) - 1, self.message["id"]
        return [self._ev("response.output_item.added", output_index=i,
                         item=dict(self.message, content=[])),
                self._ev("response.content_part.added", item_id=mid, output_index=i, content_index=0,
                         part={"type": "output_text", "text": "", "annotations": []})]

    def _close_message(self) -> list[dict]:
        m, self.message = self.message, None
        if m is None:
            return []
        i, part = self.output.index(m), m["content"][0]
        m["status"] = "completed"
        return [self._ev("response.output_text.done", item_id=m["id"], output_index=i, content_index=0,
                         text=part["text"], logprobs=[]),
                self._ev("response.content_part.done", item_id=m["id"], output_index=i, content_index=0, part=part),
                self._ev("response.output_item.done", output_index=i, item=m)]

    def feed(self, kind: str, x) -> list[dict]:
        if kind == "content":
            evs = self._open_message()
            self.message["content"][0]["text"] += x
            return evs + [self._ev("response.output_text.delta", item_id=self.message["id"],
                                   output_index=self.output.index(self.message), content_index=0, delta=x,
                                   logprobs=[])]
        if kind == "call_start" or (kind == "tool_call" and x.id not in self.calls):
            evs = self._close_message()
            item = {"type": "function_call", "id": "fc_" + x.id.removeprefix("call_"), "call_id": x.id,
                    "name": x.name, "arguments": "", "status": "in_progress"}
            self.output.append(item)
            self.calls[x.id] = (len(self.output) - 1, item)
            evs.append(self._ev("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
            return evs + (self.feed("tool_call", x) if kind == "tool_call" else [])
        if kind == "call_delta":
            i, item = self.calls[next(reversed(self.calls))]
            item["arguments"] += x
            return [self._ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=x)]
        if kind == "tool_call":
            i, item = self.calls[x.id]
            item["arguments"], item["status"] = x.arguments_json(), "completed"
            return [self._ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                             arguments=item["arguments"]),
                    self._ev("response.output_item.done", output_index=i, item=item)]
        return []  # reasoning and ticks are not part of a Responses answer

    def end(self, ev) -> tuple[list[dict], dict]:
        evs = self._close_message()
        p, g = int(ev.stats.get("prompt_tokens", 0)), int(ev.stats.get("generated_tokens", 0))
        usage = {"input_tokens": p, "output_tokens": g, "total_tokens": p + g,
                 "input_tokens_details": {"cached_tokens": int(ev.stats.get("cached_prompt_tokens", 0))},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        if ev.finish_reason == "length":
            r = self.response("incomplete", usage=usage, incomplete_details={"reason": "max_output_tokens"})
            return evs + [self._ev("response.incomplete", response=r)], r
        r = self.response("completed", usage=usage)
        return evs + [self._ev("response.completed", response=r)], r


def register(app: FastAPI, server: Server) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request):
        req: ResponsesRequest = await server.read(request, ResponsesRequest)
        tools = openai_tools([{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                              for t in req.tools or []])
        choice = req.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.name}}
        use_tools, force = force_from_tool_choice(choice, tools)
        fmt_in = req.text.format if req.text and req.text.format else None
        fmt = parse_response_format(None if fmt_in is None else fmt_in.model_dump(by_alias=True, exclude_none=True),
                                    "text.format")
        prompt = render(server.tokenizer, openai_messages(chat_messages(req)), tools if use_tools else None, force,
                        None, answer_only=fmt is not None)
        ids = server.encode(prompt.text)
        params = server.sampling(req, req.max_output_tokens, "max_output_tokens")
        schemas = tool_schemas(tools) if use_tools else None
        parser = OutputParser(prompt.reasoning, schemas)
        parser.feed(prompt.forced)
        ticket = server.submit(ids, params, server.constraint(fmt, schemas, force, "text.format"))
        out = ResponseEvents({
            "id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "model": server.config.model_id, "output": [], "parallel_tool_calls": True,
            "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None
            else req.tool_choice.model_dump(), "tools": [dict(t.model_dump(exclude_none=True), strict=bool(t.strict))
                                                         for t in req.tools or []],
            "instructions": req.instructions, "metadata": req.metadata or {}, "error": None,
            "incomplete_details": None, "temperature": params.temperature, "top_p": params.top_p,
            "text": {"format": {"type": "text"} if fmt_in is None else fmt_in.model_dump(by_alias=True,
                                                                                           exclude_none=True)}})

        async def run():
            yield out.start()
            async for kind, x in server.parts(ticket, parser):
                if kind == "end":
                    server.finished(request, x.stats)
                    evs, final = out.end(x)
                    yield evs
                    yield final
                else:
                    yield out.feed(kind, x)

        if req.stream:
            async def events():
                try:
                    async for evs in run():
                        for e in evs if isinstance(evs, list) else []:
                            yield f"event: {e['type']}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n"
                except EngineFailed as e:
                    err = APIError(500, str(e)).openai_body()["error"]
                    yield f"event: error\ndata: {json.dumps(dict(err, type='error', sequence_number=out.seq))}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        final = None
        async for evs in run():
            final = evs if isinstance(evs, dict) else final
        return final

