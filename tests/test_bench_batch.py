"""benchmarks/bench_batch.py on tiny shapes (the CPU variant of the disk-bound batch regime): the cache size it
reports is the one in effect, both arms run the same documents, byte counters are per arm, every batch step
is metered against its bound."""

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
    out = tmp_path_factory.mktemp("bb") / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    return out


def test_bench_batch_honours_its_cache_and_meters_steps(bundle, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), str(bundle), "--docs", "10",
                        "--loop-docs", "8", "--prompt-tokens", "16", "--gen-tokens", "4", "--slots", "24", "--gpu-cache-gb", "0.5",
                        "--sweep-seconds", "0.05", "--routing", "uniform", "-q", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "bench_batch.json").read_text())
    st = rep["metadata"]["settings"]
    assert st["expert_slots"] == 24 and st["slots_asked"] == 24  # asked for, and in effect
    assert st["gpu_cache_gb_asked"] == 0.5  # passed to load() (it sizes the cache on CUDA when slots are not given)
    assert rep["bundle_vs_cache"] == pytest.approx(rep["bundle_bytes"] / st["expert_slot_bytes"])
    assert rep["bundle_vs_cache"] > 3  # the regime: the bundle several times what caches it
    loop, batch = rep["results"]["loop"], rep["results"]["batch"]
    assert batch["docs"] == 10 and loop["docs"] == 8 and loop["sampled"]
    assert len(set(loop["documents"])) == 8 and all(0 <= i < 10 for i in loop["documents"])  # the same documents
    assert loop["docs_per_hour_per_doc"]["n"] == 8 and "random sample of 8 of the 10" in rep["loop_label"]
    for arm in (loop, batch):  # bytes per arm, not since the process started
        assert arm["expert_bytes"] > 0 and arm["read_s"] >= 0
        assert arm["disk_bytes"] is None or arm["disk_bytes"] >= 0
    total = sum(s["expert_bytes"] for s in batch["steps"])
    assert batch["expert_bytes"] == total  # the steps account for the whole arm
    assert {s["phase"] for s in batch["steps"]} == {"prefill", "decode"}
    for s in batch["steps"]:
        for key in ("rows", "experts_touched", "records_read", "expert_bytes", "read_s", "compute_s", "overlap_s",
                    "bound_s", "wall_s"):
            assert key in s, key
        assert s["compute_s"] > 0
    assert rep["disk"]["by_depth"] and rep["metadata"]["git_commit"]
    assert rep["bound_violations"] == []


def test_bench_batch_refuses_a_loop_sample_under_8(bundle, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_batch.py"), str(bundle), "--docs", "10",
                        "--loop-docs", "3", "--sweep-seconds", "0.01", "-q"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--loop-docs must be at least 8" in r.stderr


def test_bench_batch_profiles_every_step(bundle, tmp_path):
    """The profile of the disk-bound regime (issue #19): every step reports its layer-major prefill passes,
    read time and the part waited for, compute split into stages that add up, expert calls and pairs, and the
    expert-block probe sits beside the measured expert math."""
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
