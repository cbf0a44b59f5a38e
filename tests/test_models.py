"""The architectures besides conftest's Qwen3.5 tiny model, each converted from a checkpoint built and
briefly trained here, and run against transformers 5.24 itself:

    Qwen3-Next (qwen3_next)          fused delta-net projections split at conversion; float-expert
                                     bundles (per-expert fp32, fused bf16) and an mlx-lm 8-bit one
    Qwen3.6 (qwen3_5_moe, 35B-A3B)   the multimodal checkpoint layout with a vision tower and MTP head

and flashmoe-convert's one-line refusal of anything else."""

from __future__ import annotations

import copy
import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
import tiny_models as tm
from flashmoe.convert import convert_checkpoint
from flashmoe.convert.cli import main as convert_main
from flashmoe.eval import perplexity
from flashmoe.format import Bundle, BundleError
from flashmoe.format.names import split_rows
from tiny import logits_of, save_checkpoint

STEPS, BATCH = 60, 4  # training: decisive greedy choices (top-1 beats top-2 by > 20x our 8-bit error)
GREEDY = 24  # tokens generated and compared


def quiet(_msg: str) -> None:
    pass


def convert(src, out, **kw):
    return convert_checkpoint(src, out, progress=False, log=quiet, **kw)


def our_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]), model.make_cache()))[0]


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def assert_greedy_matches(bundle, ref_model, ids: list[int]) -> None:
    model, tok = flashmoe.load(bundle)
    want = torch_greedy(ref_model, ids, GREEDY)
    # decisive choices: at every generated position the reference's top-1 beats its top-2 by more than twice
    # our largest logit difference there, so a token mismatch below is a real divergence, not a near-tie
    seq = ids + want
    ref, ours = logits_of(ref_model, seq)[len(ids) - 1 : -1], our_logits(model, seq)[len(ids) - 1 : -1]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 2 * np.abs(ours - ref).max(axis=-1)).all()
    got = [c.token for c in flashmoe.generate(model, tok, ids, max_tokens=GREEDY) if c.token is not None]
    assert got == want


def bf16_rounded(model):
    """A copy of `model` whose weights are rounded to bfloat16 (what a bf16 checkpoint holds), kept in fp32."""
    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


def torch_perplexity(model, ids: list[int]) -> float:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(ids[1:]))
    return math.exp(float(nll))


def check_float_bundle(bundle, ref_model, corpus_ids) -> None:
    """Float bundle: every position's logits match transformers, and so does the perplexity (within 1%)."""
    model, _ = flashmoe.load(bundle)
    ids = corpus_ids[5:75]
    ours, ref = our_logits(model, ids), logits_of(ref_model, ids)
    tol = (1e-4 if mx.default_device() == mx.cpu else 2e-3) * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ours - ref).max()) <= tol
    text = corpus_ids[:200]
    got = perplexity(model, text)
    assert got.tokens == len(text) - 1  # one window: the same predictions as the reference's
    ppl = got.ppl
    want = torch_perplexity(ref_model, text)
    assert abs(ppl / want - 1) < 0.01, (ppl, want)


# ----------------------------------------------------------------------------------------------
# Qwen3-Next


@pytest.fixture(scope="module")
def next_trained(corpus_ids):
    return tm.train(tm.build_next(seed=0), corpus_ids, STEPS, batch=BATCH)


@pytest.fixture(scope="module")
def next_ckpts(next_trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("next")
    return {"fp32": save_checkpoint(copy.deepcopy(next_trained), root / "fp32", "float32", "per_expert"),
            "bf16_fused": save_checkpoint(copy.deepcopy(next_trained), root / "bf16_fused", "bfloat16", "fused"),
            "mlx8": tm.save_next_mlx(copy.deepcopy(next_trained), root / "mlx8", bits=8)}


def test_next_config_in_released_field_names():
    """A Qwen3-Next-80B-A3B config.json in the field names it was released with (transformers 4.57: rope_theta
    and partial_rotary_factor at top level, rope_scaling null, full_attention_interval and no layer_types)
    reads as the qwen3-next-80b-a3b bench preset (values: the model card, see bench/presets.py)."""
    from flashmoe.bench.presets import config
    from flashmoe.format import TextConfig

    raw = {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936,
           "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 48, "num_attention_heads": 16,
           "num_key_value_heads": 2, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
           "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
           "decoder_sparse_step": 1, "mlp_only_layers": [], "moe_intermediate_size": 512,
           "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10, "num_experts": 512,
           "norm_topk_prob": True, "rope_theta": 10000000, "partial_rotary_factor": 0.25, "rope_scaling": None,
           "full_attention_interval": 4, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
           "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}
    got, want = TextConfig.from_hf(raw).to_dict(), config("qwen3-next-80b-a3b").to_dict()
    assert (got.pop("eos_token_id"), got.pop("bos_token_id")) == ([151645], 151643)
    assert got == {k: v for k, v in want.items() if k not in ("eos_token_id", "bos_token_id")}


def test_next_split_matches_transformers_ordering(next_trained):
    """split_rows picks exactly the q, k, v, z, b, a that transformers' fix_query_key_value_ordering derives."""
    import torch

    la = next_trained.model.layers[0].linear_attn
    cfg = next_trained.config
    x = torch.randn(1, 3, cfg.hidden_size)
    with torch.no_grad():
        q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(x), la.in_proj_ba(x))
        want = {"in_proj_qkv": torch.cat([t.reshape(1, 3, -1) for t in (q, k, v)], -1),
                "in_proj_z": z.reshape(1, 3, -1), "in_proj_b": b, "in_proj_a": a}
        for fused in ("in_proj_qkvz", "in_proj_ba"):
            w = getattr(la, fused).weight
            for split, rows in split_rows(fused, cfg.linear_num_key_heads, cfg.linear_key_head_dim,
                                          cfg.linear_num_value_heads, cfg.linear_value_head_dim).items():
                torch.testing.assert_close(x @ w[torch.from_numpy(rows)].T, want[split], rtol=0, atol=0)


def test_next_float_bundle_matches_transformers(next_trained, next_ckpts, corpus_ids, tmp_path):
    out = convert(next_ckpts["fp32"], tmp_path / "b", bits=None, dense_bits=None)
    m = Bundle.open(out).manifest
    assert m["config"]["model_type"] == "qwen3_5_moe"  # the runtime's layout: nothing Qwen3-Next specific
    check_float_bundle(out, next_trained, corpus_ids)


@pytest.mark.parametrize("source", ["fp32", "bf16_fused", "mlx8"])
def test_next_greedy_8bit_matches_transformers(next_trained, next_ckpts, corpus_ids, tmp_path, source):
    out = convert(next_ckpts[source], tmp_path / "b", bits=8)
    if source == "mlx8":  # the 8-bit MLX dense weights are repacked, not requantized: the split projections'
        # packed weights, scales and biases are the fused tensor's rows, byte for byte
        assert Bundle.open(out).manifest["dense"]["quantized"]["layers.0.linear_attn.in_proj_qkv"] == {
            "bits": 8, "group_size": 64}
        src = mx.load(str(next_ckpts["mlx8"] / "model.safetensors"))
        d = mx.load(str(out / "dense/layer-002.safetensors"))
        cfg = next_trained.config
        for fused in ("in_proj_qkvz", "in_proj_ba"):
            for split, rows in split_rows(fused, cfg.linear_num_key_heads, cfg.linear_key_head_dim,
                                          cfg.linear_num_value_heads, cfg.linear_value_head_dim).items():
                for part in ("weight", "scales", "biases"):
                    want = src[f"model.layers.2.linear_attn.{fused}.{part}"][mx.array(rows)]
                    assert mx.array_equal(d[f"layers.2.linear_attn.{split}.{part}"], want).item()
    assert_greedy_matches(out, next_trained, corpus_ids[5:25])


def test_next_fp8_source_splits_dequantized_rows(next_trained, tmp_path):
    """FP8 (block-scaled) Qwen3-Next: the block scales apply to the fused weight, then its rows are picked:
    the bundle's float projections are exactly the dequantized fused rows."""
    ck = save_checkpoint(copy.deepcopy(next_trained), tmp_path / "ck", "bfloat16", "per_expert")
    ref = tm.to_fp8(ck, block=32)
    b = Bundle.open(convert(ck, tmp_path / "b", bits=None, dense_bits=None, dtype="float32"))
    assert b.manifest["source"]["kind"] == "fp8"
    d = mx.load(str(b.path / "dense/layer-001.safetensors"))
    cfg = next_trained.config
    for fused in ("in_proj_qkvz", "in_proj_ba"):
        w = ref[f"model.layers.1.linear_attn.{fused}.weight"].numpy()
        for split, rows in split_rows(fused, cfg.linear_num_key_heads, cfg.linear_key_head_dim,
                                      cfg.linear_num_value_heads, cfg.linear_value_head_dim).items():
            np.testing.assert_array_equal(np.array(d[f"layers.1.linear_attn.{split}.weight"]), w[rows])


@pytest.mark.parametrize("change,match", [
    ({"mlp_only_layers": [1]}, r"makes layers \[1\] dense MLPs"),
    ({"decoder_sparse_step": 2}, r"makes layers \[0, 2\] dense MLPs"),
    ({"norm_topk_prob": False}, "norm_topk_prob is not true"),
])
def test_next_refuses_what_the_runtime_cannot_run(next_ckpts, tmp_path, change, match):
    ck = tmp_path / "ck"
    shutil.copytree(next_ckpts["fp32"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(BundleError, match=match):
        convert(ck, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_next_fused_rows_must_match_config(next_ckpts, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(next_ckpts["fp32"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(dict(cfg, linear_num_value_heads=2)))
    with pytest.raises(BundleError, match=r"in_proj_ba.weight: shape \[8, 128\] does not have the 4 rows"):
        convert(ck, tmp_path / "b")


# ----------------------------------------------------------------------------------------------
# Qwen3.6 (Qwen3.5-MoE architecture)


@pytest.fixture(scope="module")
def q36_trained(corpus_ids):
    return tm.train(tm.build_qwen36(seed=0), corpus_ids, STEPS, batch=BATCH)


@pytest.fixture(scope="module")
def q36_ckpt(q36_trained, tmp_path_factory):
    return tm.save_multimodal(copy.deepcopy(q36_trained), tmp_path_factory.mktemp("q36") / "ck")


def test_qwen36_float_bundle_matches_transformers(q36_trained, q36_ckpt, corpus_ids, tmp_path):
    out = convert(q36_ckpt, tmp_path / "b", bits=None, dense_bits=None, dtype="float32")
    m = Bundle.open(out).manifest
    assert m["skipped"]["vision"] and m["skipped"]["mtp"]
    assert m["config"]["num_experts"] == 32 and m["config"]["num_experts_per_tok"] == 8
    check_float_bundle(out, bf16_rounded(q36_trained), corpus_ids)


def test_qwen36_greedy_8bit_matches_transformers(q36_trained, q36_ckpt, corpus_ids, tmp_path):
    out = convert(q36_ckpt, tmp_path / "b", bits=8, group_size=32)  # moe_intermediate_size 32 (hidden / 4)
    assert_greedy_matches(out, q36_trained, corpus_ids[5:25])


# ----------------------------------------------------------------------------------------------
# unknown architectures


def test_convert_refuses_unknown_architecture_in_one_line(tmp_path, capsys):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(dict(tm.NEXT, model_type="deepseek_v3")))
    assert convert_main([str(ck), "-o", str(tmp_path / "b"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unsupported model_type 'deepseek_v3'" in err
    assert all(t in err for t in ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"))
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------
# flashmoe-bench shape presets


@pytest.mark.parametrize("preset,total_b,experts,k", [("qwen3-next-80b-a3b", 80, 512, 10),
                                                      ("qwen3.6-35b-a3b", 35, 256, 8)])
def test_presets_add_up_to_the_published_sizes(preset, total_b, experts, k):
    """The shapes give the parameter count the model is named after (80B / 35B, within 2%)."""
    from flashmoe.bench.presets import config

    c = config(preset)
    assert (c.num_experts, c.num_experts_per_tok, c.rotary_dim) == (experts, k, 64)
    total = sum(int(np.prod(s)) for L in [None, *range(c.num_hidden_layers)] for s in c.dense_shapes(L).values())
    total += c.num_hidden_layers * c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size
    assert abs(total / (total_b * 1e9) - 1) < 0.02, total
