"""benchmarks/bench_batch.py's profile of the disk-bound regime (issue #19) on tiny shapes: every step
reports its layer-major prefill passes, read time and the part waited for, compute split into stages that
add up, expert calls and pairs, and the expert-block probe sits beside the measured expert math."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe.bench.synth import make_bundle

from test_bench import SMALL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("pb") / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    return out


def test_bench_batch_profiles_every_step(bundle, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), str(bundle), "--docs", "10",
                        "--loop-docs", "8", "--prompt-tokens", "40", "--gen-tokens", "3", "--slots", "24",
                        "--sweep-seconds", "0.05", "--routing", "uniform", "--prefetch", "on", "--read-threads", "2",
                        "-q", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "bench_batch.json").read_text())
    st = rep["metadata"]["settings"]
    assert st["prefetch"] is True and st["read_threads"] == 2  # asked for, and in effect
    batch = rep["results"]["batch"]
    prefill = [s for s in batch["steps"] if s["phase"] == "prefill"]
    assert prefill and all(s["prefill_passes"] >= 1 for s in prefill)
    assert all(s["prefill_passes"] == 0 for s in batch["steps"] if s["phase"] == "decode")
    for s in batch["steps"]:
        assert sum(s["stages"].values()) == pytest.approx(s["compute_s"])
        assert set(s["stages"]) == {"attention", "routing", "expert_compute", "head"}
        assert s["read_s"] >= s["read_wait_s"] >= 0 and s["overlap_s"] >= 0
        assert s["expert_calls"] > 0 and s["expert_pairs"] >= s["expert_calls"]
        assert s["experts_touched"] >= s["records_read"] > 0 or s["records_read"] == 0
    ph = batch["phases"]["prefill"]
    assert ph["prefill_passes"] == sum(s["prefill_passes"] for s in prefill)
    assert [p["tokens"] for p in rep["expert_block_probe"]][0] == 1
    assert all(p["s_per_call"] > 0 for p in rep["expert_block_probe"])
    assert "layer-major passes" in r.stderr and "expert block, every expert of a layer resident" in r.stderr
    assert "batch step: prefill" in r.stderr and "waited" in r.stderr
