"""flashmoe-bench on small shapes: make writes a valid bundle; run completes and reports every field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashmoe.bench.presets import PRESETS, config
from flashmoe.bench.routing import (PUBLISHED_LRU_HITS, StickyRouter, make_router, route_stats,
                                    simulated_batch_union, simulated_lru_hits)
from flashmoe.bench.synth import make_bundle
from flashmoe.format import Bundle

SMALL = dict(num_hidden_layers=8, hidden_size=256, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
             shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             linear_num_key_heads=2, linear_num_value_heads=4, vocab_size=1024, head_dim=64)


def test_presets_match_published_shapes():
    c = config("qwen3.5-397b-a17b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == \
        (60, 4096, 512, 10, 1024)
    assert sum(c.is_linear(i) for i in range(60)) == 45
    assert config("qwen3.5-35b-a3b").num_experts == 256 and set(PRESETS) >= {"qwen3.5-122b-a10b"}
    cut = config("qwen3.5-397b-a17b", 2)
    assert cut.layer_types == ["linear_attention", "full_attention"]  # both kinds measured


def test_sticky_router_statistics():
    r = StickyRouter(2, 512, 10, stickiness=0.2, seed=1)
    for _ in range(90):
        r.next(0), r.next(1)
    s = route_stats(r.history, 512)
    assert 0.15 < s["consecutive_overlap"] < 0.25
    assert 0.30 < s["touched_per_window"] < 0.46
    assert all(len(set(h.tolist())) == 10 for h in r.history[0])  # no expert twice in one token


def test_calibrated_routing_reproduces_published_lru_hits():
    """An LRU cache of 18/36/55% of a layer's 512 experts hits 43.5/62/72% of real top-10 routing; the
    calibrated model lands within 3 points, the uniform one far below at small caches."""
    shares = [s for s, _ in PUBLISHED_LRU_HITS]
    cal = simulated_lru_hits("calibrated", 512, 10, shares, seed=3)
    uni = simulated_lru_hits("uniform", 512, 10, shares, seed=3)
    for share, real in PUBLISHED_LRU_HITS:
        assert abs(cal[share] - real) < 0.03, (share, cal[share], real)
        assert uni[share] < real - 0.05
    r = make_router("calibrated", 1, 512, 10, seed=0)
    assert all(len(set(r.next(0).tolist())) == 10 for _ in range(120))  # distinct, across topic changes


def test_batch_streams_are_independent_and_union_counts():
    r = make_router("uniform", 2, 64, 4, seed=0)
    a = r.route_streams(0, range(8))
    assert a.shape == (8, 4) and len(r.history) == 8  # one stream per sequence
    assert simulated_batch_union("uniform", 512, 10, 1) == 10
    u8 = simulated_batch_union("calibrated", 512, 10, 8)
    assert 60 < u8 <= 80  # 8 x 10 picks, few repeats
    with pytest.raises(ValueError):
        make_router("zipf", 1, 8, 2)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    return out


def test_make_produces_valid_bundle(small_bundle):
    b = Bundle.open(small_bundle)
    assert b.verify(progress=False) == []
    assert b.config.num_hidden_layers == 4 and b.manifest["source"]["kind"] == "synthetic"
    for layer in range(4):
        b.expert_file(layer).close()


def test_run_reports_every_field(small_bundle, tmp_path):
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    r = subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", "run", str(small_bundle), "--tokens", "4",
                        "--sweep-seconds", "0.05", "--prefill", "16", "--json", str(out)] + (["--chart", str(png)] if _has_matplotlib() else []),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    for key in ("machine", "date", "layers", "bits", "experts_per_token", "tokens", "limits", "decode", "targets",
                "peak_rss_mb", "record_bytes"):
        assert key in rep, key
    for key in ("seq_read_warm_gbps", "cpu_mem_gbps"):
        assert rep["limits"][key] > 0
    sweep = rep["limits"]["disk"]
    assert [r["depth"] for r in sweep["by_depth"]] == [1, 2, 4, 8, 16, 32, 64] and sweep["limit_gbps"] > 0
    md = rep["metadata"]
    for key in ("host", "cpu", "gpu", "disk", "date", "git_commit", "settings"):
        assert key in md, key
    assert md["settings"]["expert_slots"] == rep["expert_slots"] and md["settings"]["io"] == "pread"
    for phase in rep["decode"].values():  # every figure per pass: median and spread over 5 passes
        sp = phase["tok_s_spread"]
        assert sp["n"] == 5 and sp["min"] <= sp["median"] <= sp["max"] and phase["tok_s"] == sp["median"]
    if sweep["direct"] and "cold" in rep["decode"]:
        ratio = rep["ratios"]["cold_vs_disk_roofline"]
        assert ratio["n"] == 5 and rep["targets"]["cold_vs_disk_roofline"] == ratio["median"]
        assert rep["ratios"]["cold_over_read"]["median"] is not None
    if "cold" in rep["decode"]:  # no measured arm asked for: the simulated curve, by recall from 0 to 1, labelled
        assert [r["recall"] for r in rep["prefetch"]["by_recall"]] == [i / 10 for i in range(11)]
        assert rep["prefetch"]["kind"] == "simulated estimate"
        assert "gain by prediction recall" in r.stdout and "ESTIMATE, not measured" in r.stdout
    assert md["settings"]["prefetch"] == "off"  # the synthetic routes give the model's own guess nothing to go on
    # no measurement above what the report calls its bound
    assert rep["bound_violations"] == [], rep["bound_violations"]
    warm = rep["decode"]["warm"]
    for key in ("tok_s", "projected_full_model_tok_s", "per_layer_ms", "expert_bytes_per_token", "expert_gbps",
                "routes", "attention", "routing", "expert_io", "expert_compute"):
        assert key in warm, key
    pre = rep["prefill"]
    assert pre["tokens"] == 16 and pre["tok_s"] > 0 and 4 <= pre["experts_read_per_layer"] <= 32
    need = 4 * 4 * rep["record_bytes"]  # K experts x layers
    assert warm["expert_bytes_routed_per_token"] == need
    assert 0 < rep["decode"]["cold"]["expert_bytes_per_token"] <= need  # slot hits only lower it
    assert rep["expert_slots"] >= 4
    assert rep["bundle_vs_cache"] == pytest.approx(rep["bundle_expert_bytes"] / rep["expert_slot_bytes"])
    assert "tok/s" in r.stdout and "warm" in r.stdout
    # plain language: no internal key names in what people read; 4 tokens is flagged as noise
    assert "cold_io_vs_disk_limit" not in r.stdout and "_" not in r.stdout.split("check", 1)[-1]
    assert "only 4 tokens were timed" in r.stdout and rep["warnings"]
    assert "cold_vs_disk_roofline" in rep["targets"] or not rep["decode"].get("cold")
    if _has_matplotlib():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def test_doctor_runs(tmp_path):
    out = tmp_path / "d.json"
    r = subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", "doctor", "--dir", str(tmp_path), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "qwen3.5-397b-a17b" in r.stdout and "GiB RAM" in r.stdout
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip()}
    assert "GB free" in lines["disk"] and "GB free" not in lines["memory"]  # disk figures under "disk"
    rep = json.loads(out.read_text())
    assert all(v > 0 for v in rep["matmul_gbps"].values())
    for p in rep["presets"]:
        # the estimate counts compute: never faster than the arithmetic alone allows
        assert p["compute_s_per_token"] > 0 and p["estimated_tok_s"] <= 1 / p["compute_s_per_token"] + 1e-9
        if p["disk_s_per_token"] is not None:
            assert p["estimated_tok_s"] <= 1 / max(p["disk_s_per_token"], 1e-12) + 1e-9


def _bench(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_flags_have_help_and_common_options():
    from flashmoe.bench.cli import parser

    p = parser()
    subs = [a for a in p._actions if a.dest == "cmd"][0].choices
    for sp in [p, *subs.values()]:
        for a in sp._actions:
            if a.dest not in ("help", "cmd"):
                assert a.help, (sp.prog, a.dest)
    r = _bench("--version")
    assert r.returncode == 0 and r.stdout.startswith("flashmoe-bench ")


def test_cli_user_errors_are_one_line_rc2(tmp_path):
    one = tmp_path / "one"
    make_bundle(dict(SMALL), 1, 4, one, progress=False)
    r = _bench("run", str(one), "--peer")  # used to crash with a traceback
    assert r.returncode == 2 and "--peer needs a bundle of 4 or more layers" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _bench("run", str(one), "--batch", "1,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = _bench("run", str(one), "--batch", "8,64", "--batch-prompt-tokens", "32")
    assert r.returncode == 2 and "must be larger than the largest batch" in r.stderr
    r = _bench("run", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such bundle" in r.stderr


def test_run_batch_reports_steps_and_references(small_bundle, tmp_path):
    """--batch through the batched engine: one row per batch size (B=1 always, for the read-sharing estimate)
    with aggregate tok/s, distinct experts per layer per step, bytes per token, the two reference rates
    (labelled as estimates, not bounds) and every engine step metered against its bound."""
    out = tmp_path / "b.json"
    r = _bench("run", str(small_bundle), "--tokens", "2", "--passes", "1", "--sweep-seconds", "0.05", "--batch", "3",
               "--batch-tokens", "3", "--batch-prompt-tokens", "8", "--routing", "uniform", "--json", str(out),
               timeout=600)
    assert r.returncode == 0, r.stderr
    batch = json.loads(out.read_text())["batch"]
    rows = batch["rows"]
    assert [(b["routing"], b["batch"]) for b in rows] == [("uniform", 1), ("uniform", 3)]
    one, three = rows
    assert one["distinct_experts_per_layer_step"] == 4  # K distinct experts for a single stream
    assert 4 < three["distinct_experts_per_layer_step"] <= 12  # 3 streams x K=4, some shared
    for b in rows:
        assert b["decode_tokens"] == b["batch"] * (3 - 2)  # 3 tokens each: 1 from prefill, 1 in its step, 1 after
        for key in ("decode_tok_s", "prefill_tok_s", "mlx_expert_block_tok_s", "prefill_mlx_expert_block_tok_s",
                    "read_sharing_estimate_tok_s", "expert_bytes_per_generated_token", "records_read_per_layer_step"):
            assert b[key] is not None and b[key] >= 0, key
        assert "read_sharing_bound_tok_s" not in b and "compute_ceiling_tok_s" not in b  # not bounds
    assert three["read_sharing_estimate_tok_s"] == pytest.approx(
        3 * 4 / three["distinct_experts_per_layer_step"] * one["decode_tok_s"])
    assert "read-sharing estimate" in r.stdout and "B=3" in r.stdout and "not bounds" in r.stdout
    for b in rows:
        steps = b["steps"]
        assert steps and {s["phase"] for s in steps} == {"prefill", "decode"}
        for s in steps:  # per step: what was touched, read, how long, and the bound of that step
            assert s["experts_touched"] >= 4 and s["records_read"] >= 0 and s["read_s"] >= 0
            assert s["compute_s"] > 0 and s["overlap_s"] >= 0
            if batch["disk_limit_gbps"]:
                assert s["bound_s"] >= s["compute_s"]
        for ph in ("prefill", "decode"):  # per phase, not cumulative: the phase's own steps add up
            tot = b["phases"][ph]
            mine = [s for s in steps if s["phase"] == ph]
            assert tot["expert_bytes"] == sum(s["expert_bytes"] for s in mine)
            assert b["expert_bytes_" + ph] == tot["expert_bytes"]
            assert tot["wall_s"] == pytest.approx(sum(s["wall_s"] for s in mine))
        assert b["prefill_s"] > 0 and b["prefill_tok_s"] == pytest.approx(b["prompt_tokens"] / b["prefill_s"])
    assert batch["bound_violations"] == []
    assert "overlap" in r.stdout and "bound max(disk, compute)" in r.stdout


def test_qwen4_preset_and_no_synthetic_bundle(tmp_path):
    """The qwen4-exp-flash-next shapes (uncertain, third-party numbers) read as a Qwen4-Exp config; make refuses
    them in one line (synthetic bundles have no n-gram tables) before writing anything."""
    c = config("qwen4-exp-flash-next")
    assert c.model_type == "qwen4_exp"
    assert (c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.num_attention_heads, c.num_key_value_heads, c.linear_num_value_heads) == (48, 2560, 512, 10, 640, 24, 2, 48)
    r = subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", "make", "--shape", "qwen4-exp-flash-next",
                        "--layers", "1", "--bits", "4", "-o", str(tmp_path / "q")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "n-gram tables" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "q").exists()


def test_inspect_reads_per_token_without_tables(small_bundle):
    """A Qwen3.5 bundle: experts K x layers x record size per token, tables none."""
    from flashmoe.format.cli import summary, token_reads

    b = Bundle.open(small_bundle)
    r = token_reads(b)
    assert r["tables"] is None and r["experts"] == 4 * 4 * b.expert_info(0).record_size
    text = summary(b)
    assert "per token   tables none" in text and f"experts {r['experts']:,} bytes" in text
