"""Shared pieces of flashmoe.hub: the error type, retry policy, patterns and quiet progress bars."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

log = logging.getLogger("flashmoe.hub")
T = TypeVar("T")

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


from flashmoe.format.errors import BundleError


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
            log.warning(msg)
            if progress:
                print(f"flashmoe-publish: {msg}", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")
