"""Rows of the streamed embedding tables (format/tables.py), read with pread: one read plan per call.

A call (a prefill chunk or a decode step) asks for the rows of every PLE layer at once. The plan
dedupes them, orders them by file offset and reads each block the first time it is touched whole
(checking its CRC-32), later only the rows it needs (coalescing neighbours into one pread). The OS
page cache does the caching; nothing is kept here but which blocks were checked.
"""

from __future__ import annotations

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


class TableReader:
    """The tables of a bundle, by decoder layer. `gather({layer: row ids}) -> {layer: rows}`."""

    def __init__(self, bundle_path: Path, manifest: dict):
        self.files: dict[int, TableFile] = {}
        self.stats = TableStats()
        try:
            for rel, info in parse_tables(manifest):
                self.files[info.layer] = TableFile(Path(bundle_path) / rel, info)
        except BaseException:
            self.close()
            raise
        self.checked = {L: np.zeros(f.info.num_blocks, bool) for L, f in self.files.items()}

    def info(self, layer: int) -> TableInfo:
        return self.files[layer].info

    def gather(self, wanted: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """wanted: layer -> row ids (any shape, int64). Returns layer -> rows [*shape, row_dim] in the
        table's numpy dtype (bfloat16 as uint16 bits)."""
        out = {}
        for layer, ids in wanted.items():
            f = self.files[layer]
            info = f.info
            flat = np.asarray(ids, np.int64).reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= info.rows):
                raise ValueError(f"table row out of range for layer {layer}")
            uniq, inverse = np.unique(flat, return_inverse=True)
            rows = np.empty((len(uniq), info.row_bytes), np.uint8)
            self._read_rows(layer, f, uniq, rows)
            self.stats.rows += len(uniq)
            vals = rows.view(_NP[info.dtype]).reshape(len(uniq), info.row_dim)
            out[layer] = vals[inverse].reshape(*np.shape(ids), info.row_dim)
        return out

    def _read_rows(self, layer: int, f: TableFile, uniq: np.ndarray, dst: np.ndarray) -> None:
        info, checked, st = f.info, self.checked[layer], self.stats
        rpb, rb = info.rows_per_block, info.row_bytes
        blocks = uniq // rpb
        i, n = 0, len(uniq)
        while i < n:
            b = int(blocks[i])
            if not checked[b]:  # first touch: the whole block, CRC-checked
                off, size = f.block_span(b)
                raw = f.read(off, size)
                st.reads += 1
                st.bytes += size
                f.check_block(b, raw)
                checked[b] = True
                st.blocks_checked += 1
                j = i
                while j < n and blocks[j] == b:
                    r = int(uniq[j]) - b * rpb
                    dst[j] = np.frombuffer(raw, np.uint8, rb, r * rb)
                    j += 1
                i = j
                continue
            # a checked block: the run of adjacent rows starting here, in one pread
            j = i + 1
            while j < n and uniq[j] == uniq[j - 1] + 1 and blocks[j] == b:
                j += 1
            raw = f.read(f.row_offset(int(uniq[i])), (j - i) * rb)
            st.reads += 1
            st.bytes += len(raw)
            dst[i:j] = np.frombuffer(raw, np.uint8).reshape(j - i, rb)
            i = j

    def close(self) -> None:
        for f in self.files.values():
            f.close()
