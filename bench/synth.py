"""`flashmoe-bench make`: a valid bundle with the real shapes of a named model and random weights, for
any number of layers, written directly (no checkpoint, no quantization pass).

Quantized tensors get random packed codes and a constant scale per tensor chosen so that dequantized
weights are zero-mean uniform with standard deviation 1/sqrt(in_features): activations stay O(1)
through any depth, so decoding runs the same arithmetic and I/O as the real model. Norm weights are
1, A_log/dt_bias take typical values. Bytes come from one random pool sliced at random offsets, so
generation runs at disk speed.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from flashmoe.format import BundleError, BundleWriter, ExpertQuant, expert_components
from flashmoe.format.manifest import DENSE_GLOBAL, MANIFEST, build_manifest, dense_layer_path
from flashmoe.format.experts import make_info
from flashmoe.format.layout import dense_module_bits

from .presets import config, hf_config

POOL_BYTES = 64 << 20


class RandomBytes:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.pool = np.frombuffer(self.rng.bytes(POOL_BYTES), dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        out = np.empty(nbytes, dtype=np.uint8)
        pos = 0
        while pos < nbytes:
            start = int(self.rng.integers(0, POOL_BYTES // 2))
            n = min(nbytes - pos, POOL_BYTES - start)
            out[pos:pos + n] = self.pool[start:start + n]
            pos += n
        return out


def bf16_const(value: float, shape) -> np.ndarray:
    bits = np.array([value], dtype=np.float32).view(np.uint32) >> 16
    return np.full(shape, bits[0], dtype=np.uint16)


def scale_bias(out_f: int, in_f: int, bits: int, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Constant bf16 scales and biases [out_f, in_f/gs] making dequantized codes zero-mean uniform with
    standard deviation 1/sqrt(in_f)."""
    levels = (1 << bits) - 1
    scale = math.sqrt(12.0 / in_f) / levels
    return bf16_const(scale, (out_f, in_f // gs)), bf16_const(-scale * levels / 2, (out_f, in_f // gs))


def quantized(rb: RandomBytes, out_f: int, in_f: int, bits: int, gs: int) -> dict[str, tuple[str, np.ndarray]]:
    s, b = scale_bias(out_f, in_f, bits, gs)
    return {
        "weight": ("U32", rb.take(out_f * in_f * bits // 8).view(np.uint32).reshape(out_f, in_f * bits // 32)),
        "scales": ("BF16", s),
        "biases": ("BF16", b),
    }


def byte_tokenizer_files(vocab_size: int) -> dict[str, bytes]:
    """A byte-level BPE tokenizer (the 256 byte tokens, a few merges, Qwen-style special tokens) and a
    Qwen-style chat template: enough to run and test any bundle whose vocabulary has >= 270 entries.
    Returns {file name: content}."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
    merges = []
    # a few merges so that tokens span several bytes (multi-byte UTF-8 characters split across tokens)
    for a, b in [("t", "h"), ("h", "e"), ("th", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r")]:
        if len(vocab) < vocab_size:
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    assert len(vocab) <= vocab_size, "tiny vocab_size must hold the 256 byte tokens"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "chat_template": template,
        }).encode(),
        "chat_template.jinja": template.encode(),
    }


def write_byte_tokenizer(out: Path, vocab_size: int) -> list[str]:
    """byte_tokenizer_files written into the directory `out` (for test checkpoints); returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    files = byte_tokenizer_files(vocab_size)
    for name, raw in files.items():
        (out / name).write_bytes(raw)
    return list(files)


def make_bundle(preset: str | dict, layers: int, bits: int, out: str | Path, group_size: int = 64, dense_bits: int = 8,
                seed: int = 0, progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    cfg = config(preset, layers)
    out = Path(out).expanduser()
    if (out / MANIFEST).exists():
        raise BundleError(f"{out} already holds a bundle; choose another -o or delete it")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} is not empty; flashmoe-bench make writes only into an empty or new directory")
    quant = ExpertQuant(bits, group_size, "bfloat16")
    comps = expert_components(cfg.hidden_size, cfg.moe_intermediate_size, quant)
    info0 = make_info(0, cfg.num_experts, comps)
    need = layers * info0.file_size + 2 * cfg.vocab_size * cfg.hidden_size * dense_bits // 8 + layers * (400 << 20)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > free:
        raise BundleError(f"{out}: needs ~{need / 1e9:.1f} GB but {free / 1e9:.1f} GB is free; use fewer --layers")
    rb = RandomBytes(seed)
    bw = BundleWriter(out)
    qmods: dict[str, dict] = {}
    H, E = cfg.hidden_size, cfg.num_experts

    def dense_file(path: str, tensors: dict[str, tuple[int, int] | tuple[int]], extra: dict) -> None:
        with bw.safetensors(path, {"format": "mlx", "flashmoe": "synthetic"}) as w:
            for name, shape in tensors.items():
                module = name[: -len(".weight")]
                b = dense_module_bits(module, dense_bits)
                for part, (dt, a) in quantized(rb, shape[0], shape[1], b, group_size).items():
                    w.add(f"{module}.{part}", dt, a)
                qmods[module] = {"bits": b, "group_size": group_size}
            for name, (dt, a) in extra.items():
                w.add(name, dt, a)

    # the same constant scales/biases serve every record: build them once
    consts = {}
    for c in comps:
        proj, part = c.name.split(".")
        if part == "scales":
            s, b = scale_bias(c.shape[0], c.shape[1] * group_size, bits, group_size)
            consts[f"{proj}.scales"], consts[f"{proj}.biases"] = s, b
    total = layers * info0.file_size
    with tqdm(total=total, unit="B", unit_scale=True, desc="make", disable=not progress) as bar:
        for L in range(layers):
            with bw.experts(make_info(L, E, comps)) as w:
                for _ in range(E):
                    parts = dict(consts)
                    for c in comps:
                        if c.name.endswith(".weight"):
                            parts[c.name] = rb.take(c.nbytes).view(np.uint32).reshape(c.shape)
                    w.write_record(parts)
                    bar.update(info0.record_stride)
            p = f"layers.{L}"
            Is = cfg.shared_expert_intermediate_size
            lin = {f"{p}.mlp.gate.weight": (E, H), f"{p}.mlp.shared_expert_gate.weight": (1, H),
                   f"{p}.mlp.shared_expert.gate_proj.weight": (Is, H), f"{p}.mlp.shared_expert.up_proj.weight": (Is, H),
                   f"{p}.mlp.shared_expert.down_proj.weight": (H, Is)}
            ones = lambda n: ("F32", np.ones(n, dtype=np.float32))  # noqa: E731
            extra = {f"{p}.input_layernorm.weight": ones(H), f"{p}.post_attention_layernorm.weight": ones(H)}
            if cfg.is_linear(L):
                nv = cfg.linear_num_value_heads
                lin.update({f"{p}.linear_attn.in_proj_qkv.weight": (cfg.conv_dim, H),
                            f"{p}.linear_attn.in_proj_z.weight": (cfg.value_dim, H),
                            f"{p}.linear_attn.in_proj_b.weight": (nv, H), f"{p}.linear_attn.in_proj_a.weight": (nv, H),
                            f"{p}.linear_attn.out_proj.weight": (H, cfg.value_dim)})
                k = cfg.linear_conv_kernel_dim
                conv = (np.random.default_rng(L).standard_normal((cfg.conv_dim, k), dtype=np.float32) / math.sqrt(k))
                extra.update({f"{p}.linear_attn.conv1d.weight": ("BF16", (conv.view(np.uint32) >> 16).astype(np.uint16)),
                              f"{p}.linear_attn.dt_bias": ("F32", np.ones(nv, dtype=np.float32)),
                              f"{p}.linear_attn.A_log": ("F32", np.log(np.linspace(1, 16, nv, dtype=np.float32))),
                              f"{p}.linear_attn.norm.weight": ones(cfg.linear_value_head_dim)})
            else:
                nh, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
                lin.update({f"{p}.self_attn.q_proj.weight": (2 * nh * hd, H), f"{p}.self_attn.k_proj.weight": (kv * hd, H),
                            f"{p}.self_attn.v_proj.weight": (kv * hd, H), f"{p}.self_attn.o_proj.weight": (H, nh * hd)})
                extra.update({f"{p}.self_attn.q_norm.weight": ones(hd), f"{p}.self_attn.k_norm.weight": ones(hd)})
            dense_file(dense_layer_path(L), lin, extra)
    dense_file(DENSE_GLOBAL, {"embed_tokens.weight": (cfg.vocab_size, H), "lm_head.weight": (cfg.vocab_size, H)},
               {"norm.weight": ("F32", np.ones(H, dtype=np.float32))})
    for name, raw in byte_tokenizer_files(cfg.vocab_size).items():
        bw.write_bytes(name, raw)
    conf = hf_config(preset, layers)
    bw.write_bytes("config.json", (json.dumps(conf, indent=1) + "\n").encode())
    dense = {"dtype": "bfloat16", "bits": dense_bits, "group_size": group_size, "quantized": dict(sorted(qmods.items()))}
    source = {"kind": "synthetic", "preset": preset if isinstance(preset, str) else "custom", "seed": seed, "full_layers": conf.get("full_layers_in_model")}
    m = build_manifest(cfg, quant, info0, dense, source, {"vision": False, "mtp": False, "tensors": 0}, bw.files,
                       f"synthetic-{preset}-{layers}-{bits}-{seed}", records=bw.record_list(layers))
    bw.finish(m)
    print(f"made {out}: {preset} shapes, {layers} layers, {bits}-bit experts "
          f"({sum(f['size'] for f in bw.files.values()) / 1e9:.2f} GB)", file=sys.stderr)
    return out
