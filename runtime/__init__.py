"""flashmoe.runtime: run a bundle with dense weights resident and routed experts streamed from SSD.

    model.py      the Qwen3.5-MoE text model (MLX modules; experts are not parameters)
    experts.py    RoutedExperts: reader.py (files, reads) + expert_cache.py (residency) + the expert kernels
    config.py     RuntimeConfig: every runtime knob, resolved once by load()
    sampling.py   SamplingParams, samplers, and one sequence's stop/EOS/text handling
    engine.py     Engine: many sequences decoded together (continuous batching), batch_generate
    loader.py     load(path, config=RuntimeConfig(...) or field=value ...) -> (model, tokenizer)
    generate.py   generate(model, tokenizer, prompt, ...) -> iterator of GenerationChunk
    tokenizer.py  tokenizer.json + chat template + streaming detokenizer
    cli.py        flashmoe-run
"""
