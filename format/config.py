"""The text model's shape, read from a checkpoint's config.json.

One dataclass, filled from the Hugging Face config (or its `text_config` for the multimodal
Qwen3.5 checkpoints). Every shape in the converter and the runtime derives from it; nothing is
hard-coded to one model size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flashmoe.errors import BundleError

# model_type values a bundle's config may have (the runtime runs these).
SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text")
# model_type values (top level or text_config) of the checkpoints flashmoe-convert takes, with the families
# they name. Qwen3-Next converts onto the Qwen3.5 layout (format/names.py splits its fused projections):
# its bundles are `qwen3_5_moe` bundles, and the runtime does not know the difference.
SOURCE_MODEL_TYPES = {"qwen3_5_moe": "Qwen3.5 / Qwen3.6 MoE", "qwen3_5_moe_text": "Qwen3.5 / Qwen3.6 MoE, text part",
                      "qwen3_next": "Qwen3-Next", "qwen4_exp": "Qwen4-Exp",
                      "qwen4_exp_text": "Qwen4-Exp, text part"}


@dataclass
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def key_dim(self) -> int:  # linear attention: all key heads together
        return self.linear_key_head_dim * self.linear_num_key_heads

    @property
    def value_dim(self) -> int:
        return self.linear_value_head_dim * self.linear_num_value_heads

    @property
    def conv_dim(self) -> int:  # q, k and v go through the causal conv together
        return 2 * self.key_dim + self.value_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    def dense_shapes(self, layer: int | None) -> dict[str, tuple[int, ...]]:
        """Bundle name -> [out, in] (or [n]) of every dense tensor of `layer` (None: the global ones),
        as the Hugging Face checkpoint stores them (conv1d as [C, 1, W]). lm_head is absent with tied
        embeddings. The converter checks a checkpoint against this before it writes anything."""
        H, V = self.hidden_size, self.vocab_size
        qwen4 = self.model_type == "qwen4_exp"  # hyper-connection norms instead of these three (runtime/qwen4_exp.py)
        if layer is None:
            out = {"embed_tokens.weight": (V, H)} if qwen4 else {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
            if not self.tie_word_embeddings:
                out["lm_head.weight"] = (V, H)
            return out
        p = f"layers.{layer}."
        Is, E = self.shared_expert_intermediate_size, self.num_experts
        out = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
               p + "mlp.gate.weight": (E, H), p + "mlp.shared_expert_gate.weight": (1, H),
               p + "mlp.shared_expert.gate_proj.weight": (Is, H), p + "mlp.shared_expert.up_proj.weight": (Is, H),
               p + "mlp.shared_expert.down_proj.weight": (H, Is)}
        if qwen4:
            del out[p + "input_layernorm.weight"], out[p + "post_attention_layernorm.weight"]
        if self.is_linear(layer):
            a, nv = p + "linear_attn.", self.linear_num_value_heads
            out.update({a + "in_proj_qkv.weight": (self.conv_dim, H), a + "in_proj_z.weight": (self.value_dim, H),
                        a + "in_proj_b.weight": (nv, H), a + "in_proj_a.weight": (nv, H),
                        a + "out_proj.weight": (H, self.value_dim),
                        a + "conv1d.weight": (self.conv_dim, 1, self.linear_conv_kernel_dim),
                        a + "dt_bias": (nv,), a + "A_log": (nv,), a + "norm.weight": (self.linear_value_head_dim,)})
        else:
            a, n, kv, d = p + "self_attn.", self.num_attention_heads, self.num_key_value_heads, self.head_dim
            out.update({a + "q_proj.weight": (2 * n * d, H), a + "k_proj.weight": (kv * d, H),
                        a + "v_proj.weight": (kv * d, H), a + "o_proj.weight": (H, n * d),
                        a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "TextConfig":
        """Read a Hugging Face config.json (dict). Raises BundleError on anything unsupported or mistyped."""
        if not isinstance(config, dict):
            raise BundleError("config.json is not a JSON object: is SOURCE a Hugging Face checkpoint?")
        top_type = config.get("model_type")
        text = config.get("text_config") or config
        if not isinstance(text, dict):
            raise BundleError(f"config.json text_config must be an object, not {type(text).__name__}")
        mtype = text.get("model_type") or top_type
        arch = mtype if isinstance(mtype, str) and mtype in SOURCE_MODEL_TYPES else top_type
        if not isinstance(arch, str) or arch not in SOURCE_MODEL_TYPES:
            known = "; ".join(f"{k} ({v})" for k, v in SOURCE_MODEL_TYPES.items())
            raise BundleError(
                f"unsupported model_type {str(top_type or mtype)[:60]!r}: flashmoe converts {known}. Check that "
                "SOURCE points at one of those checkpoints (e.g. Qwen/Qwen3.5-397B-A17B, Qwen/Qwen3-Next-80B-A3B-Instruct)."
            )
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
            if k not in text
        ]
        if missing:
            raise BundleError(f"config.json lacks {', '.join(missing)}: is it a complete Qwen3.5 MoE config?")

        def num(key: str, default=None, kind=int, d: dict = text):
            v = d.get(key, default)
            if v is None and default is None and key in ("head_dim",):
                return None
            ok = (isinstance(v, int) and not isinstance(v, bool)) if kind is int else (
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
            if not ok:
                raise BundleError(f"config.json {key} must be {'an integer' if kind is int else 'a finite number'}, "
                                  f"not {str(v)[:40]!r}; the checkpoint's config is corrupt")
            return kind(v)

        n_layers = num("num_hidden_layers")
        if not 0 < n_layers <= 1000:
            raise BundleError(f"impossible config value num_hidden_layers={n_layers}")
        if arch == "qwen3_next":
            _check_next(text, n_layers)
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = num("full_attention_interval", 4)
            if interval <= 0:
                raise BundleError(f"config.json full_attention_interval must be positive, not {interval}")
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)
            ]
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise BundleError(f"config.json layer_types is malformed: {str(layer_types)[:80]}")
        # Qwen4-Exp: its indexed attention is full attention with a token indexer (runtime/qwen4_exp.py)
        layer_types = ["full_attention" if t in ("indexed_attention", "qwen_sparse_attention") else t
                       for t in layer_types][:n_layers]
        if len(layer_types) != n_layers or set(layer_types) - {"linear_attention", "full_attention"}:
            raise BundleError(f"config.json layer_types is malformed: {str(layer_types)[:80]}")
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise BundleError("config.json rope_parameters must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope", None):
            raise BundleError(f"unsupported rope_type {str(rope_type)[:40]!r} (only the default RoPE is implemented)")
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos_list = [] if eos is None else [eos] if not isinstance(eos, list) else eos
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos_list):
            raise BundleError(f"config.json eos_token_id must be token ids, not {str(eos)[:40]}")
        bos = text.get("bos_token_id", config.get("bos_token_id"))
        if bos is not None and (not isinstance(bos, int) or isinstance(bos, bool) or bos < 0):
            raise BundleError(f"config.json bos_token_id must be a token id or null, not {str(bos)[:40]}")
        heads = num("num_attention_heads")
        hidden = num("hidden_size")
        if heads <= 0:
            raise BundleError(f"impossible config value num_attention_heads={heads}")
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        bias = text.get("attention_bias", False)
        for key, v in (("tie_word_embeddings", tie), ("attention_bias", bias)):
            if not isinstance(v, bool):
                raise BundleError(f"config.json {key} must be true or false, not {str(v)[:40]!r}")
        act = text.get("hidden_act", "silu")
        cfg = cls(
            model_type="qwen4_exp" if str(mtype).startswith("qwen4_exp") else "qwen3_5_moe",
            vocab_size=num("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=num("num_key_value_heads"),
            head_dim=num("head_dim") or hidden // heads,
            layer_types=layer_types,
            linear_conv_kernel_dim=num("linear_conv_kernel_dim", 4),
            linear_key_head_dim=num("linear_key_head_dim", 128),
            linear_value_head_dim=num("linear_value_head_dim", 128),
            linear_num_key_heads=num("linear_num_key_heads", 16),
            linear_num_value_heads=num("linear_num_value_heads", 32),
            moe_intermediate_size=num("moe_intermediate_size"),
            shared_expert_intermediate_size=num("shared_expert_intermediate_size", 0),
            num_experts=num("num_experts"),
            num_experts_per_tok=num("num_experts_per_tok"),
            rms_norm_eps=num("rms_norm_eps", 1e-6, float),
            rope_theta=num("rope_theta", num("rope_theta", 10000.0, float), float, rope),
            partial_rotary_factor=num("partial_rotary_factor", num("partial_rotary_factor", (
                1.0 if str(mtype).startswith("qwen4_exp") else 0.25), float), float, rope),  # Qwen4-Exp's default: 1
            max_position_embeddings=num("max_position_embeddings", 32768),
            tie_word_embeddings=tie,
            attention_bias=bias,
            hidden_act=str(act),
            eos_token_id=eos_list,
            bos_token_id=bos,
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """Reject shapes no Qwen3.5 MoE model can have, with a message naming the field."""
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v > 1 << 31:
                raise BundleError(f"impossible config value {name}={v!r}: expected a positive integer")
        if self.num_experts_per_tok > self.num_experts:
            raise BundleError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise BundleError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise BundleError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if len(self.layer_types) != self.num_hidden_layers:
            raise BundleError("layer_types must list one type per layer")
        for name, lo, hi in (("rms_norm_eps", 0.0, 1.0), ("partial_rotary_factor", 0.0, 1.0),
                             ("rope_theta", 0.0, 1e15)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo < v <= hi) or math.isnan(v):
                raise BundleError(f"impossible config value {name}={v!r}")
        if self.hidden_act != "silu":
            raise BundleError(f"unsupported hidden_act {self.hidden_act!r} (Qwen3.5 MoE uses silu)")


def _check_next(text: dict[str, Any], n_layers: int) -> None:
    """Qwen3-Next options the Qwen3.5 layout has no room for: dense-MLP layers in place of MoE
    (decoder_sparse_step > 1 or mlp_only_layers) and unnormalised top-k routing weights. No published
    Qwen3-Next checkpoint uses them (Qwen3-Next-80B-A3B: step 1, no MLP-only layers, norm_topk_prob true);
    a config that does is refused rather than run wrong."""
    step = text.get("decoder_sparse_step", 1)
    only = text.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise BundleError(f"config.json mlp_only_layers must be a list of layer indices, not {str(only)[:40]}")
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise BundleError(f"config.json decoder_sparse_step must be a positive integer, not {str(step)[:40]!r}")
    dense = sorted({i for i in only if 0 <= i < n_layers} | {i for i in range(n_layers) if (i + 1) % step})
    if dense:
        raise BundleError(f"config.json makes layers {dense[:8]}{' ...' if len(dense) > 8 else ''} dense MLPs "
                          "(decoder_sparse_step / mlp_only_layers); flashmoe runs Qwen3-Next models whose every "
                          "layer is MoE, as Qwen3-Next-80B-A3B's")
    if text.get("norm_topk_prob", True) is not True:
        raise BundleError("config.json norm_topk_prob is not true; flashmoe's router renormalises the top-k weights "
                          "(as Qwen3-Next-80B-A3B and Qwen3.5 do) and cannot run this checkpoint")
