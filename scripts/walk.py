"""The first-run walk: what a newcomer does, on a fresh clone, with a given Python.

    python scripts/walk.py [--python /usr/bin/python3] [--keep]

1. `git clone` this repository's committed HEAD into a temporary directory;
2. `make demo PYTHON=...` there (a new .venv, packages from the package index pip is configured with);
3. every command of the README's quick start, in order, as the README shows them: each line that
   starts with `$ ` in a fenced block of the "Quick start" section runs in bash with .venv/bin first on
   PATH (what `source .venv/bin/activate` does), and each ```python block runs with .venv's Python. A
   command ending in `&` (the server) runs in the background; the walk waits for its /health, and
   stops it with SIGTERM (the README's `kill %1`), which must end it within 60 s (a clean exit or
   death by that signal both count). Port 8080 in the commands is replaced by a free port, so a
   server already on 8080 does not matter. Commands get no input (an interactive chat sees end of
   input at once).

Prints each step with its time and exit status; exits 1 at the first failing step (its output shown).
The test tests/test_walk.py runs it when FLASHMOE_WALK=1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = ("make demo", "source .venv/bin/activate", "kill %1")  # the walk does these itself


def quick_start(readme: str) -> list[tuple[str, str]]:
    """[("sh", command) | ("python", source)] of the README's Quick start section, in order."""
    m = re.search(r"^## Quick start.*?$(.*?)(?=^## )", readme, re.M | re.S)
    if not m:
        raise SystemExit("walk: README.md has no '## Quick start' section")
    steps = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", m.group(1), re.M | re.S):
        if lang == "python":
            steps.append(("python", block))
            continue
        for line in block.splitlines():
            if line.startswith("$ "):
                cmd = line[2:].split("  #", 1)[0].strip()
                if not cmd.startswith(SKIP):
                    steps.append(("sh", cmd))
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(port: int, proc: subprocess.Popen, limit: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the server did not answer /health within {limit:.0f} s")


def step(name: str, argv: list[str], cwd: Path, env: dict, timeout: float) -> str:
    t0 = time.time()
    r = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    print(f"[{time.time() - t0:6.1f} s] exit {r.returncode}: {name}", flush=True)
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n", flush=True)
        raise SystemExit(1)
    return r.stdout + r.stderr


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="python3", help="the interpreter make demo gets as PYTHON (default python3)")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    p.add_argument("--show", action="store_true", help="print every command's output")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="flashmoe-walk-"))
    clone = work / "flashmoe"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(x for x in env["PATH"].split(os.pathsep) if not x.endswith("/.venv/bin"))
    server = None
    try:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
        head = subprocess.run(["git", "-C", str(clone), "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()
        print(f"walk: {clone} at {head}, PYTHON={a.python}", flush=True)
        out = step(f"make demo PYTHON={a.python}", ["make", "demo", f"PYTHON={a.python}"], clone, env, 3600)
        if a.show:
            print(out)
        venv = clone / ".venv"
        env = dict(env, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
        port = free_port()
        for kind, text in quick_start((clone / "README.md").read_text()):
            text = text.replace("8080", str(port))
            if kind == "python":
                src = work / "step.py"
                src.write_text(text)
                out = step("python: " + text.strip().splitlines()[0][:60] + " ...", [str(venv / "bin" / "python"), str(src)],
                           clone, env, 600)
            elif text.endswith("&"):
                t0 = time.time()
                log = open(work / "server.log", "w")
                server = subprocess.Popen(["bash", "-c", "exec " + text[:-1]], cwd=clone, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                wait_health(port, server)
                print(f"[{time.time() - t0:6.1f} s] up: {text}", flush=True)
                continue
            else:
                out = step(text, ["bash", "-c", text], clone, env, 900)
            if a.show:
                print(out)
        if server is not None:
            t0 = time.time()
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
            how = "ended by the signal, no clean stop" if code == -signal.SIGTERM else f"exit {code}"
            print(f"[{time.time() - t0:6.1f} s] server stopped by SIGTERM (kill %1): {how}", flush=True)
            server = None
            if code not in (0, -signal.SIGTERM):
                print((work / "server.log").read_text()[-4000:])
                return 1
        print("walk: every step passed", flush=True)
        return 0
    finally:
        if server is not None:
            server.kill()
            server.wait()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
