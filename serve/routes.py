"""The FastAPI app: the routes of one Server (serve/app.py).

    app = create_app(server)      # GET /, /health, /metrics, /v1/models; POST /v1/chat/completions and
                                  # /v1/completions (openai_api.py), /v1/messages (anthropic_api.py),
                                  # /v1/responses (responses_api.py)

The API modules import the Server from app.py; this module imports them all, so nothing imports back.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashmoe import __version__

from . import anthropic_api, openai_api, responses_api
from .app import Server
from .errors import APIError
from .middleware import BodyLimit, Internal, RequestLog


def create_app(server: Server) -> FastAPI:
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

    @app.get("/health")
    async def health():
        c = server.engine.counters
        return {"status": "ok", "model": server.config.model_id, "running": c.get("running", 0),
                "waiting": c.get("waiting", 0)}

    page = (Path(__file__).parent / "static" / "chat.html").read_bytes()

    @app.get("/")
    async def chat_page():  # one static page, no build step and nothing fetched from elsewhere
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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
    responses_api.register(app, server)
    app.add_middleware(BodyLimit, limit=server.config.max_body_bytes)
    app.add_middleware(Internal)
    app.add_middleware(RequestLog, metrics=server.metrics, log=server.config.request_log)  # the outermost
    return app
