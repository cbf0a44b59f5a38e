"""Cost of the run-path corruption guards (flashmoe.runtime.integrity), on 397B shapes.

    python benchmarks/integrity_overhead.py

* CRC-32 (zlib) of a 397B 4-bit expert record (7,077,888 bytes), 1 thread and N threads (zlib releases
  the GIL), against the first-touch decode reads of one token: K=10 records x 60 layers.
* check_logits on a [1, 248320] row and check_finite on a [1, 4096] hidden state (MLX, this device).
"""

from __future__ import annotations

import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

RECORD = 7_077_888  # SPEC 3.1: the 397B record at 4 bits, group 64, bf16 scales
PER_TOKEN = 10 * 60  # K x layers, every record read for the first time


def crc_rate(threads: int, seconds: float = 2.0) -> float:
    bufs = [np.random.default_rng(i).integers(0, 255, RECORD, dtype=np.uint8) for i in range(max(2, threads))]
    n = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        while time.perf_counter() - t0 < seconds:
            list(ex.map(lambda b: zlib.crc32(memoryview(b)), bufs * 4))
            n += len(bufs) * 4
    return n * RECORD / (time.perf_counter() - t0)


def main() -> None:
    import mlx.core as mx

    from flashmoe.runtime.integrity import check_finite, check_logits

    print(f"device {mx.default_device()}, {os.cpu_count()} cores, zlib {zlib.ZLIB_RUNTIME_VERSION}")
    for t in sorted({1, os.cpu_count() or 1}):
        r = crc_rate(t)
        print(f"crc32 {t} thread(s): {r / 1e9:.2f} GB/s; one 397B token's first-touch records "
              f"({PER_TOKEN} x {RECORD / 2**20:.2f} MiB = {PER_TOKEN * RECORD / 1e9:.2f} GB): {PER_TOKEN * RECORD / r:.3f} s")
    logits = mx.random.normal((1, 248320))
    hidden = mx.random.normal((1, 1, 4096))
    mx.eval(logits, hidden)
    for name, fn, n in (("check_logits [1, 248320]", lambda: check_logits(logits), 200),
                        ("check_finite [1, 4096]", lambda: check_finite(hidden, "layer 0"), 2000)):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        print(f"{name}: {(time.perf_counter() - t0) / n * 1e6:.0f} us")


if __name__ == "__main__":
    main()
