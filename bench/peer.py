"""The peer in `flashmoe-bench run --peer`: the same weights as a bundle, saved as an mlx-lm checkpoint
and decoded by mlx-lm entirely in memory (a benchmark-only dependency: `pip install mlx-lm`).

Export: bundle dense tensors keep their packed bytes under mlx-lm's names (`language_model.model.` /
`language_model.lm_head`), conv1d goes back to [C, K, 1] (which also tells mlx-lm's sanitize that the
norms are already (1 + w)), and each layer's expert records are stacked into `switch_mlp.{proj}.{part}`
[E, ...] tensors. Nothing is requantized, so both engines multiply by identical weights.

`export_once` keeps an export in a directory of its own for later runs (the 40-layer 35B export is 20 GB:
written once per machine, not once per measurement), stamped with the bundle's manifest digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from flashmoe.errors import InputError
from flashmoe.format import Bundle, record_views
from flashmoe.format.files import write_file
from flashmoe.format.st import SafetensorsWriter, read_header, read_tensor

STAMP = "flashmoe-export.json"  # in an export_once directory: the manifest digest of the bundle it came from


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


def _digest(bundle: Bundle) -> str:
    return hashlib.sha256((Path(bundle.path) / "flashmoe.json").read_bytes()).hexdigest()


def export_once(bundle: Bundle, out: Path) -> tuple[Path, bool]:
    """`out` as an mlx-lm checkpoint of `bundle`: reused when its stamp names this bundle's manifest, else
    exported into a new sibling directory that is renamed to `out` when complete. Returns (out, whether it
    was reused). An `out` that exists without a matching stamp is never written into or removed."""
    out = Path(out)
    want = _digest(bundle)
    if out.is_symlink():
        raise InputError(f"{out} is a link: give --peer-dir a real directory (or a new path)")
    if out.exists():
        try:
            have = json.loads((out / STAMP).read_text()).get("manifest_sha256")
        except (OSError, ValueError, AttributeError):
            have = None
        if have == want:
            return out, True
        raise InputError(f"{out} exists and is not an mlx-lm export of {bundle.path} (no {STAMP} naming its "
                         "manifest): remove it or give another --peer-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        export_mlx_lm(bundle, tmp)
        write_file(tmp / STAMP, json.dumps({"manifest_sha256": want, "bundle": str(bundle.path)}).encode())
        os.rename(tmp, out)  # a directory that appeared meanwhile makes this fail: nothing is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, False


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
    return mlx_lm_decode(model, prompt, tokens)["decode_tps"]


def mlx_lm_decode(model, prompt, tokens: int) -> dict:
    """A loaded mlx-lm model's greedy run: the prompt's own token (out of prefill: `prefill_s` from the call
    to that token) and then `tokens` timed steps. Returns {decode_tps, prefill_s, tokens}."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
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
    return {"decode_tps": n / (time.perf_counter() - t), "prefill_s": t - t0, "tokens": out}
