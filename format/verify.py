"""The one verifier: files of a bundle against their listed size and sha256, in parallel, with a
stat-keyed record of what was already verified so that re-checking a complete bundle is instant.
flashmoe-inspect --verify, flashmoe-pull, flashmoe-publish, flashmoe-convert (repair and resume) and
flashmoe.load(verify=True) all come here.

The record (`.flashmoe-verified.json` in the bundle directory) maps each manifest path to the
(size, mtime_ns, inode) of the file that hashed correctly, plus the manifest's own sha256. A file
whose stat changed (re-downloaded, truncated, replaced, touched) is hashed again. Silent in-place
corruption that keeps size and mtime is only caught by a full check (`verify(..., full=True)`,
`flashmoe-pull --verify`, `flashmoe-inspect --verify`, a convert re-run), or on the run path by the
per-record CRC-32s (flashmoe.runtime.integrity).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from flashmoe.errors import BundleError

from .files import write_file
from .manifest import MANIFEST
from .paths import link_problem

RECORD = ".flashmoe-verified.json"
HASH_CHUNK = 8 << 20


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def _stat_key(p: Path) -> list[int] | None:
    try:
        st = p.stat()  # follows symlinks (HF cache snapshots point into blobs/)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def manifest_digest(bundle_dir: Path) -> str:
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


def _load_record(bundle_dir: Path, digest: str) -> dict:
    try:
        rec = json.loads((bundle_dir / RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(rec, dict) or rec.get("manifest_sha256") != digest or not isinstance(rec.get("files"), dict):
        return {}
    return rec["files"]


def _save_record(bundle_dir: Path, digest: str, files: dict) -> None:
    try:
        write_file(bundle_dir / RECORD, json.dumps({"manifest_sha256": digest, "files": files}, sort_keys=True).encode())
    except (OSError, BundleError):  # a read-only bundle just means the next check hashes again
        pass


def check_files(root: Path, files: dict[str, dict], names: list[str] | None = None, *, known: dict | None = None,
                progress: bool = False, workers: int | None = None) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Check `names` (default: all) of `files` ({path: {size, sha256}}) under `root`. Files whose stat key
    equals `known[path]` are trusted without hashing. Returns ({path: why it is bad}, {path: stat key of
    each good file}). A link that leads out of `root` is bad and never read."""
    from tqdm.auto import tqdm

    root = Path(root)
    known = known or {}
    todo: list[str] = []
    bad: dict[str, str] = {}
    good: dict[str, list[int]] = {}
    for n in sorted(names if names is not None else files):
        f = files[n]
        p = root / n
        key = _stat_key(p)
        why = link_problem(root, n)
        if why:
            bad[n] = why
        elif key is None or not p.is_file():
            bad[n] = "missing"
        elif key[0] != f["size"]:
            bad[n] = f"size {key[0]} differs from the manifest's {f['size']}"
        elif known.get(n) == key:
            good[n] = key
        else:
            todo.append(n)

    total = sum(files[n]["size"] for n in todo)
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify sha256", disable=not progress or not todo) as bar:
        def one(n: str):
            p = root / n
            key = _stat_key(p)
            try:
                return n, key, sha256_file(p, bar.update)
            except OSError as e:
                return n, key, f"unreadable ({e.strerror or e})"

        with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:  # hashlib releases the GIL
            for n, key, sha in ex.map(one, todo):
                want = files[n]["sha256"]
                if sha == want:
                    good[n] = key
                elif sha.startswith("unreadable"):
                    bad[n] = sha
                else:
                    bad[n] = f"sha256 {sha} differs from the manifest's {want}"
    return bad, good


def verify(bundle, *, full: bool = False, progress: bool = True, workers: int | None = None,
           names: list[str] | None = None) -> dict[str, str]:
    """Hash every manifest file (or `names`) of `bundle` (a format.Bundle) and compare with the manifest.

    Returns {path: reason} for every file that does not match (missing, wrong size, wrong sha256, a
    link out of the bundle); an empty dict means the bundle is intact. Files recorded as verified with
    an unchanged stat are skipped unless `full`. The record is updated with what hashed correctly."""
    root = Path(bundle.path)
    digest = manifest_digest(root)
    record = _load_record(root, digest)
    bad, good = check_files(root, bundle.files, names, known=None if full else record, progress=progress,
                            workers=workers)
    if names is not None:  # keep what was recorded for files outside this check
        merged = {k: v for k, v in record.items() if k not in bad}
        merged.update(good)
        good = merged
    _save_record(root, digest, good)
    return bad
