"""The ASGI app: one Server (model, tokenizer, engine worker, settings) behind FastAPI routes.

    server = open_server(bundle)  # the Server the routes (serve/routes.py: create_app) answer from

Bodies are read and checked here (size, JSON, model, sampling values); every client mistake becomes an
APIError rendered in the OpenAI shape, or the Anthropic shape under /v1/messages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from flashmoe.errors import FlashmoeError, InputError
from flashmoe.request import field_of, parse_json, validate

from .errors import APIError, bad, from_flashmoe
from .grammar import Grammars, tool_call_grammar
from .logprobs import LogprobRecorder
from .metrics import Metrics
from .toolcalls import OutputParser
from .worker import EngineFailed, EngineWorker, Overloaded


@dataclass
class ServerConfig:
    model_id: str  # the name /v1/models lists and requests must use
    api_key: str | None = None  # when set, every /v1 request needs it (Authorization: Bearer, or x-api-key)
    max_tokens: int = 4096  # tokens per answer when a request names none, and the most it may ask for
    # defaults for requests that do not set them: temperature, top_p, top_k, seed, stop
    sampling: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})
    max_body_bytes: int = 16 << 20  # request bodies over this are refused (413) before being read whole
    strict_model: bool = False  # True: a request must name model_id; False: any name is served by the one model
    max_queue: int = 64  # requests waiting beyond the engine's batch; past it: 429
    request_log: bool = True  # one line per request on the "flashmoe.serve" logger (INFO)


@dataclass
class Answer:
    """One finished generation, parsed."""
    reasoning: str
    content: str
    calls: list
    finish_reason: str  # the engine's: "stop", "length" (or "cancelled")
    tokens: list[int]
    stats: dict
    logprobs: list  # logprobs.TokenLogprob per output token, when asked for


class Server:
    def __init__(self, model, tokenizer, engine, config: ServerConfig):
        self.model, self.tokenizer, self.engine, self.config = model, tokenizer, engine, config
        self.worker = EngineWorker(engine, config.max_queue)
        self.created = int(time.time())
        self.metrics = Metrics(engine, model)
        self.grammars = Grammars((Path(model.bundle.path) / "tokenizer.json").read_text(),
                                 int(model.config.vocab_size), sorted(engine.eos))

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

    async def read(self, request: Request, cls):
        """The request's body as the typed request `cls` (flashmoe.request): JSON, every field's type and
        range, token ids, and the model name checked; the body size was bounded by BodyLimit already."""
        self.authorize(request)
        raw = await request.body()
        try:
            req = validate(cls, parse_json(raw), vocab_size=self.tokenizer.vocab_size)
        except InputError as e:
            raise bad(str(e), field_of(str(e))) from None
        if req.model != self.config.model_id and self.config.strict_model:
            raise APIError(404, f"model {req.model!r} does not exist here; this server serves "
                                f"{self.config.model_id!r}", "model", "model_not_found")
        return req

    def sampling(self, req, max_tokens: int | None, max_tokens_key: str = "max_tokens"):
        """SamplingParams from a typed request (OpenAI or Anthropic: the same sampling fields)."""
        if max_tokens is None:
            max_tokens = self.config.max_tokens
        if max_tokens > self.config.max_tokens:
            raise bad(f"{max_tokens_key} is {max_tokens}, over this server's limit of {self.config.max_tokens}",
                      max_tokens_key)
        d = self.config.sampling
        return self.make_params(
            max_tokens=max_tokens,
            temperature=d["temperature"] if req.temperature is None else req.temperature,
            top_p=d["top_p"] if req.top_p is None else req.top_p,
            top_k=d["top_k"] if req.top_k is None else req.top_k,
            seed=d.get("seed") if req.seed is None else req.seed,
            stop=tuple(dict.fromkeys(s for s in (*d.get("stop", ()), *req.stops) if s)),
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

    def constraint(self, fmt, tools: dict | None, force: str | None, fmt_where: str = "response_format") -> str | None:
        """The grammar an answer must follow, or None: a required tool call (force not None) follows its
        tool's schema; else response_format's JSON; else, with tools, free text whose calls follow theirs."""
        if tools and force is not None:
            return self.grammars.compile(tool_call_grammar(tools, force), "tool_choice")
        if fmt is not None:
            return self.grammars.compile(fmt.grammar(), fmt_where)
        if tools:
            return self.grammars.compile(tool_call_grammar(tools, None), "tools")
        return None

    # ---- generation ---------------------------------------------------------------------------
    def finished(self, request: Request, stats: dict) -> None:
        """A generation ended: its tokens go to the metrics and to the request's log line."""
        self.metrics.generation(stats)
        tokens = request.scope.setdefault("state", {}).setdefault("flashmoe_tokens", [0, 0])
        tokens[0] += int(stats.get("prompt_tokens", 0))
        tokens[1] += int(stats.get("generated_tokens", 0))

    def submit(self, ids: list[int], params, grammar: str | None = None, recorder: LogprobRecorder | None = None):
        """Admit one sequence; with a grammar, its own matcher masks every token it samples; with a
        recorder, the log-probabilities of what it samples are kept (read them through parts)."""
        if grammar is not None:  # the engine masks it (with the batch's other grammar rows) before the recorder
            params = dataclasses.replace(params, grammar=self.grammars.mask(grammar))
        if recorder is not None:
            params = dataclasses.replace(params, logits_processor=recorder)
        try:
            return self.worker.submit(ids, params)
        except Overloaded as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        except FlashmoeError as e:
            raise from_flashmoe(e) from None

    async def parts(self, ticket, parser: OutputParser | None,
                    recorder: LogprobRecorder | None = None) -> AsyncIterator[tuple[str, object]]:
        """Parsed output: ("reasoning"|"content", str), ("tool_call", ToolCall), then ("end", Event).
        parser None: the raw text, all of it content. A generated token that shows nothing yet (held back,
        part of a call or of a character) gives ("tick", None), so streams can show progress. With a
        recorder, each output token first gives ("logprob", TokenLogprob)."""
        n = 0
        async for ev in self.worker.events(ticket):
            if recorder is not None and ev.token is not None:
                yield "logprob", recorder.take(n, ev.token)
                n += 1
            parts = parser.feed(ev.text) if parser else [("content", ev.text)] if ev.text else []
            for part in parts:
                yield part
            if not parts and ev.token is not None and ev.finish_reason is None:
                yield "tick", None
            if ev.finish_reason is not None:
                for part in parser.close() if parser else []:
                    yield part
                yield "end", ev

    async def answer(self, request: Request, ticket, parser: OutputParser | None,
                     recorder: LogprobRecorder | None = None) -> Answer:
        """Collect a whole answer, cancelling it if the client goes away meanwhile."""
        async def collect() -> Answer:
            r, c, calls, end, lps = [], [], [], None, []
            async for kind, x in self.parts(ticket, parser, recorder):
                if kind == "logprob":
                    lps.append(x)
                elif kind == "reasoning":
                    r.append(x)
                elif kind == "content":
                    c.append(x)
                elif kind == "tool_call":
                    calls.append(x)
                elif kind == "end":
                    end = x
            self.finished(request, end.stats)
            return Answer("".join(r), "".join(c), calls, end.finish_reason, list(end.tokens), dict(end.stats), lps)

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


def open_server(bundle, runtime_config=None, config: ServerConfig | None = None, sampling_overrides=None,
                engine_config=None, dist=None, **engine_kw) -> Server:
    """Load a bundle (directory or Hub repo id) and build its engine: a Server ready for create_app.
    sampling_overrides: request defaults over the bundle's (temperature, top_p, top_k, seed, stop).
    engine_config: an EngineConfig (or engine_kw: its max_batch, memory_budget_gb, prompt_cache_gb,
    prefill_tokens). dist: this process's place in an expert-parallel run (runtime/distributed.py)."""
    import flashmoe
    from flashmoe.runtime.config import EngineConfig
    from flashmoe.runtime.distributed import make_engine, start_from_env

    dist = dist or start_from_env("flashmoe-serve", environ={})  # a single process
    model, tokenizer = flashmoe.load(bundle, config=runtime_config, shard=dist.expert_shard())
    dist.attach(model)
    path = Path(model.bundle.path)
    config = config or ServerConfig(model_id="")
    config = dataclasses.replace(config, model_id=config.model_id or path.name,
                                 sampling={**sampling_defaults(path), **(sampling_overrides or {})})
    ec = engine_config or EngineConfig(**{k: v for k, v in engine_kw.items() if v is not None})
    return Server(model, tokenizer, make_engine(dist, model, tokenizer, ec), config)


def _engine_result(task) -> Answer:
    try:
        return task.result()
    except EngineFailed as e:
        raise APIError(500, str(e)) from None


def dump(x):
    """A validated request part as plain JSON values (what chat.py normalises), None kept as None."""
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, list):
        return [dump(v) for v in x]
    return x.model_dump(by_alias=True, exclude_none=True)
