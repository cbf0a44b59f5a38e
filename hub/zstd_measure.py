"""Measure what zstandard would save on bundle data: `python -m flashmoe.hub.zstd_measure [BUNDLE]`.

Prints compression ratio and single-thread speed at a few levels for (a) one expert record of the
397B's shape (H=4096, I=1024) quantized to 4 bits with bf16 scales, (b) bf16 dense weights,
(c) a bf16 prompt (KV) cache, and (d) the files of BUNDLE if given. (a)-(c) use synthetic normal
data of realistic scale (this machine has no real checkpoint); the numbers recorded in
hub/README-section.md came from this script.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def measure(name: str, data: bytes, levels=(1, 3, 9)) -> None:
    import zstandard as zstd

    for lv in levels:
        c = zstd.ZstdCompressor(level=lv)
        t = time.perf_counter()
        out = c.compress(data)
        dt = time.perf_counter() - t
        d = zstd.ZstdDecompressor()
        t = time.perf_counter()
        d.decompress(out)
        ddt = time.perf_counter() - t
        print(f"{name:42s} level {lv}: {len(data) / 1e6:8.1f} MB -> saves {100 * (1 - len(out) / len(data)):5.1f} %, "
              f"compress {len(data) / dt / 1e6:6.0f} MB/s, decompress {len(data) / ddt / 1e6:6.0f} MB/s")


def bf16_bytes(a: np.ndarray) -> bytes:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()


def main() -> None:
    rng = np.random.default_rng(0)
    try:
        import mlx.core as mx

        H, I = 4096, 1024
        parts = []
        for shape in ((I, H), (I, H), (H, I)):
            w = mx.array(rng.normal(0, 0.02, shape).astype(np.float32)).astype(mx.bfloat16)
            q, s, b = mx.quantize(w, group_size=64, bits=4)
            parts.append(np.array(q).tobytes())
            parts.append(np.array(s.astype(mx.float32)).astype(np.float32).view(np.uint32).__rshift__(16)
                         .astype(np.uint16).tobytes())
            parts.append(np.array(b.astype(mx.float32)).astype(np.float32).view(np.uint32).__rshift__(16)
                         .astype(np.uint16).tobytes())
        measure("expert record, 4-bit weights only", b"".join(parts[0::3]))
        measure("expert record, 4-bit + bf16 scales/biases", b"".join(parts))
    except ImportError:
        print("mlx not importable: expert record measurement skipped")
    measure("bf16 dense weights (normal, std 0.02)", bf16_bytes(rng.normal(0, 0.02, 16 << 20)))
    kv = rng.normal(0, 1.0, (8192, 512)) * rng.lognormal(0, 1.0, 512)  # per-channel scales, some outliers
    measure("bf16 prompt cache (KV-like activations)", bf16_bytes(kv))
    if len(sys.argv) > 1:
        root = Path(sys.argv[1])
        for sub in ("dense", "experts"):
            data = b"".join(p.read_bytes() for p in sorted((root / sub).glob("*")))
            measure(f"bundle {sub}/ ({root.name})", data, levels=(3,))


if __name__ == "__main__":
    main()
