"""Tiny Qwen3.5-MoE checkpoints built at test time with transformers (random weights).

Every test that needs a checkpoint builds it here, so nothing is downloaded. Shapes are small but
keep the real model's structure: linear-attention and full-attention layers (full every 4th),
GQA, partial RoPE, routed + shared experts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_conv_kernel_dim=4,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    num_experts=16,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    eos_token_id=1,
    bos_token_id=None,
)


def tiny_config(**over):
    from transformers import Qwen3_5MoeTextConfig

    kw = dict(TINY)
    kw.update(over)
    return Qwen3_5MoeTextConfig(**kw)


def build_model(seed: int = 0, **over):
    """A randomly initialised Qwen3_5MoeForCausalLM (fp32), with non-trivial norm weights so that the
    zero-centred (1 + w) convention is exercised."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(tiny_config(**over)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    return model


def save_tokenizer(out: Path, vocab_size: int) -> None:
    from flashmoe.bench.synth import write_byte_tokenizer

    write_byte_tokenizer(out, vocab_size)


def save_checkpoint(model, out: Path, dtype: str = "float32", layout: str = "per_expert") -> Path:
    """Save `model` as a Hugging Face checkpoint. layout: "per_expert" (transformers' own save, keys
    mlp.experts.E.gate_proj.weight) or "fused" (mlp.experts.gate_up_proj [E, 2I, H] and
    mlp.experts.down_proj [E, H, I]), in dtype float32, bfloat16 or float16."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    tdtype = getattr(torch, dtype)
    model = model.to(tdtype)
    model.save_pretrained(out)
    save_tokenizer(out, model.config.vocab_size)
    if layout == "fused":
        files = sorted(out.glob("*.safetensors"))
        sd = {}
        from safetensors.torch import load_file

        for f in files:
            sd.update(load_file(f))
            f.unlink()
        for idx in [p for p in out.glob("*.index.json")]:
            idx.unlink()
        cfg = model.config
        fused = {}
        for k, v in sd.items():
            if ".mlp.experts." not in k:
                fused[k] = v
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}.mlp.experts"
            g = torch.stack([sd[f"{p}.{e}.gate_proj.weight"] for e in range(cfg.num_experts)])
            u = torch.stack([sd[f"{p}.{e}.up_proj.weight"] for e in range(cfg.num_experts)])
            d = torch.stack([sd[f"{p}.{e}.down_proj.weight"] for e in range(cfg.num_experts)])
            fused[f"{p}.gate_up_proj"] = torch.cat([g, u], dim=1).contiguous()
            fused[f"{p}.down_proj"] = d.contiguous()
        save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def save_mlx_quantized(model, out: Path, bits: int = 4, group_size: int = 64) -> Path:
    """Save `model` the way mlx-lm / mlx-community do: stacked switch_mlp experts quantized with
    mx.quantize, other Linear weights quantized too (router and shared_expert_gate at 8 bits),
    norms shifted to (1 + w), conv1d as [C, K, 1], keys under language_model."""
    import mlx.core as mx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {k: mx.array(v.detach().float().numpy()).astype(mx.bfloat16) for k, v in model.state_dict().items()}
    w = {}
    qcfg = {"group_size": group_size, "bits": bits}
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}.mlp.experts"
        gate_up = sd.pop(f"{p}.gate_up_proj")  # in memory transformers keeps experts fused: [E, 2I, H]
        inter = gate_up.shape[1] // 2
        parts = {"gate_proj": gate_up[:, :inter], "up_proj": gate_up[:, inter:], "down_proj": sd.pop(f"{p}.down_proj")}
        for proj, stacked in parts.items():
            q, s, b = mx.quantize(stacked, group_size=group_size, bits=bits)
            base = f"language_model.model.layers.{L}.mlp.switch_mlp.{proj}"
            w[f"{base}.weight"], w[f"{base}.scales"], w[f"{base}.biases"] = q, s, b
    norm_sfx = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")
    for k, v in sd.items():
        name = "language_model." + k
        if k.endswith(norm_sfx):
            w[name] = (v.astype(mx.float32) + 1.0).astype(mx.bfloat16)
        elif "conv1d.weight" in k:
            w[name] = v.moveaxis(2, 1)
        elif v.ndim == 2 and k.endswith(".weight") and v.shape[-1] % group_size == 0 and "norm" not in k:
            mod = name[: -len(".weight")]
            qb = 8 if (mod.endswith("mlp.gate") or mod.endswith("shared_expert_gate")) else bits
            q, s, b = mx.quantize(v, group_size=group_size, bits=qb)
            w[f"{mod}.weight"], w[f"{mod}.scales"], w[f"{mod}.biases"] = q, s, b
            if qb != bits:
                qcfg[mod] = {"group_size": group_size, "bits": qb}
        else:
            w[name] = v
    mx.save_safetensors(str(out / "model.safetensors"), w, metadata={"format": "mlx"})
    conf = json.loads(cfg.to_json_string())
    conf["quantization"] = qcfg
    conf["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(conf, indent=1))
    save_tokenizer(out, cfg.vocab_size)
    return out


def logits_of(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
