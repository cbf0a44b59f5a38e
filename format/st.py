"""Minimal safetensors I/O for large checkpoints: a bounded header parser with pread-based slicing
(read one expert out of a stacked [E, ...] tensor without touching the rest) and a deterministic,
hashing writer. Arrays are numpy; bfloat16 travels as its uint16 bit pattern (numpy has no bf16),
tagged with the safetensors dtype string.

safetensors layout: u64 n | n bytes JSON header {name: {dtype, shape, data_offsets: [b, e]}, "__metadata__": {...}} | data
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe.errors import BundleError

from .dtypes import ST_ITEMSIZE, ST_NUMPY
from .files import abort_partial, commit_partial, create_partial
from .jsonio import load_json

MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (bounded length, offsets inside the file,
    sizes matching shapes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BundleError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise BundleError(f"{path}: safetensors header length {n} is impossible for a {size}-byte file "
                                  "(truncated or not safetensors); re-download it")
            header = load_json(f.read(n), path, "the safetensors header", "re-download it (the file is corrupt)")
    except FileNotFoundError:
        raise BundleError(f"{path}: file not found; re-download the checkpoint (or pass the right directory)") from None
    except IsADirectoryError:
        raise BundleError(f"{path}: is a directory, not a safetensors file") from None
    base = 8 + n
    if not isinstance(header, dict):
        raise BundleError(f"{path}: corrupt safetensors header (not a JSON object); re-download it")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if not isinstance(dtype, str) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                     for v in (*shape, b, e)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{path}: malformed safetensors header entry for {name[:80]!r}; re-download it") from None
        if dtype not in ST_ITEMSIZE:
            raise BundleError(f"{path}: tensor {name} has unsupported dtype {dtype[:20]}")
        want = int(np.prod(shape, dtype=object)) * ST_ITEMSIZE[dtype]
        if not (0 <= b <= e) or e - b != want or base + e > size:
            raise BundleError(f"{path}: tensor {name} has bad offsets [{b}, {e}) for shape {list(shape)} "
                              f"in a {size}-byte file (truncated?); re-download it")
        out[name] = TensorInfo(path, dtype, shape, base + b, e - b)
    return out


def read_tensor(t: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """Read a whole tensor, or rows [a, b) of its leading dimension, with one pread."""
    shape = list(t.shape)
    start, nbytes = t.start, t.nbytes
    if rows is not None:
        a, b, _ = rows.indices(shape[0])
        start += a * t.row_bytes
        nbytes = (b - a) * t.row_bytes
        shape[0] = b - a
    buf = np.empty(nbytes, dtype=np.uint8)
    fd = os.open(t.file, os.O_RDONLY)
    try:
        got = os.preadv(fd, [memoryview(buf)], start) if nbytes else 0
    finally:
        os.close(fd)
    if got != nbytes:
        raise BundleError(f"{t.file}: short read ({got} of {nbytes} bytes); the file is truncated, re-download it")
    return buf.view(ST_NUMPY[t.dtype]).reshape(shape)


class SafetensorsWriter:
    """Write tensors to `path` atomically (via a new `path.partial`, format/files.py), sorted by name so output is deterministic.
    Returns (size, sha256) from close()."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = metadata or {}
        self.tensors: dict[str, tuple[str, np.ndarray]] = {}

    def add(self, name: str, dtype: str, arr: np.ndarray) -> None:
        if name in self.tensors:
            raise BundleError(f"duplicate tensor {name}")
        if np.dtype(ST_NUMPY[dtype]).itemsize != arr.dtype.itemsize:
            raise ValueError(f"{name}: array dtype {arr.dtype} does not carry {dtype}")
        self.tensors[name] = (dtype, np.ascontiguousarray(arr))

    def close(self) -> tuple[int, str]:
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        off = 0
        names = sorted(self.tensors)
        for n in names:
            dtype, a = self.tensors[n]
            header[n] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
            off += a.nbytes
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # align data to 8 bytes, as the reference writer does
        sha = hashlib.sha256()
        f = create_partial(self.path)
        try:
            for chunk in (struct.pack("<Q", len(hb)), hb, *(memoryview(self.tensors[n][1]).cast("B") for n in names)):
                f.write(chunk)
                sha.update(chunk)
        except BaseException:
            abort_partial(f, self.path)  # never leave a partial file taking the space a retry needs
            raise
        commit_partial(f, self.path)
        return 8 + len(hb) + off, sha.hexdigest()
