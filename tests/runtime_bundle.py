"""Test helper: write a flashmoe bundle straight from an in-memory transformers model (independent of
flashmoe.convert, so runtime tests do not depend on the converter), and build the matching torch
reference for quantized experts (dequantized weights)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from flashmoe.format import DENSE_GLOBAL, BundleWriter, ExpertQuant, TextConfig, dense_layer_path
from flashmoe.format.manifest import build_manifest
from flashmoe.format.dtypes import DTYPES
from flashmoe.format.experts import make_info
from flashmoe.format.layout import expert_components
from flashmoe.format.names import ZERO_CENTRED_NORMS, layer_of

def _expert_weights(model):
    """{layer: (gate [E, I, H], up [E, I, H], down [E, H, I])} as float32 numpy."""
    cfg = model.config
    sd = model.state_dict()
    out = {}
    for L in range(cfg.num_hidden_layers):
        gu = sd[f"model.layers.{L}.mlp.experts.gate_up_proj"].detach().float().numpy()
        inter = gu.shape[1] // 2
        out[L] = (gu[:, :inter], gu[:, inter:], sd[f"model.layers.{L}.mlp.experts.down_proj"].detach().float().numpy())
    return out


def quantize(w: np.ndarray, bits: int, group_size: int, dtype: str = "float32"):
    """mx.quantize (MLX affine, as SPEC 3.2) -> numpy (packed uint32, scales, biases)."""
    q, s, b = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    mdt = getattr(mx, dtype)
    return np.array(q), np.array(s.astype(mdt)), np.array(b.astype(mdt))


def write_bundle(model, out: Path, bits: int | None = None, group_size: int = 64, dtype: str = "float32",
                 tokenizer: bool = True) -> Path:
    """Write `model` (a transformers Qwen3_5MoeForCausalLM, fp32) as a bundle at `out`."""
    from flashmoe.bench.synth import byte_tokenizer_files

    bw = BundleWriter(out)
    hf = json.loads(model.config.to_json_string())
    cfg = TextConfig.from_hf(hf)
    bw.write_bytes("config.json", json.dumps(hf, indent=1).encode())
    if tokenizer:
        for name, raw in byte_tokenizer_files(cfg.vocab_size).items():
            bw.write_bytes(name, raw)

    # dense tensors
    dense: dict[str, dict[str, np.ndarray]] = {}
    for k, v in model.state_dict().items():
        if ".mlp.experts." in k:
            continue
        name = k[len("model."):] if k.startswith("model.") else k
        a = v.detach().float().numpy()
        if ZERO_CENTRED_NORMS.search(name):
            a = (a + 1.0).astype(np.float32)
        elif name.endswith("conv1d.weight"):
            a = a[:, 0, :]  # [C, 1, W] -> [C, W]
        elif name.endswith(("A_log", "dt_bias", "linear_attn.norm.weight")):
            a = a.astype(np.float32)
        L = layer_of(name)
        rel = DENSE_GLOBAL if L is None else dense_layer_path(L)
        dense.setdefault(rel, {})[name] = np.ascontiguousarray(a, dtype=np.float32)
    if cfg.tie_word_embeddings:
        dense[DENSE_GLOBAL].pop("lm_head.weight", None)
    for rel, tensors in dense.items():
        with bw.safetensors(rel) as w:
            for k, a in tensors.items():
                w.add(k, "F32", a)

    # experts
    q = ExpertQuant(bits, group_size, dtype)
    comps = expert_components(cfg.hidden_size, cfg.moe_intermediate_size, q)
    info = None
    for L, (g, u, d) in _expert_weights(model).items():
        info = make_info(L, cfg.num_experts, comps)
        with bw.experts(info) as w:
            for e in range(cfg.num_experts):
                parts = {}
                for proj, t in (("gate_proj", g[e]), ("up_proj", u[e]), ("down_proj", d[e])):
                    if bits is None:
                        parts[f"{proj}.weight"] = t.astype(DTYPES[dtype].numpy)
                    else:
                        parts[f"{proj}.weight"], parts[f"{proj}.scales"], parts[f"{proj}.biases"] = quantize(
                            t, bits, group_size, dtype)
                w.write_record(parts)

    dense_q = {"dtype": "float32", "bits": None, "group_size": group_size, "quantized": {}}
    manifest = build_manifest(cfg, q, info, dense_q, {"path": "test", "kind": "float"},
                              {"vision": False, "mtp": False, "tensors": 0}, bw.files, "test",
                              records=bw.record_list(cfg.num_hidden_layers))
    bw.finish(manifest)
    return out


def dequantized_reference(model, bits: int, group_size: int = 64, dtype: str = "float32"):
    """A copy of `model` whose routed experts hold exactly the weights a `bits` bundle decodes to."""
    import torch

    ref = copy.deepcopy(model)
    for L, (g, u, d) in _expert_weights(model).items():
        deq = []
        for t in (g, u, d):
            qq, s, b = (mx.array(a) for a in quantize(t, bits, group_size, dtype))
            deq.append(np.array(mx.dequantize(qq, s, b, group_size=group_size, bits=bits).astype(mx.float32)))
        experts = ref.model.layers[L].mlp.experts
        with torch.no_grad():
            experts.gate_up_proj.copy_(torch.from_numpy(np.concatenate([deq[0], deq[1]], axis=1)))
            experts.down_proj.copy_(torch.from_numpy(deq[2]))
    return ref


def reference_from_bundle(model, bundle_dir):
    """A copy of `model` holding exactly the weights a bundle decodes to: quantized dense modules and
    quantized experts dequantized (for checking the runtime on converter-made bundles)."""
    import torch

    from flashmoe.format import Bundle
    from flashmoe.format.experts import record_views

    b = Bundle.open(bundle_dir)
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    dense = {}
    for L in [None, *range(b.config.num_hidden_layers)]:
        dense.update(mx.load(str(b.dense_path(L))))

    def put(name, arr):
        with torch.no_grad():
            sd[name].copy_(torch.from_numpy(np.array(arr.astype(mx.float32))).reshape(sd[name].shape))

    for mod, q in (b.dense_quant.get("quantized") or {}).items():
        w = mx.dequantize(dense[f"{mod}.weight"], dense[f"{mod}.scales"], dense[f"{mod}.biases"],
                          group_size=q["group_size"], bits=q["bits"])
        put("lm_head.weight" if mod == "lm_head" else f"model.{mod}.weight", w)
    eq = b.expert_quant
    for L in range(b.config.num_hidden_layers):
        f = b.expert_file(L)
        buf = np.zeros(f.info.record_stride, np.uint8)
        gate, up, down = [], [], []
        for e in range(f.info.num_experts):
            f.read_into(e, buf)
            v = record_views(f.info, buf)
            comp = {c.name: mx.array(v[c.name]).view(getattr(mx, c.dtype)) if c.dtype == "bfloat16"
                    else mx.array(v[c.name]) for c in f.info.components}
            out = []
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if eq.bits is None:
                    out.append(comp[f"{proj}.weight"])
                else:
                    out.append(mx.dequantize(comp[f"{proj}.weight"], comp[f"{proj}.scales"], comp[f"{proj}.biases"],
                                             group_size=eq.group_size, bits=eq.bits))
            gate.append(out[0]), up.append(out[1]), down.append(out[2])
        put(f"model.layers.{L}.mlp.experts.gate_up_proj",
            mx.concatenate([mx.stack(gate), mx.stack(up)], axis=1))
        put(f"model.layers.{L}.mlp.experts.down_proj", mx.stack(down))
        f.close()
    return ref
