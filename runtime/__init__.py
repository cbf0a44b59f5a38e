"""flashmoe.runtime: run a bundle with dense weights resident and routed experts streamed from SSD.

    model.py      the Qwen3.5-MoE text model (MLX modules; experts are not parameters)
    cache.py      per-sequence state of a batch of rows (delta-net state, KV cache)
    experts.py    RoutedExperts: reader.py (files, reads) + expert_cache.py (residency) + the expert kernels
    config.py     RuntimeConfig (every runtime knob, resolved once by load()) and EngineConfig
    loader.py     load(path, config=RuntimeConfig(...) or field=value ...) -> (model, tokenizer)
    pipeline.py   one decode step: launched, synced, run again on an expert-cache miss, or undone
    runner.py     BatchRunner (every model forward: the one prefill loop, decode steps) and PromptCache
    engine.py     Engine: the scheduler every generation runs on (continuous batching), batch_generate
    sampling.py   SamplingParams, samplers, and one sequence's stop/EOS/text handling
    text.py       prompts to ids, generation chunks, a sequence's figures
    generate.py   generate(model, tokenizer, prompt, ...) -> iterator of GenerationChunk (one-sequence engine)
    tokenizer.py  tokenizer.json + chat template + streaming detokenizer
    distributed.py  expert parallel over mx.distributed (dist_link.py: transport, dist_checks.py: start-up)
    chat.py       the interactive chat of flashmoe-run
    cli.py        flashmoe-run (report.py: its --stats text)
"""
