"""Tiny checkpoints of the other architectures flashmoe converts, built with transformers 5.24 (no
download): Qwen3-Next (`qwen3_next`) and a Qwen3.6-like Qwen3.5-MoE (`qwen3_5_moe`, multimodal layout),
plus the few-step training that makes greedy choices decisive (`train`: these models, conftest's `trained`
and test_qwen4's Qwen4-Exp all train with it).

Shapes are tiny but keep what tells each architecture apart:
    Qwen3-Next   fused in_proj_qkvz / in_proj_ba with 2 value heads per key head (80B-A3B: 32 per 16),
                 all layers MoE (decoder_sparse_step 1), norm_topk_prob, partial RoPE without mrope
    Qwen3.6      top-level `qwen3_5_moe` with a text_config, weights under model.language_model., a vision
                 tower and an MTP head (skipped), interleaved mrope sections, top-8 of 32 experts
                 (35B-A3B: 8 of 256) and a shared expert as wide as a routed one, 8 query heads per KV head
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tiny import TINY, save_tokenizer

NEXT = dict(TINY, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=256)

QWEN36 = dict(TINY, num_attention_heads=8, num_key_value_heads=1, num_experts=32, num_experts_per_tok=8,
              moe_intermediate_size=32, shared_expert_intermediate_size=32, eos_token_id=[1, 2],
              rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                               "mrope_section": [2, 1, 1], "mrope_interleaved": True})


def _randomise_norms(model) -> None:
    """Non-trivial (zero-centred) norm weights, so the (1 + w) convention is exercised."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)


def build_next(seed: int = 0, **over):
    """A random Qwen3NextForCausalLM (fp32)."""
    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**dict(NEXT, **over))).eval()
    _randomise_norms(model)
    return model


def build_qwen36(seed: int = 0, **over):
    """A random Qwen3_5MoeForCausalLM (fp32) with a Qwen3.6-35B-A3B-like text config."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**dict(QWEN36, **over))).eval()
    _randomise_norms(model)
    return model


def train(model, ids: list[int], steps: int, seed: int = 0, batch: int = 8, window: int = 64):
    """`steps` AdamW steps (lr 5e-3) of next-token loss on `batch` random `window`-token windows of `ids`
    (drawn by a generator seeded with `seed`), on one torch thread: the same weights on every machine and run
    (on more threads torch's CPU sums differ by thread count, and from run to run). Returns the model in eval
    mode."""
    import torch

    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    S, B = window, batch
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - S - 1, (B,), generator=g)
            x = torch.stack([data[s : s + S] for s in starts])
            y = torch.stack([data[s + 1 : s + S + 1] for s in starts])
            logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def save_next_mlx(model, out: Path, bits: int = 8, group_size: int = 64) -> Path:
    """Save a Qwen3-Next model as mlx-lm's convert does (mlx-community): keys under `model.` (no
    language_model. prefix: the model is text-only), `switch_mlp` experts, every Linear quantized
    including the fused in_proj_qkvz / in_proj_ba (router gates at 8 bits), norms shifted to (1 + w),
    conv1d as [C, K, 1]. Written with tiny.save_mlx_quantized, then renamed."""
    import mlx.core as mx

    from tiny import save_mlx_quantized

    out = save_mlx_quantized(model, Path(out), bits=bits, group_size=group_size)
    w = mx.load(str(out / "model.safetensors"))
    w = {k[len("language_model."):]: v for k, v in w.items()}
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "mlx"})
    conf = json.loads((out / "config.json").read_text())
    q = {k[len("language_model."):] if k.startswith("language_model.") else k: v
         for k, v in conf["quantization"].items()}
    conf["quantization"] = conf["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    return out


def save_multimodal(model, out: Path) -> Path:
    """Save a Qwen3.5-MoE text model the way Qwen3.5 / Qwen3.6 checkpoints ship: config.json with
    model_type `qwen3_5_moe` and a text_config, weights under model.language_model. with per-expert
    tensors, next to a vision tower (model.visual.) and an MTP head (mtp.) that a text bundle drops."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to(torch.bfloat16).contiguous()
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[len("model."): -len(".gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[f"model.language_model.{p}.{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                sd[f"model.language_model.{p}.{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[len("model."): -len(".down_proj")]
            for e in range(v.shape[0]):
                sd[f"model.language_model.{p}.{e}.down_proj.weight"] = v[e].contiguous()
        elif k.startswith("model."):
            sd["model.language_model." + k[len("model."):]] = v
        else:
            sd[k] = v  # lm_head.weight
    rng = np.random.default_rng(0)
    for k, shape in (("model.visual.blocks.0.attn.qkv.weight", (48, 16)), ("model.visual.merger.mlp.0.weight", (8, 16)),
                     ("mtp.fc.weight", (cfg.hidden_size, 2 * cfg.hidden_size)), ("mtp.norm.weight", (cfg.hidden_size,))):
        sd[k] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads(cfg.to_json_string())
    conf = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "vision_config": {"depth": 1, "hidden_size": 16}, "tie_word_embeddings": False,
            "image_token_id": 3, "video_token_id": 4}
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    save_tokenizer(out, cfg.vocab_size)
    return out


def to_fp8(ckpt: Path, block: int = 32) -> dict:
    """Rewrite a saved checkpoint's Linear weights (projections, experts, router) as float8_e4m3 with
    block x block scales (`weight_scale_inv`, the Qwen FP8 releases' layout) and mark config.json
    quant_method fp8. Returns {name: the dequantized weight, float32 torch} for the rewritten tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = Path(ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    out, ref = {}, {}
    for k, v in sd.items():
        if not (k.endswith(".weight") and v.ndim == 2 and ("proj" in k or "mlp.gate" in k)):
            out[k] = v
            continue
        o, i = v.shape
        so, si = -(-o // block), -(-i // block)
        pad = torch.zeros(so * block, si * block)
        pad[:o, :i] = v.float().abs()
        scale = pad.reshape(so, block, si, block).amax(dim=(1, 3)).clamp(min=1e-8) / 448.0
        full = scale.repeat_interleave(block, 0)[:o].repeat_interleave(block, 1)[:, :i]
        q = (v.float() / full).to(torch.float8_e4m3fn)
        out[k], out[k[: -len(".weight")] + ".weight_scale_inv"] = q, scale
        ref[k] = q.float() * full
    (ckpt / "model.safetensors").unlink()
    save_file(out, str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=1))
    return ref
