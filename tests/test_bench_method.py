"""bench/method.py: the measuring rules every benchmark uses (issue #19's review)."""

from __future__ import annotations

import os

import pytest

from flashmoe.bench import method
from flashmoe.bench.routing import simulated_reads_per_token


def test_spread_is_median_and_range_never_the_best():
    s = method.spread([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (s["median"], s["min"], s["max"], s["n"], s["enough"]) == (3.0, 1.0, 10.0, 5, True)
    assert not method.spread([1.0, 2.0])["enough"]  # fewer than 5 passes is flagged
    assert "fewer than 5" in method.fmt_spread(method.spread([1.0, 2.0]))
    assert method.fmt_spread(s) == "3.00 (1.00-10.00, 5 passes)"
    assert method.spread([])["median"] is None


def test_bound_check_flags_a_measurement_above_its_bound():
    ok = method.check_bound("x", 1.04, 1.0)
    bad = method.check_bound("y", 1.06, 1.0)
    assert not ok["violated"] and bad["violated"] and bad["ratio"] == pytest.approx(1.06)
    assert method.violations([ok, bad]) == [bad]
    assert not method.check_bound("z", None, 1.0)["violated"]


def test_roofline_uses_needed_bytes_and_reports_over_read_apart():
    # the H100 case of the review: 5.58 GB needed, 6.59 GB read; a 10 GB/s disk
    r = method.roofline(tok_s=1.5, needed_bytes_per_token=5.58e9, disk_gbps=10.0, disk_bytes_per_token=6.59e9)
    assert r["roofline_tok_s"] == pytest.approx(10 / 5.58)
    assert r["ratio"] == pytest.approx(1.5 / (10 / 5.58))
    assert r["over_read"] == pytest.approx(6.59 / 5.58 - 1)


def test_qd_sweep_reads_records_with_o_direct(tmp_path):
    p = tmp_path / "layer.bin"
    stride = 64 << 10
    p.write_bytes(os.urandom(4096 + 32 * stride))
    s = method.qd_sweep([p], 4096, stride, stride - 1000, 32, depths=(1, 4, 64), seconds=0.02, min_reads=8)
    assert [r["depth"] for r in s["by_depth"]] == [1, 4, 64]
    assert all(r["reads"] >= 8 and r["gbps"] > 0 for r in s["by_depth"])
    assert s["limit_gbps"] == max(r["gbps"] for r in s["by_depth"])
    assert s["read_bytes"] == stride  # record size rounded up to the 4096-byte alignment
    assert s["direct"] == method.direct_supported(p)
    with pytest.raises(ValueError, match="aligned"):
        method.qd_sweep([p], 100, stride, 1000, 4)


def test_metadata_names_machine_disk_commit_and_settings_read_back(tmp_path):
    import flashmoe
    from flashmoe.bench.synth import make_bundle

    from test_bench import SMALL

    b = tmp_path / "b"
    make_bundle(dict(SMALL), 1, 4, b, progress=False)
    model, _ = flashmoe.load(b, slots=7, experts_per_token=2)
    md = method.metadata(b, model)
    model.experts.close()
    for key in ("host", "cpu", "cpus", "ram_gib", "gpu", "disk", "date", "git_commit", "mlx"):
        assert key in md, key
    assert md["disk"]["path"] == os.path.realpath(b) and md["disk"].get("fs")
    st = md["settings"]
    assert st["expert_slots"] == 7 and st["slots_asked"] == 7 and st["experts_per_token"] == 2
    assert st["io"] == "pread" and st["upload"] and st["dtype"] == "float32"


def test_projection_check_reports_the_difference():
    shallow = {"layers": 4, "seconds_per_token": 0.41, "head_s_per_token": 0.01, "expert_bytes_per_token": 4e8}
    deep = {"layers": 16, "seconds_per_token": 1.80, "head_s_per_token": 0.01, "expert_bytes_per_token": 1.9e9}
    c = method.projection_check(shallow, deep)
    assert c["projected_seconds_per_token"] == pytest.approx(0.1 * 16 + 0.01)
    assert c["time_error"] == pytest.approx(1.61 / 1.80 - 1)
    assert c["bytes_error"] == pytest.approx(1.6e9 / 1.9e9 - 1)


def test_a_deeper_model_reads_more_per_layer_with_the_same_cache():
    """The review's point: 4 layers of 397B shapes fit the 2260-slot cache, 60 do not; the bench's own routing
    reads ~19% more per layer over 60 layers in a cold 32-token pass."""
    four = simulated_reads_per_token("uniform", 4, 512, 10, 2260, tokens=32, warmup=0) / 4
    sixty = simulated_reads_per_token("uniform", 60, 512, 10, 2260, tokens=32, warmup=0) / 60
    assert 1.10 < sixty / four < 1.30
    # a cache far larger than the layers' experts reads each expert once
    assert simulated_reads_per_token("uniform", 2, 8, 2, 10_000, tokens=50, warmup=0) * 50 == 2 * 8


def test_hardware_peak_is_looked_up_by_name():
    assert method.hardware_peak_flops("NVIDIA H200, 143771 MiB, 570.1") == 989e12
    assert method.hardware_peak_flops("Some GPU") is None
