"""Strict JSON, the way every flashmoe reader must parse it: no NaN/Infinity, bounded nesting and size, a
BundleError naming the file instead of a traceback."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from flashmoe.errors import BundleError

MAX_MANIFEST_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, strings skipped (no recursion, numpy-fast)."""
    import numpy as np

    b = np.frombuffer(_STRING.sub("", text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    step = (b == ord("[")).astype(np.int32) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
    return int(np.cumsum(step).max()) if step.size else 0


def load_json(raw: bytes | str, where: str | os.PathLike, what: str = "file", fix: str = "") -> object:
    """Parse JSON strictly: NaN/Infinity and nesting deeper than MAX_JSON_DEPTH are errors. Raises
    BundleError("WHERE: <what> is not valid JSON (...); FIX")."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        if _depth(text) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BundleError(f"{where}: {what} is not valid JSON ({msg}){'; ' + fix if fix else ''}") from None


def read_json_file(path: Path, what: str, fix: str, limit: int = MAX_MANIFEST_BYTES) -> object:
    """A JSON file of bounded size, strictly parsed; every failure is one BundleError naming the file."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise BundleError(f"{path}: {what} is {size} bytes, larger than any valid one; {fix}")
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BundleError(f"{path}: {what} is a directory; {fix}") from None
    except OSError as e:
        raise BundleError(f"{path}: cannot read {what} ({e.strerror or e}); {fix}") from None
    return load_json(raw, path, what, fix)
