"""flashmoe.serve: flashmoe-serve, an OpenAI- and Anthropic-compatible HTTP server over the batched engine.

    app.py            ServerConfig, Server (typed requests via flashmoe.request, sampling params, generation),
                      open_server
    routes.py         create_app: the FastAPI app (GET /, /health, /metrics, /v1/models; the APIs below)
    openai_api.py     POST /v1/chat/completions, POST /v1/completions
    anthropic_api.py  POST /v1/messages
    responses_api.py  POST /v1/responses (stateless)
    chat.py           OpenAI/Anthropic messages and tools -> the chat template's inputs; render; tool_choice
    toolcalls.py      Qwen3.5 output parser: reasoning, content and tool calls, incrementally
    jsonformat.py     response_format / output_format -> the JSON an answer must be
    grammar.py        constrained decoding (llguidance): JSON and Qwen3.5 XML tool-call grammars, masks
    middleware.py     RequestLog, Internal (a bug's 500 keeps the connection), BodyLimit (bodies bounded)
    metrics.py        Prometheus metrics (GET /metrics)
    logprobs.py       logprobs: the recorder (a logits processor) and the OpenAI shapes
    worker.py         EngineWorker: the one thread that steps the engine; per-request asyncio queues
    errors.py         APIError in the OpenAI and Anthropic shapes
    cli.py            flashmoe-serve
"""
