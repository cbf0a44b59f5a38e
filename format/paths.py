"""Where a bundle's files may lie (format/SPEC.md section 1, "Links"). Every folder between the bundle
directory and a listed file is a real folder, never a link; a listed file may be a link only to a place
inside the bundle (or, for a Hugging Face cache snapshot, inside the repo's cache folder). The reader,
the verifier, flashmoe-convert and flashmoe-pull all apply this one rule: a linked folder is an error
(never repaired through), a file linked out of the bundle is a bad file (replaced, its target untouched)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from flashmoe.errors import BundleError


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


def folder_link(d: Path) -> BundleError:
    """The error for a bundle folder `d` that is a link."""
    return BundleError(f"{d} is a link to {os.path.realpath(d)}; a bundle's folders must be real folders (flashmoe "
                       "never writes or reads through a link inside a bundle). Replace the link with the folder "
                       "itself, or move the whole bundle to the other disk (format/SPEC.md 1)")


def check_folders(root: Path, rel: str) -> None:
    """Raise BundleError if a folder between `root` and its file `rel` is a link."""
    d = Path(root)
    for part in PurePosixPath(rel).parts[:-1]:
        d = d / part
        if d.is_symlink():
            raise folder_link(d)


def link_problem(root: Path, rel: str) -> str | None:
    """Why the bundle file `rel` of `root` must not be read (a link out of the bundle), or None. A folder
    on its way that is a link raises BundleError (check_folders): no tool repairs through it."""
    check_folders(root, rel)
    p = Path(root) / rel
    if p.is_symlink() and not inside(p, root):
        return f"a link to {os.path.realpath(p)}, outside the bundle (never followed)"
    return None
