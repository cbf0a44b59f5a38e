"""The machine's raw limits, measured on the same files and in the same run as the decode benchmark:
sequential reads (cold: pages evicted first; warm: from the page cache; the disk's limit for expert
records is bench.method.qd_sweep),
memory bandwidth (CPU copy, and the GPU's own when MLX has one), and how many bytes really came from
the disk (page-cache hit rate).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np


def can_evict() -> bool:
    return hasattr(os, "posix_fadvise")


def evict(paths) -> bool:
    """Drop the files' pages from the OS page cache (Linux: posix_fadvise DONTNEED). False where the OS
    offers no such call (macOS: run `sudo purge` before a cold run instead)."""
    if not can_evict():
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def disk_read_bytes() -> int | None:
    """Bytes this process has made the storage layer fetch (Linux /proc/self/io read_bytes); None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def seq_read(paths, chunk: int = 16 << 20) -> float:
    """GB/s reading whole files in order."""
    buf = bytearray(chunk)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - t) / 1e9


def cpu_mem_bandwidth(nbytes: int = 512 << 20) -> float:
    """GB/s of a large numpy copy, counting bytes read plus bytes written."""
    a = np.ones(nbytes // 8, dtype=np.float64)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * nbytes / (time.perf_counter() - t) / 1e9)
    return best


def gpu_mem_bandwidth(nbytes: int = 1 << 30) -> float | None:
    """GB/s of a large device-side copy through MLX (read + write), or None without a GPU."""
    import mlx.core as mx

    if mx.default_device() != mx.gpu:
        return None
    a = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b = a + 0.0
        mx.eval(b)
        best = max(best, 2 * nbytes / (time.perf_counter() - t) / 1e9)
        del b
    return best


def matmul_gbps(bits_list=(8, 4, 2), rows: int = 2048, cols: int = 4096, n: int = 4, reps: int = 3) -> dict[int, float]:
    """GB/s of quantized weights that MLX's quantized matmul gets through at batch 1 (one token), per bit
    width, on MLX's default device: the speed at which decode can touch weights once they are in memory.
    `n` matrices of rows x cols are cycled so that they do not stay in the CPU's caches."""
    import mlx.core as mx

    gpu = mx.default_device() == mx.gpu
    x = mx.random.normal((1, cols)).astype(mx.bfloat16 if gpu else mx.float32)  # the runtime's activation dtype
    out = {}
    for bits in bits_list:
        ws = [((mx.random.randint(0, 1 << 16, (rows, cols * bits // 32)).astype(mx.uint32) << 16)  # random codes
               | mx.random.randint(0, 1 << 16, (rows, cols * bits // 32)).astype(mx.uint32),
               mx.full((rows, cols // 64), 0.01, x.dtype), mx.full((rows, cols // 64), -0.05, x.dtype))
              for _ in range(n)]
        mx.eval(ws, x)
        nbytes = sum(q.nbytes + s.nbytes + b.nbytes for q, s, b in ws)
        mx.eval([mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits) for q, s, b in ws])
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval([mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=bits) for q, s, b in ws])
            best = min(best, time.perf_counter() - t)
        out[bits] = nbytes / best / 1e9
        del ws
    return out


def peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def machine() -> str:
    import mlx.core as mx

    dev = str(mx.default_device())
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {ram_bytes() / 2**30:.0f} GiB RAM, MLX {mx.__version__} on {dev}"


def file_list(bundle) -> list[Path]:
    from flashmoe.format import expert_path

    return [bundle.path / expert_path(L) for L in range(bundle.config.num_hidden_layers)]
