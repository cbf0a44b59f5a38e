"""How every flashmoe benchmark measures and reports, written once (issue #19's review of the raw files).

* The disk's limit: `qd_sweep`, record-sized O_DIRECT reads (aligned buffers, the bundle's alignment) at
  random records of the bundle's expert files, 1..64 reads in flight; the limit is the best depth's
  GB/s. O_DIRECT bypasses the page cache, so neither the probe nor a runtime reading with io="direct"
  can be served from memory; the report records whether O_DIRECT was in effect.
* Roofline ratios on the bytes the model needed (`roofline`): the records its routes required (the
  runtime's expert_bytes counter, record_size per record fetched); bytes the disk actually delivered
  beyond that (page rounding, read-ahead, pieces) are reported apart, as over-read.
* Every ratio is per pass, reported as median and spread (min-max) over >= MIN_PASSES passes
  (`spread`); never the best pass.
* A figure called a bound is one no measurement can exceed: `check_bound` flags a measurement above
  BOUND_TOLERANCE x its bound (the report carries the flags; tests fail on them).
* Every JSON carries `metadata`: machine, CPU, GPU, disk, date, git commit and the settings in effect,
  read back from the loaded model (cache slots, upload mode, io mode, dtype, K).
* Projections to the full model are checked against a deeper run (`projection_check`).
"""

from __future__ import annotations

import mmap
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

MIN_PASSES = 5
BOUND_TOLERANCE = 1.05
QD_DEPTHS = (1, 2, 4, 8, 16, 32, 64)
ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: a multiple of the logical block size (<= 4096)


# ---- per-pass figures ----------------------------------------------------------------------------
def spread(values, min_passes: int = MIN_PASSES) -> dict:
    """{median, min, max, n, passes} of per-pass values; `enough` says whether n >= min_passes."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "passes": [], "enough": False}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "passes": vals, "enough": len(vals) >= min_passes}


def fmt_spread(s: dict, fmt: str = "{:.2f}") -> str:
    """'1.23 (1.10-1.31, 5 passes)'; a '!' when fewer passes than MIN_PASSES."""
    if not s or s.get("median") is None:
        return "-"
    warn = "" if s["enough"] else f", fewer than {MIN_PASSES}!"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])}, {s['n']} passes{warn})"


# ---- bounds ----------------------------------------------------------------------------------------
def check_bound(name: str, measured: float | None, bound: float | None, tolerance: float = BOUND_TOLERANCE) -> dict:
    """A measurement against something called a bound; `violated` when measured > tolerance x bound
    (then the bound is not one: its method is wrong, or the measurement is)."""
    if measured is None or bound is None or bound <= 0:
        return {"name": name, "measured": measured, "bound": bound, "ratio": None, "violated": False}
    ratio = measured / bound
    return {"name": name, "measured": measured, "bound": bound, "ratio": ratio, "violated": ratio > tolerance}


def violations(checks) -> list[dict]:
    return [c for c in checks if c["violated"]]


# ---- the hardware's own peak, beside MLX's rates ------------------------------------------------------
# dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' datasheets (SXM parts)
HW_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def hardware_peak_flops(gpu: str | None = None) -> float | None:
    """The GPU's dense bf16 peak (FLOP/s) by its name, None when unknown (or no GPU)."""
    gpu = gpu if gpu is not None else gpu_model()
    if not gpu:
        return None
    for name, peak in HW_PEAK_BF16.items():
        if name in gpu:
            return peak
    return None


def expert_flops_per_token(cfg, k: int) -> float:
    """FLOPs of one token's routed experts in one layer: K x (gate and up: 2 x H x I, down: I x H) x 2."""
    return 2.0 * k * 3 * cfg.hidden_size * cfg.moe_intermediate_size


# ---- rooflines on needed bytes -------------------------------------------------------------------------
def roofline(tok_s: float, needed_bytes_per_token: float, disk_gbps: float,
             disk_bytes_per_token: float | None = None) -> dict:
    """Decode tok/s against the disk roofline on the bytes the model needed: disk limit / needed bytes per
    token. `over_read` = bytes the disk delivered / bytes needed - 1 (None where the OS does not count them)."""
    roof = disk_gbps * 1e9 / needed_bytes_per_token if needed_bytes_per_token > 0 and disk_gbps else None
    over = disk_bytes_per_token / needed_bytes_per_token - 1.0 \
        if disk_bytes_per_token is not None and needed_bytes_per_token > 0 else None
    return {"roofline_tok_s": roof, "ratio": tok_s / roof if roof else None, "needed_bytes_per_token": needed_bytes_per_token,
            "disk_bytes_per_token": disk_bytes_per_token, "over_read": over}


# ---- the disk's limit: a queue-depth sweep with O_DIRECT -----------------------------------------------
def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _open(path, direct: bool) -> int:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    return os.open(path, flags)


def direct_supported(path) -> bool:
    """True when `path` can be read with O_DIRECT (Linux, and a file system that allows it)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = _open(path, True)
    except OSError:
        return False
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        buf.close()


def _depth(fds, offsets: list[tuple[int, int]], length: int, depth: int, seconds: float, min_reads: int) -> dict:
    """`depth` threads, each with its own aligned buffer, reading `length` bytes at offsets drawn in turn
    until `seconds` have passed and at least `min_reads` reads are done."""
    lock = threading.Lock()
    state = {"next": 0, "bytes": 0, "reads": 0}
    lat: list[float] = []
    deadline = [0.0]

    def worker():
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        try:
            while True:
                with lock:
                    i = state["next"]
                    if state["reads"] >= min_reads and time.perf_counter() >= deadline[0]:
                        return
                    state["next"] = i + 1
                f, off = offsets[i % len(offsets)]
                t = time.perf_counter()
                n = os.preadv(fds[f], [buf], off)
                dt = time.perf_counter() - t
                with lock:
                    state["bytes"] += n
                    state["reads"] += 1
                    lat.append(dt)
        finally:
            buf.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(depth)]
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    lat.sort()
    return {"depth": depth, "reads": state["reads"], "gbps": state["bytes"] / dt / 1e9,
            "iops": state["reads"] / dt, "latency_ms_median": lat[len(lat) // 2] * 1e3 if lat else None,
            "latency_ms_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else None}


def qd_sweep(paths, data_offset: int, stride: int, size: int, n_records: int, depths=QD_DEPTHS,
             seconds: float = 1.0, min_reads: int = 64, direct: bool = True, seed: int = 0) -> dict:
    """The disk's limit for record reads: random records (`n_records` per file at data_offset + i * stride,
    each `size` bytes rounded up to ALIGN) over every file in `paths`, at each queue depth. With direct
    (O_DIRECT, when the file system allows it) nothing comes from the page cache; without it, evict the
    files first and keep their total above what the OS can cache. Returns {by_depth, limit_gbps,
    best_depth, direct, span_bytes, record_bytes}."""
    paths = [str(p) for p in paths]
    direct = bool(direct and paths and direct_supported(paths[0]))
    if data_offset % ALIGN or (stride % ALIGN and n_records > 1):
        raise ValueError(f"records at offset {data_offset}, stride {stride} are not {ALIGN}-aligned: "
                         "O_DIRECT cannot read them whole")
    length = _aligned(size)
    rng = random.Random(seed)
    offsets = [(rng.randrange(len(paths)), data_offset + rng.randrange(n_records) * stride) for _ in range(65536)]
    fds = [_open(p, direct) for p in paths]
    try:
        rows = [_depth(fds, offsets, length, d, seconds, min_reads) for d in depths]
    finally:
        for fd in fds:
            os.close(fd)
    best = max(rows, key=lambda r: r["gbps"])
    return {"by_depth": rows, "limit_gbps": best["gbps"], "best_depth": best["depth"], "direct": direct,
            "span_bytes": sum(os.path.getsize(p) for p in paths), "record_bytes": size, "read_bytes": length,
            "seconds_per_depth": seconds}


def bundle_qd_sweep(bundle, depths=QD_DEPTHS, seconds: float = 1.0, direct: bool = True, seed: int = 0) -> dict:
    """qd_sweep over a bundle's expert files (every layer's records)."""
    from flashmoe.format import expert_path

    info = bundle.expert_info(0)
    paths = [bundle.path / expert_path(layer) for layer in range(bundle.config.num_hidden_layers)]
    return qd_sweep(paths, info.data_offset, info.record_stride, info.record_size, info.num_experts, depths,
                    seconds=seconds, direct=direct, seed=seed)


def format_sweep(s: dict) -> str:
    cells = ", ".join(f"QD{r['depth']} {r['gbps']:.2f}" for r in s["by_depth"])
    return (f"disk      record reads ({s['record_bytes'] / 2**20:.2f} MiB, {'O_DIRECT' if s['direct'] else 'page cache'})"
            f" at random over {s['span_bytes'] / 1e9:.1f} GB, GB/s by reads in flight: {cells}; "
            f"limit {s['limit_gbps']:.2f} GB/s at QD{s['best_depth']}")


# ---- what was measured where, and with what ------------------------------------------------------------
def _run(cmd, timeout: float = 5.0) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor() or "unknown"


def gpu_model() -> str | None:
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if smi:
        return smi.splitlines()[0]
    try:
        import mlx.core as mx

        if mx.default_device() == mx.gpu:
            info = mx.device_info()
            return str(info.get("device_name") or info.get("architecture") or "gpu")
    except Exception:  # noqa: BLE001 - a backend without device_info
        pass
    return None


def disk_of(path) -> dict:
    """The block device holding `path`: mount source, file system, model and whether it spins."""
    path = os.path.realpath(path)
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            src, mnt, fs = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (src, mnt, fs)
    except OSError:
        return {"path": path}
    out = {"path": path, "device": best[0], "mount": best[1], "fs": best[2]}
    dev = os.path.basename(best[0])
    for name in (dev, dev.rstrip("0123456789"), dev.split("p")[0] if dev.startswith("nvme") else dev):
        sys_dir = Path("/sys/block") / name
        if sys_dir.exists():
            for key, rel in (("model", "device/model"), ("rotational", "queue/rotational")):
                try:
                    out[key] = (sys_dir / rel).read_text().strip()
                except OSError:
                    pass
            break
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    rev = _run(["git", "-C", str(here), "rev-parse", "HEAD"])
    dirty = _run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"])
    return None if rev is None else rev + ("-dirty" if dirty else "")


def settings(model) -> dict:
    """The runtime settings in effect, read back from a loaded model (not from flags or environment)."""
    ex = model.experts
    rc = getattr(model, "runtime_config", None)
    dtype = getattr(model, "compute_dtype", None)
    reader = ex.reader
    return {"expert_slots": ex.slots, "expert_slot_bytes": ex.slots * reader.info.record_stride,
            "upload": str(ex.upload), "io": getattr(reader, "io", getattr(rc, "io", None)),
            "read_threads": getattr(reader, "threads", None),
            "dtype": str(dtype).replace("mlx.core.", "") if dtype is not None else None,
            "experts_per_token": model.experts_per_token, "kernels": getattr(rc, "kernels", None),
            "gpu_cache_gb_asked": getattr(rc, "gpu_cache_gb", None), "slots_asked": getattr(rc, "slots", None),
            "prefetch": "on" if getattr(ex, "prefetcher", None) is not None else "off",
            "prefetch_asked": getattr(rc, "prefetch", None)}


def metadata(bundle_path=None, model=None) -> dict:
    """machine, CPU, GPU, disk (of the bundle), UTC date, git commit and (with a model) its settings."""
    import mlx.core as mx

    from .probe import ram_bytes

    out = {"host": platform.node(), "machine": f"{platform.system()} {platform.machine()}", "cpu": cpu_model(),
           "cpus": os.cpu_count(), "ram_gib": round(ram_bytes() / 2**30, 1), "gpu": gpu_model(),
           "mlx": mx.__version__, "mlx_device": str(mx.default_device()),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}
    if bundle_path is not None:
        out["disk"] = disk_of(bundle_path)
    if model is not None:
        out["settings"] = settings(model)
    return out


# ---- projections, checked ---------------------------------------------------------------------------------
def project_seconds_per_token(per_layer_s: float, head_s: float, layers: int) -> float:
    """Seconds a token takes through `layers` layers at `per_layer_s` each, plus the head."""
    return per_layer_s * layers + head_s


def projection_check(shallow: dict, deep: dict) -> dict:
    """A projection from a shallow run checked against a deeper run of the same shapes and cache size:
    each run is {layers, seconds_per_token (per-pass median), head_s_per_token, expert_bytes_per_token}.
    The shallow run's per-layer time and bytes, scaled to the deep run's layers, against what the deep run
    measured; `time_error` / `bytes_error` = projected / measured - 1."""
    Ls, Ld = shallow["layers"], deep["layers"]
    per_layer = (shallow["seconds_per_token"] - shallow.get("head_s_per_token", 0.0)) / Ls
    proj_s = project_seconds_per_token(per_layer, shallow.get("head_s_per_token", 0.0), Ld)
    proj_b = shallow["expert_bytes_per_token"] / Ls * Ld
    return {"shallow_layers": Ls, "deep_layers": Ld, "projected_seconds_per_token": proj_s,
            "measured_seconds_per_token": deep["seconds_per_token"],
            "time_error": proj_s / deep["seconds_per_token"] - 1.0,
            "projected_expert_bytes_per_token": proj_b, "measured_expert_bytes_per_token": deep["expert_bytes_per_token"],
            "bytes_error": proj_b / deep["expert_bytes_per_token"] - 1.0 if deep["expert_bytes_per_token"] else None}
