"""Shared pieces of flashmoe.hub: the error type, retry policy, patterns and quiet progress bars."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable, TypeVar

log = logging.getLogger("flashmoe.hub")
T = TypeVar("T")

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


from flashmoe.format.errors import BundleError


class HubError(BundleError):
    """A Hub operation failed in a way the user can act on; the message says how. Never holds a token.
    A BundleError, so callers that report BundleError as a user error (flashmoe-run) do the same here."""


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


def with_retries(fn: Callable[[], T], what: str, retries: int, backoff: float, progress: bool = True) -> T:
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
                   f"retrying in {wait:.0f} s, already-uploaded files are not sent again")
            log.warning(msg)
            if progress:
                print(f"flashmoe-publish: {msg}", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")
