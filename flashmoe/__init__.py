"""flashmoe: run frontier-scale Mixture-of-Experts models by streaming routed experts from SSD.

    import flashmoe
    model, tokenizer = flashmoe.load("~/models/qwen3.5-397b-q4")
    for chunk in flashmoe.generate(model, tokenizer, "Hello", max_tokens=64):
        print(chunk.text, end="", flush=True)

    results = flashmoe.batch_generate(model, tokenizer, ["First prompt", "Second"], max_tokens=64)
"""

__version__ = "0.1.0"


def load(path, config=None, **kwargs):
    """Load a converted bundle (or a Hub repo id of one): returns (model, tokenizer). `config`: a
    flashmoe.runtime.config.RuntimeConfig (keyword overrides of its fields are accepted too)."""
    from flashmoe.runtime.loader import load as _load

    return _load(path, config, **kwargs)


def generate(model, tokenizer, prompt, **kwargs):
    """Iterate over generated text chunks; see flashmoe.runtime.generate.generate."""
    from flashmoe.runtime.generate import generate as _generate

    return _generate(model, tokenizer, prompt, **kwargs)


def batch_generate(model, tokenizer, prompts, **kwargs):
    """Generate for many prompts together (one expert read serves every sequence that routed to it);
    one BatchResult(text, tokens, finish_reason, stats) per prompt. See flashmoe.runtime.engine."""
    from flashmoe.runtime.engine import batch_generate as _batch_generate

    return _batch_generate(model, tokenizer, prompts, **kwargs)


def stream_batch_generate(model, tokenizer, prompts, **kwargs):
    """Like batch_generate, yielding (prompt index, GenerationChunk) as tokens arrive."""
    from flashmoe.runtime.engine import stream_batch_generate as _stream

    return _stream(model, tokenizer, prompts, **kwargs)
