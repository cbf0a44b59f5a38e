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
