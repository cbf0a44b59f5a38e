"""ExpertCache: which (layer, expert) record sits in which slot of the resident expert buffers.

One job: residency. It owns the slot buffers (one MLX array per record component, `[slots, *shape]`,
allocated once) and says where each slot's components lie (`destinations`); the reader (reader.py) plans
and issues the reads into them. It also owns the eviction policy
(least recently used across layers and tokens), and the table `slot[layer, expert]` (-1 = not resident),
kept on the host and mirrored to the device on demand.

On unified memory (Apple GPUs, CPU) a few dozen slots suffice and the OS page cache is the real cache;
on CUDA the slots are a GPU-resident expert cache of several GB (see experts.default_slots).
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx
import numpy as np

from flashmoe.format.dtypes import DTYPES



class ExpertCache:
    def __init__(self, info, slots: int, num_layers: int, num_experts: int):
        self.info = info
        self.slots = int(slots)
        self.table = np.full((num_layers, num_experts), -1, np.int32)  # slot of (layer, expert), -1 = absent
        self._device_table: mx.array | None = None
        self._alloc()
        self.clear()

    def clear(self) -> None:
        """Forget every record (the next use of each reads it again)."""
        self.table.fill(-1)
        self._device_table = None
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
            d = DTYPES[c.dtype]
            raw = mx.zeros((S, *c.shape), getattr(mx, d.storage))
            typed = raw.view(getattr(mx, d.name))  # same buffer, as the dtype the kernels want
            mx.eval(raw, typed)
            self._storage.append(raw)
            self.weights[c.name] = typed
            byte_views[c.name] = np.frombuffer(memoryview(raw), dtype=np.uint8).reshape(S, c.nbytes)
        self.byte_views = byte_views
        self._offsets = [(c.name, c.offset) for c in comps]
        # every view must be a live view of the MLX buffer, not a copy
        assert all(not v.flags.owndata for v in byte_views.values())

    def destinations(self, slot: int) -> list[tuple[np.ndarray, int]]:
        """Where slot `slot`'s bytes go: (uint8 view of the slot's part of a component buffer, offset of that
        component in the record), in record order."""
        return [(self.byte_views[name][slot], off) for name, off in self._offsets]

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._storage)

    # ---- residency ------------------------------------------------------------------------
    def place(self, layer: int, experts: list[int], avoid=frozenset()) -> tuple[np.ndarray, list[int], list[int]]:
        """Slots for `experts` of `layer` (at most `slots` of them): resident ones as they are, the
        others assigned the least recently used slots this call does not need and `avoid` does not name
        (slots a background read is still writing, records a prefetch must not displace). Returns (slot of
        each, -1 where no slot was free; experts to read, their slots); the caller reads them before using
        the slots."""
        row = self.table[layer]
        slot_of = row[np.asarray(experts, np.int64)].astype(np.int64)
        miss = np.flatnonzero(slot_of < 0)
        to_read, read_slots = [], []
        if len(miss):
            keep = set(slot_of[slot_of >= 0].tolist()) | set(avoid)
            victims = [s for s in self.lru if s not in keep][: len(miss)]
            for i, s in zip(miss.tolist(), victims):
                old = self.owner[s]
                if old is not None:
                    self.table[old] = -1
                e = experts[i]
                self.owner[s] = (layer, e)
                row[e] = s
                slot_of[i] = s
                to_read.append(e)
                read_slots.append(s)
            self._device_table = None
        for s in slot_of.tolist():
            if s >= 0:
                self.lru.move_to_end(s)
        return slot_of, to_read, read_slots

    def touch(self, layer: int, experts: list[int]) -> None:
        """Resident experts of `layer` were used: most recently used now."""
        for s in self.table[layer][np.asarray(experts, np.int64)].tolist():
            if s >= 0:
                self.lru.move_to_end(s)

    def resident_slots(self, layer: int) -> set[int]:
        """The slots holding records of `layer`."""
        row = self.table[layer]
        return set(row[row >= 0].tolist())

    def demote(self, slots) -> None:
        """Make `slots` the least recently used (the next to be reused): records read on a wrong guess."""
        for s in slots:
            self.lru.move_to_end(s, last=False)

    def invalidate(self, slots: list[int]) -> None:
        """Mark slots empty (e.g. after a failed read), so nothing trusts their bytes."""
        for s in slots:
            old = self.owner[s]
            if old is not None:
                self.table[old] = -1
                self.owner[s] = None
        self._device_table = None

    def device_table(self) -> mx.array:
        """`slot[layer, expert]` as an int32 device array (uploaded again only after a change)."""
        if self._device_table is None:
            self._device_table = mx.array(self.table)
        return self._device_table
