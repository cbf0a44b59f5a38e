"""Where a bundle's files may lie (format/SPEC.md section 1, "Links"). Every folder between the bundle
directory and a listed file is a real folder, never a link; a listed file may be a link only to a place
inside the bundle (or, for a Hugging Face cache snapshot, inside the repo's cache folder). The reader,
the verifier, flashmoe-convert and flashmoe-pull all apply this one rule."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath


def containment_root(root: Path) -> Path:
    """The directory no file of `root` may resolve outside: `root` itself, or for a Hugging Face cache
    snapshot (REPO/snapshots/COMMIT, whose files are links into REPO/blobs) the repo's cache folder."""
    real = Path(os.path.realpath(root))
    if real.parent.name == "snapshots":
        return real.parent.parent
    return real


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every link followed, stays inside containment_root(root)."""
    try:
        Path(os.path.realpath(path)).relative_to(containment_root(root))
        return True
    except ValueError:
        return False


def link_problem(root: Path, rel: str) -> str | None:
    """Why the bundle file `rel` of `root` must not be read or written (a folder on its way is a link, or
    the file is a link out of the bundle), or None."""
    d = Path(root)
    for part in PurePosixPath(rel).parts[:-1]:
        d = d / part
        if d.is_symlink():
            return f"its folder {part}/ is a link to {os.path.realpath(d)} (bundle folders must be real folders)"
    p = Path(root) / rel
    if p.is_symlink() and not inside(p, root):
        return f"a link to {os.path.realpath(p)}, outside the bundle (never followed)"
    return None
