"""The first-run walk (scripts/walk.py): a fresh clone, `make demo`, then every command of the README's
quick start, the server and the openai client included. It installs packages and takes minutes per
Python, so it runs only with FLASHMOE_WALK=1; FLASHMOE_WALK_PYTHONS lists the interpreters (default:
python3 on PATH, and Debian's externally managed /usr/bin/python3 where it exists)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALK = ROOT / "scripts" / "walk.py"


def _pythons() -> list[str]:
    if os.environ.get("FLASHMOE_WALK_PYTHONS"):
        return os.environ["FLASHMOE_WALK_PYTHONS"].split()
    return ["python3"] + (["/usr/bin/python3"] if Path("/usr/bin/python3").exists() else [])


def test_quick_start_has_the_steps_the_walk_runs():
    """The walk reads its commands from the README: the quick start must give the demo chat, the server
    and the client, or the walk would pass having run nothing."""
    spec = importlib.util.spec_from_file_location("walk", WALK)
    walk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(walk)
    steps = walk.quick_start((ROOT / "README.md").read_text())
    shell = [t for k, t in steps if k == "sh"]
    assert any(t.startswith("flashmoe-serve ") and t.endswith("&") for t in shell), shell
    assert any("flashmoe-run " in t for t in shell), shell
    assert any("from openai import OpenAI" in t for k, t in steps if k == "python")


@pytest.mark.skipif(os.environ.get("FLASHMOE_WALK") != "1", reason="installs from the package index; FLASHMOE_WALK=1 runs it")
@pytest.mark.parametrize("python", _pythons())
def test_walk(python):
    r = subprocess.run([sys.executable, str(WALK), "--python", python], capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "walk: every step passed" in r.stdout
