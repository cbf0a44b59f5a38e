"""Routed experts, streamed from the bundle's per-layer expert files.

For each MoE layer the model routes first, then calls `ExpertStreamer(layer, x, indices, scores)`:

  1. the host takes the union of the experts the tokens selected (each needed expert once, however many
     tokens chose it: batched prefill reads a layer's union exactly once);
  2. those records are read with one `os.preadv` each (which releases the GIL) from a thread pool,
     straight into slot buffers allocated once at load time: one MLX array per record component,
     `[slots, *component shape]`, whose memory the reads scatter into, so there is no copy between the
     read and the matmul. `io="mmap"` instead copies from a read-only mapping of the layer file (and drops
     the touched pages from the process with MADV_DONTNEED, so RSS stays bounded);
  3. `flashmoe.metal.dispatch.expert_block` applies them (custom dequant-FMA kernels on a GPU, or MLX's
     `gather_qmm` / `gather_mm` built-ins).

Resident memory is `slots * record_size` for the buffers, independent of the number of experts in the
bundle. When a batch needs more distinct experts than there are slots, the union is processed in groups
of `slots` experts (still one read per expert), each group computing only the (token, expert) pairs it
holds and accumulating into the output.

The compute is `flashmoe.metal.dispatch.expert_block` (FLASHMOE_KERNELS=auto|builtin|custom or
`flashmoe-run --kernels` picks the kernels there).
"""

from __future__ import annotations

import mmap
import os
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from flashmoe.format import Bundle, BundleError
from flashmoe.metal.dispatch import shared_expert

DEFAULT_SLOTS = 32  # records held at once; 32 x 6.75 MiB = 216 MiB for the 397B at 4 bits

_STORAGE = {"uint32": mx.uint32, "float32": mx.uint32, "bfloat16": mx.uint16, "float16": mx.uint16}
_TYPED = {"uint32": mx.uint32, "float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


# ----------------------------------------------------------------------------------------------
# compute


def get_expert_block():
    """The expert compute function: `flashmoe.metal.dispatch.expert_block`, which runs the custom
    dequant-FMA kernels on a GPU or MLX's built-ins (gather_qmm; gather_mm for float experts), chosen
    by FLASHMOE_KERNELS=auto|builtin|custom or flashmoe-run --kernels."""
    from flashmoe.metal.dispatch import expert_block

    def block(x, weights, indices, scores, *, bits, group_size, shared=None, shared_gate=None):
        return expert_block(x, weights, indices, scores, bits, group_size, shared=shared, shared_gate=shared_gate)

    return block


# ----------------------------------------------------------------------------------------------
# streaming


def default_slots(record_stride: int, k: int) -> int:
    """Slot count when the caller gives none. Unified memory (Apple GPUs, CPU): DEFAULT_SLOTS, enough for
    one layer's union; the OS page cache is the cache. A discrete (CUDA) GPU: the slots double as a
    GPU-resident expert cache of FLASHMOE_GPU_CACHE_GB (default 16) gigabytes, because MLX's CUDA
    arrays live in managed memory and every record the CPU writes migrates to the GPU by page faults
    (measured ~2.5 GB/s on an H100, 10x slower than the page cache), so a record worth keeping is one
    already on the GPU."""
    from flashmoe.metal.dispatch import gpu_backend

    if gpu_backend() == "cuda":
        env = os.environ.get("FLASHMOE_GPU_CACHE_GB")
        if env is not None:
            try:
                gb = float(env)
            except ValueError:
                raise BundleError(f"FLASHMOE_GPU_CACHE_GB={env!r}: give a number of gigabytes (0 = no GPU cache)") from None
        else:  # 16 GB, or 40% of a smaller GPU's memory (the dense weights and activations need the rest)
            info = mx.device_info() if hasattr(mx, "device_info") else {}
            mem = info.get("memory_size") or info.get("total_memory") or 0
            gb = min(16.0, 0.4 * mem / 1e9) if mem else 16.0
        return max(k, int(gb * 1e9) // record_stride)
    return max(DEFAULT_SLOTS, k)


class ExpertStreamer:
    """Reads the routed experts a layer needs into reusable slot buffers and applies them.

    The slots form one pool for all layers, managed least-recently-used: a (layer, expert) still in a
    slot from an earlier token is not read again. With the default 32 slots that rarely happens (a token
    touches K x layers records); on CUDA the pool is large and is the GPU expert cache (default_slots).

    io: "pread" (default; measured faster, see benchmarks/bench_io.py) or "mmap".
    """

    def __init__(self, bundle: Bundle, io: str = "pread", slots: int | None = None, threads: int | None = None,
                 stats=None):
        if io not in ("pread", "mmap"):
            raise BundleError(f"unknown io mode {io!r}: choose pread or mmap")
        cfg = bundle.config
        self.io = io
        self.quant = bundle.expert_quant
        self.info = bundle.expert_info(0)
        self.num_experts = cfg.num_experts
        # layer files: headers checked now, so a corrupt bundle fails at load, not mid-generation
        self.files = [bundle.expert_file(layer) for layer in range(cfg.num_hidden_layers)]
        self.maps: list[mmap.mmap | None] = [None] * len(self.files)
        want = slots if slots is not None else default_slots(self.info.record_stride, cfg.num_experts_per_tok)
        self.slots = max(1, min(int(want), cfg.num_experts * cfg.num_hidden_layers))
        self.pool = ThreadPoolExecutor(max_workers=threads or min(16, max(4, cfg.num_experts_per_tok)),
                                       thread_name_prefix="flashmoe-io")
        self.stats = stats
        self.reads: Counter = Counter()  # (layer, expert) -> times read; tests use it, reset() clears it
        self.block = get_expert_block()
        self._alloc()
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget which records the slots hold (the next use of each reads it again)."""
        self.where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot holding it
        self.owner: list[tuple[int, int] | None] = [None] * self.slots
        self.lru: OrderedDict[int, None] = OrderedDict((s, None) for s in range(self.slots))  # oldest first

    # ---- buffers --------------------------------------------------------------------------
    def _alloc(self) -> None:
        """One MLX array per component, [slots, *shape], plus per-slot byte views for the reads."""
        S, comps = self.slots, sorted(self.info.components, key=lambda c: c.offset)
        self.weights: dict[str, mx.array] = {}
        self._storage = []  # keeps the raw arrays (and thus the memory the views point at) alive
        byte_views = {}
        for c in comps:
            raw = mx.zeros((S, *c.shape), _STORAGE[c.dtype])
            typed = raw.view(_TYPED[c.dtype])  # same buffer, as the dtype the kernels want
            mx.eval(raw, typed)
            self._storage.append(raw)
            self.weights[c.name] = typed
            byte_views[c.name] = np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(S, c.nbytes)
        # iovecs per slot: component views in file order, a scratch buffer for any alignment gaps
        gap_max = max([b.offset - (a.offset + a.nbytes) for a, b in zip(comps, comps[1:])] + [0])
        self._scratch = np.zeros(max(gap_max, 1), np.uint8)
        self.iov: list[list[memoryview]] = []
        self.copy_plan: list[list[tuple[np.ndarray, int]]] = []  # (dst, offset in record) for mmap
        for s in range(S):
            iov, plan, pos = [], [], 0
            for c in comps:
                if c.offset > pos:
                    iov.append(memoryview(self._scratch)[: c.offset - pos])
                dst = byte_views[c.name][s]
                iov.append(memoryview(dst))
                plan.append((dst, c.offset))
                pos = c.offset + c.nbytes
            self.iov.append(iov)
            self.copy_plan.append(plan)
        # every view must be a live view of the MLX buffer, not a copy
        assert all(not v.flags.owndata for v in byte_views.values())

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._storage)

    # ---- reading --------------------------------------------------------------------------
    def _read_one(self, layer: int, slot: int, expert: int) -> None:
        f = self.files[layer]
        base = f.offset(expert)
        size = self.info.record_size
        if self.io == "pread":
            got = os.preadv(f.fd, self.iov[slot], base)
            if got != size:
                raise BundleError(f"{f.path}: short read of expert {expert} ({got} of {size} bytes); "
                                  "the file changed on disk, re-run flashmoe-pull to repair it")
            return
        mm = self.maps[layer]
        if mm is None:
            mm = self.maps[layer] = mmap.mmap(f.fd, 0, access=mmap.ACCESS_READ)
        if hasattr(mm, "madvise"):  # one readahead request for the whole record instead of a fault per page
            mm.madvise(mmap.MADV_WILLNEED, base, self.info.record_stride)
        for dst, off in self.copy_plan[slot]:
            np.copyto(dst, np.frombuffer(mm, np.uint8, count=dst.nbytes, offset=base + off))
        if hasattr(mm, "madvise"):  # drop the mapped pages from our RSS (the page cache keeps them)
            mm.madvise(mmap.MADV_DONTNEED, base, self.info.record_stride)

    def read(self, layer: int, experts: list[int], slots: list[int] | None = None) -> None:
        """Read records `experts` of `layer` into `slots` (default 0..len(experts)-1), in parallel."""
        t0 = time.perf_counter()
        slots = list(range(len(experts))) if slots is None else slots
        if len(experts) == 1:
            self._read_one(layer, slots[0], experts[0])
        elif experts:
            list(self.pool.map(lambda se: self._read_one(layer, *se), zip(slots, experts)))
        for e in experts:
            self.reads[(layer, e)] += 1
        if self.stats is not None:
            self.stats.expert_io += time.perf_counter() - t0
            self.stats.expert_bytes += len(experts) * self.info.record_size
            self.stats.expert_reads += len(experts)

    # ---- the call the model makes ---------------------------------------------------------
    def __call__(self, layer: int, x: mx.array, indices: mx.array, scores: mx.array, shared: dict | None = None,
                 shared_gate: dict | None = None) -> mx.array:
        """x [T, H], indices [T, K] (expert ids), scores [T, K] -> routed expert output [T, H], evaluated;
        plus the shared expert (`shared`: its gate/up/down weights, `shared_gate`: its sigmoid gate) if given."""
        T, K = indices.shape
        ids = np.array(indices)  # [T, K] on the host
        if ids.min() < 0 or ids.max() >= self.num_experts:
            raise BundleError(f"layer {layer}: router chose expert {int(ids.max())} outside [0, {self.num_experts})")
        union, inv = np.unique(ids, return_inverse=True)  # sorted expert ids; inv [T*K] -> position in union
        inv = inv.reshape(T, K)
        q = self.quant
        kw = dict(bits=q.bits, group_size=q.group_size, shared=shared, shared_gate=shared_gate)
        if len(union) <= self.slots:  # the usual case (decode, short prompts): one read round, one call
            slot_of = self._place(layer, union.tolist())  # [U] slot of each union member
            t0 = time.perf_counter()
            y = self.block(x, self.weights, mx.array(slot_of[inv].astype(np.int32)), scores, **kw)
            mx.eval(y)
            if self.stats is not None:
                self.stats.expert_compute += time.perf_counter() - t0
            return y
        # more distinct experts than slots: groups of `slots` experts, each pair computed exactly once
        self.clear_cache()  # the groups overwrite slots in order
        kw.update(shared=None, shared_gate=None)
        y = mx.zeros(x.shape, x.dtype) if shared is None else shared_expert(x, shared, shared_gate).astype(x.dtype)
        for g0 in range(0, len(union), self.slots):
            group = union[g0 : g0 + self.slots]
            self.read(layer, group.tolist())
            t0 = time.perf_counter()
            tok, kk = np.nonzero((inv >= g0) & (inv < g0 + len(group)))  # the pairs this group serves
            tok_a = mx.array(tok.astype(np.int32))
            local = mx.array((inv[tok, kk] - g0).astype(np.int32)[:, None])  # [P, 1]
            sc = scores[tok_a, mx.array(kk.astype(np.int32))][:, None]  # [P, 1]
            part = self.block(x[tok_a], self.weights, local, sc, **kw)  # [P, H]
            y = y.at[tok_a].add(part)
            mx.eval(y)  # before the next group overwrites the slots
            if self.stats is not None:
                self.stats.expert_compute += time.perf_counter() - t0
        return y

    def _place(self, layer: int, experts: list[int]) -> np.ndarray:
        """Slots holding `experts` of `layer`: cached ones as they are, the others read into the least
        recently used slots that this call does not need."""
        slot_of = np.empty(len(experts), dtype=np.int64)
        missing = []
        for i, e in enumerate(experts):
            s = self.where.get((layer, e))
            if s is None:
                missing.append(i)
            else:
                slot_of[i] = s
        if missing:
            miss = set(missing)
            keep = {int(slot_of[i]) for i in range(len(experts)) if i not in miss}
            victims = [s for s in self.lru if s not in keep][: len(missing)]
            for i, s in zip(missing, victims):
                old = self.owner[s]
                if old is not None:
                    del self.where[old]
                self.owner[s] = (layer, experts[i])
                self.where[(layer, experts[i])] = s
                slot_of[i] = s
            self.read(layer, [experts[i] for i in missing], victims)
        for s in slot_of.tolist():
            self.lru.move_to_end(s)
        return slot_of

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for i, mm in enumerate(self.maps):
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
                self.maps[i] = None
        for f in self.files:
            f.close()
