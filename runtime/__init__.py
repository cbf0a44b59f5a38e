"""flashmoe.runtime: run a bundle with dense weights resident and routed experts streamed from SSD.

    model.py      the Qwen3.5-MoE text model (MLX modules; experts are not parameters)
    experts.py    ExpertStreamer (reads the routed experts' records per layer) and expert_block (compute)
    loader.py     load(path, experts_per_token=None, io="pread"|"mmap") -> (model, tokenizer)
    generate.py   generate(model, tokenizer, prompt, ...) -> iterator of GenerationChunk
    tokenizer.py  tokenizer.json + chat template + streaming detokenizer
    cli.py        flashmoe-run
"""
