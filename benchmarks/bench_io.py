"""Expert read throughput: pread (os.preadv straight into the MLX slot buffers) vs mmap (copy out of a
read-only mapping, then MADV_DONTNEED), through the runtime's own ExpertReader read path.

Writes synthetic layer files with the real Qwen3.5-397B-A17B record layout (4-bit, G=64, bf16 scales:
6.75 MiB per expert) and reads K random experts per layer per "token", like decode does.

    python benchmarks/bench_io.py [--dir /tmp/flashmoe-bench-io] [--experts 128] [--layers 4] [--tokens 20]

"cold" evicts the files from the page cache (posix_fadvise DONTNEED) before every token, so each read
goes to the device; "warm" reads from the page cache (memory bandwidth + syscall/fault overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flashmoe.format import ExpertFile, ExpertFileWriter, ExpertQuant
from flashmoe.format.experts import make_info
from flashmoe.format.layout import expert_components
from flashmoe.runtime.expert_cache import ExpertCache
from flashmoe.runtime.reader import ExpertReader


def make_files(root: Path, layers: int, experts: int, H: int, I: int, bits: int) -> list[Path]:
    q = ExpertQuant(bits, 64, "bfloat16")
    comps = expert_components(H, I, q)
    paths = []
    rng = np.random.default_rng(0)
    for L in range(layers):
        p = root / f"layer-{L:03d}.bin"
        info = make_info(L, experts, comps)
        if not p.exists() or p.stat().st_size != info.file_size:
            w = ExpertFileWriter(p, info)
            for _ in range(experts):
                w.write_record({c.name: rng.integers(0, 1 << 16, c.nbytes // 2, dtype=np.uint16)
                                .view(np.uint32 if c.dtype == "uint32" else np.uint16).reshape(c.shape)
                                for c in comps})
            w.close()
        paths.append(p)
    return paths


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run(paths, io: str, k: int, tokens: int, cold: bool, seed: int = 0) -> tuple[float, int]:
    files = [ExpertFile(p) for p in paths]
    info = files[0].info
    cfg = SimpleNamespace(num_hidden_layers=len(files), num_experts=info.num_experts, num_experts_per_tok=k)
    shim = SimpleNamespace(config=cfg, expert_quant=None, expert_info=lambda L: info,
                           expert_file=lambda L: files[L])
    s = ExpertReader(shim, io=io)
    cache = ExpertCache(info, k, len(files), info.num_experts)
    rng = np.random.default_rng(seed)
    elapsed, nbytes = 0.0, 0
    for _ in range(tokens):
        if cold:
            evict(paths)
        for L in range(len(files)):
            ids = sorted(rng.choice(info.num_experts, k, replace=False).tolist())
            t0 = time.perf_counter()
            s.read(L, ids, list(range(k)), cache)
            elapsed += time.perf_counter() - t0
            nbytes += k * info.record_size
    s.close()
    return elapsed, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/flashmoe-bench-io")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("-k", type=int, default=10, help="experts per token (397B: 10)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = make_files(root, a.layers, a.experts, 4096, 1024, a.bits)
    rec = ExpertFile(paths[0]).info.record_size
    print(f"{a.layers} layer files x {a.experts} experts x {rec / 2**20:.2f} MiB, K={a.k}, {a.tokens} tokens, "
          f"{os.cpu_count()} CPUs, {sys.platform}")
    for cold in (False, True):
        if not cold:  # warm the page cache
            for p in paths:
                with open(p, "rb") as f:
                    while f.read(64 << 20):
                        pass
        for io in ("pread", "mmap"):
            rates = []
            for r in range(a.repeats):
                t, n = run(paths, io, a.k, a.tokens, cold, seed=r)
                rates.append(n / t / 1e9)
            print(f"{'cold' if cold else 'warm'} {io:5s}: {np.median(rates):6.2f} GB/s median of {a.repeats} "
                  f"({', '.join(f'{x:.2f}' for x in rates)}), {a.k * rec / 2**20:.1f} MiB per layer-read")


if __name__ == "__main__":
    main()
