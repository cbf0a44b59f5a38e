"""Qwen4-Exp text model in MLX: Qwen3.5-MoE (runtime/model.py's token mixers and MoE block, imported)
plus hyper-connections, per-layer n-gram embeddings (PLE) streamed from disk, and the QSA token indexer.

Dataflow of one decoder layer on the hyper state X [B, S, hc*H] (hc residual streams side by side):

    X += PLE(X, n-gram rows)                   on PLE layers only (linear-attention layers)
    h, (X, w) = attn_hyper_connection(X)       h [B, S, H]: the streams mixed; w [B, S, hc] injection weights
    X = X + w (x) mixer(h)                     mixer: gated delta net, or attention masked by the indexer
    h, (X, w) = mlp_hyper_connection(X);  X = X + w (x) moe(h)

The embedding is repeated into the hc streams; after the last layer `hyper_connection_mixer` mixes
them into one [B, S, H] that goes to lm_head (there is no final norm). The n-gram rows come from
runtime/table_reader.py, one read plan per call for all PLE layers; the rest is resident.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flashmoe.format import BundleError, TextConfig
from flashmoe.format.jsonio import read_json_file

from .cache import Cache, KVCache, LinearCache
from .model import (Attention, DepthwiseConv, GatedDeltaNet, Model, RMSNorm, RMSNormGated, SparseMoeBlock,
                    StepInfo, Stats)
from .table_reader import TableReader


@dataclass(frozen=True)
class Qwen4Params:
    """What Qwen4-Exp adds to the Qwen3.5 shape (TextConfig), read from the bundle's config.json."""

    output_gate: str  # the delta net's output gate: silu (Qwen3.5's) or sigmoid (the published checkpoint's)
    hc_count: int
    hc_lowrank: int
    ple_layers: tuple[int, ...]  # 0-based decoder layers with a PLE module
    ple_embed_dim: int
    ple_conv_kernel_size: int
    ngram_size: int
    eos_token_id: int
    indexer_n_heads: int | None
    indexer_head_dim: int | None
    indexer_budget: int | None
    indexer_compress_ratio: int | None

    @staticmethod
    def from_hf(config: dict, cfg: TextConfig) -> "Qwen4Params":
        t = config.get("text_config") or config
        H = cfg.hidden_size

        def get(key, default=None, required=False):
            v = t.get(key, default)
            if v is None and not required:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise BundleError(f"config.json {key} must be a positive integer, not {str(v)[:40]!r}")
            return v

        gate = t.get("output_gate_type") or t.get("hidden_act", "silu")
        if gate not in ("silu", "sigmoid"):
            raise BundleError(f"Qwen4-Exp output_gate_type {str(gate)[:20]!r} is not supported (silu or sigmoid)")
        ple = t.get("ple_layer_ids") or []
        if not isinstance(ple, list) or not all(isinstance(i, int) and 1 <= i <= cfg.num_hidden_layers
                                                and cfg.is_linear(i - 1) for i in ple):
            raise BundleError("config.json ple_layer_ids must list 1-based linear-attention layers")
        idx = {k: get(k) for k in ("indexer_n_heads", "indexer_head_dim", "indexer_budget", "indexer_compress_ratio")}
        if any(v is None for v in idx.values()) and any(v is not None for v in idx.values()):
            raise BundleError("config.json sets some indexer_* fields but not all")
        if idx["indexer_n_heads"] and t.get("indexer_kv_heads", 1) != 1:
            raise BundleError("config.json indexer_kv_heads must be 1 (Qwen4-Exp's indexer has one key head)")
        if idx["indexer_budget"] and idx["indexer_budget"] % idx["indexer_compress_ratio"]:
            raise BundleError("config.json indexer_budget must be a multiple of indexer_compress_ratio")
        eos = cfg.eos_token_id
        if ple and not eos:
            raise BundleError("config.json must set eos_token_id when PLE layers are enabled")
        p = Qwen4Params(gate, get("hc_count", 4, True), get("hc_lowrank", 320, True), tuple(sorted({i - 1 for i in ple})),
                        get("ple_embed_dim", H, True), get("ple_conv_kernel_size", 4, True), get("ngram_size", 3, True),
                        eos[0] if eos else 0, **idx)
        if p.hc_count < 2:
            raise BundleError("config.json hc_count must be at least 2")
        return p


# ----------------------------------------------------------------------------------------------
# caches: a PLE layer keeps its dilated conv inputs and the last n-1 token ids; an indexed attention
# layer keeps each token's raw index key next to its keys and values


@dataclass
class PLECache(LinearCache):
    ple_conv: mx.array | None = None  # [B, (K-1)*dilation, hc*H]
    ngram: np.ndarray | None = None  # [B, ngram_size-1] int64, on the host (the hash runs there)

    def rows(self, idx: mx.array) -> "PLECache":
        base = super().rows(idx)
        return PLECache(base.conv, base.state, None if self.ple_conv is None else self.ple_conv[idx],
                        None if self.ngram is None else self.ngram[np.array(idx)])

    @staticmethod
    def concat(parts: list["PLECache"]) -> "PLECache":
        base = LinearCache.concat(parts)
        return PLECache(base.conv, base.state, mx.concatenate([p.ple_conv for p in parts]),
                        np.concatenate([p.ngram for p in parts]))

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.ple_conv is None else self.ple_conv.nbytes)

    def snapshot(self):
        return super().snapshot(), self.ple_conv, self.ngram

    def restore(self, saved) -> None:
        base, self.ple_conv, self.ngram = saved
        super().restore(base)


@dataclass
class IndexedKVCache(KVCache):
    index_keys: mx.array | None = None  # [B, cap, Di], columns [0, offset) written

    def put_index(self, k: mx.array) -> mx.array:
        """Write this call's raw index keys [B, S, Di] at the current offset (before update() moves it);
        returns every column written so far."""
        B, S, Di = k.shape
        need = self.offset + S
        if self.index_keys is None or need > self.index_keys.shape[1]:
            cap = ((need + self.step - 1) // self.step) * self.step
            nk = mx.zeros((B, cap, Di), k.dtype)
            if self.index_keys is not None and self.offset:
                nk[:, : self.offset] = self.index_keys[:, : self.offset]
            self.index_keys = nk
        self.index_keys[:, self.offset : need] = k
        return self.index_keys[:, :need]

    def rows(self, idx: mx.array, drop: int = 0) -> "IndexedKVCache":
        base = super().rows(idx, drop)
        if base.keys is None:
            return IndexedKVCache(step=self.step)
        return IndexedKVCache(base.keys, base.values, base.offset, base.step, self.index_keys[idx, drop : self.offset])

    @staticmethod
    def concat(parts: list["IndexedKVCache"], pads: list[int]) -> "IndexedKVCache":
        base = KVCache.concat(parts, pads)
        Di = next(p for p in parts if p.index_keys is not None).index_keys.shape[-1]
        ks = [mx.concatenate([mx.zeros((p.index_keys.shape[0], pad, Di), p.index_keys.dtype),
                              p.index_keys[:, : p.offset]], axis=1) for p, pad in zip(parts, pads)]
        return IndexedKVCache(base.keys, base.values, base.offset, base.step, mx.concatenate(ks))

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self.index_keys is None else self.index_keys.nbytes)


# ----------------------------------------------------------------------------------------------
# modules


class GroupedRMSNorm(nn.Module):
    """RMSNorm of each H-wide stream of a [.., hc*H] input, scaled by the stored effective weight [hc*H]."""

    def __init__(self, streams: int, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((streams * dims,))
        self.dims, self.eps = dims, eps

    def __call__(self, x: mx.array) -> mx.array:
        xs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, self.dims)
        y = mx.fast.rms_norm(xs, None, self.eps).reshape(x.shape)
        return (y * self.weight.astype(mx.float32)).astype(x.dtype)


class GatedResidual(nn.Module):
    """A hyper-connection: mixes the hc streams into one input (a learned low-rank sigmoid gate per
    feature, averaged over streams) and, with `combine`, the weight 2*sigmoid(.) each stream gives the
    block's output."""

    def __init__(self, H: int, p: Qwen4Params, eps: float, combine: bool = True):
        super().__init__()
        self.hc, self.H = p.hc_count, H
        self.hc_norm = GroupedRMSNorm(p.hc_count, H, eps)
        self.input_mix_weight_down = nn.Linear(p.hc_count * H, p.hc_lowrank, bias=False)
        self.input_mix_weight_up = nn.Linear(p.hc_lowrank, p.hc_count * H, bias=False)
        if combine:
            self.block_inject_weight = nn.Linear(p.hc_count * H, p.hc_count, bias=False)

    def mix(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x [B, S, hc*H] -> (mixed [B, S, H], normed x [B, S, hc*H])."""
        xn = self.hc_norm(x)
        g = nn.silu(self.input_mix_weight_down(xn) / self.hc)
        g = mx.sigmoid(self.input_mix_weight_up(g))
        shape = (*x.shape[:-1], self.hc, self.H)
        return (g.reshape(shape) * xn.reshape(shape)).mean(axis=-2), xn

    def __call__(self, x: mx.array, block) -> mx.array:
        """x + each stream's weighted share of block(mixed x)."""
        mixed, xn = self.mix(x)
        w = 2 * mx.sigmoid(self.block_inject_weight(xn) / self.hc)  # [B, S, hc]
        h = block(mixed)  # [B, S, H]
        return x + (w[..., None] * h[..., None, :]).reshape(x.shape)


class PLE(nn.Module):
    """Per-layer embedding: the token's n-gram rows gate a value into every stream, plus a dilated
    depthwise conv of the gated values."""

    def __init__(self, H: int, p: Qwen4Params, eps: float):
        super().__init__()
        C = p.hc_count * H
        self.hc, self.H = p.hc_count, H
        self.K, self.dilation = p.ple_conv_kernel_size, p.ngram_size
        self.key_proj = nn.Linear(p.ple_embed_dim, C, bias=False)
        self.value_proj = nn.Linear(p.ple_embed_dim, H, bias=False)
        self.norm_key = GroupedRMSNorm(p.hc_count, H, eps)
        self.norm_query = GroupedRMSNorm(p.hc_count, H, eps)
        self.norm_conv = GroupedRMSNorm(p.hc_count, H, eps)
        self.conv1d = DepthwiseConv(C, self.K)

    def __call__(self, x: mx.array, emb: mx.array, cache: PLECache, step: StepInfo) -> mx.array:
        B, S, C = x.shape
        shape = (B, S, self.hc, self.H)
        key = self.norm_key(self.key_proj(emb)).reshape(shape)
        value = self.value_proj(emb)  # [B, S, H]
        query = self.norm_query(x).reshape(shape)
        gate = (key * query).sum(-1, keepdims=True) / math.sqrt(self.H)
        gate = mx.sqrt(mx.maximum(mx.abs(gate), 1e-6)) * mx.sign(gate)
        gated = (mx.sigmoid(gate) * value[..., None, :]).reshape(B, S, C)
        normed = self.norm_conv(gated)
        if step.gate is not None:  # pad tokens: no input to the value or the conv
            gated, normed = gated * step.gate.astype(gated.dtype), normed * step.gate.astype(normed.dtype)
        span = (self.K - 1) * self.dilation
        prev = cache.ple_conv if cache.ple_conv is not None else mx.zeros((B, span, C), normed.dtype)
        xp = mx.concatenate([prev, normed], axis=1)  # [B, span + S, C]
        cache.ple_conv = xp[:, -span:]
        w = self.conv1d.weight.astype(xp.dtype)  # [C, K]
        out = xp[:, 0:S] * w[:, 0]
        for j in range(1, self.K):
            out = out + xp[:, j * self.dilation : j * self.dilation + S] * w[:, j]
        return gated + nn.silu(out)


@partial(mx.compile, shapeless=True)
def sigmoid_gated_rms_norm(x: mx.array, w: mx.array, z: mx.array, eps: float) -> mx.array:
    y = mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(x.dtype) * w.astype(x.dtype)
    return (y.astype(mx.float32) * mx.sigmoid(z.astype(mx.float32))).astype(x.dtype)


class SigmoidGatedRMSNorm(RMSNormGated):
    """norm(x) * w * sigmoid(z) (output_gate_type "sigmoid")."""

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        return sigmoid_gated_rms_norm(x, self.weight, z, self.eps)


class DeltaNet(GatedDeltaNet):
    """runtime/model.py's gated delta net, with the output gate the config names."""

    def __init__(self, cfg: TextConfig, p: Qwen4Params):
        super().__init__(cfg)
        if p.output_gate == "sigmoid":
            self.norm = SigmoidGatedRMSNorm(self.Dv, cfg.rms_norm_eps)


def rope_at(x: mx.array, pos: mx.array, dims: int, base: float) -> mx.array:
    """rotate_half RoPE of the first `dims` features of x [..., n, D] at positions pos [n]."""
    inv = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    ang = pos.astype(mx.float32)[:, None] * inv[None]  # [n, dims/2]
    cos, sin = mx.cos(mx.concatenate([ang, ang], -1)), mx.sin(mx.concatenate([ang, ang], -1))
    r, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rot = mx.concatenate([-r[..., half:], r[..., :half]], -1)
    return mx.concatenate([(r * cos.astype(x.dtype) + rot * sin.astype(x.dtype)), rest], -1)


class Indexer(nn.Module):
    """QSA token indexer: keys are averaged over blocks of `ratio` consecutive tokens; each query keeps
    the `budget / ratio` blocks of highest score sum_h relu(q_h . k_block) / sqrt(Di), plus the tail of
    tokens after its last complete block. Attention then sees only those tokens."""

    def __init__(self, cfg: TextConfig, p: Qwen4Params):
        super().__init__()
        self.N, self.Di = p.indexer_n_heads, p.indexer_head_dim
        self.ratio, self.top = p.indexer_compress_ratio, p.indexer_budget // p.indexer_compress_ratio
        self.R, self.theta = cfg.rotary_dim, cfg.rope_theta
        self.index_qk_proj = nn.Linear(cfg.hidden_size, (self.N + 1) * self.Di, bias=False)
        self.q_layernorm = RMSNorm(self.Di, cfg.rms_norm_eps)
        self.k_layernorm = RMSNorm(self.Di, cfg.rms_norm_eps)

    def mask(self, x: mx.array, cache: IndexedKVCache, full: Cache, step: StepInfo) -> mx.array | str | None:
        """The attention mask [B, 1, S, P+S] with only the selected tokens (or step.mask unchanged when no
        query has more complete blocks than it may keep)."""
        B, S, _ = x.shape
        P = cache.offset
        qk = self.index_qk_proj(x)
        q = self.q_layernorm(qk[..., : self.N * self.Di].reshape(B, S, self.N, self.Di)).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.R, traditional=False, base=self.theta, scale=1.0, offset=step.rope_offset)
        keys = cache.put_index(qk[..., self.N * self.Di :])  # [B, P+S, Di]
        lp = full.left_pad
        if max(P + S - int(lp.min()), 0) // self.ratio <= self.top:
            return step.mask
        masks = [self._row(q[b], keys[b, int(lp[b]):], P - int(lp[b]), int(lp[b]), S) for b in range(B)]
        return mx.stack(masks)[:, None]

    def _row(self, q: mx.array, keys: mx.array, P: int, pad: int, S: int) -> mx.array:
        """One row: q [N, S, Di] (roped), keys [n, Di] of its tokens; its first query is at position P."""
        c, n = self.ratio, keys.shape[0]
        nb = n // c
        qpos = P + mx.arange(S)  # [S] position of each query (negative: a pad query)
        if nb:
            pooled = keys[: nb * c].astype(mx.float32).reshape(nb, c, -1).mean(1).astype(keys.dtype)
            kb = rope_at(self.k_layernorm(pooled), mx.arange(nb) * c, self.R, self.theta)  # [nb, Di]
            sc = mx.maximum(q.astype(mx.float32) @ kb.astype(mx.float32).T, 0).sum(0) / math.sqrt(self.Di)  # [S, nb]
            nb_q = (qpos + 1) // c  # complete blocks each query sees
            ok = mx.arange(nb)[None] < nb_q[:, None]
            sc = mx.where(ok, sc, -mx.inf)
            rank = mx.argsort(mx.argsort(-sc, axis=-1), axis=-1)
            chosen = (rank < self.top) & ok  # [S, nb]
        tpos = mx.arange(n)  # token positions of this row's columns
        causal = tpos[None] <= qpos[:, None]
        tail = tpos[None] >= ((qpos + 1) // c * c)[:, None]
        if nb:
            blk = mx.minimum(tpos // c, nb - 1)
            inblock = mx.take(chosen, blk, axis=1) & (tpos < nb * c)[None]
            keep = causal & (tail | inblock)
        else:
            keep = causal
        if pad:  # pad columns: no query sees them, except a pad query sees itself
            col = mx.arange(pad)[None] == (qpos + pad)[:, None]
            keep = mx.concatenate([col, keep], axis=1)
        return keep


class IndexedAttention(Attention):
    """Gated attention (runtime/model.py) restricted to the tokens the indexer selects."""

    def __init__(self, cfg: TextConfig, p: Qwen4Params):
        super().__init__(cfg)
        self.indexer = Indexer(cfg, p)

    def __call__(self, x: mx.array, cache: IndexedKVCache, step: StepInfo, full: Cache) -> mx.array:
        return super().__call__(x, cache, dataclasses.replace(step, mask=self.indexer.mask(x, cache, full, step)))


class Qwen4Layer(nn.Module):
    def __init__(self, cfg: TextConfig, p: Qwen4Params, layer: int):
        super().__init__()
        self.is_linear = cfg.is_linear(layer)
        self.indexed = not self.is_linear and p.indexer_n_heads is not None
        if self.is_linear:
            self.linear_attn = DeltaNet(cfg, p)
        else:
            self.self_attn = IndexedAttention(cfg, p) if self.indexed else Attention(cfg)
        self.mlp = SparseMoeBlock(cfg, layer)
        if layer in p.ple_layers:
            self.ple = PLE(cfg.hidden_size, p, cfg.rms_norm_eps)
        self.attn_hyper_connection = GatedResidual(cfg.hidden_size, p, cfg.rms_norm_eps)
        self.mlp_hyper_connection = GatedResidual(cfg.hidden_size, p, cfg.rms_norm_eps)

    def __call__(self, x, cache, full: Cache, experts, stats: Stats, step: StepInfo, emb: mx.array | None):
        t0 = time.perf_counter()
        if emb is not None:
            x = x + self.ple(x, emb, cache, step)
        if self.is_linear:
            x = self.attn_hyper_connection(x, lambda h: self.linear_attn(h, cache, step))
        elif self.indexed:
            x = self.attn_hyper_connection(x, lambda h: self.self_attn(h, cache, step, full))
        else:
            x = self.attn_hyper_connection(x, lambda h: self.self_attn(h, cache, step))
        if stats.enabled:
            mx.eval(x)
        stats.attention += time.perf_counter() - t0
        return self.mlp_hyper_connection(x, lambda h: self.mlp(h, experts, stats, step))


class Qwen4ExpModel(Model):
    """Qwen4-Exp causal LM without its routed experts and n-gram tables (both read from the bundle).
    The interface is Model's: call with ids [B, S] and a Cache, or decode()."""

    def __init__(self, cfg: TextConfig, params: Qwen4Params, tables: TableReader | None, experts=None,
                 stats: Stats | None = None, compute_dtype=None, experts_per_token: int | None = None, bundle=None,
                 runtime_config=None):
        nn.Module.__init__(self)  # not Model.__init__: the layers and the head differ
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Qwen4Layer(cfg, params, i) for i in range(cfg.num_hidden_layers)]
        self.hyper_connection_mixer = GatedResidual(cfg.hidden_size, params, cfg.rms_norm_eps, combine=False)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        missing = [L for L in params.ple_layers if tables is None or L not in tables.files]
        if missing:
            raise BundleError(f"the bundle has no n-gram table for PLE layer(s) {missing}; re-run flashmoe-convert")
        for L in params.ple_layers:
            info = tables.info(L)
            if info.row_dim * len(info.hash.vocab_sizes) != params.ple_embed_dim \
                    or info.hash.eos_token_id != params.eos_token_id:
                raise BundleError(f"the n-gram table of layer {L} does not fit config.json (ple_embed_dim "
                                  f"{params.ple_embed_dim}, eos {params.eos_token_id}); the bundle is corrupt")
        if experts_per_token is not None:
            for layer in self.layers:
                layer.mlp.top_k = int(experts_per_token)
        # plain attributes (not parameters), as Model's
        self.params = params
        self.tables = tables
        self.experts = experts
        self.stats = stats if stats is not None else Stats()
        self.compute_dtype = compute_dtype
        self.bundle = bundle
        self.runtime_config = runtime_config

    @staticmethod
    def from_bundle(*, bundle, **kw) -> "Qwen4ExpModel":
        """The model of a qwen4_exp bundle; `kw` as Model's (experts, stats, compute_dtype, ...)."""
        hf = read_json_file(Path(bundle.path) / "config.json", "config.json", "re-run flashmoe-convert")
        params = Qwen4Params.from_hf(hf, bundle.config)
        return Qwen4ExpModel(bundle.config, params, TableReader(bundle.path, bundle.manifest), bundle=bundle, **kw)

    def make_cache(self, left_pad=None) -> Cache:
        lp = np.zeros(1, np.int64) if left_pad is None else np.asarray(left_pad, np.int64)
        return Cache([(PLECache() if "ple" in layer else LinearCache()) if layer.is_linear
                      else IndexedKVCache() if layer.indexed else KVCache() for layer in self.layers], 0, lp)

    def _ngram_rows(self, ids: mx.array, cache: Cache, step: StepInfo) -> dict[int, mx.array]:
        """Every PLE layer's n-gram embedding [B, S, E] for this call: one read plan over all tables."""
        p = self.params
        if not p.ple_layers:
            return {}
        host = np.array(ids).astype(np.int64)
        if step.valid is not None:  # pad tokens hash as eos (as transformers' masked ple_input_ids)
            host = np.where(step.valid, host, p.eos_token_id)
        B, S = host.shape
        wanted = {}
        for L in p.ple_layers:
            c = cache.layers[L]
            th = self.tables.info(L).hash
            ctx = c.ngram if c.ngram is not None else np.full((B, th.context()), p.eos_token_id, np.int64)
            hist = np.concatenate([ctx, host], axis=1)
            c.ngram = hist[:, -th.context():]
            wanted[L] = th.row_ids(hist)  # [B, S, heads]
        rows = self.tables.gather(wanted)
        out = {}
        for L, r in rows.items():
            a = mx.array(r.reshape(B, S, -1))
            if self.tables.info(L).dtype == "bfloat16":
                a = a.view(mx.bfloat16)
            out[L] = a.astype(self.compute_dtype or self.embed_tokens.weight.dtype)
        return out

    def __call__(self, ids: mx.array, cache: Cache, last_only: bool = False, lookups: list | None = None) -> mx.array:
        if self.experts is None:
            raise RuntimeError("Model.experts is not set; load the model with flashmoe.load")
        if ids.shape[0] != cache.batch:
            raise ValueError(f"ids have {ids.shape[0]} rows but the cache has {cache.batch}")
        stats = self.stats
        step = StepInfo.build(cache, ids.shape[1])
        if lookups is not None:
            if ids.shape[1] != 1 or step.valid is not None:
                raise ValueError("optimistic lookups are for decode steps (one real token per row)")
            step.lookups = lookups
        emb = self._ngram_rows(ids, cache, step)
        x = self.embed_tokens(ids)  # [B, S, H]
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        x = mx.tile(x, (1, 1, self.params.hc_count))  # [B, S, hc*H]
        for i, (layer, c) in enumerate(zip(self.layers, cache.layers)):
            x = layer(x, c, cache, self.experts, stats, step, emb.get(i))
        cache.offset += ids.shape[1]
        t0 = time.perf_counter()
        if last_only:
            x = x[:, -1:]
        x = self.hyper_connection_mixer.mix(x)[0]
        logits = self.lm_head(x) if "lm_head" in self else self.embed_tokens.as_linear(x)
        if stats.enabled:
            mx.eval(logits)
        stats.head += time.perf_counter() - t0
        return logits


__all__ = ["Qwen4ExpModel", "Qwen4Params", "PLECache", "IndexedKVCache"]
