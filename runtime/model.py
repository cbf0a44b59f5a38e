"""Qwen3.5-MoE text model in MLX: one readable file, mlx-lm style.

Dense weights (attention, router, shared expert, norms, embeddings) live in these modules; routed
experts do not: each MoE block asks an `experts` callable (runtime/experts.py) to stream the records
its tokens selected from SSD and apply them. The module tree mirrors the bundle's dense names
(format/SPEC.md section 4), so `load_weights` takes the bundle's safetensors as they are.

Shape letters used in comments:

    B batch                S tokens in this call          P past tokens (cache offset)
    H hidden_size          V vocab_size                   T = B*S flattened tokens
    N attention heads      Nk kv heads                    D head_dim          R rotary dims (D * partial factor)
    Hk linear key heads    Hv linear value heads          Dk, Dv linear key / value head dims
    C conv channels (2*Hk*Dk + Hv*Dv)                     W conv kernel width
    E experts              K experts per token            I shared expert intermediate size

Batches. Rows of a batch are separate sequences of different lengths, laid out left-padded: every row
ends at the same column, and row b's first `left_pad[b]` columns are padding. A pad column never
touches state: attention masks it out as a key, the delta net gives it beta = 0 and decay 1 (and a zero
conv input), and the MoE block neither routes nor reads experts for it. Row b's position of column j
is j - left_pad[b] (RoPE takes per-row offsets).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from flashmoe.format import TextConfig

from . import pipeline
from .cache import Cache, KVCache, LinearCache
from .integrity import check_finite, nonfinite

# ----------------------------------------------------------------------------------------------
# stats: wall time per stage. Stages are only separable when we synchronise at their ends, so the
# model evaluates eagerly at stage boundaries when stats are on (`Stats.enabled`), and only where
# it must (routing) otherwise.


@dataclass
class Stats:
    enabled: bool = False
    attention: float = 0.0  # token mixers (delta net / attention) incl. norms and residuals
    routing: float = 0.0  # router matmul, softmax, top-k, indices to the host
    expert_io: float = 0.0  # waiting for expert records to be read
    expert_compute: float = 0.0  # routed + shared expert matmuls
    head: float = 0.0  # final norm + lm_head
    expert_bytes: int = 0
    expert_reads: int = 0
    # the profile of the disk-bound regime (bench/batch.py's StepMeter), not in `snapshot`:
    io_busy: float = 0.0  # wall time some expert read was in flight (the model's own or a background one)
    experts_touched: int = 0  # distinct experts per MoE layer call (a layer-major prefill's union once)
    expert_calls: int = 0  # expert-block calls (kernel launches of the routed experts)
    expert_pairs: int = 0  # (token, expert) pairs they computed
    prefill_passes: int = 0  # layer-major prefill passes (runtime/prefill.py)

    COUNTERS = ("io_busy", "experts_touched", "expert_calls", "expert_pairs", "prefill_passes")

    def reset(self) -> None:
        for f in ("attention", "routing", "expert_io", "expert_compute", "head", *self.COUNTERS):
            setattr(self, f, type(getattr(self, f))(0))
        self.expert_bytes = self.expert_reads = 0

    def snapshot(self) -> dict:
        return {f: getattr(self, f) for f in ("attention", "routing", "expert_io", "expert_compute", "head",
                                              "expert_bytes", "expert_reads")}


@dataclass
class StepInfo:
    """What one forward needs to know about its rows' padding (built once per call by Model)."""

    mask: mx.array | str | None  # attention mask [B, 1, S, P+S] (True = attend), "causal" or None
    rope_offset: int | mx.array  # position of each row's first new token
    valid: np.ndarray | None  # [B, S] bool: real (not pad) tokens of this call; None = all real
    gate: mx.array | None  # valid as float [B, S, 1] for the delta net
    # optimistic decode (runtime/pipeline.py): MoE blocks look their experts up in the device-side slot table
    # instead of syncing with the host, and append (layer, indices, slot ids, nonfinite flag) here
    lookups: list | None = None

    @staticmethod
    def build(cache: Cache, S: int, offset: int | None = None) -> "StepInfo":
        """For S new columns of `cache`'s rows starting at column `offset` (default: the cache's offset; a
        layer-major prefill builds every chunk's before any chunk is fed)."""
        P, lp = cache.offset if offset is None else offset, cache.left_pad
        if not lp.any():
            return StepInfo("causal" if S > 1 else None, P, None, None)
        kpos = mx.arange(P + S)[None, None, None, :]
        qpos = (P + mx.arange(S))[None, None, :, None]
        lpa = mx.array(lp.astype(np.int32))[:, None, None, None]
        # causal, and no pad key, except that a pad query sees itself (so its softmax stays finite)
        mask = (kpos <= qpos) & ((kpos >= lpa) | (kpos == qpos))
        rope = mx.array((P - lp).astype(np.int32))
        valid = (P + np.arange(S))[None, :] >= lp[:, None]  # [B, S]
        if valid.all():
            return StepInfo(mask, rope, None, None)
        return StepInfo(mask, rope, valid, mx.array(valid.astype(np.float32))[..., None])


# ----------------------------------------------------------------------------------------------
# building blocks


# ----------------------------------------------------------------------------------------------
# fused elementwise chains: on a GPU every op is a kernel launch, and a decode step is launch-bound, so
# the chains below are compiled into one kernel each (shapeless: one trace for every shape)


@partial(mx.compile, shapeless=True)
def swiglu(g: mx.array, u: mx.array) -> mx.array:
    return nn.silu(g) * u


@partial(mx.compile, shapeless=True)
def sigmoid_gate(y: mx.array, gate: mx.array) -> mx.array:
    """y * sigmoid(gate), the sigmoid in float32 (the shared expert's and attention's output gates)."""
    return y * mx.sigmoid(gate.astype(mx.float32)).astype(y.dtype)


@partial(mx.compile, shapeless=True)
def delta_gates(a: mx.array, b: mx.array, A_log: mx.array, dt_bias: mx.array) -> tuple[mx.array, mx.array]:
    """The delta net's log-decay g = -exp(A_log) * softplus(a + dt_bias) and write strength beta =
    sigmoid(b), in float32."""
    f32 = mx.float32
    g = -mx.exp(A_log.astype(f32)) * nn.softplus(a.astype(f32) + dt_bias.astype(f32))
    return g, mx.sigmoid(b.astype(f32))


@partial(mx.compile, shapeless=True)
def qk_l2norm(q: mx.array, k: mx.array, scale: float) -> tuple[mx.array, mx.array]:
    """float32 l2-normalised q (times scale) and k."""
    q, k = q.astype(mx.float32), k.astype(mx.float32)
    return l2norm(q) * scale, l2norm(k)


@partial(mx.compile, shapeless=True)
def gated_rms_norm(x: mx.array, w: mx.array, z: mx.array, eps: float) -> mx.array:
    y = mx.fast.rms_norm(x.astype(mx.float32), None, eps).astype(x.dtype) * w.astype(x.dtype)
    return (y.astype(mx.float32) * nn.silu(z.astype(mx.float32))).astype(x.dtype)


@mx.compile
def causal_conv(xp: mx.array, w: mx.array) -> mx.array:
    """silu of the depthwise causal conv: xp [B, S+W-1, C] (past inputs first), w [C, W] -> [B, S, C]
    (traced once per shape: decode's S = 1 is one trace)."""
    W = w.shape[1]
    S = xp.shape[1] - W + 1
    w = w.astype(xp.dtype)
    out = xp[:, 0:S] * w[:, 0]
    for j in range(1, W):
        out = out + xp[:, j : j + S] * w[:, j]
    return nn.silu(out)


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm of Qwen3.5: the bundle stores the effective scale (1 + w) in float32, so this
    is a plain RMSNorm computed in float32 (as the reference does) and cast back."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class RMSNormGated(nn.Module):
    """norm(x) * w * silu(z): the delta net's output norm (plain weight, not zero-centred)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        return gated_rms_norm(x, self.weight, z, self.eps)


class DepthwiseConv(nn.Module):
    """Holds the causal depthwise conv1d weight as the bundle stores it: [C, W]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps)


# ----------------------------------------------------------------------------------------------
# token mixers


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (Qwen3-Next / Qwen3.5 `linear_attention` layers)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.W = cfg.linear_conv_kernel_dim
        self.key_dim, self.value_dim, C = cfg.key_dim, cfg.value_dim, cfg.conv_dim
        H = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(H, C, bias=False)
        self.in_proj_z = nn.Linear(H, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(H, self.Hv, bias=False)
        self.in_proj_a = nn.Linear(H, self.Hv, bias=False)
        self.conv1d = DepthwiseConv(C, self.W)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = RMSNormGated(self.Dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, H, bias=False)

    def __call__(self, x: mx.array, cache: LinearCache, step: StepInfo) -> mx.array:
        B, S, _ = x.shape
        qkv = self.in_proj_qkv(x)  # [B, S, C]
        if step.gate is not None:  # pad tokens: zero conv input (as before a sequence starts)
            qkv = qkv * step.gate.astype(qkv.dtype)
        z = self.in_proj_z(x).reshape(B, S, self.Hv, self.Dv)
        b = self.in_proj_b(x)  # [B, S, Hv]
        a = self.in_proj_a(x)  # [B, S, Hv]

        # causal depthwise conv over [previous W-1 inputs, this call's inputs]
        W = self.W
        prev = cache.conv if cache.conv is not None else mx.zeros((B, W - 1, qkv.shape[-1]), qkv.dtype)
        xp = mx.concatenate([prev, qkv], axis=1)  # [B, S+W-1, C]
        cache.conv = xp[:, -(W - 1):]
        conv = causal_conv(xp, self.conv1d.weight)  # [B, S, C]

        q, k, v = mx.split(conv, [self.key_dim, 2 * self.key_dim], axis=-1)
        f32 = mx.float32
        v = v.reshape(B, S, self.Hv, self.Dv).astype(f32)
        q, k = qk_l2norm(q.reshape(B, S, self.Hk, self.Dk), k.reshape(B, S, self.Hk, self.Dk),
                         self.Dk ** -0.5)  # [B, S, Hk, Dk]
        # decay g = -exp(A_log) * softplus(a + dt_bias) in log space (the kernel takes exp(g)); beta [B, S, Hv]
        g, beta = delta_gates(a, b, self.A_log, self.dt_bias)
        if step.gate is not None:  # pad tokens: beta 0 and decay exp(0) = 1 leave the state as it was
            beta = beta * step.gate
            g = g * step.gate
        state = cache.state
        if state is None:
            state = mx.zeros((B, self.Hv, self.Dv, self.Dk), f32)
        # mx.fast.gated_delta_update: q, k [B,S,Hk,Dk] (k heads repeated to v heads inside, like
        # repeat_interleave), v [B,S,Hv,Dv], gamma = exp(g), beta [B,S,Hv], state [B,Hv,Dv,Dk]; it does
        # no normalisation or scaling itself (checked against a plain recurrence in tests).
        out, cache.state = mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state)  # [B, S, Hv, Dv]
        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(B, S, self.value_dim))


class Attention(nn.Module):
    """Gated full attention: q_proj yields query and gate per head; q/k RMSNorm; partial RoPE; GQA."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.N, self.Nk, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.R = cfg.rotary_dim
        self.theta = cfg.rope_theta
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.N * self.D * 2, bias=bias)
        self.k_proj = nn.Linear(H, self.Nk * self.D, bias=bias)
        self.v_proj = nn.Linear(H, self.Nk * self.D, bias=bias)
        self.o_proj = nn.Linear(self.N * self.D, H, bias=bias)
        self.q_norm = RMSNorm(self.D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache, step: StepInfo) -> mx.array:
        B, S, _ = x.shape
        N, Nk, D = self.N, self.Nk, self.D
        qg = self.q_proj(x).reshape(B, S, N, 2 * D)
        q, gate = qg[..., :D], qg[..., D:]  # [B, S, N, D] each
        gate = gate.reshape(B, S, N * D)
        q = self.q_norm(q).transpose(0, 2, 1, 3)  # [B, N, S, D]
        k = self.k_norm(self.k_proj(x).reshape(B, S, Nk, D)).transpose(0, 2, 1, 3)  # [B, Nk, S, D]
        v = self.v_proj(x).reshape(B, S, Nk, D).transpose(0, 2, 1, 3)  # [B, Nk, S, D]
        # rotate_half-style (non-interleaved) RoPE on the first R dims; the rest pass through
        q = mx.fast.rope(q, self.R, traditional=False, base=self.theta, scale=1.0, offset=step.rope_offset)
        k = mx.fast.rope(k, self.R, traditional=False, base=self.theta, scale=1.0, offset=step.rope_offset)
        k, v = cache.update(k, v)  # [B, Nk, P+S, D]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=step.mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, S, N * D)  # [B, S, N*D]
        return self.o_proj(sigmoid_gate(out, gate))


# ----------------------------------------------------------------------------------------------
# MoE block

ExpertsFn = Callable[..., mx.array]  # (layer, x [T, H], indices [T, K], scores [T, K]) -> routed output [T, H]


class SparseMoeBlock(nn.Module):
    """Router (softmax over all experts in fp32, top-k, renormalised) + streamed routed experts +
    sigmoid-gated shared expert. Routed expert weights are not parameters of this module."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x [T, H] -> (indices [T, K] int32, scores [T, K] in x.dtype)."""
        k = self.top_k
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)  # [T, E]
        inds = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]  # [T, K]
        scores = mx.take_along_axis(probs, inds, axis=-1)
        scores = scores / scores.sum(-1, keepdims=True)
        return inds.astype(mx.int32), scores.astype(x.dtype)

    def __call__(self, x: mx.array, experts: ExpertsFn, stats: Stats, step: StepInfo) -> mx.array:
        if step.lookups is not None:  # optimistic: no host round trip; pipeline.finish checks for misses
            xf = x.reshape(-1, x.shape[-1])
            inds, scores = self.route(xf)
            slots = experts.lookup(self.layer, inds)  # [T, K], -1 where not resident
            step.lookups.append((self.layer, inds, slots, nonfinite(xf)))
            return self.combine(x.shape, Routed(xf, None, inds, scores), experts.apply(xf, mx.maximum(slots, 0), scores))
        r = self.select(x, stats, step)
        return self.combine(x.shape, r, experts(self.layer, r.x, r.inds, r.scores))  # summed over ranks if sharded

    def select(self, x: mx.array, stats: Stats, step: StepInfo) -> "Routed":
        """Route the real (not pad) tokens of x [B, S, H]; the indices are evaluated (the host reads the
        experts they name)."""
        xf = x.reshape(-1, x.shape[-1])  # [T, H]
        rows = None
        if step.valid is not None:  # pad tokens neither route nor read experts
            rows = mx.array(np.flatnonzero(step.valid.reshape(-1)).astype(np.int32))
            xf = xf[rows]
        t0 = time.perf_counter()
        inds, scores = self.route(xf)
        bad = nonfinite(xf)  # corruption guard, evaluated with the indices: no round trip of its own
        mx.eval(inds, scores, bad)  # the host needs the indices to read the experts
        if bad.item():
            check_finite(xf, f"layer {self.layer}")
        stats.routing += time.perf_counter() - t0
        return Routed(xf, rows, inds, scores)

    def combine(self, shape: tuple, r: "Routed", y: mx.array) -> mx.array:
        """The block's output [B, S, H] from the routed experts' y [T', H]: plus the sigmoid-gated shared
        expert (applied once, after the ranks' sum), pad tokens' rows zero."""
        B, S, H = shape
        shared = sigmoid_gate(self.shared_expert(r.x), self.shared_expert_gate(r.x))
        y = y + shared.astype(y.dtype)
        if r.rows is not None:
            out = mx.zeros((B * S, H), y.dtype)
            out[r.rows] = y
            y = out
        return y.reshape(B, S, H)


@dataclass(frozen=True)
class Routed:
    """One MoE call's routed tokens: x [T', H] (the real tokens), their rows in the flattened [B*S] call
    (None: all), expert indices [T', K] and scores [T', K]."""

    x: mx.array
    rows: mx.array | None
    inds: mx.array
    scores: mx.array


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.is_linear = cfg.is_linear(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg, layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache, experts: ExpertsFn, stats: Stats, step: StepInfo) -> mx.array:
        x, h = self.mix(x, cache, stats, step)
        return x + self.mlp(h, experts, stats, step)

    def mix(self, x: mx.array, cache, stats: Stats, step: StepInfo) -> tuple[mx.array, mx.array]:
        """The token mixer and its residual: (x after it, the MoE block's normed input)."""
        t0 = time.perf_counter()
        h = self.input_layernorm(x)
        h = self.linear_attn(h, cache, step) if self.is_linear else self.self_attn(h, cache, step)
        x = x + h
        h = self.post_attention_layernorm(x)
        if stats.enabled:
            mx.eval(h)
        stats.attention += time.perf_counter() - t0
        return x, h


# ----------------------------------------------------------------------------------------------
# the model


class Model(nn.Module):
    """Qwen3.5-MoE causal LM without its routed experts. Call with token ids [B, S] and a Cache; returns
    logits [B, S, V] (or [B, 1, V] with last_only=True). Built by flashmoe.load, complete: `experts` is the
    routed-expert source (runtime/experts.py), `stats` the stage timings it shares with it, `compute_dtype`
    the activation dtype (None: the embedding's), `experts_per_token` K (None: the model's own)."""

    def __init__(self, cfg: TextConfig, experts=None, stats: Stats | None = None, compute_dtype=None,
                 experts_per_token: int | None = None, bundle=None, runtime_config=None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if experts_per_token is not None:
            for layer in self.layers:
                layer.mlp.top_k = int(experts_per_token)
        # plain attributes (not parameters)
        self.experts = experts
        self.stats = stats if stats is not None else Stats()
        self.compute_dtype = compute_dtype
        self.bundle = bundle
        self.runtime_config = runtime_config

    # ---- experts per token ----------------------------------------------------------------
    @property
    def experts_per_token(self) -> int:
        return self.layers[0].mlp.top_k

    # ---- cache ----------------------------------------------------------------------------
    def make_cache(self, left_pad=None) -> Cache:
        """An empty cache for one row, or for len(left_pad) rows with that much leading padding each
        (the ids passed to the first call are left-padded to match). The delta-net state is stored in the
        runtime config's state dtype (float32 without one)."""
        lp = np.zeros(1, np.int64) if left_pad is None else np.asarray(left_pad, np.int64)
        sd = getattr(mx, self.runtime_config.state_dtype) if self.runtime_config is not None else mx.float32
        return Cache([LinearCache(state_dtype=sd) if layer.is_linear else KVCache() for layer in self.layers], 0, lp)

    # ---- forward --------------------------------------------------------------------------
    def decode(self, ids: mx.array, cache: Cache) -> mx.array:
        """One unpipelined decode step (runtime/pipeline.decode, which the engine's steps use): ids [B, 1]
        -> logits [B, 1, V], evaluated and checked."""
        return pipeline.decode(self, ids, cache)

    def _prefetch(self, layer: int, x: mx.array, stats: Stats) -> None:
        """Speculative prefetch (runtime/prefetch.py): layer `layer`'s router on the state leaving the layer
        before names the records to read while `layer`'s attention runs (decode steps: the union of every
        row's guess)."""
        nxt = self.layers[layer]
        # no guess where a tool replaced the block's routing (the bench's synthetic routers): its own router
        # then says nothing about the routes taken
        if getattr(self.experts, "prefetcher", None) is None or x.shape[1] != 1 or "route" in vars(nxt.mlp):
            return
        t0 = time.perf_counter()
        inds, scores = nxt.mlp.route(nxt.post_attention_layernorm(x).reshape(-1, x.shape[-1]))
        self.experts.prefetch(layer, inds, scores)
        stats.routing += time.perf_counter() - t0

    def __call__(self, ids: mx.array, cache: Cache, last_only: bool = False, lookups: list | None = None) -> mx.array:
        if self.experts is None:
            raise RuntimeError("Model.experts is not set; load the model with flashmoe.load")
        stats = self.stats
        x = self.embed(ids)  # [B, S, H]
        if ids.shape[0] != cache.batch:
            raise ValueError(f"ids have {ids.shape[0]} rows but the cache has {cache.batch}")
        step = StepInfo.build(cache, ids.shape[1])
        if lookups is not None:
            if ids.shape[1] != 1 or step.valid is not None:
                raise ValueError("optimistic lookups are for decode steps (one real token per row)")
            step.lookups = lookups
        for i, (layer, c) in enumerate(zip(self.layers, cache.layers)):
            x = layer(x, c, self.experts, stats, step)
            if i + 1 < len(self.layers) and step.lookups is None and step.valid is None:
                self._prefetch(i + 1, x, stats)
        cache.offset += ids.shape[1]
        return self.head(x, last_only)

    def embed(self, ids: mx.array) -> mx.array:
        """Token ids [B, S] -> hidden states [B, S, H] in the compute dtype."""
        x = self.embed_tokens(ids)
        return x if self.compute_dtype is None else x.astype(self.compute_dtype)

    def head(self, x: mx.array, last_only: bool = False) -> mx.array:
        """Final norm and lm_head: x [B, S, H] -> logits [B, S, V] (or the last position's [B, 1, V])."""
        t0 = time.perf_counter()
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        logits = self.lm_head(x) if "lm_head" in self else self.embed_tokens.as_linear(x)  # [B, S|1, V]
        if self.stats.enabled:
            mx.eval(logits)
        self.stats.head += time.perf_counter() - t0
        return logits


def dense_weight_names(model: Model) -> set[str]:
    """Names the bundle's dense files must provide for this model (for error messages)."""
    from mlx.utils import tree_flatten

    return {k for k, _ in tree_flatten(model.parameters())}


__all__ = ["Model", "Cache", "KVCache", "LinearCache", "StepInfo", "Stats", "dense_weight_names"]
