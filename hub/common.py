"""Shared pieces of flashmoe.hub: the error type, retry policy, patterns and quiet progress bars."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import stat
import threading
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

log = logging.getLogger("flashmoe.hub")
T = TypeVar("T")

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


from flashmoe.errors import BundleError


class HubError(BundleError):
    """A Hub operation failed in a way the user can act on; the message says how. Never holds a token.
    A BundleError, so callers that report BundleError as a user error (flashmoe-run) do the same here."""


# Seconds. Every flashmoe Hub operation runs under network_timeout(), so that no request waits forever on a
# Hub that accepts connections and never answers (huggingface_hub's own client has no default timeout).
RESOLVE_TIMEOUT_CACHED = 3.0  # resolving a revision when a verified local copy exists: then use it
DOWNLOAD_TIMEOUT = 10.0  # metadata calls of pulls and conversions (file bodies: huggingface_hub's 10 s)
UPLOAD_TIMEOUT = 60.0  # publish: a commit of many files can take the Hub a while to answer
CONNECT_TIMEOUT = 10.0


@contextmanager
def network_timeout(read: float) -> Iterator[None]:
    """Bound every request huggingface_hub's shared HTTP client sends for the duration: connect at most
    CONNECT_TIMEOUT, then at most `read` seconds between bytes (also for the calls that huggingface_hub makes
    with an explicit `timeout=None`, such as snapshot_download's repo_info): a request hook caps the
    request's own timeouts."""
    from huggingface_hub.utils import get_session

    limits = {"connect": min(read, CONNECT_TIMEOUT), "read": read, "write": read, "pool": read}

    def cap(request) -> None:
        own = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: lim if own.get(k) is None else min(own[k], lim) for k, lim in limits.items()}

    hooks = get_session().event_hooks["request"]
    hooks.append(cap)
    try:
        yield
    finally:
        hooks.remove(cap)


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def file_patterns(names: list[str]) -> list[str]:
    """allow_patterns (fnmatch) that match exactly these paths."""
    def esc(n: str) -> str:
        return "".join(f"[{c}]" if c in "*?[]" else c for c in n)

    return [esc(n) for n in names]


def quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *a, **k):
            k["disable"] = True
            super().__init__(*a, **k)

    return Quiet


def is_transient(exc: BaseException) -> bool:
    """Network trouble or a 5xx/429 from the Hub anywhere in the exception chain (huggingface_hub wraps
    upload failures in RuntimeError)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, HfHubHTTPError):
            r = getattr(e, "response", None)
            return r is not None and r.status_code in TRANSIENT_STATUS
        if isinstance(e, (httpx2.TransportError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def with_retries(fn: Callable[[], T], what: str, retries: int, backoff: float, progress: bool = True,
                 note: str = "already-uploaded files are not sent again") -> T:
    """Run fn; on a transient error wait (backoff * 2**k, at most 60 s) and run it again, `retries`
    attempts in all. Uploads are idempotent: objects already on the Hub are not sent again."""
    retries = max(1, int(retries))
    for attempt in range(1, retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not is_transient(e):
                raise
            wait = min(backoff * 2 ** (attempt - 1), 60.0)
            msg = (f"{what} failed (attempt {attempt}/{retries}: {type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                   f"retrying in {wait:.0f} s{', ' + note if note else ''}")
            if progress:  # once: printed, or (quiet) only logged at a level no default handler shows
                print(f"flashmoe-publish: {msg}", file=sys.stderr, flush=True)
            else:
                log.info(msg)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---- paths and files in a user's directory ----------------------------------------------------------------
def looks_like_path(s: str) -> bool:
    """An argument that names a local path, never a Hub repo id: it exists here, starts with `.`, `/` or `~`,
    has more than one slash, or holds this system's own separator."""
    return (os.path.lexists(os.path.expanduser(s)) or s.startswith((".", "/", "~")) or s.count("/") > 1
            or (os.sep != "/" and os.sep in s))


def write_new(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` the one safe way: a fresh file under a temporary name in the same directory
    (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file, never through a link), fsync'd, then renamed over
    `path` (a link there is replaced, its target never touched). On any error the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def unlink_links(root: Path, rel: str) -> None:
    """Remove every link on the way from `root` to `root/rel` (the path itself or a folder on the way),
    never following one, so that nothing later written at `rel` can land outside `root`."""
    p = Path(root)
    for part in Path(rel).parts:
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            p.unlink()
            return
        if not stat.S_ISDIR(st.st_mode):
            return


def place(src: Path, root: Path, rel: str) -> None:
    """Move `src` (a file of ours) to `root/rel` by rename: the folders on the way are made real ones (a link
    among them is removed first) and whatever is at `rel` is replaced, never opened or followed."""
    unlink_links(root, rel)
    dest = Path(root) / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(dest) and not os.path.islink(dest):
        raise HubError(f"{dest} is a directory where the bundle has a file; remove it and re-run")
    os.replace(src, dest)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be: a resumable job stops the same way."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread, so that a resumable
    command (batch, pull, publish) ends as on Ctrl-C: finish the line being written, say how to resume."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (a write and its fsync finish whole), then take effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
