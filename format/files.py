"""Creating a bundle's files safely: every file is written under a temporary name that is created new
(O_CREAT|O_EXCL|O_NOFOLLOW: never an existing path, never through a link), fsynced, and renamed over
its final name (a rename replaces a link itself, never its target). Directories inside a bundle are real
directories: one that is a link is refused (format/SPEC.md section 1, "Links")."""

from __future__ import annotations

import os
from pathlib import Path

from flashmoe.errors import BundleError

from .paths import folder_link

PARTIAL = ".partial"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def real_dirs(root: Path, rel_dir: str) -> Path:
    """root/rel_dir, each of its folders made if missing; a folder that is a link (or not a folder) is
    refused: flashmoe never writes through a link inside a directory it owns."""
    d = Path(root)
    for part in Path(rel_dir).parts:
        d = d / part
        if d.is_symlink():
            raise folder_link(d)
        if d.exists() and not d.is_dir():
            raise BundleError(f"{d} is a file where a bundle folder belongs; move it away and re-run")
        d.mkdir(exist_ok=True)
    return d


def create_partial(path: Path, mode: int = 0o644):
    """A new, empty `path.partial` opened for binary writing (O_EXCL|O_NOFOLLOW); a stale one of a run
    that died is removed first (unlink removes a link itself, never its target)."""
    tmp = partial_path(path)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    try:
        return os.fdopen(os.open(tmp, _CREATE, mode), "wb")
    except FileExistsError:
        raise BundleError(f"{tmp} appeared while flashmoe was writing it: is another process writing into "
                          f"{path.parent}? Stop it and re-run") from None


def commit_partial(f, path: Path) -> None:
    """Flush, fsync and close `f` (made by create_partial) and rename its file over `path`."""
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
    os.replace(partial_path(path), path)


def abort_partial(f, path: Path) -> None:
    """Close `f` and drop its unfinished file (a full disk gets its space back)."""
    try:
        f.close()
    except OSError:
        pass
    partial_path(path).unlink(missing_ok=True)


def write_file(path: Path, data: bytes) -> None:
    """`data` to `path` by way of a new temporary file and a rename."""
    f = create_partial(path)
    try:
        f.write(data)
    except BaseException:
        abort_partial(f, path)
        raise
    commit_partial(f, path)
