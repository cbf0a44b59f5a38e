"""Publish a converted bundle to the Hugging Face Hub.

1. Verify the bundle: manifest structure, sizes, and the sha256 of every file. A bundle that does not
   match its manifest is never published.
2. Create the repo if needed (public unless --private) and the branch if --revision names a new one.
3. Write README.md (the model card) into the bundle; nothing else is added: the converter's output
   is the repo.
4. Upload with HfApi.upload_folder in two steps, so the repo never shows a manifest whose files are
   not all there yet (the same rule as on disk, SPEC section 1): first every file the manifest lists,
   then flashmoe.json and README.md. Each step is retried on transient errors; re-running after an
   interruption resumes, because files and LFS objects already on the Hub are not sent again (with
   hf_xet, huggingface_hub 2.x also commits large folders in several resumable commits).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from flashmoe.format.bundle import Bundle
from flashmoe.format.manifest import MANIFEST
from flashmoe.errors import BundleError

from flashmoe.format import verify as _verify
from .card import CARD_MARKER, card_text
from .common import (UPLOAD_TIMEOUT, HubError, file_patterns, is_transient, network_timeout, offline, with_retries,
                     write_new)

log = logging.getLogger("flashmoe.hub")


def _write_card(bundle: Bundle, repo_id: str, speed: str | None, progress: bool) -> None:
    path = Path(bundle.path) / "README.md"
    if path.is_file() and CARD_MARKER not in path.read_text(errors="replace"):
        if progress:
            print(f"flashmoe-publish: keeping your own {path} as the model card", file=sys.stderr)
        return
    text = card_text(bundle, repo_id, speed)
    if path.is_file() and path.read_text(errors="replace") == text:
        return
    write_new(path, text.encode())


def _auth_error(e: Exception, repo_id: str) -> HubError | None:
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    r = getattr(e, "response", None)
    code = r.status_code if r is not None else None
    if isinstance(e, RepositoryNotFoundError) or code == 404:
        return HubError(f"{repo_id}: repository not found, or the token cannot see it; check the repo id and that "
                        "the token (HF_TOKEN or `hf auth login`) belongs to its owner")
    if isinstance(e, HfHubHTTPError) and code in (401, 403):
        return HubError(f"the Hub refused the token for {repo_id} (HTTP {code}): it is invalid, expired, read-only, or "
                        "cannot write to this namespace. Create a token with write access and run `hf auth login` "
                        "or set HF_TOKEN")
    return None


def _raise_hub_error(e: Exception, repo_id: str, unreachable) -> NoReturn:
    """Raise what `e`, raised by a Hub call, becomes: a refused token or a missing repo its HubError, a
    transient failure HubError(unreachable(why)); any other error itself."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        raise (_auth_error(e, repo_id) or e) from None
    if is_transient(e):
        raise HubError(unreachable(f"{type(e).__name__}: {str(e)[:200]}")) from None
    raise e


def publish_bundle(bundle_dir: str | os.PathLike, repo_id: str, *, private: bool = False,
                   revision: str | None = None, commit_message: str | None = None, token: str | None = None,
                   endpoint: str | None = None, speed: str | None = None, retries: int = 5,
                   backoff: float = 5.0, progress: bool = True, timeout: float = UPLOAD_TIMEOUT):
    """Verify `bundle_dir` and upload it to `repo_id`; returns the final CommitInfo (its .oid is the
    commit that holds the manifest). No request waits longer than `timeout` seconds for an answer, and each
    step is tried at most `retries` times."""
    if offline():
        raise HubError("HF_HUB_OFFLINE is set: publishing needs the Hub. Unset HF_HUB_OFFLINE and re-run")
    with network_timeout(timeout):
        return _publish(bundle_dir, repo_id, private, revision, commit_message, token, endpoint, speed, retries,
                        backoff, progress)


def _publish(bundle_dir, repo_id, private, revision, commit_message, token, endpoint, speed, retries, backoff,
             progress):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    try:
        bundle = Bundle.open(bundle_dir)
    except BundleError as e:
        raise HubError(f"not publishing: {e}") from None
    bad = _verify.verify(bundle, full=True, progress=progress)
    if bad:
        listing = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items()))
        raise HubError(f"not publishing {bundle.path}: {len(bad)} file(s) do not match the manifest: {listing}. "
                       "Re-run flashmoe-convert with the same arguments to repair the bundle")

    from huggingface_hub.utils import get_token

    api = HfApi(endpoint=endpoint, token=token)
    if not (token or get_token()):
        raise HubError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access")
    try:
        if "/" not in repo_id:
            repo_id = f"{with_retries(api.whoami, 'whoami', retries, backoff, progress)['name']}/{repo_id}"
        with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                     "create repo", retries, backoff, progress)
        if revision and revision != "main":
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                         "create branch", retries, backoff, progress)
    except Exception as e:
        _raise_hub_error(e, repo_id, lambda why: f"cannot reach the Hub at {api.endpoint} ({why}) after {retries} "
                                                 "attempt(s); check the connection and re-run")

    _write_card(bundle, repo_id, speed, progress)
    names = sorted(bundle.files)
    summary = commit_message or f"Upload flashmoe bundle ({len(names)} files)"
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        def upload(patterns: list[str], message: str):
            return api.upload_folder(repo_id=repo_id, folder_path=str(bundle.path), revision=revision,
                                     allow_patterns=patterns, commit_message=message, repo_type="model")

        try:
            with_retries(lambda: upload(file_patterns(names), summary), "upload", retries, backoff, progress)
            info = with_retries(lambda: upload(file_patterns([MANIFEST, "README.md"]),
                                               f"{summary}: manifest and model card"),
                                "upload manifest", retries, backoff, progress)
        except Exception as e:
            _raise_hub_error(e, repo_id, lambda why: f"the upload to {repo_id} failed {retries} time(s) ({why}); "
                                                     "re-run the same command to resume it")
    finally:
        if quiet:
            enable_progress_bars()
    return info
