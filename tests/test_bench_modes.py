"""The Python entry points of benchmarks/gpu_session.sh's measured modes (disk, project, regime; warm35 in
test_bench_warm.py), run on this CPU with tiny shapes so that GPU minutes are not spent on bugs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe.bench.synth import make_bundle

from test_bench import SMALL

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "benchmarks" / "gpu_session.sh"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    return {n: make_bundle(dict(SMALL), n, 4, root / f"l{n}", progress=False) or root / f"l{n}" for n in (4, 8)}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_session_script_parses_and_lists_the_modes():
    assert subprocess.run(["bash", "-n", str(SESSION)]).returncode == 0
    r = subprocess.run(["bash", str(SESSION), "nonsense"], capture_output=True, text=True, env={"OUT": "/tmp/x-none",
                       "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    for mode in ("warm35", "all-b", "prepare-warm35", "grammar", "disk", "project", "regime", "regime-steps", "prepare"):
        assert mode in r.stdout


def test_disk_entry_point_with_io_direct(small, tmp_path):
    """--io direct: the runtime reads with O_DIRECT where it has that mode; until then a one-line refusal."""
    from flashmoe.runtime.config import IO_MODES

    out = tmp_path / "d.json"
    r = _run("-m", "flashmoe.bench.cli", "run", small[4], "--tokens", "4", "--passes", "5", "--sweep-seconds", "0.02",
             "--experts-per-token", "2", "--io", "direct", "--json", out)
    if "direct" not in IO_MODES:
        assert r.returncode == 2 and "io=direct" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        return
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["metadata"]["settings"]["io"] == "direct" and rep["experts_per_token"] == 2
    assert rep["bound_violations"] == []


def test_project_entry_point(small, tmp_path):
    reps = {}
    for n in (4, 8):
        reps[n] = tmp_path / f"p{n}.json"
        r = _run("-m", "flashmoe.bench.cli", "run", small[n], "--tokens", "4", "--passes", "2", "--sweep-seconds",
                 "0.02", "--slots", "48", "--json", reps[n])
        assert r.returncode == 0, r.stderr
    out = tmp_path / "proj.json"
    r = _run(ROOT / "benchmarks" / "bench_projection.py", reps[4], reps[8], "--json", out)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert (rep["shallow_layers"], rep["deep_layers"]) == (4, 8)
    deep = json.loads(reps[8].read_text())
    assert rep["measured_seconds_per_token"] == pytest.approx(1 / deep["decode"]["cold"]["tok_s"])
    assert rep["bytes_error"] is not None and "read_adjusted_time_error" in rep  # 8 = SMALL's full depth
    # reports of different settings are not compared
    other = json.loads(reps[8].read_text())
    other["expert_slots"] = 7
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    r = _run(ROOT / "benchmarks" / "bench_projection.py", reps[4], bad)
    assert r.returncode != 0 and "not comparable" in r.stderr
