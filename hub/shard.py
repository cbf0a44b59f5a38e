"""Pull one rank's part of a bundle: `flashmoe-pull REPO --shard r/N -o DIR`.

A rank of an expert-parallel run (runtime/distributed.py) reads only the experts e with e % N == r, so
it needs only those records, plus everything else (manifest, config, tokenizer, dense weights).

Layout of a part (decided here; README "Several machines"): the same directory as a whole bundle, with
the same manifest and dense files, and each `experts/layer-NNN.bin` at its full size but *sparse*: its
header and the rank's own records are written, every other record is a hole (no disk blocks, reads as
zeros, never read by that rank). A marker `.flashmoe-shard.json` ({rank, size, manifest_sha256, repo,
commit}), written last, says which part the directory holds; the runtime checks it at start and a rank
given another rank's part, or a part with a file missing, stops with a message naming the rank, the file
and this command. Keeping the whole-bundle file names means one reader, one format and one manifest.

Verification: non-expert files against the manifest's sha256; each layer file's header against the
manifest's layout; each record (fetched with an HTTP Range request) against its CRC-32 in the manifest's
`records.digests` (format/SPEC.md 3.3). A bundle without record digests cannot be checked record by
record, so --shard refuses it (pull it whole instead). Re-running resumes: records an earlier pull left with
the right CRC-32 are copied, not fetched again, into a new file (created with O_EXCL|O_NOFOLLOW and renamed
into place by format.BundleWriter): an existing path, or a link's target, is never opened for writing.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from flashmoe.format import BundleWriter
from flashmoe.format.bundle import Bundle
from flashmoe.format.manifest import MANIFEST, expert_path, write_json_atomic
from flashmoe.format.paths import link_problem
from flashmoe.format.experts import ExpertFile
from flashmoe.format.files import partial_path

from .common import (
    DOWNLOAD_TIMEOUT,
    HubError,
    file_patterns,
    is_transient,
    network_timeout,
    quiet_tqdm,
)

SHARD_MARKER = ".flashmoe-shard.json"  # the runtime reads it too (runtime/distributed.py)
ATTEMPTS = 3  # tries per record (network errors and CRC mismatches)


def parse_shard(text: str) -> tuple[int, int]:
    """'r/N' -> (r, N), with 0 <= r < N."""
    try:
        r, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise HubError(f"--shard {text!r}: give RANK/RANKS, e.g. 0/2 for the first of two machines") from None
    if not (n >= 1 and 0 <= r < n):
        raise HubError(f"--shard {text!r}: the rank must be in 0..RANKS-1 (e.g. 0/2 and 1/2 for two machines)")
    return r, n


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def pull_shard(repo_id: str, rank: int, size: int, local_dir: str | os.PathLike, *, revision: str | None = None,
               token: str | bool | None = None, endpoint: str | None = None, progress: bool = True,
               max_workers: int = 8, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Download and verify rank `rank` of `size`'s part of bundle `repo_id` into `local_dir`; returns it."""
    with network_timeout(timeout):
        return _pull_shard(repo_id, rank, size, Path(local_dir).expanduser().resolve(), revision or "main", token,
                           endpoint, progress, max_workers, timeout)


def _pull_shard(repo_id, rank, size, out: Path, revision, token, endpoint, progress, max_workers, timeout) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        commit = api.repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r} (branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: repository not found on the Hub, or it is private and the token does not give "
                       "access to it; check the repo id, or log in with `hf auth login`") from None
    out.mkdir(parents=True, exist_ok=True)
    tqdm_class = None if progress else quiet_tqdm()
    common = {"repo_id": repo_id, "revision": commit, "endpoint": endpoint, "token": token, "local_dir": str(out)}
    marker = out / SHARD_MARKER
    marker.unlink(missing_ok=True)  # the part is incomplete until the end of this pull

    # 1. the manifest and every file that is not an expert file, checked against their sha256
    mpath = Path(hf_hub_download(filename=MANIFEST, tqdm_class=tqdm_class, **common))
    bundle = Bundle.open(mpath.parent, check_files=False)
    where = f"{repo_id}@{commit[:12]}"
    digests = bundle.manifest.get("records", {}).get("digests") if isinstance(bundle.manifest.get("records"), dict) else None
    if not digests:
        raise HubError(f"{where} has no per-record checksums (converted before flashmoe recorded them), so its "
                       "records cannot be verified one by one: pull it whole (without --shard), or ask the "
                       "publisher to re-convert and re-publish it")
    layers = bundle.config.num_hidden_layers
    experts = {expert_path(layer) for layer in range(layers)}
    others = sorted(n for n in bundle.files if n not in experts)
    snapshot_download(allow_patterns=file_patterns(others + ["README.md"]), max_workers=max_workers,
                      tqdm_class=tqdm_class, **common)
    for n in others:
        why = link_problem(out, n)
        if why:
            raise HubError(f"{out / n}: {why}; flashmoe-pull never writes or reads through such a link: replace it "
                           "with a real file or folder (format/SPEC.md 1) and re-run")
        got = _sha256(out / n)
        if got != bundle.files[n]["sha256"]:
            (out / n).unlink(missing_ok=True)
            raise HubError(f"{where}: {n} does not match the sha256 in its manifest (deleted); re-run to download it "
                           "again, and if it persists the copy on the Hub is corrupt")

    # 2. each layer file: header + this rank's records, into a sparse file
    from huggingface_hub import hf_hub_url

    owned = list(range(rank, bundle.config.num_experts, size))
    info0 = bundle.expert_info(0)
    total = layers * len(owned) * info0.record_size
    _say(f"flashmoe-pull: shard {rank}/{size}: {len(owned)} of {bundle.config.num_experts} experts per layer, "
         f"{total / 1e9:.3f} GB of expert records", progress)
    from tqdm.auto import tqdm

    bw = BundleWriter(out)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"shard {rank}/{size}", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for layer in range(layers):
            rel = expert_path(layer)
            info = bundle.expert_info(layer)
            url = hf_hub_url(repo_id, rel, revision=commit, endpoint=endpoint)
            final = bw.path(rel)  # its folder a real folder (a link there is refused)
            old = _open_earlier(final, info.file_size)  # an earlier pull's file: its good records are kept
            try:
                with bw.random_access(rel, info.file_size) as fd:  # a new file; holes for other ranks' records
                    os.pwrite(fd, _get_range(url, token, 0, info.data_offset, timeout), 0)
                    fetch = partial(_fetch_record, url, token, rel=rel, timeout=timeout)
                    _fill_layer(pool, bar, fd, old, info, digests[layer], owned, fetch)
            finally:
                if old is not None:
                    os.close(old)
            ExpertFile(final, expected=info).close()  # the header agrees with the manifest

    write_json_atomic(marker, {"rank": rank, "size": size, "repo": repo_id, "commit": commit,
                               "manifest_sha256": _sha256(out / MANIFEST)})
    return out


def _open_earlier(final: Path, size: int) -> int | None:
    """A read-only descriptor of what an earlier pull left for this layer file (its unfinished `.partial`,
    else the file itself), or None. Links are never followed (O_NOFOLLOW): a link in the user's directory
    is replaced by the new file, its target left alone."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for p in (partial_path(final), final):
        try:
            fd = os.open(p, flags)
        except OSError:  # missing, or a link (ELOOP)
            continue
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == size:
            return fd
        os.close(fd)
    return None


def _fill_layer(pool, bar, fd: int, old: int | None, info, crcs: str, owned: list[int], fetch) -> None:
    """Write each owned record of one new layer file (open as `fd`) at its offset: copied from `old` (an
    earlier pull's file) when it holds the record with the right CRC-32, else fetched."""
    def one(e: int) -> None:
        want = int(crcs[8 * e : 8 * e + 8], 16)
        off = info.data_offset + e * info.record_stride
        data = os.pread(old, info.record_size, off) if old is not None else b""
        if len(data) != info.record_size or zlib.crc32(data) != want:
            data = fetch(off, info.record_size, want, expert=e)
        os.pwrite(fd, data, off)
        bar.update(info.record_size)

    list(pool.map(one, owned))


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _get_range(url: str, token, start: int, length: int, timeout: float) -> bytes:
    """Bytes [start, start+length) of a Hub file (one Range request; redirects to the CDN followed)."""
    from huggingface_hub.utils import build_hf_headers, get_session

    headers = build_hf_headers(token=token)
    headers["Range"] = f"bytes={start}-{start + length - 1}"
    r = get_session().get(url, headers=headers, follow_redirects=True, timeout=timeout)
    if r.status_code != 206 or len(r.content) != length:
        r.raise_for_status()
        raise HubError(f"{url}: the server ignored the byte range (status {r.status_code}, {len(r.content)} bytes); "
                       "--shard needs a Hub (or mirror) that serves Range requests")
    return r.content


def _fetch_record(url, token, off, size, want, *, rel, expert, timeout) -> bytes:
    last = ""
    for _ in range(ATTEMPTS):
        try:
            data = _get_range(url, token, off, size, timeout)
        except HubError:
            raise
        except Exception as e:
            if not is_transient(e):
                raise
            last = f"{type(e).__name__}: {e}"
            continue
        crc = zlib.crc32(data)
        if crc == want:
            return data
        last = f"CRC-32 {crc:08x}, the manifest says {want:08x}"
    raise HubError(f"{rel}: expert {expert} is still wrong after {ATTEMPTS} downloads ({last}); re-run later, and "
                   "if it persists the copy on the Hub is corrupt")


__all__ = ["SHARD_MARKER", "parse_shard", "pull_shard"]
