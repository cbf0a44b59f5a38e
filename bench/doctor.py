"""`flashmoe-bench doctor`: what this machine can run, and at about what speed, before a download of
tens to hundreds of gigabytes.

Measures RAM, free disk, the disk's limit for expert-sized records (bench.method.qd_sweep), the speed at which
MLX's quantized matmul gets through weights at batch 1 on this machine's default device (CPU or GPU),
and the GPU; then for each preset and bit width estimates resident memory (dense weights at 8 bits +
KV/state headroom), disk needed, expert bytes per token, the share of experts the page cache can hold,
and a decode speed that counts both halves of a token's time:

    seconds per token = expert bytes per token x page-cache miss rate / random-read GB/s      (disk)
                      + dense bytes per token / matmul GB/s (8-bit) + expert bytes per token / matmul GB/s
                                                                                               (compute)

Dense bytes per token are every 8-bit matrix a token multiplies (attention, shared experts, routers,
lm_head; not the embedding, which is a row lookup). Reads and compute are added, not overlapped, as the
runtime runs them one after the other per layer. It is an estimate; `flashmoe-bench run` measures.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from flashmoe.format import ExpertQuant, expert_components
from flashmoe.format.layout import record_stride

from . import probe
from .presets import PRESETS, config

HEADROOM = 3 << 30  # OS, Python, MLX, KV cache and buffers


def dense_params(c) -> int:
    H = c.hidden_size
    n = 2 * c.vocab_size * H
    for L in range(c.num_hidden_layers):
        if c.is_linear(L):
            n += H * (c.conv_dim + c.value_dim + 2 * c.linear_num_value_heads) + c.value_dim * H
        else:
            n += H * (2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim)
            n += c.num_attention_heads * c.head_dim * H
        n += 3 * H * c.shared_expert_intermediate_size + H * c.num_experts + H
    return n


def measure_disk(directory: Path, size: int = 1 << 30, record: int = 7 << 20) -> dict | None:
    """The disk's limit for expert-sized records in a scratch file (bench.method.qd_sweep: 1..64 reads in
    flight, O_DIRECT; the pages are also evicted first, for file systems without O_DIRECT). None where
    neither is possible."""
    from .method import qd_sweep

    with tempfile.TemporaryDirectory(dir=directory, prefix="flashmoe-doctor-") as d:
        p = Path(d) / "probe.bin"
        block = os.urandom(16 << 20)
        with open(p, "wb") as f:
            for _ in range(size // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        evicted = probe.evict([p])
        sweep = qd_sweep([p], 0, record, record, size // record, seconds=0.5)
        return sweep if sweep["direct"] or evicted else None


def doctor(directory: str | Path = ".", bits_list=(4, 2)) -> dict:
    import mlx.core as mx

    directory = Path(directory).expanduser()
    ram = probe.ram_bytes()
    free = shutil.disk_usage(directory).free
    t = time.perf_counter()
    sweep = measure_disk(directory)
    rr = sweep["limit_gbps"] if sweep else None
    mm = probe.matmul_gbps(sorted({8, *bits_list}, reverse=True))
    report = {"machine": probe.machine(), "ram_bytes": ram, "free_disk_bytes": free, "disk_dir": str(directory),
              "random_read_gbps": rr, "disk_sweep": sweep, "matmul_gbps": mm, "gpu": mx.default_device() == mx.gpu,
              "probe_seconds": 0.0, "presets": []}
    for name in PRESETS:
        c = config(name)
        dense = dense_params(c) + c.num_hidden_layers * c.hidden_size * 64  # 8-bit dense (1 byte/param) + scales
        for bits in bits_list:
            stride = record_stride(expert_components(c.hidden_size, c.moe_intermediate_size,
                                                     ExpertQuant(bits, 64, "bfloat16")))
            experts = stride * c.num_experts * c.num_hidden_layers
            per_token = stride * c.num_experts_per_tok * c.num_hidden_layers
            cache = max(0, ram - dense - HEADROOM)
            hit = min(1.0, cache / experts)
            fits = ram >= dense + HEADROOM
            disk_ok = free >= dense + experts
            tps = None
            io_s = per_token * (1.0 - hit) / (rr * 1e9) if rr else None
            matmul_dense = (dense - c.vocab_size * c.hidden_size) * (1 + 4 / 64)  # 8-bit codes + bf16 scales/biases
            compute_s = matmul_dense / (mm[8] * 1e9) + per_token / (mm[bits] * 1e9)
            if rr is not None and fits:
                miss = max(1.0 - hit, 1e-3)
                tps = rr * 1e9 / (per_token * miss)
            report["presets"].append({
                "preset": name, "bits": bits, "dense_gb": dense / 1e9, "experts_gb": experts / 1e9,
                "expert_gb_per_token": per_token / 1e9, "cache_share": hit, "fits_ram": fits, "fits_disk": disk_ok,
                "io_bound_tok_s": tps, "disk_s_per_token": io_s, "compute_s_per_token": compute_s,
                "estimated_tok_s": 1.0 / (io_s + compute_s) if io_s is not None else 1.0 / compute_s,
            })
    report["probe_seconds"] = time.perf_counter() - t
    return report


def format_report(r: dict) -> str:
    mm = r.get("matmul_gbps") or {}
    lines = [f"machine     {r['machine']}",
             f"memory      {r['ram_bytes'] / 2**30:.0f} GiB RAM",
             f"disk        {r['free_disk_bytes'] / 1e9:.0f} GB free in {r['disk_dir']}; "
             + (f"{r['random_read_gbps']:.2f} GB/s reading expert-sized records at random from the disk "
                f"(best of 1-64 reads in flight)"
                if r["random_read_gbps"] else "read speed not measurable here (pages cannot be evicted; run "
                "`sudo purge`, then flashmoe-bench run)"),
             f"compute     {'the GPU' if r['gpu'] else 'the CPU'} multiplies one token by quantized weights at "
             + ", ".join(f"{v:.1f} GB/s ({b}-bit)" for b, v in sorted(mm.items(), reverse=True)),
             f"gpu         {'yes (MLX GPU backend)' if r['gpu'] else 'no: MLX runs on the CPU'}", "",
             "Estimated decode speed counts both reading experts from the disk (what the page cache cannot hold)",
             "and the arithmetic of every weight a token touches, one after the other.", "",
             f"{'preset':<20}{'bits':>5}{'dense GB':>10}{'experts GB':>12}{'GB/token':>10}{'cached':>8}  verdict"]
    for p in r["presets"]:
        if not p["fits_ram"]:
            verdict = "no: dense weights do not fit in RAM"
        elif not p["fits_disk"]:
            verdict = f"no: needs {p['dense_gb'] + p['experts_gb']:.0f} GB of free disk"
        else:
            io, comp = p.get("disk_s_per_token"), p["compute_s_per_token"]
            if io is None:
                verdict = (f"yes, <= {p['estimated_tok_s']:.2f} tok/s from compute alone ({comp:.2f} s per token; "
                           "disk speed unknown)")
            else:
                bound = "compute-bound" if comp >= io else "disk-bound"
                verdict = (f"yes, about {p['estimated_tok_s']:.2f} tok/s ({bound}: {io:.2f} s disk + {comp:.2f} s "
                           "compute per token)")
        lines.append(f"{p['preset']:<20}{p['bits']:>5}{p['dense_gb']:>10.1f}{p['experts_gb']:>12.1f}"
                     f"{p['expert_gb_per_token']:>10.3f}{p['cache_share']:>8.0%}  {verdict}")
    return "\n".join(lines)
