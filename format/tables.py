"""Streamed embedding tables (Qwen4-Exp's per-layer n-gram embeddings): hash parameters, writer, reader.

A table is read a few rows per token, so it stays on disk like the routed experts. Each PLE layer's
table is one file `tables/layer-NNN.bin` (format/SPEC.md section 6 is normative):

    offset                           size   field
    0                                8      magic b"FMOETABL"
    8                                4      u32 format version (TABLE_VERSION)
    12                               4      u32 n = length of the JSON header
    16                               n      UTF-8 JSON header (TableInfo.header_dict)
    16+n                             ...    zero bytes up to crc_offset (a multiple of 16 KiB)
    crc_offset                       4*nb   u32 CRC-32 of each block (its block_stride bytes)
    ...                              ...    zero bytes up to data_offset (a multiple of 16 KiB)
    data_offset + b*block_stride            block b: rows b*R .. b*R+R-1 (row_bytes each), zero-padded

    file size = data_offset + num_blocks * block_stride, num_blocks = ceil(rows / R)

The hash that finds a row (`ngram_row_ids`) is the one of transformers' Qwen4ExpTextNGramEmbedding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe.errors import BundleError
from .files import abort_partial, commit_partial, create_partial, partial_path
from .dtypes import DTYPES, FLOAT_DTYPES
from .layout import RECORD_ALIGN, align_up

MAGIC = b"FMOETABL"
TABLE_VERSION = 1
PREAMBLE = struct.Struct("<8sII")
MAX_HEADER_JSON = 1 << 20
HASH_NAME = "qwen4-ngram-xor-mod"
MAX_ROWS = 1 << 40

# ----------------------------------------------------------------------------------------------
# the hash (transformers models/qwen4_exp: _splitmix64, _build_layer_multipliers, _find_nth_prime_after)

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_PRIME_1 = 10007


def _splitmix64(v: int) -> int:
    v = (v + _GAMMA) & _MASK64
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (v ^ (v >> 31)) & _MASK64


def layer_multipliers(vocab_size: int, ngram_size: int, ple_index: int, seed: int) -> list[int]:
    """Odd multipliers m_0..m_{n-1} of one PLE layer; each is below 2**63 // vocab_size, so token * m fits int64."""
    half = max(1, ((1 << 63) - 1) // max(vocab_size, 1) // 2)
    base = seed + _PRIME_1 * ple_index
    return [2 * (_splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % half) + 1 for i in range(ngram_size)]


def _is_prime(v: int) -> bool:
    if v < 2 or v % 2 == 0:
        return v == 2
    return all(v % d for d in range(3, math.isqrt(v) + 1, 2))


def primes_from(base: int, count: int) -> list[int]:
    """The first `count` primes at or above `base`: head h of PLE layer i hashes into prime i*heads + h."""
    out, p = [], base - 1
    for _ in range(count):
        p += 1
        while not _is_prime(p):
            p += 1
        out.append(p)
    return out


@dataclass(frozen=True)
class TableHash:
    """What finds the rows of one PLE layer's table for a token: its n-gram hash parameters."""

    ngram_size: int
    heads_per_ngram: int
    eos_token_id: int
    multipliers: tuple[int, ...]  # ngram_size odd integers below 2**63
    vocab_sizes: tuple[int, ...]  # (ngram_size-1)*heads_per_ngram primes, heads of 2-grams first
    offsets: tuple[int, ...]  # first row of each head: running sum of vocab_sizes

    def context(self) -> int:
        return self.ngram_size - 1

    def row_ids(self, history: np.ndarray) -> np.ndarray:
        """history [B, context + S] int64 token ids (the `context` ids before this call first, eos where a
        row has none) -> row ids [B, S, heads] (int64), heads ordered 2-grams first."""
        history = np.asarray(history, np.int64)
        B, n = history.shape
        ctx, eos = self.context(), self.eos_token_id
        pos = np.arange(n)
        # a token sees back to the start of its segment: the position after the last eos strictly before it
        eos_at = np.where(history == eos, pos, -1)
        prev_eos = np.concatenate([np.full((B, 1), -1), np.maximum.accumulate(eos_at, axis=1)[:, :-1]], axis=1)
        shifted = []
        for k in range(self.ngram_size):
            src = np.concatenate([np.full((B, min(k, n)), eos, np.int64), history[:, : n - k]], axis=1)
            valid = (pos[None] - k) > prev_eos
            shifted.append(np.where(valid, src, eos))
        m = self.multipliers
        H = self.heads_per_ngram
        sizes, offs = np.array(self.vocab_sizes, np.int64), np.array(self.offsets, np.int64)
        blocks = []
        for order in range(2, self.ngram_size + 1):
            mixed = shifted[0] * np.int64(m[0])
            for k in range(1, order):
                mixed = np.bitwise_xor(mixed, shifted[k] * np.int64(m[k]))
            h = slice((order - 2) * H, (order - 1) * H)
            blocks.append(np.remainder(mixed[..., None], sizes[h]) + offs[h])
        return np.concatenate(blocks, axis=-1)[:, ctx:]

    def to_dict(self) -> dict:
        return {"ngram_size": self.ngram_size, "heads_per_ngram": self.heads_per_ngram,
                "eos_token_id": self.eos_token_id, "multipliers": list(self.multipliers),
                "head_vocab_sizes": list(self.vocab_sizes)}

    @staticmethod
    def build(vocab_size: int, ngram_size: int, heads_per_ngram: int, eos_token_id: int, base: int,
              ple_index: int, seed: int, primes: list[int] | None = None) -> "TableHash":
        """The hash of PLE layer `ple_index`; `primes` (primes_from(base, n) for n covering this layer)
        saves recomputing them per layer."""
        heads = (ngram_size - 1) * heads_per_ngram
        primes = primes or primes_from(base, (ple_index + 1) * heads)
        sizes = primes[ple_index * heads : (ple_index + 1) * heads]
        return TableHash(ngram_size, heads_per_ngram, eos_token_id,
                         tuple(layer_multipliers(vocab_size, ngram_size, ple_index, seed)), tuple(sizes),
                         tuple(int(x) for x in np.cumsum([0, *sizes[:-1]])))


# ----------------------------------------------------------------------------------------------
# file layout


@dataclass(frozen=True)
class TableInfo:
    layer: int  # decoder layer (0-based) whose PLE module owns the table
    rows: int  # rows stored (the checkpoint's padded vocabulary)
    row_dim: int
    dtype: str
    rows_per_block: int
    block_stride: int
    crc_offset: int
    data_offset: int
    hash: TableHash

    @property
    def row_bytes(self) -> int:
        return self.row_dim * DTYPES[self.dtype].size

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.rows_per_block)

    @property
    def file_size(self) -> int:
        return self.data_offset + self.num_blocks * self.block_stride

    def header_dict(self) -> dict:
        return {"layer": self.layer, "rows": self.rows, "row_dim": self.row_dim, "dtype": self.dtype,
                "row_bytes": self.row_bytes, "rows_per_block": self.rows_per_block,
                "block_stride": self.block_stride, "crc_offset": self.crc_offset, "data_offset": self.data_offset,
                "hash": HASH_NAME, **self.hash.to_dict()}

    def check(self) -> None:
        h = self.hash
        if self.dtype not in FLOAT_DTYPES or not 0 < self.row_dim <= 1 << 20 or not 0 < self.rows <= MAX_ROWS:
            raise BundleError(f"table of layer {self.layer}: impossible dtype/row_dim/rows "
                              f"{self.dtype!r}/{self.row_dim}/{self.rows}")
        if self.block_stride % RECORD_ALIGN or self.block_stride <= 0 or self.rows_per_block <= 0 \
                or self.rows_per_block * self.row_bytes > self.block_stride:
            raise BundleError(f"table of layer {self.layer}: {self.rows_per_block} rows of {self.row_bytes} bytes "
                              f"do not fit a block of {self.block_stride} (a positive multiple of {RECORD_ALIGN})")
        if self.crc_offset % RECORD_ALIGN or self.data_offset % RECORD_ALIGN or self.crc_offset <= 0 \
                or self.data_offset < self.crc_offset + 4 * self.num_blocks:
            raise BundleError(f"table of layer {self.layer}: misaligned or overlapping crc/data offsets")
        heads = (h.ngram_size - 1) * h.heads_per_ngram
        if h.ngram_size < 2 or h.heads_per_ngram <= 0 or len(h.multipliers) != h.ngram_size \
                or len(h.vocab_sizes) != heads or len(h.offsets) != heads:
            raise BundleError(f"table of layer {self.layer}: hash parameters do not match ngram_size/heads")
        if any(not 0 < m < 1 << 63 or m % 2 == 0 for m in h.multipliers) or any(v <= 0 for v in h.vocab_sizes) \
                or sum(h.vocab_sizes) > self.rows:
            raise BundleError(f"table of layer {self.layer}: hash parameters address rows the table lacks")


def make_table_info(layer: int, rows: int, row_dim: int, dtype: str, th: TableHash) -> TableInfo:
    row_bytes = row_dim * DTYPES[dtype].size
    stride = align_up(row_bytes, RECORD_ALIGN)
    rpb = stride // row_bytes
    nb = -(-rows // rpb)
    probe = TableInfo(layer, rows, row_dim, dtype, rpb, stride, RECORD_ALIGN, RECORD_ALIGN, th)
    crc_offset = align_up(PREAMBLE.size + len(_encode_json(probe)) + 64, RECORD_ALIGN)
    info = TableInfo(layer, rows, row_dim, dtype, rpb, stride, crc_offset,
                     align_up(crc_offset + 4 * nb, RECORD_ALIGN), th)
    info.check()
    return info


def _encode_json(info: TableInfo) -> bytes:
    return json.dumps(info.header_dict(), separators=(",", ":"), sort_keys=True).encode()


def info_from_dict(d: dict, layer: int | None = None) -> TableInfo:
    """TableInfo from a header or a manifest `tables.layers[]` entry; BundleError on anything malformed."""
    try:
        if d.get("hash") != HASH_NAME:
            raise TypeError(f"unknown hash {str(d.get('hash'))[:40]!r}")
        ints = {k: d[k] for k in ("layer", "rows", "row_dim", "rows_per_block", "block_stride", "crc_offset",
                                  "data_offset", "ngram_size", "heads_per_ngram", "eos_token_id")}
        seqs = {k: d[k] for k in ("multipliers", "head_vocab_sizes")}
        for k, v in [*ints.items(), *((k, x) for k, s in seqs.items() for x in s)]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TypeError(f"{k} must hold non-negative integers")
        if not isinstance(d["dtype"], str) or not all(isinstance(s, list) for s in seqs.values()) \
                or len(seqs["head_vocab_sizes"]) > 4096 or len(seqs["multipliers"]) > 64:
            raise TypeError("dtype/multipliers/head_vocab_sizes malformed")
        sizes = seqs["head_vocab_sizes"]
        th = TableHash(ints["ngram_size"], ints["heads_per_ngram"], ints["eos_token_id"],
                       tuple(seqs["multipliers"]), tuple(sizes), tuple(int(x) for x in np.cumsum([0, *sizes[:-1]])))
        info = TableInfo(ints["layer"], ints["rows"], ints["row_dim"], d["dtype"], ints["rows_per_block"],
                         ints["block_stride"], ints["crc_offset"], ints["data_offset"], th)
        if d.get("row_bytes", info.row_bytes if info.dtype in DTYPES else -1) != info.row_bytes:
            raise TypeError("row_bytes disagrees with row_dim and dtype")
    except (KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"malformed table description{'' if layer is None else f' (layer {layer})'}: {e}") from None
    info.check()
    return info


# ----------------------------------------------------------------------------------------------
# writer


class TableFileWriter:
    """Writes one table to `<name>.partial` in row order, CRC per block, and renames it into place on
    close(); `sha256` is the finished file's digest."""

    def __init__(self, path: str | os.PathLike, info: TableInfo):
        self.path, self.info = Path(path), info
        self.f = create_partial(self.path)  # a new temporary file (O_EXCL|O_NOFOLLOW), renamed on close
        self.f.truncate(info.data_offset)
        self.f.seek(info.data_offset)
        self.crcs = np.zeros(info.num_blocks, "<u4")
        self.pending = bytearray()
        self.next_block = 0
        self.rows_written = 0

    def write_rows(self, rows: np.ndarray) -> None:
        """rows [n, row_dim] in the table's dtype (bfloat16 given as uint16 bits), the next n rows."""
        info = self.info
        a = np.ascontiguousarray(rows)
        if a.ndim != 2 or a.shape[1] != info.row_dim or a.dtype.itemsize != DTYPES[info.dtype].size:
            raise BundleError(f"table rows of shape {a.shape}/{a.dtype} do not fit {info.row_dim} x {info.dtype}")
        if self.rows_written + len(a) > info.rows:
            raise BundleError("more table rows written than the table has")
        self.rows_written += len(a)
        self.pending += a.tobytes()
        whole = info.rows_per_block * info.row_bytes
        while len(self.pending) >= whole:
            self._block(bytes(self.pending[:whole]))
            del self.pending[:whole]

    def _block(self, raw: bytes) -> None:
        blk = raw + b"\0" * (self.info.block_stride - len(raw))
        self.crcs[self.next_block] = zlib.crc32(blk)
        self.f.write(blk)
        self.next_block += 1

    def close(self) -> str:
        info = self.info
        try:
            if self.rows_written != info.rows:
                raise BundleError(f"table of layer {info.layer}: {self.rows_written} of {info.rows} rows written")
            if self.pending:
                self._block(bytes(self.pending))
            body = _encode_json(info)
            self.f.seek(0)
            self.f.write(PREAMBLE.pack(MAGIC, TABLE_VERSION, len(body)) + body)
            self.f.seek(info.crc_offset)
            self.f.write(self.crcs.tobytes())
            self.f.flush()
            sha = hashlib.sha256()
            with open(partial_path(self.path), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    sha.update(chunk)
            commit_partial(self.f, self.path)
            return sha.hexdigest()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        abort_partial(self.f, self.path)


# ----------------------------------------------------------------------------------------------
# reader


class TableFile:
    """One table file opened defensively: header, size and CRC table checked against `expected` (the
    manifest's description). `read(offset, n)` is one pread; blocks are checked by the caller
    (`check_block`), the first time it reads each."""

    def __init__(self, path: Path, expected: TableInfo):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise BundleError(f"{path}: cannot open this table ({e.strerror}); re-run flashmoe-convert") from None
        try:
            head = os.pread(self.fd, PREAMBLE.size, 0)
            if len(head) < PREAMBLE.size:
                raise BundleError(f"{path}: truncated table file")
            magic, version, n = PREAMBLE.unpack(head)
            if magic != MAGIC:
                raise BundleError(f"{path}: not a flashmoe table file (bad magic)")
            if version != TABLE_VERSION:
                raise BundleError(f"{path}: table version {version}, this flashmoe reads {TABLE_VERSION}")
            if n > MAX_HEADER_JSON:
                raise BundleError(f"{path}: table header of {n} bytes is implausible")
            try:
                d = json.loads(os.pread(self.fd, n, PREAMBLE.size))
            except ValueError:
                raise BundleError(f"{path}: table header is not JSON") from None
            if not isinstance(d, dict):
                raise BundleError(f"{path}: table header is not a JSON object")
            self.info = info_from_dict(d)
            if self.info != expected:
                raise BundleError(f"{path}: table header disagrees with the manifest (from another conversion?)")
            size = os.fstat(self.fd).st_size
            if size != self.info.file_size:
                raise BundleError(f"{path}: table file is {size} bytes, expected {self.info.file_size}")
            nb = self.info.num_blocks
            raw = os.pread(self.fd, 4 * nb, self.info.crc_offset)
            if len(raw) != 4 * nb:
                raise BundleError(f"{path}: short read of the CRC table")
            self.crcs = np.frombuffer(raw, "<u4")
        except BaseException:
            os.close(self.fd)
            raise

    def block_span(self, block: int) -> tuple[int, int]:
        info = self.info
        return info.data_offset + block * info.block_stride, info.block_stride

    def row_offset(self, row: int) -> int:
        info = self.info
        b, r = divmod(row, info.rows_per_block)
        return info.data_offset + b * info.block_stride + r * info.row_bytes

    def read(self, offset: int, n: int) -> bytes:
        raw = os.pread(self.fd, n, offset)
        if len(raw) != n:
            raise BundleError(f"{self.path}: short read at {offset} ({len(raw)} of {n} bytes); the file changed")
        return raw

    def check_block(self, block: int, raw: bytes) -> None:
        if zlib.crc32(raw) != int(self.crcs[block]):
            raise BundleError(f"{self.path}: block {block} fails its CRC-32 (rows {block * self.info.rows_per_block}"
                              f"..); the table is corrupt: run `flashmoe-inspect --verify`, then re-run "
                              "flashmoe-convert or flashmoe-pull")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def table_path(layer: int) -> str:
    return f"tables/layer-{layer:03d}.bin"


def tables_manifest(infos: list[TableInfo]) -> dict:
    """The manifest's `tables` key (SPEC section 6.3)."""
    return {"hash": HASH_NAME, "layers": [{"path": table_path(i.layer), **i.header_dict()} for i in infos]}


def parse_tables(m: dict) -> list[tuple[str, TableInfo]]:
    """(path, TableInfo) of each table a manifest lists (none without a `tables` key)."""
    t = m.get("tables")
    if t is None:
        return []
    listed = {f.get("path") for f in m.get("files", []) if isinstance(f, dict)}
    out = []
    for d in t["layers"]:
        info = info_from_dict(d)
        if d.get("path") != table_path(info.layer):
            raise BundleError(f"manifest tables: layer {info.layer} must be at {table_path(info.layer)}")
        if d["path"] not in listed:
            raise BundleError(f"manifest tables: files does not list {d['path']}")
        if info.layer in {i.layer for _, i in out}:
            raise BundleError(f"manifest tables: layer {info.layer} is listed twice")
        out.append((d["path"], info))
    return out


# ----------------------------------------------------------------------------------------------
# conversion: which checkpoint tensors are tables, and their layout

# model.layers.N.ple.ple_embedding.ngram_embedding.shard_K.weight (the published layout: split_ngram_parts
# shards concatenated along rows, K = 0, 1, ...) or .ngram_embedding.weight (one piece); and the hash
# buffers transformers keeps next to them (recomputed here from the config, not copied)
_TABLE = re.compile(r"(?:^|\.)layers\.(\d+)\.ple\.ple_embedding\.ngram_embedding\.(?:shard_(\d+)\.)?weight$")
_HASH_BUFFER = re.compile(r"(?:^|\.)layers\.\d+\.ple\.ple_embedding\.(layer_multipliers|ngram_heads_vocab_sizes|"
                          r"ngram_heads_offsets)$")


def is_table_tensor(name: str) -> bool:
    """A tensor (checkpoint or bundle-relative name) that belongs to a table (write_table), not to the dense files."""
    return bool(_TABLE.search(name) or _HASH_BUFFER.search(name))


def plan_tables(hf_config: dict, vocab_size: int, dtype: str, shapes: dict[str, tuple[int, ...]]
                ) -> list[tuple[TableInfo, list[str]]]:
    """Each PLE layer's TableInfo and its checkpoint pieces in row order, from config.json (its text_config
    when nested) and {checkpoint name: shape} of the checkpoint's table tensors."""
    t = hf_config.get("text_config") or hf_config
    pieces: dict[int, list[tuple[int, str]]] = {}
    for name in shapes:
        m = _TABLE.search(name)
        if m:
            pieces.setdefault(int(m[1]), []).append((int(m[2] or 0), name))
    ple = sorted({int(i) - 1 for i in t.get("ple_layer_ids") or []})
    if sorted(pieces) != ple:
        raise BundleError(f"checkpoint n-gram tables are for layers {sorted(pieces)}, config.json ple_layer_ids "
                          f"says {[i + 1 for i in ple]}; is a weight shard missing?")
    if not ple:
        return []
    n, hpn = int(t.get("ngram_size", 3)), int(t.get("heads_per_ngram", 8))
    eos = t.get("eos_token_id", hf_config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise BundleError("config.json must set eos_token_id for Qwen4-Exp n-gram tables")
    base, seed, heads = int(t.get("ngram_vocab_size_base", 20_000_000)), int(t.get("seed", 1234)), (n - 1) * hpn
    primes = primes_from(base, len(ple) * heads)
    out = []
    for idx, L in enumerate(ple):
        names = [nm for _, nm in sorted(pieces[L])]
        dims = {shapes[nm][1] for nm in names if len(shapes[nm]) == 2}
        if len(dims) != 1 or any(len(shapes[nm]) != 2 for nm in names):
            raise BundleError(f"layer {L}: n-gram table pieces have inconsistent shapes")
        th = TableHash.build(vocab_size, n, hpn, eos, base, idx, seed, primes)
        out.append((make_table_info(L, sum(shapes[nm][0] for nm in names), dims.pop(), dtype, th), names))
    return out


def write_table(path: Path, info: TableInfo, chunks) -> dict:
    """Write a table from `chunks` (row blocks in order, numpy, in the table's dtype; bfloat16 as uint16)
    and return its {size, sha256}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = TableFileWriter(path, info)
    try:
        for c in chunks:
            w.write_rows(c)
    except BaseException:
        w.abort()
        raise
    return {"size": info.file_size, "sha256": w.close()}
