"""The 2026-12-03 review of the raw files (issue #19): the figures that did not hold, recomputed from the raw
JSON with bench/method.py's rules, so that every corrected figure on RESULTS.md has a file behind it.

    python benchmarks/review_2026_12.py --out benchmarks/results/2026-12/review.json

* cold single stream: the roofline on the bytes the model needed (the runtime's expert_bytes) instead of
  the bytes read; over-read apart. The old runs' disk figure is the 8-thread random-read probe, which is
  not the disk's limit (the runtime beat it), so even these ratios are against no bound: they are kept as
  upper estimates of the true ratio until `gpu_session.sh disk` measures the limit (QD sweep).
* the 60-layer projection: the 4-layer cold per-layer read time scaled by the extra reads the bench's own
  routing makes over 60 layers with the run's slots (bench.routing.simulated_reads_per_token).
* warm vs mlx-lm: per-pass ratios (median and spread) of the interleaved runs, not the best pass.
* what speculative prefetch would gain in the H200's cold 397B regime, as a curve over recall 0..1.
* the batched prefill's "compute ceiling": MLX's expert block (gather_qmm) with every expert resident, put
  beside the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
SINGLE = ["wave3/h100-single-397b-pinned.json", "wave3/h200b-single-397b-pinned.json",
          "wave3/h100-single-397b-direct.json", "wave3/h200b-single-397b-direct.json",
          "wave3/h100-single-35b-pinned.json", "wave3/h100-single-35b-direct.json"]
WARM = ["wave3/h100-optimistic-35b-interleaved.json", "wave3/h200d-optimistic-35b-interleaved.json"]
PREFILL = "wave3/h200f-batch-397b-calibrated-128.json"
GPU_OF = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200"}


def cold_row(name: str) -> dict:
    from flashmoe.bench import method
    from flashmoe.bench.routing import simulated_reads_per_token

    r = json.loads((RES / name).read_text())
    c, T = r["decode"]["cold"], r["tokens"]
    probe = r["limits"]["rand_read_cold_gbps"]
    needed, disk = c["expert_bytes_per_token"], c["disk_bytes"] / T
    rf = method.roofline(c["tok_s"], needed, probe, disk)
    E = 512 if "397b" in name else 256
    full = 60 if "397b" in name else 40
    k, L, slots = r["experts_per_token"], r["layers"], r["expert_slots"]
    sim = {n: simulated_reads_per_token("uniform", n, E, k, slots, tokens=T, warmup=0) / n for n in (L, full)}
    factor = sim[full] / sim[L]
    io_per_layer = c["expert_io"] / T / L
    adj = 1.0 / (1.0 / c["projected_full_model_tok_s"] + io_per_layer * (factor - 1) * full)
    return {"file": name, "upload": r.get("upload"), "tok_s": c["tok_s"],
            "ratio_on_read_bytes_vs_probe (as published)": r["targets"]["cold_vs_disk_roofline"],
            "ratio_on_needed_bytes_vs_probe": rf["ratio"], "over_read": rf["over_read"],
            "runtime_disk_gbps_during_reads": c["disk_bytes"] / c["expert_io"] / 1e9, "probe_gbps": probe,
            "projected_full_tok_s (as published)": c["projected_full_model_tok_s"],
            "simulated_read_factor": factor, "projected_full_tok_s_read_adjusted": adj}


def warm_row(name: str) -> dict:
    from flashmoe.bench import method

    r = json.loads((RES / name).read_text())
    per = [a / b for a, b in zip(r["runs"]["generate"], r["runs"]["mlx-lm"])]
    return {"file": name, "best_pass (as published)": max(per), "per_pass": method.spread(per)}


def prefill_row() -> dict:
    from flashmoe.bench import method
    from flashmoe.bench.presets import config

    r = json.loads((RES / PREFILL).read_text())
    row = next(x for x in r["batch"]["rows"] if x["batch"] == 128)
    cfg = config("qwen3.5-397b-a17b")
    flops = method.expert_flops_per_token(cfg, r["experts_per_token"]) * r["layers"]
    peak = method.HW_PEAK_BF16["H200"]
    return {"file": PREFILL, "prefill_tok_s": row["prefill_tok_s"],
            "mlx_expert_block_tok_s": row["prefill_compute_ceiling_tok_s"],
            "share_of_mlx_expert_block": row["prefill_tok_s"] / row["prefill_compute_ceiling_tok_s"],
            "mlx_expert_block_share_of_h200_bf16_peak": row["prefill_compute_ceiling_tok_s"] * flops / peak,
            "prefill_share_of_h200_bf16_peak (routed experts only)": row["prefill_tok_s"] * flops / peak}


def prefetch_row(name: str) -> dict:
    """What speculative prefetch would gain in that cold run's regime, by recall (bench.prefetch), over the
    full model's layers with the run's slots: a curve, not a forecast at any recall."""
    from flashmoe.bench.prefetch import curve

    r = json.loads((RES / name).read_text())
    c = r["decode"]["cold"]
    reads = c["expert_bytes_per_token"] * r["tokens"] / r["record_bytes"]
    out = curve(c["expert_io"] / reads, c["per_layer_non_io_ms"] / 1e3, "uniform", 60, 512, r["experts_per_token"],
                r["expert_slots"], tokens=16)
    out["file"] = name
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = {"cold": [cold_row(n) for n in SINGLE], "warm": [warm_row(n) for n in WARM], "prefill": prefill_row(),
           "prefetch": prefetch_row("wave3/h200b-single-397b-pinned.json")}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
