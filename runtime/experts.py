"""Routed experts: the callable each MoE block hands its routed tokens to.

For each MoE layer the model routes first, then calls `RoutedExperts(layer, x, indices, scores)`:

  1. the host takes the union of the experts the tokens selected (each needed expert once, however many
     tokens chose it: a batched step reads a layer's union exactly once, for every sequence in it);
  2. the ExpertCache (expert_cache.py) says which of them are resident and which slots the others go to;
     the ExpertReader (reader.py) reads those records from the bundle into the slots;
  3. a pure function applies them: `flashmoe.metal.dispatch.expert_block(x, weights, slot_ids, scores)`
     (custom dequant-FMA kernels on a GPU, or MLX's gather_qmm / gather_mm built-ins).

Speculative prefetch (runtime/prefetch.py, RuntimeConfig.prefetch): after layer L the model hands over
layer L+1's router guess (`prefetch`); its records are read in the background while L+1's attention runs,
and step 2 first waits for the guessed records it uses (`Prefetcher.settle`), reading the rest as before.

When a step needs more distinct experts than there are slots, the union is processed in groups of
`slots` experts (still one read per expert), each group computing only the (token, expert) pairs it
holds and accumulating into the output.

Expert parallelism (runtime/distributed.py): with `shard=ExpertShard(rank, size, group)` this process reads and applies only
the experts e with e % size == rank; the other pairs contribute zero here, and `group.all_sum` adds up
every rank's part. The shared expert is not routed: the MoE block applies it once, after the sum.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from flashmoe.format import Bundle, BundleError, InputError

from .config import RuntimeConfig
from .expert_cache import ExpertCache
from .prefetch import Prefetcher, prefetch_wanted
from .reader import ExpertReader

DEFAULT_SLOTS = 32  # records held at once on unified memory; 32 x 6.75 MiB = 216 MiB for the 397B at 4 bits
DEFAULT_GPU_CACHE_GB = 16.0
OPTIMISTIC_MIN_LAYERS_RESIDENT = 4  # optimistic decode when the slots hold >= 4 tokens' worth of experts


def device_memory_bytes() -> int:
    """The default device's total memory as MLX reports it (0 if it does not)."""
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        return 0
    return int(info.get("memory_size") or info.get("total_memory") or 0)


def default_slots(record_stride: int, k: int, gpu: str | None, gpu_cache_gb: float | None = None) -> int:
    """Slot count when the config gives none. Unified memory (Apple GPUs, CPU): DEFAULT_SLOTS, enough for
    one layer's union; the OS page cache is the cache. A discrete (CUDA) GPU: the slots double as a
    GPU-resident expert cache of `gpu_cache_gb` gigabytes (default 16, or 40% of a smaller GPU's memory),
    because MLX's CUDA arrays live in managed memory and every record the CPU writes migrates to the GPU
    by page faults (measured ~2.5 GB/s on an H100, 10x slower than the page cache), so a record worth
    keeping is one already on the GPU."""
    if gpu == "cuda":
        gb = gpu_cache_gb
        if gb is None:
            mem = device_memory_bytes()
            gb = min(DEFAULT_GPU_CACHE_GB, 0.4 * mem / 1e9) if mem else DEFAULT_GPU_CACHE_GB
        return max(k, int(gb * 1e9) // record_stride)
    return max(DEFAULT_SLOTS, k)


@dataclass(frozen=True)
class ExpertShard:
    """Expert parallelism (runtime/distributed.py): rank `rank` of `size` owns the experts e with
    e % size == rank and adds its part to the others' with all_sum over `group`. `guard` is called
    before and after each layer's all_sum (the distributed watchdog's progress mark, and the check that
    the forward belongs to a step every rank runs)."""

    rank: int
    size: int
    group: object = None
    guard: Callable[[], None] = lambda: None

    def mask(self, num_experts: int) -> np.ndarray:
        """bool [num_experts]: the experts this rank owns."""
        return (np.arange(num_experts) % self.size) == self.rank


class RoutedExperts:
    """reader + cache + apply, for one bundle. Call it as experts(layer, x [T, H], indices [T, K],
    scores [T, K]) -> routed output [T, H], evaluated."""

    def __init__(self, bundle: Bundle, config: RuntimeConfig | None = None, stats=None,
                 shard: ExpertShard | None = None, optimistic: bool | None = None):
        from flashmoe.metal.dispatch import gpu_backend

        config = config or RuntimeConfig()
        cfg = bundle.config
        self.quant = bundle.expert_quant
        self.num_experts = cfg.num_experts
        self.kernels = config.kernels
        self.stats = stats
        self.reader = ExpertReader(bundle, io=config.io, threads=config.threads, stats=stats)
        info = self.reader.info
        want = config.slots if config.slots is not None else default_slots(
            info.record_stride, cfg.num_experts_per_tok, gpu_backend(), config.gpu_cache_gb)
        n = max(1, min(int(want), cfg.num_experts * cfg.num_hidden_layers))
        self.cache = ExpertCache(info, n, cfg.num_hidden_layers, cfg.num_experts)
        self.upload = self._open_uploader(config.upload, gpu_backend())
        self.shard = shard if shard is not None and shard.size > 1 else None
        # optimistic decode (runtime/pipeline.py): worth it when the cache is a real cache (the GPU expert
        # cache, or a test's large slot count), not a one-layer staging area; never across ranks (a rank's
        # retry would leave the others' collectives unpaired)
        self.optimistic = self.shard is None and (optimistic if optimistic is not None else (
            n >= OPTIMISTIC_MIN_LAYERS_RESIDENT * cfg.num_experts_per_tok * cfg.num_hidden_layers))
        self.optimistic_hits = self.optimistic_misses = 0
        # bool [E]: experts this process applies (None: all)
        self.owned = None if self.shard is None else self.shard.mask(cfg.num_experts)
        # speculative prefetch of the next layer's records (runtime/prefetch.py), None when off
        self.prefetcher = Prefetcher(self.reader, self.cache, cfg.num_experts_per_tok) if prefetch_wanted(
            config.prefetch) else None

    def _open_uploader(self, upload: str, gpu: str | None) -> str:
        """Give the reader a PinnedUploader where records must cross to a discrete GPU. Returns the mode
        in effect: 'pinned' or 'direct'."""
        if upload == "direct" or (upload == "auto" and gpu != "cuda"):
            return "direct"
        if gpu != "cuda":
            raise InputError("upload 'pinned' needs MLX's CUDA backend (an NVIDIA GPU as the default device); "
                             "use upload 'auto'")
        from .upload import CudaError, PinnedUploader

        try:
            self.reader.attach_uploader(PinnedUploader.open(next(iter(self.cache.byte_views.values()))[0].ctypes.data))
        except CudaError as e:
            if upload == "pinned":
                raise InputError(f"upload 'pinned' is not available: {e}; use upload 'auto' or 'direct'") from None
            return "direct"
        return "pinned"

    # ---- what tests and tools look at -------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.cache.slots

    @property
    def reads(self):
        return self.reader.reads

    @property
    def resident_bytes(self) -> int:
        return self.cache.resident_bytes

    @property
    def info(self):
        return self.reader.info

    @property
    def io(self) -> str:
        return self.reader.io

    def clear_cache(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.drain()
        self.cache.clear()

    def prefetch(self, layer: int, indices: mx.array, scores: mx.array) -> None:
        """The model's guess of `layer`'s expert ids [T, K] and their router scores (its router on the state
        leaving the layer before): read them in the background, the most likely first."""
        if self.prefetcher is not None:
            ids, sc = np.array(indices), np.array(scores.astype(mx.float32))
            self.prefetcher.start(layer, ids.reshape(-1)[np.argsort(-sc.reshape(-1), kind="stable")])

    # ---- apply ------------------------------------------------------------------------------
    def apply(self, x, slot_ids, scores):
        """The pure part: x [T, H], slot ids [T, K] into the resident buffers, scores [T, K] -> [T, H]."""
        from flashmoe.metal.dispatch import expert_block

        q = self.quant
        if self.stats is not None:
            self.stats.expert_calls += 1
            self.stats.expert_pairs += slot_ids.size
        return expert_block(x, self.cache.weights, slot_ids, scores, q.bits, q.group_size, backend=self.kernels)

    # ---- the optimistic path (runtime/pipeline.py): no host round trip per layer --------------
    def lookup(self, layer: int, indices: mx.array) -> mx.array:
        """Lazy slot ids [T, K] of the selected experts in the device-side slot table, -1 where an expert is
        not resident (then the step is void and runs again the ordinary way)."""
        if self.prefetcher is not None:  # the table names records still being read in the background
            self.prefetcher.drain()
        return self.cache.device_table()[layer][indices]

    def commit(self, used: list[tuple[int, np.ndarray]], hit: bool) -> None:
        """After an optimistic step: `hit` (every expert was resident) marks (layer, expert ids) in `used`
        as just used; a miss is counted (the step runs again through __call__)."""
        if not hit:
            self.optimistic_misses += 1
            return
        for layer, ids in used:
            self.cache.touch(layer, np.unique(ids).tolist())
            self._touched(ids)
        self.optimistic_hits += 1

    def _load(self, layer: int, experts: list[int]) -> np.ndarray:
        busy = self.prefetcher.settle(layer, experts) if self.prefetcher is not None else set()
        slot_of, to_read, read_slots = self.cache.place(layer, experts, avoid=busy)
        try:
            self.reader.read(layer, to_read, read_slots, self.cache)
        except BaseException:
            self.cache.invalidate(read_slots)
            raise
        return slot_of

    def _checked(self, layer: int, indices: mx.array) -> np.ndarray:
        """The indices [T, K] on the host, each a valid expert id."""
        ids = np.array(indices)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise BundleError(f"layer {layer}: the router chose expert {int(ids.max())} outside "
                              f"[0, {self.num_experts}): the bundle may be corrupt, run `flashmoe-inspect --verify`")
        return ids

    def _touched(self, ids: np.ndarray) -> None:
        if self.stats is not None:
            self.stats.experts_touched += len(np.unique(ids))

    def __call__(self, layer: int, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
        if self.shard is not None:  # progress, and a forward that every rank runs
            self.shard.guard()
        ids = self._checked(layer, indices)  # [T, K] on the host
        self._touched(ids)
        if self.owned is not None:  # expert parallel: other ranks' pairs get weight 0 here
            mine = self.owned[ids]  # [T, K]
            scores = scores * mx.array(mine.astype(np.float32)).astype(scores.dtype)
            if mine.any():
                ids = np.where(mine, ids, ids[mine][0])  # any owned expert: its score is 0 where not mine
            else:
                ids = None
        if ids is None:  # this rank owns none of the step's experts
            y = mx.zeros(x.shape, x.dtype)
        else:
            y = self._routed(layer, x, ids, scores)
        if self.shard is not None:  # the ranks' parts added up
            y = mx.distributed.all_sum(y, group=self.shard.group)
            mx.eval(y)
            self.shard.guard()
        return y

    def read_ahead(self, layer: int, experts, keep_layer: int) -> None:
        """Read `layer`'s records `experts` in the background (a layer-major prefill's guess for the next
        layer) while layer `keep_layer` computes: none of `keep_layer`'s resident records is displaced."""
        if self.prefetcher is not None:
            self.prefetcher.start(layer, np.sort(np.asarray(experts).reshape(-1)),
                                  keep=self.cache.resident_slots(keep_layer))

    def run_layer(self, layer: int, parts: list[tuple[mx.array, mx.array, mx.array]],
                  ahead: Callable[[np.ndarray], None] | None = None) -> list[mx.array]:
        """Every chunk of one layer of a layer-major prefill (runtime/prefill.py): parts [(x [T, H], indices
        [T, K], scores [T, K])]. The union of all the parts' experts is read once, in expert-id order, then
        each part is computed; a union larger than the slots goes in groups of `slots` experts, each read
        once and applied to every part. `ahead(union)` is called once the union is resident, before the
        parts compute (where the union fit the slots and speculative reads are on): the place to start the
        next layer's reads. Returns each part's routed output, evaluated. Expert-parallel runs take the
        one-call path per part."""
        if self.shard is not None:
            return [self(layer, x, i, s) for x, i, s in parts]
        ids = [self._checked(layer, i) for _, i, _ in parts]
        union = np.unique(np.concatenate([i.reshape(-1) for i in ids]))
        self._touched(union)
        if len(union) <= self.cache.slots:
            self._load(layer, union.tolist())  # every part's experts are resident now: no read below
            if ahead is not None and self.prefetcher is not None:
                ahead(union)
            return [self._routed(layer, x, i, s) for (x, _, s), i in zip(parts, ids)]
        return self._grouped(layer, union, [(x, np.searchsorted(union, i), s) for (x, _, s), i in zip(parts, ids)])

    def _routed(self, layer: int, x: mx.array, ids: np.ndarray, scores: mx.array) -> mx.array:
        T, K = ids.shape
        union, inv = np.unique(ids, return_inverse=True)  # sorted expert ids; inv [T*K] -> position in union
        inv = inv.reshape(T, K)
        stats = self.stats
        if len(union) <= self.cache.slots:  # the usual case: one read round, one call
            slot_of = self._load(layer, union.tolist())  # [U] slot of each union member
            t0 = time.perf_counter()
            y = self.apply(x, mx.array(slot_of[inv].astype(np.int32)), scores)
            mx.eval(y)
            if stats is not None:
                stats.expert_compute += time.perf_counter() - t0
            return y
        return self._grouped(layer, union, [(x, inv, scores)])[0]

    def _grouped(self, layer: int, union: np.ndarray, parts: list) -> list[mx.array]:
        """More distinct experts than slots: groups of `slots` experts of `union` (sorted), each read once and
        applied to the pairs it serves in every part (x [T, H], positions in union [T, K], scores [T, K]);
        each pair computed exactly once."""
        self.clear_cache()  # the groups overwrite slots in order
        ys = [mx.zeros(x.shape, x.dtype) for x, _, _ in parts]
        n = self.cache.slots
        stats = self.stats
        for g0 in range(0, len(union), n):
            group = union[g0 : g0 + n]
            slot_of = self._load(layer, group.tolist())
            t0 = time.perf_counter()
            for j, (x, inv, scores) in enumerate(parts):
                tok, kk = np.nonzero((inv >= g0) & (inv < g0 + len(group)))  # the pairs this group serves
                if not len(tok):
                    continue
                tok_a = mx.array(tok.astype(np.int32))
                local = mx.array(slot_of[inv[tok, kk] - g0].astype(np.int32)[:, None])  # [P, 1]
                sc = scores[tok_a, mx.array(kk.astype(np.int32))][:, None]  # [P, 1]
                part = self.apply(x[tok_a], local, sc)  # [P, H]
                ys[j] = ys[j].at[tok_a].add(part)
            mx.eval(ys)  # before the next group overwrites the slots
            if stats is not None:
                stats.expert_compute += time.perf_counter() - t0
        return ys

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.reader.close()
