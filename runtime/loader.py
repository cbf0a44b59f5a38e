"""Load a bundle: dense weights resident (MLX), routed experts streamed (ExpertStreamer), tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from flashmoe.format import Bundle, BundleError
from flashmoe.format.config import SUPPORTED_MODEL_TYPES

from .experts import ExpertStreamer
from .model import Model, dense_weight_names
from .tokenizer import Tokenizer


def _resolve(path) -> Path:
    """A local bundle directory, or a Hub repo id of one (pulled and verified by flashmoe.hub)."""
    p = Path(os.fspath(path)).expanduser()
    if p.exists():
        return p
    try:
        from flashmoe.hub import resolve_bundle
    except ImportError:
        return p  # Bundle.open reports the missing directory
    return Path(resolve_bundle(os.fspath(path)))


def _load_dense(model: Model, bundle: Bundle) -> None:
    cfg = bundle.config
    dq = bundle.dense_quant or {}
    quantized = dq.get("quantized") or {}
    if quantized:
        def pred(path, m):
            q = quantized.get(path)
            if q is None or not hasattr(m, "to_quantized"):
                return False
            return {"group_size": int(q["group_size"]), "bits": int(q["bits"])}

        nn.quantize(model, class_predicate=pred)
    weights = {}
    for layer in [None, *range(cfg.num_hidden_layers)]:
        weights.update(mx.load(str(bundle.dense_path(layer))))
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    want = dense_weight_names(model)
    missing = sorted(want - set(weights))
    extra = sorted(set(weights) - want)
    if missing:
        raise BundleError(f"{bundle.path}: dense weights lack {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}; the bundle is corrupt or from another converter")
    if extra:
        for k in extra:  # e.g. tensors a newer converter adds; ignore them rather than fail
            weights.pop(k)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise BundleError(f"{bundle.path}: dense weights do not fit the config ({e})") from None
    mx.eval(model.parameters())


def compute_dtype(bundle: Bundle):
    """Activation dtype. On the CPU, float32: MLX's CPU quantized matmul is ~8x slower with bfloat16
    activations than with float32 ones (measured: an 8-bit 248320x2048 lm_head takes 5.2 s vs 0.65 s),
    while weights stay packed either way. On a GPU, the bundle's own float dtype (bfloat16 for real
    models). FLASHMOE_DTYPE=float32|bfloat16|float16 overrides."""
    forced = os.environ.get("FLASHMOE_DTYPE", "").strip()
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            raise BundleError(f"FLASHMOE_DTYPE={forced!r}: choose float32, bfloat16 or float16")
        return getattr(mx, forced)
    if mx.default_device() == mx.cpu:
        return mx.float32
    return getattr(mx, bundle.manifest["dense"]["dtype"])


def load(path, experts_per_token: int | None = None, io: str = "pread", slots: int | None = None,
         threads: int | None = None, verify: bool = False):
    """Open a converted bundle. Returns (model, tokenizer).

    experts_per_token  override the model's K (routed experts per token)
    io                 "pread" (default, faster in benchmarks/bench_io.py) or "mmap"
    slots              expert records held in memory at once (default 32; bounds resident memory)
    verify             check every file's sha256 first (slow: reads the whole bundle)
    """
    bundle = Bundle.open(_resolve(path))
    cfg = bundle.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise BundleError(f"{bundle.path}: unknown model type {cfg.model_type!r}; this flashmoe runs "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    cfg.check()
    if verify:
        bad = bundle.verify(progress=False)
        if bad:
            raise BundleError(f"{bundle.path}: {len(bad)} file(s) fail their sha256 ({', '.join(bad[:3])}); "
                              "re-run flashmoe-pull to repair")
    model = Model(cfg)
    _load_dense(model, bundle)
    object.__setattr__(model, "compute_dtype", compute_dtype(bundle))
    if experts_per_token is not None:
        k = int(experts_per_token)
        if not 1 <= k <= cfg.num_experts:
            raise BundleError(f"--experts-per-token {k} is out of range: the model has {cfg.num_experts} experts "
                              f"(its default is {cfg.num_experts_per_tok})")
        model.set_experts_per_token(k)
    streamer = ExpertStreamer(bundle, io=io, slots=slots, threads=threads, stats=model.stats)
    object.__setattr__(model, "experts", streamer)
    object.__setattr__(model, "bundle", bundle)
    tokenizer = Tokenizer(bundle.path, config_eos=cfg.eos_token_id)
    return model, tokenizer
