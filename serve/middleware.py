"""The server's ASGI middleware (outermost first): RequestLog (one line per request), Internal (a bug is a
500 and the connection lives on), BodyLimit (bounds request bodies before anything buffers them).

BodyLimit:

A declared Content-Length over the limit is answered 413 before a byte of the body is read; a body sent
without one (chunked) is counted as it streams and refused once it passes the limit, so a 400 MiB POST
never costs the server more than the limit in memory. Bodies within the limit are read here and handed
to the app unchanged."""

from __future__ import annotations

import json
import logging
import time

from .errors import APIError

log = logging.getLogger("flashmoe.serve")


def _is_anthropic(scope) -> bool:
    return scope.get("path", "").startswith("/v1/messages")


async def send_error(send, err: APIError, anthropic: bool, close: bool = False) -> None:
    body = json.dumps(err.anthropic_body() if anthropic else err.openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


class RequestLog:
    """Accounts for each request once its response has been sent whole (a stream: when it ends): counted in
    the metrics, and (log=True) logged as `CLIENT METHOD PATH STATUS in=PROMPT out=GENERATED SECONDS` on the
    "flashmoe.serve" logger (INFO). Tokens come from Server.finished."""

    def __init__(self, app, metrics, log: bool = True):
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 0

        async def watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.request(scope.get("path", ""), status or 500)
            if self.log:
                p, g = scope.get("state", {}).get("flashmoe_tokens", (0, 0))
                client = (scope.get("client") or ("-",))[0]
                log.info("%s %s %s %s in=%d out=%d %.3fs", client, scope.get("method"), scope.get("path"),
                         status or "-", p, g, time.perf_counter() - t0)


class Internal:
    """An exception that escapes a route (a bug) is answered with a one-line 500 and logged with its
    traceback, without ending the connection (raised further, the server would close it). Once a response
    has started nothing can be sent in its place: the exception goes on up."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            if started:
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await send_error(send, APIError(500, f"internal error: {type(e).__name__}: {e}"), _is_anthropic(scope))


DRAIN_MAX = 64 << 20  # refused bodies up to this size are read (and dropped) before the 413


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await self._refuse(scope, send, APIError(400, "the Content-Length header is not a number"))
            if size > self.limit:  # refused before a byte is kept; a modest body is read and dropped first,
                # so that the client, still sending, reads the 413 instead of a reset connection
                drained = size <= DRAIN_MAX and await self._drain(receive)
                return await self._refuse(scope, send, self._too_large(f"{size} bytes"), close=not drained)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                return await self._refuse(scope, send, self._too_large(f"over {self.limit} bytes"))
            chunks.append(body)
            more = message.get("more_body", False)
        whole, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"the request body is {size}, over the server's limit of {self.limit} bytes "
                             "(flashmoe-serve --max-body-mb)")

    @staticmethod
    async def _drain(receive) -> bool:
        """Read the request body to its end, keeping none of it; False if the client went away."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            if not message.get("more_body", False):
                return True

    @staticmethod
    async def _refuse(scope, send, err: APIError, close: bool = True) -> None:
        await send_error(send, err, _is_anthropic(scope), close=close)  # an unread body: the connection ends
