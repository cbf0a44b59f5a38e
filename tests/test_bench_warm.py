"""benchmarks/bench_warm.py (gpu_session.sh's warm35 and all-b modes) end to end on this CPU with tiny shapes,
so that GPU minutes are not spent on bugs: every field, the budget, the JSON left by a run stopped from
outside, the mlx-lm copy kept between runs, and the greedy-agreement rule."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_bench import SMALL

from flashmoe.bench.synth import make_bundle

pytest.importorskip("mlx_lm")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_warm.py"
TINY = ["--prompt-tokens", "8", "--tokens", "4", "--batch-tokens", "3"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("warm") / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    return out


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _module():
    spec = importlib.util.spec_from_file_location("bench_warm", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_field_on_the_same_weights(bundle, tmp_path):
    out = tmp_path / "w.json"
    r = _run(bundle, *TINY, "--passes", "2", "--batch", "2,3", "--batch-passes", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["partial"] is False and rep["passes_run"] == 2 and rep["notes"] == []
    assert rep["tok_s"]["flashmoe"]["n"] == 2 and rep["ratio_vs_mlx_lm"]["n"] == 2
    assert rep["prefill_ratio_vs_mlx_lm"]["n"] == 2 and rep["prefill_tok_s"]["mlx-lm"]["median"] > 0
    f, m = rep["tok_s"]["flashmoe"]["passes"], rep["tok_s"]["mlx-lm"]["passes"]
    assert rep["ratio_vs_mlx_lm"]["passes"] == pytest.approx([x / y for x, y in zip(f, m)])
    # the same weights: the greedy tokens agree and the logits match closely (float32 on the CPU)
    g = rep["greedy_tokens"]
    assert g["agree"] and g["equal_share"] == 1.0 and g["compared"] == 5 and g["min_margin"] > 0
    assert g["lengths"] == [5, 5]  # the prompt's own token and 4 decoded
    assert rep["logits"]["relative"] < 1e-3 and rep["logits"]["positions"] == 8 + 4
    assert [b["batch"] for b in rep["batch"]] == [2, 3]
    for row in rep["batch"]:
        assert row["passes_run"] == 2 and row["ratio"]["n"] == 2 and row["ratio"]["median"] > 0
        assert row["mlx-lm BatchGenerator"]["median"] > 0
    assert rep["metadata"]["settings"]["expert_slots"] == 4 * 32  # every expert resident
    assert rep["peer_export_reused"] is False and set(rep["phase_s"]["batch_untimed"]) == {"2", "3"}
    assert "single stream: flashmoe" in r.stdout and "B=3:" in r.stdout


def test_a_budget_that_fits_nothing_still_reports_the_agreement(bundle, tmp_path):
    out = tmp_path / "w.json"
    r = _run(bundle, *TINY, "--passes", "10", "--batch", "2", "--budget-s", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["partial"] is False and rep["passes_run"] == 0 and rep["batch"] == []
    assert rep["greedy_tokens"]["agree"] and rep["logits"]["positions"] == 12  # from the untimed pass
    assert any("0 of 10 single-stream passes" in n for n in rep["notes"])
    assert any("no B=2 pass fits" in n for n in rep["notes"])
    assert "0 of 10 single-stream passes fit in --budget-s 1" in r.stderr


def test_a_run_stopped_from_outside_leaves_its_passes(bundle, tmp_path):
    out = tmp_path / "w.json"
    proc = subprocess.Popen([sys.executable, str(BENCH), str(bundle), *TINY, "--passes", "100000", "--json", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and json.loads(out.read_text()).get("passes_run", 0) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended by itself"
        proc.send_signal(signal.SIGTERM)  # what `timeout` sends
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143  # through its finally blocks: the temporary mlx-lm copy is gone
    assert not list(Path(bundle).parent.glob("flashmoe-peer-*"))
    rep = json.loads(out.read_text())  # whole: written by a rename
    assert rep["partial"] is True and rep["passes_run"] >= 2 and rep["tok_s"]["flashmoe"]["n"] == rep["passes_run"]
    assert rep["greedy_tokens"]["agree"]


def test_the_mlx_lm_copy_is_kept_and_reused(bundle, tmp_path):
    peer = tmp_path / "peer"
    r = _run(bundle, "--peer-dir", peer, "--export-only")
    assert r.returncode == 0, r.stderr
    assert (peer / "config.json").is_file() and (peer / "flashmoe-export.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name != "peer"]  # no temporary directory left over
    out = tmp_path / "w.json"
    r = _run(bundle, *TINY, "--passes", "1", "--batch-passes", "0", "--peer-dir", peer, "--json", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["peer_export_reused"] is True
    # a directory that is not an export of this bundle is neither used nor touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = _run(bundle, "--peer-dir", other, "--export-only")
    assert r.returncode == 2 and "is not an mlx-lm export" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_agreement_rule():
    agreement = _module().agreement
    ok = np.array([5.0, 4.0, 0.01, 3.0])
    # equal everywhere
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4], ok, 0.1)["agree"]
    # they part where a margin is within the logit difference: allowed
    g = agreement([1, 2, 3, 4], [1, 2, 9, 8], ok, 0.1)
    assert g["agree"] and g["first_difference"] == 2 and g["first_margin_at_most_diff"] == 2
    assert g["checked_positions"] == 2 and g["equal_share"] == 0.5
    # they part before any such margin: a real difference
    g = agreement([1, 7, 3, 4], [1, 2, 3, 4], ok, 0.1)
    assert not g["agree"] and g["first_difference"] == 1
    g = agreement([1, 2, 3, 4], [1, 2, 3, 5], np.array([5.0, 4.0, 3.0, 2.0]), 0.1)
    assert not g["agree"] and g["first_margin_at_most_diff"] is None
    # a shorter run (one engine met an EOS) is compared over the common length
    assert agreement([1, 2], [1, 2, 3], ok, 0.1)["compared"] == 2


@pytest.mark.parametrize("mode", ["warm35", "all-b"])
def test_session_modes_run_bench_warm_within_their_limit(bundle, tmp_path, mode):
    """gpu_session.sh warm35 / all-b on a tiny bundle (WARM_BUNDLE): the JSON, the budget the mode gave (its
    LIMIT less what it spent before, less 30 s) and the mlx-lm copy kept beside the bundle."""
    import os

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "WARM_BUNDLE": str(bundle), "LIMIT": "300", "PROMPT_WARM": "8", "TOKENS_WARM": "4", "PASSES": "2",
           "BATCH": "2", "BATCH_TOKENS": "3", "BATCH_PASSES": "1"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), mode], capture_output=True, text=True,
                       env=env, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((out / "warm35.json").read_text())
    assert rep["partial"] is False and rep["passes_run"] == 2 and rep["batch"][0]["passes_run"] == 1
    assert 240 <= rep["budget_s"] <= 270 and rep["prompt_tokens"] == 8
    assert (Path(str(bundle) + "-mlxlm") / "flashmoe-export.json").is_file()
    assert "single stream: flashmoe" in (out / "log.txt").read_text()
