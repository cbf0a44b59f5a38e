"""The ASGI app: one Server (model, tokenizer, engine worker, settings) behind FastAPI routes.

    app = create_app(server)      # GET /health, GET /v1/models, POST /v1/chat/completions,
                                  # POST /v1/completions (openai_api.py), POST /v1/messages (anthropic_api.py)

Bodies are read and checked here (size, JSON, model, sampling values); every client mistake becomes an
APIError rendered in the OpenAI shape, or the Anthropic shape under /v1/messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from flashmoe.format.errors import FlashmoeError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashmoe import __version__

from .errors import APIError, bad, from_flashmoe
from .toolcalls import OutputParser
from .worker import EngineFailed, EngineWorker, Overloaded

MAX_STOP = 16


@dataclass
class ServerConfig:
    model_id: str  # the name /v1/models lists and requests must use
    api_key: str | None = None  # when set, every /v1 request needs it (Authorization: Bearer, or x-api-key)
    max_tokens: int = 4096  # tokens per answer when a request names none, and the most it may ask for
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})  # defaults
    max_body_bytes: int = 16 << 20
    json_attempts: int = 3  # response_format: tries before giving up on valid JSON
    max_queue: int = 64  # requests waiting beyond the engine's batch; past it: 429


@dataclass
class Answer:
    """One finished generation, parsed."""
    reasoning: str
    content: str
    calls: list
    finish_reason: str  # the engine's: "stop", "length" (or "cancelled")
    tokens: list[int]
    stats: dict


class Server:
    def __init__(self, model, tokenizer, engine, config: ServerConfig):
        self.model, self.tokenizer, self.engine, self.config = model, tokenizer, engine, config
        self.worker = EngineWorker(engine, config.max_queue)
        self.created = int(time.time())

    # ---- request checks -----------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY' (or x-api-key)",
                           code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.authorize(request)
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise APIError(413, f"the request body is {len(raw)} bytes, over the server's limit of "
                                f"{self.config.max_body_bytes}")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise bad(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad("model is required (GET /v1/models lists it)", "model")
        if model != self.config.model_id:
            raise APIError(404, f"model {model!r} does not exist here; this server serves {self.config.model_id!r}",
                           "model", "model_not_found")
        return body

    def sampling(self, body: dict, max_tokens_keys: tuple[str, ...], stop_key: str = "stop",
                 required_max: bool = False):
        """SamplingParams from a request body (OpenAI or Anthropic field names)."""
        max_tokens = None
        for k in max_tokens_keys:
            if body.get(k) is not None:
                max_tokens = _int(body, k, lo=1)
                break
        if max_tokens is None and required_max:
            raise bad(f"{max_tokens_keys[0]} is required", max_tokens_keys[0])
        if max_tokens is None:
            max_tokens = self.config.max_tokens
        if max_tokens > self.config.max_tokens:
            raise bad(f"{max_tokens_keys[0]} is {max_tokens}, over this server's limit of {self.config.max_tokens}",
                      max_tokens_keys[0])
        d = self.config.sampling
        stop = body.get(stop_key)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
                                 or len(stop) > MAX_STOP):
            raise bad(f"{stop_key} must be a string or a list of at most {MAX_STOP} strings", stop_key)
        return self.make_params(
            max_tokens=max_tokens,
            temperature=_float(body, "temperature", d["temperature"]),
            top_p=_float(body, "top_p", d["top_p"]),
            top_k=_int(body, "top_k", lo=0) if body.get("top_k") is not None else d["top_k"],
            seed=_int(body, "seed") if body.get("seed") is not None else None,
            stop=tuple(s for s in (stop or []) if s),
        )

    def make_params(self, **kw):
        from flashmoe.runtime.engine import SamplingParams

        params = SamplingParams(**kw)
        try:
            params.check()
        except FlashmoeError as e:
            raise bad(" ".join(str(e).split())) from None
        return params

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise bad("the prompt is empty after tokenization: give some text", "prompt")
        return ids

    # ---- generation ---------------------------------------------------------------------------
    def submit(self, ids: list[int], params):
        try:
            return self.worker.submit(ids, params)
        except Overloaded as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        except FlashmoeError as e:
            raise from_flashmoe(e) from None

    async def parts(self, ticket, parser: OutputParser | None) -> AsyncIterator[tuple[str, object]]:
        """Parsed output: ("reasoning"|"content", str), ("tool_call", ToolCall), then ("end", Event).
        parser None: the raw text, all of it content. A generated token that shows nothing yet (held back,
        part of a call or of a character) gives ("tick", None), so streams can show progress."""
        async for ev in self.worker.events(ticket):
            parts = parser.feed(ev.text) if parser else [("content", ev.text)] if ev.text else []
            for part in parts:
                yield part
            if not parts and ev.token is not None and ev.finish_reason is None:
                yield "tick", None
            if ev.finish_reason is not None:
                for part in parser.close() if parser else []:
                    yield part
                yield "end", ev

    async def answer(self, request: Request, ticket, parser: OutputParser | None) -> Answer:
        """Collect a whole answer, cancelling it if the client goes away meanwhile."""
        async def collect() -> Answer:
            r, c, calls, end = [], [], [], None
            async for kind, x in self.parts(ticket, parser):
                if kind == "reasoning":
                    r.append(x)
                elif kind == "content":
                    c.append(x)
                elif kind == "tool_call":
                    calls.append(x)
                elif kind == "end":
                    end = x
            return Answer("".join(r), "".join(c), calls, end.finish_reason, list(end.tokens), dict(end.stats))

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return _engine_result(task)
                if await request.is_disconnected():
                    task.cancel()
                    raise APIError(499, "the client closed the connection")
        finally:
            if not task.done():
                task.cancel()


def sampling_defaults(bundle_dir: Path) -> dict:
    """temperature/top_p/top_k from the bundle's generation_config.json when it has them, else the APIs'
    own defaults (temperature 1, no top-p or top-k filtering)."""
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    f = bundle_dir / "generation_config.json"
    try:
        g = json.loads(f.read_text()) if f.is_file() else {}
    except ValueError:
        g = {}
    for k, v in d.items():
        if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool):
            d[k] = type(v)(g[k])
    return d


def open_server(bundle, runtime_config=None, config: ServerConfig | None = None, **engine_kw) -> Server:
    """Load a bundle (directory or Hub repo id) and build its engine: a Server ready for create_app.
    engine_kw: Engine's max_batch, memory_budget_gb, prompt_cache_gb, prefill_tokens (None: its default)."""
    from flashmoe.runtime.engine import Engine

    import flashmoe

    model, tokenizer = flashmoe.load(bundle, config=runtime_config)
    path = Path(model.bundle.path)
    config = config or ServerConfig(model_id="")
    config = dataclasses.replace(config, model_id=config.model_id or path.name, sampling=sampling_defaults(path))
    engine = Engine(model, tokenizer, **{k: v for k, v in engine_kw.items() if v is not None})
    return Server(model, tokenizer, engine, config)


def _engine_result(task) -> Answer:
    try:
        return task.result()
    except EngineFailed as e:
        raise APIError(500, str(e)) from None


def _number(body: dict, key: str):
    v = body.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"{key} must be a number (got {json.dumps(v)})", key)
    return v


def _float(body: dict, key: str, default: float) -> float:
    if body.get(key) is None:
        return default
    v = float(_number(body, key))
    if not math.isfinite(v):
        raise bad(f"{key} must be a finite number", key)
    return v


def _int(body: dict, key: str, lo: int | None = None) -> int:
    v = _number(body, key)
    if isinstance(v, float):
        if not v.is_integer():
            raise bad(f"{key} must be an integer (got {v})", key)
        v = int(v)
    if lo is not None and v < lo:
        raise bad(f"{key} must be >= {lo} (got {v})", key)
    return v


def flag(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{key} must be true or false", key)
    return v


def create_app(server: Server) -> FastAPI:
    from . import anthropic_api, openai_api

    @asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        yield
        server.worker.stop()

    app = FastAPI(title="flashmoe", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)

    def render_error(request: Request, err: APIError) -> JSONResponse:
        anthropic = request.url.path.startswith("/v1/messages")
        return JSONResponse(err.anthropic_body() if anthropic else err.openai_body(), status_code=err.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return render_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}; see GET /v1/models",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
        return render_error(request, APIError(err.status_code, msg))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):  # a bug: one line, never a traceback
        return render_error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))

    @app.get("/health")
    async def health():
        c = server.engine.counters
        return {"status": "ok", "model": server.config.model_id, "running": c.get("running", 0),
                "waiting": c.get("waiting", 0)}

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [{"id": server.config.model_id, "object": "model",
                                            "created": server.created, "owned_by": "flashmoe"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.authorize(request)
        if model_id != server.config.model_id:
            raise APIError(404, f"model {model_id!r} does not exist here; this server serves "
                                f"{server.config.model_id!r}", "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": server.created, "owned_by": "flashmoe"}

    openai_api.register(app, server)
    anthropic_api.register(app, server)
    return app
