"""bench/prefetch.py: the synthetic routing's prediction-recall parameter and the cold-decode gain curve."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.bench.prefetch import curve, gain_at, guess, simulate


def test_guess_has_the_recall_asked_for():
    rng = np.random.default_rng(0)
    actual = np.arange(10)
    for recall in (0.0, 0.3, 1.0):
        hits = [len(set(guess(actual, recall, 512, rng).tolist()) & set(actual.tolist())) / 10 for _ in range(400)]
        assert abs(np.mean(hits) - recall) < 0.03
        g = guess(actual, recall, 512, rng)
        assert len(set(g.tolist())) == 10  # K distinct experts


def test_simulated_reads_at_the_ends():
    none = simulate("uniform", 4, 64, 4, 32, None, tokens=20)
    perfect = simulate("uniform", 4, 64, 4, 32, 1.0, tokens=20)
    zero = simulate("uniform", 4, 64, 4, 32, 0.0, tokens=20)
    assert none["demand"] == none["needed"] > 0 and none["wasted"] == 0
    assert perfect["demand"] == 0 and perfect["wasted"] == 0 and perfect["needed"] == pytest.approx(none["needed"])
    assert zero["wasted"] > 0 and zero["demand"] >= none["demand"] * 0.9  # nothing useful, reads wasted


def test_gain_curve_is_bounded_by_perfect_overlap():
    tau, C = 1e-3, 2e-3
    c = curve(tau, C, "uniform", 4, 64, 4, 32, tokens=20)
    base = c["no_prefetch"]
    assert base["s_per_layer"] == pytest.approx(C + base["needed"] * tau)
    ends = {r["recall"]: r for r in c["by_recall"]}
    # perfect foresight: reads entirely under compute (or compute under reads): (C + R) / max(C, R)
    R = ends[1.0]["needed"] * tau
    assert ends[1.0]["gain"] == pytest.approx((C + base["needed"] * tau) / max(C, R))
    assert ends[0.0]["gain"] <= 1.0  # wrong guesses only cost
    gains = [r["gain"] for r in c["by_recall"]]
    assert gains[-1] == max(gains)
    assert gain_at(c, 0.55) == pytest.approx((ends[0.5]["gain"] + ends[0.6]["gain"]) / 2)


# ---- the measured arm (flashmoe-bench run --prefetch-recall) ------------------------------------------------
def test_routes_drawn_ahead_are_the_routes_drawn_in_turn():
    """The arm draws layer L+1's route for a token right after layer L's (to make the guess): every route is the
    one the router gives without guesses, so the two arms decode over the same routes."""
    from flashmoe.bench.routing import StickyRouter

    plain, early = StickyRouter(4, 64, 4, 0.2, seed=3), StickyRouter(4, 64, 4, 0.2, seed=3)
    held = None
    for _ in range(20):
        for layer in range(4):
            plain.next(layer)
            got = early.next(layer)
            if held is not None:
                assert got.tolist() == held.tolist()  # the route drawn ahead is the one handed out
            held = early.ahead(layer + 1)[0] if layer + 1 < 4 else None
            if held is not None:
                assert early.ahead(layer + 1)[0].tolist() == held.tolist()  # asked twice: the same route
    for a, b in zip(plain.history, early.history):
        assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_recall_flag_parses_one_or_a_sweep():
    from flashmoe.bench.cli import parser
    from flashmoe.bench.prefetch import MEASURED_RECALL

    p = parser()
    assert p.parse_args(["run", "b"]).prefetch_recall is None
    assert p.parse_args(["run", "b", "--prefetch-recall"]).prefetch_recall == [MEASURED_RECALL]
    assert p.parse_args(["run", "b", "--prefetch-recall", "0,0.5,0.84,1"]).prefetch_recall == [0, 0.5, 0.84, 1]
    for bad in ("1.5", "x", "-0.1"):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["run", "b", "--prefetch-recall", bad])
        assert e.value.code == 2


@pytest.fixture(scope="module")
def arm_report(tmp_path_factory):
    """One bench run on a tiny synthetic bundle with the measured arm at recalls 0, 0.5 and 1 (5 interleaved
    passes of 16 tokens each; a cache of 24 slots for 4 layers x 32 experts, so cold passes keep reading)."""
    from test_bench import SMALL

    from flashmoe.bench.run import run
    from flashmoe.bench.synth import make_bundle

    b = tmp_path_factory.mktemp("arm") / "b"
    make_bundle(dict(SMALL), 4, 4, b, progress=False)
    return run(b, tokens=16, sweep_seconds=0.02, slots=24, prefetch_recalls=(0.0, 0.5, 1.0), log=lambda m: None)


def test_prefetch_arm_runs_with_the_asked_recall(arm_report):
    from flashmoe.bench.prefetch import GUESS_EARLIER_THAN_MODEL_S

    rep = arm_report
    if "cold" not in rep["decode"]:
        pytest.skip("this OS cannot evict pages: no cold pass")
    a = rep["prefetch"]
    assert a["kind"] == "measured" and a["guess_earlier_than_model_s"] == GUESS_EARLIER_THAN_MODEL_S == 0
    # the settings in effect, read back from each arm's runtime
    assert a["settings"]["off"]["prefetch"] == "off" and a["settings"]["on"]["prefetch"] == "on"
    assert a["settings"]["on"]["expert_slots"] == a["settings"]["off"]["expert_slots"] == 24
    assert rep["metadata"]["settings"]["prefetch"] == "off"
    assert a["off"]["tok_s"]["n"] == 5 and a["off"]["tok_s"]["median"] == rep["decode"]["cold"]["tok_s"]
    rows = {r["recall"]: r for r in a["by_recall"]}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    for recall, r in rows.items():
        assert r["tok_s"]["n"] == 5 and r["tok_s"]["min"] <= r["tok_s"]["median"] <= r["tok_s"]["max"]
        # one guess per timed token for each layer after the first, made before that layer routed
        assert all(p["guesses"] == 16 * 3 for p in r["passes"])
        overlaps = [p["guess_recall"] for p in r["passes"]]
        assert abs(np.mean(overlaps) - recall) < 0.08, (recall, overlaps)
        # the runtime counted the same hits: each guess reached it before its layer routed, for the same token
        for p in r["passes"]:
            assert p["runtime_hit_rate"] == pytest.approx(p["guess_recall"], abs=1e-9)
            assert p["prefetch_reads"] >= 0 and p["prefetch_dropped"] >= 0
        # greedy tokens identical with prefetch on and off (the same routes; prefetch changes only when reads happen)
        assert r["tokens_equal"] and all(p["tokens_equal"] for p in r["passes"])
        if a["off"]["roofline_ratio"]["median"] is not None:  # a disk limit measured (O_DIRECT)
            assert r["roofline_ratio"]["n"] == 5
    assert rows[1.0]["guess_recall"]["median"] == 1.0 and rows[0.0]["guess_recall"]["median"] == 0.0
    # wrong guesses cost reads (the disk delivers more than the routes needed); right ones replace demand reads
    # (a perfect guess reads no more than prefetch off: the bytes counted apart as over-read are the wrong ones')
    for p in rows[1.0]["passes"]:
        assert p["wasted_reads"] <= 0.05 * p["prefetch_reads"] and p["useful_prefetch_reads"] > 0
    for p in rows[0.0]["passes"]:
        assert p["wasted_reads"] > 0.5 * p["prefetch_reads"] and p["over_read"] > 0.3
    assert rows[0.5]["over_read"]["median"] < rows[0.0]["over_read"]["median"]


def test_prefetch_arm_is_within_its_bounds(arm_report):
    rep = arm_report
    if "cold" not in rep["decode"]:
        pytest.skip("this OS cannot evict pages: no cold pass")
    mine = [c for c in rep["bound_checks"] if c["name"].startswith("prefetch")]
    if rep["limits"]["disk_limit_gbps"]:
        assert len(mine) == 3 * 5  # every pass of every recall checked
    assert all(c["ratio"] is None or c["ratio"] <= 1.05 for c in rep["bound_checks"]), rep["bound_checks"]
    assert rep["bound_violations"] == []


def test_prefetch_arm_report_reads_plainly(arm_report):
    from flashmoe.bench.run import format_table

    text = format_table(arm_report)
    if "cold" not in arm_report["decode"]:
        return
    lines = [ln for ln in text.splitlines() if ln.startswith("prefetch")]
    assert len(lines) == 1 + 3 and "measured" in lines[0] and "ESTIMATE" not in text
    assert "tokens identical" in lines[1] and "needed-bytes roofline" in lines[1]
