"""Load a bundle: dense weights resident (MLX), routed experts streamed (RoutedExperts), tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flashmoe.format import Bundle, BundleError, InputError
from flashmoe.format.config import SUPPORTED_MODEL_TYPES
from flashmoe.format.st import read_header

from .config import RuntimeConfig
from .experts import ExpertShard, RoutedExperts
from .integrity import RecordVerifier, check_dense
from .model import Model, Stats, dense_weight_names
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
        path = bundle.dense_path(layer)
        read_header(path)  # a damaged header gets an error naming the file, not MLX's parse error
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError) as e:
            raise BundleError(f"{path}: cannot read these dense weights ({e}); the bundle is corrupt: run "
                              "`flashmoe-inspect --verify`, then re-run flashmoe-convert or flashmoe-pull") from None
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


def compute_dtype(bundle: Bundle, forced: str | None = None):
    """Activation dtype. On the CPU, float32: MLX's CPU quantized matmul is ~8x slower with bfloat16
    activations than with float32 ones (measured: an 8-bit 248320x2048 lm_head takes 5.2 s vs 0.65 s),
    while weights stay packed either way. On a GPU, the bundle's own float dtype (bfloat16 for real
    models). RuntimeConfig.dtype (FLASHMOE_DTYPE in the CLIs) overrides."""
    if forced:
        return getattr(mx, forced)
    if mx.default_device() == mx.cpu:
        return mx.float32
    return getattr(mx, bundle.manifest["dense"]["dtype"])


def load(path, config: RuntimeConfig | None = None, shard: ExpertShard | None = None, **overrides):
    """Open a converted bundle (or a Hub repo id of one). Returns (model, tokenizer).

    config     a RuntimeConfig (io mode, kernels, GPU cache size, dtype, slots, threads, experts per
               token, verify); keyword overrides of its fields are accepted too, e.g.
               load(path, experts_per_token=4, io="mmap"). Resolved once, here.
    shard      this process's part of an expert-parallel run (runtime/distributed.py: Dist.expert_shard());
               None: every expert here.
    """
    cfg_rt = (config or RuntimeConfig()).with_(**overrides).check()
    if cfg_rt.kernels == "custom":
        from flashmoe.metal.dispatch import gpu_backend

        if gpu_backend() is None:
            raise InputError("custom expert kernels need a Metal or CUDA GPU as MLX's default device, and MLX "
                             "runs on the CPU here; use kernels auto (--kernels auto) or builtin")
    bundle = Bundle.open(_resolve(path))
    cfg = bundle.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise BundleError(f"{bundle.path}: unknown model type {cfg.model_type!r}; this flashmoe runs "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    cfg.check()
    check_dense(bundle)  # sha256 of the dense files: hashed on the first load, then only stat()ed
    if cfg_rt.verify:
        bad = bundle.verify(progress=False)
        if bad:
            raise BundleError(f"{bundle.path}: {len(bad)} file(s) fail their sha256 ({', '.join(bad[:3])}); "
                              "re-run flashmoe-pull to repair")
    k = cfg_rt.experts_per_token
    if k is not None and not 1 <= k <= cfg.num_experts:
        raise InputError(f"--experts-per-token {k} is out of range: the model has {cfg.num_experts} experts "
                         f"(its default is {cfg.num_experts_per_tok})")
    stats = Stats()
    experts = RoutedExperts(bundle, cfg_rt, stats=stats, shard=shard)
    verifier = RecordVerifier(bundle)
    if verifier.enabled:  # each record's CRC-32, checked the first time this process reads it
        experts.reader.verifier = verifier.check
    kw = dict(experts=experts, stats=stats, compute_dtype=compute_dtype(bundle, cfg_rt.dtype), experts_per_token=k,
              bundle=bundle, runtime_config=cfg_rt)
    if cfg.model_type == "qwen4_exp":  # n-gram tables streamed like the experts (runtime/qwen4_exp.py)
        from .qwen4_exp import Qwen4ExpModel

        model = Qwen4ExpModel.from_bundle(bundle, **kw)
    else:
        model = Model(cfg, **kw)
    _load_dense(model, bundle)
    tokenizer = Tokenizer(bundle.path, config_eos=cfg.eos_token_id)
    return model, tokenizer
