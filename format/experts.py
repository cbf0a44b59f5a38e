"""Per-layer expert files: writer (streaming, atomic) and defensive reader.

File layout (all integers little-endian; format/SPEC.md is normative):

    offset            size   field
    0                 8      magic b"FLASHMOE"
    8                 4      u32 format version (FORMAT_VERSION)
    12                4      u32 n = length of the JSON header
    16                n      UTF-8 JSON: layer, num_experts, data_offset, record_size, record_stride, components
    16+n              ...    zero padding up to data_offset (a multiple of 16 KiB)
    data_offset + e*record_stride   record of expert e (record_size bytes, zero-padded to record_stride)

    file size = data_offset + num_experts * record_stride
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoe.errors import BundleError, InputError
from .dtypes import DTYPES
from .jsonio import load_json
from .files import abort_partial, commit_partial, create_partial
from .layout import RECORD_ALIGN, Component, align_up, check_components

MAGIC = b"FLASHMOE"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sII")  # magic, version, json length
MAX_HEADER_JSON = 1 << 20


@dataclass(frozen=True)
class ExpertFileInfo:
    layer: int
    num_experts: int
    data_offset: int
    record_size: int
    record_stride: int
    components: tuple[Component, ...]

    @property
    def file_size(self) -> int:
        return self.data_offset + self.num_experts * self.record_stride

    def header_dict(self) -> dict:
        return {
            "layer": self.layer,
            "num_experts": self.num_experts,
            "data_offset": self.data_offset,
            "record_size": self.record_size,
            "record_stride": self.record_stride,
            "components": [c.to_dict() for c in self.components],
        }

    def check(self) -> None:
        if self.num_experts <= 0 or self.num_experts > 1 << 20:
            raise BundleError(f"impossible num_experts={self.num_experts}")
        if self.data_offset <= 0 or self.data_offset % RECORD_ALIGN:
            raise BundleError(f"data_offset {self.data_offset} is not a positive multiple of {RECORD_ALIGN}")
        check_components(list(self.components), self.record_stride)
        if self.record_size != max(c.offset + c.nbytes for c in self.components):
            raise BundleError("record_size does not match the component table")


def parse_components(items) -> tuple[Component, ...]:
    """A component table from JSON: a list of {name, dtype, shape, offset, nbytes} with the right types."""
    def whole(v) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
            raise TypeError(f"{v!r} is not a non-negative integer")
        return v

    try:
        if not isinstance(items, list) or not items or len(items) > 64:
            raise TypeError("expected a list of components")
        out = []
        for c in items:
            if not isinstance(c, dict) or not isinstance(c["name"], str) or not isinstance(c["dtype"], str) \
                    or not isinstance(c["shape"], list) or len(c["shape"]) > 8:
                raise TypeError(f"malformed component {str(c)[:80]}")
            out.append(Component(c["name"], c["dtype"], tuple(whole(d) for d in c["shape"]), whole(c["offset"]),
                                 whole(c["nbytes"])))
        return tuple(out)
    except (KeyError, TypeError) as e:
        raise BundleError(f"malformed component table: {e}") from None


def make_info(layer: int, num_experts: int, comps: list[Component]) -> ExpertFileInfo:
    size = max(c.offset + c.nbytes for c in comps)
    info0 = ExpertFileInfo(layer, num_experts, RECORD_ALIGN, size, align_up(size, RECORD_ALIGN), tuple(comps))
    header = len(json.dumps(info0.header_dict())) + PREAMBLE.size
    info = ExpertFileInfo(layer, num_experts, align_up(header, RECORD_ALIGN), size, info0.record_stride,
                          tuple(comps))
    info.check()
    return info


def encode_header(info: ExpertFileInfo) -> bytes:
    body = json.dumps(info.header_dict(), separators=(",", ":"), sort_keys=True).encode()
    raw = PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    assert len(raw) <= info.data_offset
    return raw + b"\0" * (info.data_offset - len(raw))


class ExpertFileWriter:
    """Writes one layer file record by record to a new `<name>.partial` (format/files.py), hashing as it
    goes and keeping each record's CRC-32; `close()` fsyncs and renames it into place, so a crash never
    leaves a complete-looking file. BundleWriter.experts is the way to use it inside a bundle."""

    def __init__(self, path: str | os.PathLike, info: ExpertFileInfo):
        self.path = Path(path)
        self.info = info
        self.f = create_partial(self.path)
        self.sha = hashlib.sha256()
        self.crcs: list[str] = []  # CRC-32 of each record's record_size bytes (SPEC 3.2, manifest `records`)
        self.next_expert = 0
        try:
            self._write(encode_header(info))
        except BaseException:
            self.abort()
            raise

    def _write(self, b) -> None:
        self.f.write(b)
        self.sha.update(b)

    def write_record(self, parts: dict[str, np.ndarray]) -> None:
        """parts maps component name -> array whose raw bytes are written (uint32 packed weights,
        scales/biases/float weights as 2- or 4-byte values)."""
        info = self.info
        if self.next_expert >= info.num_experts:
            raise BundleError("more expert records written than the layer has experts")
        rec = bytearray(info.record_stride)
        for c in info.components:
            a = parts[c.name]
            raw = memoryview(np.ascontiguousarray(a)).cast("B")
            if raw.nbytes != c.nbytes or tuple(a.shape) != c.shape:
                raise BundleError(
                    f"layer {info.layer} expert {self.next_expert} {c.name}: got shape {list(a.shape)} "
                    f"({raw.nbytes} bytes), expected {list(c.shape)} ({c.nbytes} bytes)"
                )
            rec[c.offset : c.offset + c.nbytes] = raw
        self.crcs.append(f"{zlib.crc32(memoryview(rec)[: info.record_size]):08x}")
        self._write(rec)
        self.next_expert += 1

    @property
    def record_digests(self) -> str:
        """The layer's entry of the manifest's `records.digests`: 8 hex digits per record, in expert order."""
        return "".join(self.crcs)

    def close(self) -> tuple[int, str]:
        if self.next_expert != self.info.num_experts:
            raise BundleError(f"layer file closed after {self.next_expert} of {self.info.num_experts} records")
        commit_partial(self.f, self.path)
        return self.info.file_size, self.sha.hexdigest()

    def abort(self) -> None:
        """Drop the unfinished file (also after a failed write: a full disk gets its space back)."""
        abort_partial(self.f, self.path)


def read_info(path: str | os.PathLike) -> ExpertFileInfo:
    """Read and check a layer file's header and size; never trusts a field before bounding it."""
    path = Path(path)
    fix = "re-run flashmoe-convert with the same arguments (it resumes) or flashmoe-pull (it repairs)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            pre = f.read(PREAMBLE.size)
            if len(pre) < PREAMBLE.size:
                raise BundleError(f"{path}: truncated before the header ({size} bytes); {fix}")
            magic, version, n = PREAMBLE.unpack(pre)
            if magic != MAGIC:
                raise BundleError(f"{path}: not a flashmoe expert file (magic {magic!r}, expected {MAGIC!r})")
            if version > FORMAT_VERSION:
                raise BundleError(
                    f"{path}: format version {version} is newer than this flashmoe reads ({FORMAT_VERSION}); "
                    "upgrade flashmoe (pip install -U flashmoe)"
                )
            if version < 1:
                raise BundleError(f"{path}: invalid format version {version}")
            if n > MAX_HEADER_JSON or n > size - PREAMBLE.size:
                raise BundleError(f"{path}: header length {n} is impossible for a {size}-byte file; {fix}")
            body = f.read(n)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing expert file; {fix}") from None
    h = load_json(body, path, "the expert file header", fix)
    try:
        if not isinstance(h, dict):
            raise TypeError("not a JSON object")
        fields = [h[k] for k in ("layer", "num_experts", "data_offset", "record_size", "record_stride")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 62 for v in fields):
            raise TypeError("layout fields must be non-negative integers")
        info = ExpertFileInfo(*fields, parse_components(h["components"]))
    except (KeyError, TypeError) as e:
        raise BundleError(f"{path}: corrupt header ({e}); {fix}") from None
    info.check()
    if PREAMBLE.size + n > info.data_offset:
        raise BundleError(f"{path}: header overlaps the first record; {fix}")
    if size != info.file_size:
        what = "truncated" if size < info.file_size else "longer than its header says"
        raise BundleError(f"{path}: file is {what} ({size} bytes, expected {info.file_size}); {fix}")
    return info


class ExpertFile:
    """An open layer file. `read(ids, out)` preads whole records into a caller-owned buffer with one
    call per record; os.preadv releases the GIL, so callers may read from several threads.

    `direct=True` opens it so that reads bypass the page cache: O_DIRECT on Linux (reads must then be
    aligned: buffer address, file offset and length multiples of the block size; RECORD_ALIGN, which
    every record start and stride is a multiple of, is enough), F_NOCACHE on macOS."""

    def __init__(self, path: str | os.PathLike, expected: ExpertFileInfo | None = None, direct: bool = False):
        self.path = Path(path)
        self.info = read_info(self.path)
        if expected is not None and self.info != expected:
            raise BundleError(
                f"{self.path}: header disagrees with the manifest (layer/experts/layout differ); the bundle mixes "
                "files from different conversions. Re-run flashmoe-convert into an empty directory."
            )
        self.fd = -1
        self.fd = open_uncached(self.path) if direct else os.open(self.path, os.O_RDONLY)

    def offset(self, expert: int) -> int:
        if not 0 <= expert < self.info.num_experts:
            raise IndexError(f"expert {expert} out of range [0, {self.info.num_experts})")
        return self.info.data_offset + expert * self.info.record_stride

    def read_into(self, expert: int, out: memoryview | np.ndarray) -> None:
        """Read record `expert` into `out` (at least record_size bytes)."""
        mv = memoryview(out).cast("B")[: self.info.record_size]
        got = os.preadv(self.fd, [mv], self.offset(expert))
        if got != len(mv):
            raise BundleError(f"{self.path}: short read of expert {expert} ({got} of {len(mv)} bytes)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_uncached(path: Path) -> int:
    """A read-only descriptor of `path` whose reads bypass the page cache (O_DIRECT; F_NOCACHE on macOS)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise InputError(f"{path}: its file system does not support direct I/O (O_DIRECT); use io 'pread'") from None
    fd = os.open(path, os.O_RDONLY)
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)  # macOS: no O_DIRECT, the same effect per descriptor
    except (AttributeError, OSError) as e:
        os.close(fd)
        raise InputError(f"{path}: direct I/O (reads that bypass the page cache) is not available here ({e}); "
                         "use io 'pread'") from None
    return fd


def file_record_digests(path: str | os.PathLike) -> str:
    """CRC-32 of every record of a layer file (its `records.digests` entry), read record by record."""
    f = ExpertFile(path)
    try:
        buf = bytearray(f.info.record_size)
        out = []
        for e in range(f.info.num_experts):
            f.read_into(e, buf)
            out.append(f"{zlib.crc32(buf):08x}")
        return "".join(out)
    finally:
        f.close()


def record_views(info: ExpertFileInfo, buf: np.ndarray) -> dict[str, np.ndarray]:
    """numpy views of each component inside a record buffer (uint8, >= record_size). bfloat16
    components are returned as uint16 bit patterns (numpy has no bfloat16)."""
    out = {}
    for c in info.components:
        out[c.name] = buf[c.offset : c.offset + c.nbytes].view(DTYPES[c.dtype].numpy).reshape(c.shape)
    return out
