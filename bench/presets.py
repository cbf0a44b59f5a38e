"""Shapes of the models flashmoe runs, from the models' published config values (text part).

    preset               layers  hidden  experts  K   expert I  shared I  heads/kv  linear k/v heads  vocab
    qwen3.5-397b-a17b    60      4096    512      10  1024      1024      32/2      16/64             248320
    qwen3.5-122b-a10b    48      3072    256      8   1024      1024      32/2      16/64             248320
    qwen3.5-35b-a3b      40      2048    256      8   512       512       16/2      16/32             248320
    qwen3.6-35b-a3b      40      2048    256      8   512       512       16/2      16/32             248320
    qwen3-next-80b-a3b   48      2048    512      10  512       512       16/2      16/32             151936
    qwen4-exp-flash-next 48      2560    512      10  640       640       24/2      16/48             248320 (uncertain)

All: head_dim 256, linear head dims 128, conv kernel 4, full attention every 4th layer, partial RoPE
0.25 (64 rotary dims) with theta 1e7, untied lm_head.

Sources (no real weights or config.json can be downloaded here; these are the published numbers):
- Qwen3.6-35B-A3B (model_type qwen3_5_moe, the Qwen3.5-35B-A3B shape): the model card's architecture list,
  quoted at https://mera.a-ai.ru/en/industrial/submits/181 and https://chaobro.com/en/posts/qwen36-35b-a3b-moe-2026/
  (40 layers = 10 x (3 Gated DeltaNet + 1 Gated Attention), hidden 2048, vocab 248320 padded, DeltaNet 32 V
  and 16 QK heads of 128, attention 16 Q / 2 KV heads of 256, 64 rotary dims, 256 experts, 8 routed + 1
  shared, expert intermediate 512).
- Qwen3-Next-80B-A3B (model_type qwen3_next; its bundles use this same layout, format/names.py): the model
  card's architecture list, quoted at https://lmstudio.ai/models/qwen3-next (48 layers = 12 x (3 + 1), hidden
  2048, attention 16 Q / 2 KV heads of 256 with 64 rotary dims, DeltaNet 32 V / 16 QK heads of 128, 512
  experts, 10 routed + 1 shared, expert intermediate 512, 262144 context); vocab 151936 and rope theta 1e7
  from https://apxml.com/models/qwen3-next-80b-a3b; all of which are also transformers 5.24's Qwen3NextConfig
  defaults (models/qwen3_next/configuration_qwen3_next.py, documented as Qwen3-Next-80B-A3B-Instruct's).
"""

from __future__ import annotations

from flashmoe.format import BundleError, TextConfig

_COMMON = dict(
    vocab_size=248320, head_dim=256, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, rms_norm_eps=1e-6, rope_theta=1e7, partial_rotary_factor=0.25,
    max_position_embeddings=262144, tie_word_embeddings=False, full_attention_interval=4,
)

PRESETS = {
    "qwen3.5-397b-a17b": dict(num_hidden_layers=60, hidden_size=4096, num_experts=512, num_experts_per_tok=10,
                              moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                              num_attention_heads=32, num_key_value_heads=2, linear_num_key_heads=16,
                              linear_num_value_heads=64),
    "qwen3.5-122b-a10b": dict(num_hidden_layers=48, hidden_size=3072, num_experts=256, num_experts_per_tok=8,
                              moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                              num_attention_heads=32, num_key_value_heads=2, linear_num_key_heads=16,
                              linear_num_value_heads=64),
    "qwen3.5-35b-a3b": dict(num_hidden_layers=40, hidden_size=2048, num_experts=256, num_experts_per_tok=8,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            num_attention_heads=16, num_key_value_heads=2, linear_num_key_heads=16,
                            linear_num_value_heads=32),
    "qwen3.6-35b-a3b": dict(num_hidden_layers=40, hidden_size=2048, num_experts=256, num_experts_per_tok=8,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512,
                            num_attention_heads=16, num_key_value_heads=2, linear_num_key_heads=16,
                            linear_num_value_heads=32),
    "qwen3-next-80b-a3b": dict(model_type="qwen3_next", vocab_size=151936, num_hidden_layers=48, hidden_size=2048,
                               num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512,
                               shared_expert_intermediate_size=512, num_attention_heads=16, num_key_value_heads=2,
                               linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
                               mlp_only_layers=[], norm_topk_prob=True),
    # Qwen4-Exp "flash next": UNCERTAIN, from third-party code (the values a transformers Qwen4ExpTextConfig port
    # names for it), not from a published config.json; vocab and the rest as _COMMON. Its n-gram tables
    # (ple_layer_ids, ngram_*) are streamed from disk beside the experts; flashmoe-bench make writes no tables.
    "qwen4-exp-flash-next": dict(model_type="qwen4_exp_text", num_hidden_layers=48, hidden_size=2560, num_experts=512,
                                 num_experts_per_tok=10, moe_intermediate_size=640, shared_expert_intermediate_size=640,
                                 num_attention_heads=24, num_key_value_heads=2, linear_num_key_heads=16,
                                 linear_num_value_heads=48, hc_count=4, hc_lowrank=320, ple_layer_ids=[2],
                                 ple_embed_dim=2560, ngram_size=3, heads_per_ngram=8,
                                 ngram_vocab_size_base=20_000_000, indexer_n_heads=24, indexer_head_dim=128,
                                 indexer_budget=2048, indexer_compress_ratio=4),
}


def hf_config(preset: str | dict, layers: int | None = None) -> dict:
    """A Hugging Face style text config.json dict for `preset` (a name, or a dict of shape fields for
    custom shapes such as the tests' small ones), optionally cut to `layers` layers (the layer types
    keep the real model's pattern)."""
    if isinstance(preset, dict):
        shape = preset
    elif preset in PRESETS:
        shape = PRESETS[preset]
    else:
        raise BundleError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    d = {**_COMMON, "model_type": "qwen3_5_moe_text", **shape}
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "partial_rotary_factor": d.pop("partial_rotary_factor"),
                            "rope_type": "default"}
    if layers is not None:
        if str(d["model_type"]).startswith("qwen4_exp"):  # a cut is for flashmoe-bench make (bench/synth.py)
            raise BundleError(f"flashmoe-bench make cannot write {preset if isinstance(preset, str) else 'this'} "
                              "bundle: Qwen4-Exp needs n-gram tables and hyper-connection weights synthetic bundles "
                              "lack; convert a checkpoint (flashmoe-convert) and bench that")
        if layers <= 0:
            raise BundleError("--layers must be positive")
        d["full_layers_in_model"] = d["num_hidden_layers"]
        d["num_hidden_layers"] = layers
        # the real pattern (full attention every 4th layer); a cut of 2-3 layers still gets one full-attention
        # layer, last, so that both layer kinds are measured
        types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
        if layers >= 2 and "full_attention" not in types:
            types[-1] = "full_attention"
        d["layer_types"] = types
    return d


def config(preset: str | dict, layers: int | None = None) -> TextConfig:
    return TextConfig.from_hf(hf_config(preset, layers))
