"""benchmarks/bench_distributed.py on this CPU: decode at 1 and 2 ranks under mlx.launch (ring on loopback), each
pass one run of the engine the front ends use (runtime/distributed.py make_engine + run_engine), so the GPU
session's distributed modes do not spend device minutes on a stale import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bench import SMALL

from flashmoe.bench.synth import make_bundle

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_distributed.py"


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    root = tmp_path_factory.mktemp("bd")
    make_bundle(dict(SMALL), 4, 4, root / "b0", progress=False)
    shutil.copytree(root / "b0", root / "b1")  # rank 1's own copy, as on another host
    return str(root / "b{rank}")


def test_decode_at_one_and_two_ranks(copies, tmp_path):
    out = tmp_path / "d.json"
    slots = 4 * SMALL["num_experts"]  # every record: the warm pass reads nothing
    r = subprocess.run([sys.executable, str(BENCH), "decode", copies, "--ranks", "1,2", "--tokens", "6",
                        "--slots", str(slots), "--timeout", "300", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    one, two = rep["runs"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for run in (one, two):
        assert run["tokens"] == 6 and run["tok_s"]["cold"] > 0 and run["tok_s"]["warm"] > 0
        assert run["expert_kib_per_rank"]["warm"] == [0] * run["ranks"]  # warm: every record already resident
        assert 1.0 <= run["ideal_io_speedup_per_layer_sync"] <= run["ranks"]
    # the same routes on both: the two ranks together read what one rank reads alone, each a part of it
    cold = two["expert_kib_per_rank"]["cold"]
    assert sum(cold) == one["expert_kib_per_rank"]["cold"][0] and all(c > 0 for c in cold)
    assert two["speedup_vs_1_rank"]["cold"] == pytest.approx(two["tok_s"]["cold"] / one["tok_s"]["cold"])
    assert rep["metadata"]["git_commit"]


def test_collective_costs_on_two_ranks(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, str(BENCH), "collective", "--ranks", "2", "--hidden", "64", "--iters", "20",
                        "--timeout", "300", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ranks"] == 2 and set(rep["all_sum_ms"]) == {f"{d} T={t}" for d in ("float32", "bfloat16")
                                                             for t in (1, 8, 64, 512)}
    assert 0 < rep["plan_broadcast_ms"]["median"] and 0 < rep["empty_all_sum_ms"]["median"]
