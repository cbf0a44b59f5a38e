"""Corruption checks on the run path: wrong output must never look like output.

Three guards, each cheap where it runs (costs measured in format/SPEC.md section 3.3):

* `RecordVerifier`: the CRC-32 of every expert record (the manifest's optional `records` key, written
  by the converter) is checked the first time this process reads the record; after that the record
  is trusted. ~6-7 GB/s per core with zlib, which releases the GIL, so reader threads verify in parallel.
* `check_dense`: the dense files' sha256 against the manifest at load, through the one verifier and
  its stat-keyed record (`.flashmoe-verified.json`): hashed once, then only stat()ed.
* `check_finite` / `check_logits`: NaN, infinities (and, for logits, constant rows) name the layer and
  the fix instead of producing empty or garbage text.

Every failure is a BundleError that says what is wrong and how to repair it.
"""

from __future__ import annotations

import zlib

import numpy as np

from flashmoe.format import Bundle, BundleError, expert_path


def _fix(bundle_dir) -> str:
    return (f"run `flashmoe-inspect {bundle_dir} --verify` to list the damaged files, then re-run flashmoe-convert "
            "with the same arguments (or flashmoe-pull for a downloaded bundle) to repair them")


class RecordVerifier:
    """Checks each expert record against its CRC-32 once per process.

        verifier = RecordVerifier(bundle)
        verifier.check(layer, expert, buf)   # buf: the record's bytes (>= record_size; numpy, mx, memoryview)

    `enabled` is False for bundles converted before per-record checksums (no `records` key); then
    `check` does nothing. Safe to call from several reader threads: a record two threads verify at
    once is simply hashed twice."""

    def __init__(self, bundle: Bundle):
        self.path = bundle.path
        self.record_size = bundle.expert_info(0).record_size
        digests = bundle.record_digests
        self.enabled = digests is not None
        cfg = bundle.config
        self._want = (np.stack([np.frombuffer(bytes.fromhex(d), dtype=">u4") for d in digests]).astype(np.uint32)
                      if digests else None)
        self._done = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=bool)

    def check(self, layer: int, expert: int, data) -> bool:
        """Verify record (layer, expert) held in `data` unless this process already has. Returns True when
        it hashed now. Raises BundleError naming the layer, the expert and the fix on a mismatch."""
        if self._want is None or self._done[layer, expert]:
            return False
        mv = memoryview(data).cast("B")[: self.record_size]
        if len(mv) != self.record_size:
            raise BundleError(f"layer {layer} expert {expert}: got {len(mv)} bytes to verify, the record has "
                              f"{self.record_size}")
        crc = zlib.crc32(mv)
        if crc != int(self._want[layer, expert]):
            raise BundleError(f"{self.path / expert_path(layer)}: expert {expert} of layer {layer} fails its checksum "
                              f"(CRC-32 {crc:08x}, the manifest says {int(self._want[layer, expert]):08x}): the bundle "
                              f"is corrupt; {_fix(self.path)}")
        self._done[layer, expert] = True
        return True

    @property
    def verified(self) -> int:
        """How many records this process has verified so far."""
        return int(self._done.sum())


def check_dense(bundle: Bundle, progress: bool = False) -> None:
    """sha256 of every dense file (and config.json) against the manifest, via flashmoe.format.verify: the first
    load hashes them (the 397B's ~5-10 GB: seconds), later loads only compare stat() with the record of
    verified files. Raises BundleError naming the files that fail."""
    from flashmoe.format.verify import verify

    names = [n for n in bundle.files if n.startswith("dense/") or n == "config.json"]
    bad = verify(bundle, names=names, progress=progress)
    if bad:
        listing = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items()))
        raise BundleError(f"{bundle.path}: {len(bad)} dense file(s) do not match the manifest ({listing}): the bundle "
                          f"is corrupt; {_fix(bundle.path)}")


def logit_flags(a):
    """Lazy bool [3] for an mx.array a [..., V]: (has NaN, has an infinity, has a row constant along the last
    axis). Evaluate it with something synced anyway (runtime/pipeline.launch packs it into the step's one
    transfer) and call check_logits only when a flag is set."""
    import mlx.core as mx

    a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    constant = mx.any(mx.max(a, axis=-1) == mx.min(a, axis=-1)) if a.shape[-1] > 1 else mx.array(False)
    return mx.stack([mx.any(mx.isnan(a)), mx.any(mx.isinf(a)), constant])


def _flags(x, rows: bool) -> tuple[bool, bool, bool]:
    """(has NaN, has an infinity, has a constant last-axis row) of an mx.array or numpy array, computed
    on the array's own device; one host sync."""
    import mlx.core as mx

    got = logit_flags(x if isinstance(x, mx.array) else mx.array(np.asarray(x))).tolist()
    return bool(got[0]), bool(got[1]), bool(rows and got[2])


def _raise(where: str, what: str):
    raise BundleError(f"{where} produced {what}: the bundle may be corrupt; run `flashmoe-inspect BUNDLE --verify` "
                      "(then re-run flashmoe-convert or flashmoe-pull with the same arguments to repair it)")


def nonfinite(x):
    """A lazy mx scalar, True where `x` holds NaN or an infinity: evaluate it together with something the
    engine syncs anyway (the routing indices) and call check_finite(x, where) only when it is True, so that
    the per-layer guard adds no host round trip of its own."""
    import mlx.core as mx

    return mx.logical_not(mx.all(mx.isfinite(x)))


def check_finite(x, where: str) -> None:
    """Raise BundleError("<where> produced NaN: the bundle may be corrupt; run `flashmoe-inspect BUNDLE
    --verify` ...") if `x` (mx.array or numpy: hidden states, logits) holds NaN or an infinity. `where`
    names the place, e.g. "layer 12"."""
    nan, inf, _ = _flags(x, rows=False)
    if nan or inf:
        _raise(where, "NaN" if nan else "an infinite value")


def check_logits(logits, where: str = "the output layer") -> None:
    """check_finite, and also a row of logits that is constant across the vocabulary (all zero, say), which
    no working model produces: the symptom of zeroed or garbage weights."""
    nan, inf, constant = _flags(logits, rows=True)
    if nan or inf:
        _raise(where, "NaN" if nan else "an infinite value")
    if constant:
        _raise(where, "constant logits (every token equally likely)")
