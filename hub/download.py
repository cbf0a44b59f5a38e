"""Download a bundle from the Hub and verify it against its manifest, repairing what does not match.

huggingface_hub checks only file sizes on download; the manifest (flashmoe.json) lists a sha256 for
every file, so after `snapshot_download` every file is hashed (in parallel) and a file that does not
match is named, deleted and downloaded again. A file that still does not match after the repairs is
deleted too (never used) and the pull fails, naming it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

from flashmoe.format import verify as _verify
from flashmoe.format.bundle import Bundle
from flashmoe.format.jsonio import read_json_file
from flashmoe.format.manifest import MANIFEST, validate_manifest
from flashmoe.format.paths import inside
from flashmoe.errors import BundleError

from .common import (DOWNLOAD_TIMEOUT, RESOLVE_TIMEOUT_CACHED, HubError, file_patterns, looks_like_path,
                     network_timeout, offline, place, quiet_tqdm, unlink_links, with_retries, write_new)

log = logging.getLogger("flashmoe.hub")

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
EXTRA_FILES = [MANIFEST, "README.md"]


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
    log.info(msg)


def _not_found_message(repo_id: str, token_sent: bool) -> str:
    msg = (f"{repo_id}: repository not found on the Hub, or it is private and "
           + ("the token sent does not give access to it." if token_sent else "no token was sent."))
    return msg + (" Check the repo id; for a private repo log in with `hf auth login` or set HF_TOKEN to a token "
                  "with read access to it.")


def _storage_folder(cache_dir: str | None, repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    return root / repo_folder_name(repo_id=repo_id, repo_type="model")


def _resolve_commit(api, repo_id: str, revision: str, cache_dir: str | None, local_dir: Path | None,
                    token_sent: bool, timeout: float) -> tuple[str | None, Exception | None]:
    """(commit sha, None) from the Hub, or (sha from the local cache or None, the connection error). With a
    local copy at hand the Hub gets RESOLVE_TIMEOUT_CACHED seconds and one try; without, `timeout` and
    bounded retries. Under HF_HUB_OFFLINE the Hub is not asked."""
    import httpx2
    from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    local = _local_commit(revision, cache_dir, local_dir, repo_id)
    have_copy = local is not None or (local_dir is not None and (local_dir / MANIFEST).is_file())
    if offline():
        return local, OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
    t = min(timeout, RESOLVE_TIMEOUT_CACHED) if have_copy else timeout
    try:
        return with_retries(lambda: api.repo_info(repo_id, revision=revision, timeout=t).sha, "resolve revision",
                            1 if have_copy else 3, 1.0, progress=False, note=""), None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} (branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise HubError(_not_found_message(repo_id, token_sent)) from None
    except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as e:
        if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
            raise HubError(_not_found_message(repo_id, token_sent)) from None
        return local, e  # offline / Hub unreachable: fall back to what is on disk


def _local_commit(revision: str, cache_dir: str | None, local_dir: Path | None, repo_id: str) -> str | None:
    """The commit `revision` names in the local cache, if the cache knows it."""
    if COMMIT_RE.match(revision):
        return revision
    if local_dir is None:
        ref = _storage_folder(cache_dir, repo_id) / "refs" / revision
        if ref.is_file():
            sha = ref.read_text().strip()
            return sha if COMMIT_RE.match(sha) else None
    return None


def _write_ref(cache_dir: str | None, repo_id: str, revision: str, commit: str) -> None:
    if COMMIT_RE.match(revision):
        return
    ref = _storage_folder(cache_dir, repo_id) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_new(ref, commit.encode())
    except OSError as e:  # a read-only cache still works online
        log.warning("could not record %s -> %s in the cache: %s", revision, commit, e)


def _discard(path: Path, root: Path) -> None:
    """Delete a local copy so it can never be used. In the HF cache the snapshot entry is a link into the
    repo's blobs/, and both go; a link that leads anywhere else (out of `root`'s repo folder, or any link in
    a -o directory) is removed itself and its target is never touched."""
    try:
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            path.unlink()
            if root.parent.name == "snapshots" and inside(target, root) and target.is_file():
                target.unlink()
        elif path.exists():
            path.unlink()
    except OSError as e:
        log.warning("could not delete %s: %s", path, e)


def _read_manifest(path: Path, where: str) -> dict:
    try:
        m = read_json_file(path, "the manifest", "the published bundle is corrupt")
        validate_manifest(m, where)
    except BundleError as e:
        raise HubError(str(e)) from None
    return m


def pull_bundle(repo_id: str, *, revision: str | None = None, local_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                endpoint: str | None = None, progress: bool = True, full_verify: bool = False,
                max_repairs: int = 2, max_workers: int = 8, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Download bundle `repo_id` (at `revision`, default main) and verify it; returns its directory.

    Without `local_dir` the files go into the Hugging Face cache (HF_HUB_CACHE) and the returned path
    is the snapshot folder (symlinks into blobs/). Only the files the manifest lists, the manifest
    and README.md are downloaded. A pull of a bundle that is already complete and verified makes one
    small API call (to resolve the revision) and hashes nothing. `full_verify` re-hashes every file.
    No request waits longer than `timeout` seconds (huggingface_hub's file transfers: its own 10 s); with a
    local copy the Hub gets a few seconds to answer, then the copy is used. HF_HUB_OFFLINE: no request.
    """
    with network_timeout(timeout):
        return _pull(repo_id, revision, local_dir, cache_dir, token, endpoint, progress, full_verify, max_repairs,
                     max_workers, timeout)


def _pull(repo_id, revision, local_dir, cache_dir, token, endpoint, progress, full_verify, max_repairs, max_workers,
          timeout) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import get_token

    if not REPO_ID_RE.match(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id (expected NAMESPACE/NAME)")
    revision = revision or "main"
    local_dir = Path(local_dir).expanduser().resolve() if local_dir is not None else None
    cache_dir = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")  # explicit everywhere below
    api = HfApi(endpoint=endpoint, token=token)
    token_sent = bool(token) if token is not None else get_token() is not None
    tqdm_class = None if progress else quiet_tqdm()

    commit, offline_error = _resolve_commit(api, repo_id, revision, cache_dir, local_dir, token_sent, timeout)
    if offline_error is not None and local_dir is not None:
        commit = None  # the Hub cannot be reached: -o DIR is used as it is (verified below), if it is a bundle
    if commit is None:
        if local_dir is not None and (local_dir / MANIFEST).is_file():
            commit = None  # use the local copy as it is (verified below)
        else:
            raise HubError(f"cannot reach the Hub ({type(offline_error).__name__}: {offline_error}) and there is no "
                           f"downloaded copy of {repo_id}@{revision}; connect and re-run") from None
    # huggingface_hub writes only into the cache or into our private staging folder of -o DIR (it opens an
    # existing file for writing when it copies a cached blob); files reach DIR by rename, links never followed
    stage = _stage(local_dir) if local_dir is not None and commit is not None else None
    common = dict(repo_id=repo_id, endpoint=endpoint, token=token, cache_dir=cache_dir,
                  local_dir=str(stage) if stage else None)
    try:
        if commit is None:
            manifest_path = local_dir / MANIFEST
        else:
            manifest_path = Path(hf_hub_download(filename=MANIFEST, revision=commit, tqdm_class=tqdm_class,
                                                 local_files_only=offline_error is not None, **common))
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError)
        raise HubError(f"cannot download {MANIFEST} of {repo_id}@{revision} ({offline_error or e.__cause__ or e}) and "
                       "it is not in the local cache; check the connection and re-run") from None
    except EntryNotFoundError:
        raise HubError(f"{repo_id}@{commit[:12]} has no {MANIFEST}: it is not a flashmoe bundle, or its upload did "
                       "not finish (flashmoe-publish commits the manifest last)") from None
    manifest = _read_manifest(manifest_path, f"{repo_id}@{(commit or 'local')[:12]}")
    names = sorted(f["path"] for f in manifest["files"])
    bundle_dir = local_dir if local_dir is not None else manifest_path.parent
    bundle = Bundle(bundle_dir, manifest)
    # -o DIR: only the files DIR lacks (or holds wrong) are fetched; its manifest goes last, after every file
    need, checked = (names, False) if stage is None else _missing_in_dir(bundle, manifest_path, names, full_verify)

    def land(files: list[str]) -> None:  # staged files -> DIR (nothing to do for the cache)
        if stage is not None:
            for n in files:
                if (stage / n).is_file():
                    place(stage / n, local_dir, n)

    if commit is not None and need:
        try:
            snapshot_download(revision=commit, allow_patterns=file_patterns(need + EXTRA_FILES),
                              max_workers=max_workers, tqdm_class=tqdm_class,
                              local_files_only=offline_error is not None, **common)
        except LocalEntryNotFoundError as e:
            raise HubError(f"cannot reach the Hub ({offline_error or e.__cause__ or e}) and the local copy of "
                           f"{repo_id}@{revision} is incomplete; connect and re-run to finish it") from None
        except EntryNotFoundError as e:
            raise HubError(f"{repo_id}@{commit[:12]}: a file the manifest lists is missing from the repo ({e}); "
                           "the published bundle is incomplete: ask the publisher to re-run flashmoe-publish") from None
    land(need + ["README.md", MANIFEST])
    if local_dir is None and commit is not None:
        _write_ref(cache_dir, repo_id, revision, commit)

    bad = _verify.verify(bundle, full=full_verify, progress=progress, names=need if checked else None)
    attempt = 0
    while bad and commit is not None and offline_error is None and attempt < max_repairs:
        attempt += 1
        for n, why in sorted(bad.items()):
            _say(f"flashmoe-pull: {n}: {why}; re-downloading it (repair {attempt}/{max_repairs})", progress)
            _discard(bundle_dir / n, bundle_dir)
            try:
                hf_hub_download(filename=n, revision=commit, force_download=True, tqdm_class=tqdm_class, **common)
            except EntryNotFoundError:
                pass  # reported below as missing
        land(sorted(bad))
        bad = _verify.verify(bundle, names=sorted(bad), full=True, progress=progress)
    if bad:
        for n in bad:
            _discard(bundle_dir / n, bundle_dir)
        listing = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items()))
        if commit is None or offline_error is not None:
            hint = "the Hub cannot be reached to repair them; connect and re-run flashmoe-pull"
        else:
            hint = (f"still wrong after re-downloading {max_repairs} time(s), so the copy on the Hub is corrupt. "
                    "The bad files were deleted, not used; ask the publisher to re-run flashmoe-publish")
        raise HubError(f"{repo_id}@{(commit or revision)[:12]}: {len(bad)} file(s) do not match the manifest: "
                       f"{listing}. {hint}")
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    return bundle_dir


STAGE = ".flashmoe-pull"  # in -o DIR: the only folder huggingface_hub writes into


def _stage(local_dir: Path) -> Path:
    local_dir.mkdir(parents=True, exist_ok=True)
    unlink_links(local_dir, STAGE)
    stage = local_dir / STAGE
    stage.mkdir(mode=0o700, exist_ok=True)
    return stage


def _missing_in_dir(bundle: Bundle, staged_manifest: Path, names: list[str], full: bool) -> tuple[list[str], bool]:
    """The manifest files -o DIR lacks or holds wrong, and whether the others are verified (recorded) now.
    Links in DIR are removed, never followed. The same manifest already in DIR: its verified record makes
    this instant; another (or none): DIR's manifest goes first, so an interrupted pull never leaves DIR
    looking like a bundle, and what is there is hashed."""
    root = Path(bundle.path)
    for n in names + EXTRA_FILES:
        unlink_links(root, n)
    here = root / MANIFEST
    if here.is_file() and here.read_bytes() == staged_manifest.read_bytes():
        return sorted(_verify.verify(bundle, full=full, progress=False)), True
    here.unlink(missing_ok=True)
    return sorted(_verify.check_files(root, bundle.files)[0]), False


def resolve_bundle(path_or_repo_id: str | os.PathLike, revision: str | None = None, **kwargs) -> Path:
    """What flashmoe-run / flashmoe.load accept: a local bundle directory (returned as it is) or a Hub
    repo id NAMESPACE/NAME (pulled into the Hugging Face cache, verified, and its snapshot directory
    returned). Keyword arguments go to `pull_bundle` (local_dir, cache_dir, token, progress, ...)."""
    s = os.fspath(path_or_repo_id)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise HubError(f"{p} is a file, not a bundle directory; give the directory flashmoe-convert -o wrote, "
                           "or a Hub repo id NAMESPACE/NAME")
        return p
    if looks_like_path(s) or not REPO_ID_RE.match(s):
        raise HubError(f"no such bundle directory: {s} (a path, not a Hub repo id NAMESPACE/NAME). "
                       f"Convert one with `flashmoe-convert SOURCE -o {s}` or pull one with `flashmoe-pull REPO_ID`.")
    return pull_bundle(s, revision=revision, **kwargs)
