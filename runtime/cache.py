"""Per-sequence model state of a batch of left-padded rows (runtime/model.py's layout): the delta net's
recurrent state and conv inputs, and full attention's keys and values. Rows can be taken out (sequences
leaving a batch) and stacked (sequences joining)."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


class StoredState:
    """LinearCache.state: kept in the cache's `state_dtype` whatever dtype is assigned (the delta net computes
    in float32 and hands back a float32 state; a bfloat16 cache stores half the bytes between steps)."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return None if obj is None else obj.__dict__.get(self.slot)

    def __set__(self, obj, value) -> None:
        if value is not None and value.dtype != obj.state_dtype:
            value = value.astype(obj.state_dtype)
        obj.__dict__[self.slot] = value


@dataclass
class LinearCache:
    """Gated DeltaNet state: the last W-1 conv inputs and the recurrent state, per row. The state is stored
    in `state_dtype` (float32, or bfloat16 for twice the rows in the same memory: RuntimeConfig.state_dtype)."""

    state_dtype: mx.Dtype = field(default=mx.float32, kw_only=True)  # first: set before `state` in __init__
    conv: mx.array | None = None  # [B, W-1, C]
    state: mx.array | None = StoredState()  # [B, Hv, Dv, Dk] in state_dtype

    def rows(self, idx: mx.array) -> "LinearCache":
        return LinearCache(None if self.conv is None else self.conv[idx],
                           None if self.state is None else self.state[idx], state_dtype=self.state_dtype)

    @staticmethod
    def concat(parts: list["LinearCache"]) -> "LinearCache":
        return LinearCache(mx.concatenate([p.conv for p in parts]), mx.concatenate([p.state for p in parts]),
                           state_dtype=parts[0].state_dtype)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.conv, self.state) if a is not None)

    def snapshot(self):
        """What a rolled-back decode step restores (arrays are immutable: keeping the references is enough)."""
        return self.conv, self.state

    def restore(self, saved) -> None:
        self.conv, self.state = saved


@dataclass
class KVCache:
    """Keys/values of a full-attention layer, grown in steps to avoid a copy per token. Columns
    [0, offset) are written; left-padded rows have pad columns first (Cache.left_pad)."""

    keys: mx.array | None = None  # [B, Nk, cap, D]
    values: mx.array | None = None
    offset: int = 0
    step: int = 256

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        B, Nk, S, D = k.shape
        need = self.offset + S
        if self.keys is None or need > self.keys.shape[2]:
            cap = ((need + self.step - 1) // self.step) * self.step
            nk = mx.zeros((B, Nk, cap, D), k.dtype)
            nv = mx.zeros((B, Nk, cap, D), v.dtype)
            if self.keys is not None and self.offset:
                nk[:, :, : self.offset] = self.keys[:, :, : self.offset]
                nv[:, :, : self.offset] = self.values[:, :, : self.offset]
            self.keys, self.values = nk, nv
        self.keys[:, :, self.offset : need] = k
        self.values[:, :, self.offset : need] = v
        self.offset = need
        return self.keys[:, :, :need], self.values[:, :, :need]

    def rows(self, idx: mx.array, drop: int = 0) -> "KVCache":
        """These rows, without the first `drop` columns (padding every kept row has)."""
        if self.keys is None:
            return KVCache(step=self.step)
        return KVCache(self.keys[idx, :, drop : self.offset], self.values[idx, :, drop : self.offset],
                       self.offset - drop, self.step)

    @staticmethod
    def concat(parts: list["KVCache"], pads: list[int]) -> "KVCache":
        """Stack rows of caches written to different offsets, each left-padded by pads[i] columns so
        that all end at the same column."""
        n = max(p.offset + pad for p, pad in zip(parts, pads))
        ref = next(p for p in parts if p.keys is not None)
        _, Nk, _, D = ref.keys.shape
        ks, vs = [], []
        for p, pad in zip(parts, pads):
            B = p.keys.shape[0]
            z = mx.zeros((B, Nk, pad, D), ref.keys.dtype)
            ks.append(mx.concatenate([z, p.keys[:, :, : p.offset]], axis=2) if pad else p.keys[:, :, : p.offset])
            vs.append(mx.concatenate([z, p.values[:, :, : p.offset]], axis=2) if pad else p.values[:, :, : p.offset])
        return KVCache(mx.concatenate(ks), mx.concatenate(vs), n, ref.step)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values) if a is not None)

    def snapshot(self):
        return self.offset  # columns past the offset are rewritten by later steps

    def restore(self, saved) -> None:
        self.offset = saved


@dataclass
class Cache:
    """Per-layer caches of a batch of rows. `offset`: columns written (the same for every row);
    `left_pad[b]`: leading pad columns of row b, so row b holds `offset - left_pad[b]` tokens."""

    layers: list  # LinearCache | KVCache per layer
    offset: int = 0
    left_pad: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def batch(self) -> int:
        return len(self.left_pad)

    def lengths(self) -> np.ndarray:
        return self.offset - self.left_pad

    def rows(self, keep: list[int]) -> "Cache":
        """A cache of only these rows (sequences leaving the batch), with padding no kept row needs dropped."""
        lp = self.left_pad[np.asarray(keep, np.int64)]
        drop = int(lp.min()) if len(lp) else 0
        idx = mx.array(np.asarray(keep, np.int32))
        layers = [c.rows(idx, drop) if isinstance(c, KVCache) else c.rows(idx) for c in self.layers]
        return Cache(layers, self.offset - drop, lp - drop)

    @staticmethod
    def concat(parts: list["Cache"]) -> "Cache":
        """One batch from several (sequences joining): rows right-aligned, shorter ones left-padded."""
        n = max(p.offset for p in parts)
        pads = [n - p.offset for p in parts]
        layers = []
        for i, c in enumerate(parts[0].layers):
            group = [p.layers[i] for p in parts]
            layers.append(type(c).concat(group, pads) if isinstance(c, KVCache) else type(c).concat(group))
        return Cache(layers, n, np.concatenate([p.left_pad + pad for p, pad in zip(parts, pads)]))

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)


__all__ = ["Cache", "KVCache", "LinearCache", "StoredState"]
