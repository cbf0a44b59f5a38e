"""The peer in `flashmoe-bench run --peer`: the same weights as a bundle, saved as an mlx-lm checkpoint
and decoded by mlx-lm entirely in memory (a benchmark-only dependency: `pip install mlx-lm`).

Export: bundle dense tensors keep their packed bytes under mlx-lm's names (`language_model.model.` /
`language_model.lm_head`), conv1d goes back to [C, K, 1] (which also tells mlx-lm's sanitize that the
norms are already (1 + w)), and each layer's expert records are stacked into `switch_mlp.{proj}.{part}`
[E, ...] tensors. Nothing is requantized, so both engines multiply by identical weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from flashmoe.format import Bundle, record_views
from flashmoe.format.st import SafetensorsWriter, read_header, read_tensor


def export_mlx_lm(bundle: Bundle, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = bundle.config
    q = bundle.manifest["experts"]
    quant = {"group_size": q["group_size"], "bits": q["bits"]}
    for module, mq in bundle.manifest["dense"]["quantized"].items():
        name = "language_model.lm_head" if module == "lm_head" else f"language_model.model.{module}"
        quant[name] = mq
    for L in [None, *range(cfg.num_hidden_layers)]:
        w = SafetensorsWriter(out / (f"model-{'global' if L is None else L:0>5}.safetensors"), {"format": "mlx"})
        for name, t in read_header(bundle.dense_path(L)).items():
            a = read_tensor(t)
            if name.endswith("conv1d.weight"):
                a = a[..., None]
            key = "language_model." + name if name.startswith("lm_head") else "language_model.model." + name
            w.add(key, t.dtype, a)
        if L is not None:
            f = bundle.expert_file(L)
            info = f.info
            buf = np.zeros(info.record_stride, dtype=np.uint8)
            stacks = {name: np.empty((info.num_experts, *v.shape), dtype=v.dtype)
                      for name, v in record_views(info, buf).items()}
            for e in range(info.num_experts):
                f.read_into(e, buf)
                for k, v in record_views(info, buf).items():
                    stacks[k][e] = v
            f.close()
            st = {"uint32": "U32", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
            for c in info.components:
                w.add(f"language_model.model.layers.{L}.mlp.switch_mlp.{c.name}", st[c.dtype], stacks[c.name])
        w.close()
    conf = {**cfg.to_dict(), "model_type": "qwen3_5_moe", "quantization": quant,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor,
                                "type": "default"}, "full_attention_interval": 4}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return out


def mlx_lm_decode_tps(path: Path, tokens: int, prompt_tokens: int = 1, passes: int = 5) -> list[float]:
    """Decode tokens/s of mlx-lm on the exported checkpoint, one figure per pass (greedy, after a 2-token
    warm-up)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    prompt = mx.array([1] * prompt_tokens)
    for _ in generate_step(prompt, model, max_tokens=2):
        pass
    return [time_mlx_lm_decode(model, prompt, tokens) for _ in range(passes)]


def time_mlx_lm_decode(model, prompt, tokens: int) -> float:
    """Decode tokens/s of a loaded mlx-lm model: `tokens` greedy steps after the prompt, whose own token
    (out of prefill) is not timed."""
    return mlx_lm_decode(model, prompt, tokens)[0]


def mlx_lm_decode(model, prompt, tokens: int) -> tuple[float, list[int]]:
    """(decode tokens/s, the greedy tokens) of a loaded mlx-lm model: the prompt's own token (out of prefill)
    and then `tokens` timed steps."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t = None
    n = 0
    out = []
    for tok, _ in generate_step(prompt, model, max_tokens=tokens + 1):
        out.append(int(tok))
        if t is None:  # the first token comes out of prefill: time decode only
            mx.eval(tok)
            t = time.perf_counter()
            continue
        n += 1
    return n / (time.perf_counter() - t), out
