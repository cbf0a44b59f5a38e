"""BundleWriter: the one implementation of the bundle-writing protocol (format/SPEC.md section 1).

    bw = BundleWriter(out)                                   # known={path: {size, sha256}} when resuming
    with bw.experts(info) as w: w.write_record(...)        # experts/layer-NNN.bin of info.layer   # per-record CRC-32s kept for the manifest
    with bw.safetensors("dense/layer-000.safetensors", {...}) as w: w.add(...)
    bw.copy(source_dir / "tokenizer.json", "tokenizer.json")
    bw.write_bytes("config.json", raw)
    bw.finish(manifest)                                      # validated, every file checked, written last

Every file goes to a new temporary name (O_CREAT|O_EXCL|O_NOFOLLOW), is fsynced and renamed over its
final name (format/files.py); folders are made real folders (a link in their place is refused). The
writer keeps each finished file's size and sha256 (`files`) and each layer's record CRC-32s
(`records`), which is what the manifest lists. flashmoe-convert, flashmoe-bench make, the test bundles and
flashmoe-pull --shard all write through it.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from .experts import ExpertFileInfo, ExpertFileWriter
from .files import abort_partial, commit_partial, create_partial, real_dirs, write_file
from .manifest import expert_path, safe_relpath, write_manifest
from .st import SafetensorsWriter

COPY_CHUNK = 8 << 20


class BundleWriter:
    def __init__(self, out: str | os.PathLike, known: dict[str, dict] | None = None,
                 records: dict[int, str] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict] = dict(known or {})  # path -> {"size", "sha256"} of each finished file
        self.records: dict[int, str] = dict(records or {})  # layer -> its records' CRC-32s (8 hex digits each)

    def path(self, rel: str) -> Path:
        """Where file `rel` goes, its folders made (real folders only)."""
        rel = safe_relpath(rel)
        parent = str(PurePosixPath(rel).parent)
        return (real_dirs(self.out, parent) if parent != "." else self.out) / PurePosixPath(rel).name

    def _done(self, rel: str, size: int, sha: str) -> None:
        self.files[rel] = {"size": size, "sha256": sha}

    @contextmanager
    def experts(self, info: ExpertFileInfo):
        """An ExpertFileWriter for the layer file of `info.layer`; on a clean exit it is closed (renamed into place) and
        its size, sha256 and record CRC-32s recorded; on an error its partial file is dropped."""
        rel = expert_path(info.layer)
        w = ExpertFileWriter(self.path(rel), info)
        try:
            yield w
            size, sha = w.close()
        except BaseException:
            w.abort()
            raise
        self._done(rel, size, sha)
        self.records[info.layer] = w.record_digests

    def table(self, info, chunks) -> None:
        """A streamed embedding table (format/tables.py) for `info.layer` from `chunks` (row blocks in order)."""
        from .tables import table_path, write_table

        rel = table_path(info.layer)
        done = write_table(self.path(rel), info, chunks)
        self._done(rel, done["size"], done["sha256"])

    @contextmanager
    def safetensors(self, rel: str, metadata: dict[str, str] | None = None):
        """A SafetensorsWriter for `rel`, written (and recorded) on a clean exit."""
        w = SafetensorsWriter(self.path(rel), metadata)
        yield w
        self._done(rel, *w.close())

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_file(self.path(rel), data)
        self._done(rel, len(data), hashlib.sha256(data).hexdigest())

    def copy(self, src: str | os.PathLike, rel: str) -> None:
        """A copy of the file `src` (read-only; outside the bundle) as `rel`, hashed while copied."""
        path = self.path(rel)
        f = create_partial(path)
        sha, size = hashlib.sha256(), 0
        try:
            with open(src, "rb") as s:
                while chunk := s.read(COPY_CHUNK):
                    f.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
        except BaseException:
            abort_partial(f, path)
            raise
        commit_partial(f, path)
        self._done(rel, size, sha.hexdigest())

    @contextmanager
    def random_access(self, rel: str, size: int):
        """A new `size`-byte file for `rel` (sparse: unwritten ranges are holes), as a descriptor for
        os.pwrite; renamed into place on a clean exit. Not recorded: its content is the caller's to check
        (flashmoe-pull --shard checks each record's CRC-32)."""
        path = self.path(rel)
        f = create_partial(path)
        try:
            os.ftruncate(f.fileno(), size)
            yield f.fileno()
        except BaseException:
            abort_partial(f, path)
            raise
        commit_partial(f, path)

    def finish(self, manifest: dict) -> Path:
        """Write the manifest last (validated; every file it lists on disk with its size)."""
        return write_manifest(self.out, manifest)

    def record_list(self, layers: int) -> list[str]:
        """The manifest's `records.digests`: one CRC-32 string per layer, in layer order."""
        return [self.records[layer] for layer in range(layers)]
