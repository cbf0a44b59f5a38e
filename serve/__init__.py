"""flashmoe.serve: flashmoe-serve, an OpenAI- and Anthropic-compatible HTTP server over the batched engine.

    app.py            ServerConfig, Server (request checks, sampling params, generation), open_server, create_app
    openai_api.py     POST /v1/chat/completions, POST /v1/completions
    anthropic_api.py  POST /v1/messages
    chat.py           OpenAI/Anthropic messages and tools -> the chat template's inputs; render; tool_choice
    toolcalls.py      Qwen3.5 output parser: reasoning, content and tool calls, incrementally
    jsonformat.py     response_format: validation (and retry, in openai_api)
    worker.py         EngineWorker: the one thread that steps the engine; per-request asyncio queues
    errors.py         APIError in the OpenAI and Anthropic shapes
    cli.py            flashmoe-serve
"""
