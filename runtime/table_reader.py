"""Rows of the streamed embedding tables (format/tables.py), read with pread: one read plan per call.

A call (a prefill chunk or a decode step) asks for the rows of every PLE layer at once. The plan
dedupes them per table, orders them by file offset and turns them into reads: a block not yet checked
in this process is read whole and its CRC-32 checked; in a checked block only the rows are read,
adjacent rows in one pread. The reads of the whole plan run on a small thread pool (pread releases the
GIL; an SSD serves random reads in parallel). The OS page cache does the caching; nothing is kept
here but which blocks were checked.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe.format.tables import TableFile, TableInfo, parse_tables

_NP = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


@dataclass
class TableStats:
    """Table I/O, counted apart from the experts' (Model.stats)."""

    bytes: int = 0  # bytes preadd from table files
    reads: int = 0  # pread calls
    rows: int = 0  # distinct rows served
    blocks_checked: int = 0  # blocks read whole and CRC-checked (first touch)

    def reset(self) -> None:
        self.bytes = self.reads = self.rows = self.blocks_checked = 0


@dataclass(frozen=True)
class Read:
    """One pread of a plan: `count` rows from row slot `first` of the destination (block >= 0: a whole
    block to check first, the rows at `offsets` bytes into it)."""

    layer: int
    offset: int
    size: int
    first: int
    count: int
    block: int = -1
    offsets: tuple[int, ...] = ()


class TableReader:
    """The tables of a bundle, by decoder layer. `gather({layer: row ids}) -> {layer: rows}`."""

    def __init__(self, bundle_path: Path, manifest: dict, threads: int = 8):
        self.files: dict[int, TableFile] = {}
        self.stats = TableStats()
        try:
            for rel, info in parse_tables(manifest):
                self.files[info.layer] = TableFile(Path(bundle_path) / rel, info)
        except BaseException:
            for f in self.files.values():
                f.close()
            raise
        self.checked = {L: np.zeros(f.info.num_blocks, bool) for L, f in self.files.items()}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flashmoe-tables")

    def info(self, layer: int) -> TableInfo:
        return self.files[layer].info

    def gather(self, wanted: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """wanted: layer -> row ids (any shape, int64). Returns layer -> rows [*shape, row_dim] in the
        table's numpy dtype (bfloat16 as uint16 bits)."""
        plan, dst, back = [], {}, {}
        for layer, ids in wanted.items():
            info = self.files[layer].info
            flat = np.asarray(ids, np.int64).reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= info.rows):
                raise ValueError(f"table row out of range for layer {layer}")
            uniq, back[layer] = np.unique(flat, return_inverse=True)
            dst[layer] = np.empty((len(uniq), info.row_bytes), np.uint8)
            plan += self._plan(layer, uniq)
            self.stats.rows += len(uniq)
        for r, raw in zip(plan, self.pool.map(self._execute, plan)):  # in order: errors raise here
            rb = dst[r.layer].shape[1]
            if r.block >= 0:
                for j, off in enumerate(r.offsets):
                    dst[r.layer][r.first + j] = np.frombuffer(raw, np.uint8, rb, off)
                self.checked[r.layer][r.block] = True
                self.stats.blocks_checked += 1
            else:
                dst[r.layer][r.first : r.first + r.count] = np.frombuffer(raw, np.uint8).reshape(r.count, rb)
            self.stats.reads += 1
            self.stats.bytes += r.size
        out = {}
        for layer, ids in wanted.items():
            info = self.files[layer].info
            vals = dst[layer].view(_NP[info.dtype]).reshape(-1, info.row_dim)
            out[layer] = vals[back[layer]].reshape(*np.shape(ids), info.row_dim)
        return out

    def _plan(self, layer: int, uniq: np.ndarray) -> list[Read]:
        """The reads that fetch these sorted, distinct rows of one table."""
        f = self.files[layer]
        info, checked = f.info, self.checked[layer]
        rpb, rb = info.rows_per_block, info.row_bytes
        blocks = uniq // rpb
        plan, i, n = [], 0, len(uniq)
        while i < n:
            b = int(blocks[i])
            j = i + 1
            if not checked[b]:  # first touch: the whole block, CRC-checked
                while j < n and blocks[j] == b:
                    j += 1
                off, size = f.block_span(b)
                plan.append(Read(layer, off, size, i, j - i, b, tuple(int(r - b * rpb) * rb for r in uniq[i:j])))
            else:  # a checked block: this run of adjacent rows
                while j < n and uniq[j] == uniq[j - 1] + 1 and blocks[j] == b:
                    j += 1
                plan.append(Read(layer, f.row_offset(int(uniq[i])), (j - i) * rb, i, j - i))
            i = j
        return plan

    def _execute(self, r: Read) -> bytes:
        f = self.files[r.layer]
        raw = f.read(r.offset, r.size)
        if r.block >= 0:
            f.check_block(r.block, raw)
        return raw

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.pool.shutdown(wait=False)
