"""A pure mapping from checkpoint tensor names to the bundle's names (mlx-lm's `sanitize`, as data).

Checkpoint names come in three families; all map to one set of bundle names:

    Hugging Face text model      model.layers.N.<rest>                 lm_head.weight
    Hugging Face multimodal      model.language_model.layers.N.<rest>  lm_head.weight
    mlx-lm / mlx-community       language_model.model.layers.N.<rest>  language_model.lm_head.weight

Bundle dense names drop the prefix: `embed_tokens.weight`, `norm.weight`, `lm_head.weight`,
`layers.N.<rest>`. Routed experts become ExpertKey values (they go to the expert files), and
vision tower / MTP tensors are skipped.

Qwen3-Next stores two of the delta net's projections fused, per key head: `in_proj_qkvz` rows are
Hk groups of [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] (r = Hv/Hk value heads per key head) and
`in_proj_ba` rows are Hk groups of [b (r), a (r)] (transformers' fix_query_key_value_ordering).
FUSED_SPLITS and `split_rows` map them onto Qwen3.5's four projections by picking rows, so the
bundle (and the runtime) are the same for both: in_proj_qkv = all q, then all k, then all v;
in_proj_z = all z; in_proj_b = all b; in_proj_a = all a (value heads in order g*r + j).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_SKIP = re.compile(r"^(model\.visual\.|visual\.|vision_tower\.|model\.vision_tower\.|mtp\.|model\.mtp\.|"
                   r"language_model\.mtp\.|model\.language_model\.mtp\.)")
# per-expert:  layers.N.mlp.experts.E.gate_proj.weight
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv|scales|biases)$")
# fused:       layers.N.mlp.experts.gate_up_proj | layers.N.mlp.experts.down_proj   ([E, 2I, H] / [E, H, I])
_FUSED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_scale_inv)?$")
# mlx stacked: layers.N.mlp.switch_mlp.gate_proj.weight|scales|biases  ([E, out, in*bits/32])
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.switch_mlp\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")

# Qwen3-Next fused delta-net projection -> the Qwen3.5 projections it splits into (module names)
FUSED_SPLITS = {"in_proj_qkvz": ("in_proj_qkv", "in_proj_z"), "in_proj_ba": ("in_proj_b", "in_proj_a")}
SPLIT_OF = {split: fused for fused, splits in FUSED_SPLITS.items() for split in splits}
_FUSED_MODULE = re.compile(r"^(.*\.linear_attn\.)(in_proj_qkvz|in_proj_ba)\.(weight|scales|biases|weight_scale_inv)$")

# RMSNorms that Qwen3.5 (and Qwen4-Exp: hyper-connection, indexer, PLE norms) stores zero-centred (y = x/rms * (1 + w)); the bundle stores (1 + w) in float32.
ZERO_CENTRED_NORMS = re.compile(r"(^norm\.weight$|\.(input_layernorm|post_attention_layernorm|q_norm|k_norm|hc_norm|q_layernorm|k_layernorm|norm_key|norm_query|norm_conv)\.weight$)")


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    expert: int | None  # None for stacked/fused tensors that hold every expert
    proj: str  # gate_proj | up_proj | down_proj | gate_up_proj
    part: str  # weight | scales | biases | weight_scale_inv


def strip_prefix(key: str) -> str | None:
    """Checkpoint name -> bundle-relative name, or None for tensors the text model does not use."""
    if _SKIP.match(key):
        return None
    if key == "language_model.lm_head.weight" or key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    for p in _PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def classify(key: str) -> ExpertKey | str | None:
    """ExpertKey for routed-expert tensors, the bundle name (str) for dense tensors, None to skip."""
    k = strip_prefix(key)
    if k is None:
        return None
    m = _PER_EXPERT.match(k)
    if m:
        return ExpertKey(int(m[1]), int(m[2]), m[3], m[4])
    m = _FUSED.match(k)
    if m:
        return ExpertKey(int(m[1]), None, m[2], "weight_scale_inv" if m[3] else "weight")
    m = _STACKED.match(k)
    if m:
        return ExpertKey(int(m[1]), None, m[2], m[3])
    if k.endswith(".weight_scale_inv"):
        return k  # FP8 scale of a dense weight; the converter pairs it with its weight
    return k


def layer_of(name: str) -> int | None:
    """Layer index of a bundle dense name, None for global tensors."""
    m = re.match(r"^layers\.(\d+)\.", name)
    return int(m[1]) if m else None


def fused_split(key: str) -> tuple[str, str, str] | None:
    """(module prefix, fused projection, part) of a Qwen3-Next fused delta-net tensor, else None."""
    m = _FUSED_MODULE.match(key)
    return (m[1], m[2], m[3]) if m else None


def split_rows(fused: str, Hk: int, Dk: int, Hv: int, Dv: int) -> dict[str, np.ndarray]:
    """Rows of the fused Qwen3-Next projection `fused` (in_proj_qkvz | in_proj_ba) that make up each
    Qwen3.5 projection it splits into, in that projection's row order."""
    r = Hv // Hk
    if fused == "in_proj_qkvz":
        width = 2 * Dk + 2 * r * Dv
        base = np.arange(Hk)[:, None] * width

        def piece(start: int, n: int) -> np.ndarray:  # rows [start, start + n) of every key head's group
            return (base + start + np.arange(n)[None, :]).reshape(-1)

        q, k = piece(0, Dk), piece(Dk, Dk)
        v, z = piece(2 * Dk, r * Dv), piece(2 * Dk + r * Dv, r * Dv)
        return {"in_proj_qkv": np.concatenate([q, k, v]), "in_proj_z": z}
    if fused == "in_proj_ba":
        base = np.arange(Hk)[:, None] * 2 * r
        return {"in_proj_b": (base + np.arange(r)[None, :]).reshape(-1),
                "in_proj_a": (base + r + np.arange(r)[None, :]).reshape(-1)}
    raise ValueError(f"not a fused Qwen3-Next projection: {fused}")
