"""The fault matrix, round two (issue 21): batch jobs, the Hub and paths. One test per defect, each
reproducing the fault and checking the fixed behaviour; rounds one's are in tests/test_faults.py, the
format/convert ones in tests/test_faults_format.py, the server's in tests/test_serve_faults.py. The table
of cases and outcomes is docs/faults.md.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from flashmoe.format import Bundle, BundleError
from flashmoe.format.manifest import MANIFEST
from test_faults import LocalListener, _publish_and_pull, cli, converted, ckpt, one_line_error  # noqa: F401  (fixtures)
from test_hub import REPO, TOKEN, hf_env, hub, manifest_files, same_bytes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# ---- kill -9 of flashmoe-pull, then resume ---------------------------------------------------------------------
class SlowProxy(LocalListener):
    """A TCP proxy to `port` that sends the answers back at `rate` bytes/s (so a pull can be killed midway)."""

    def __init__(self, port: int, rate: int):
        self.port, self.rate = port, rate
        self.lock = threading.Lock()
        self.next_send = 0.0  # one budget shared by every connection: parallel downloads share `rate`

    def on_connect(self, client):
        up = socket.create_connection(("127.0.0.1", self.port))
        threading.Thread(target=self._pump, args=(client, up, 0), daemon=True).start()
        threading.Thread(target=self._pump, args=(up, client, self.rate), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, rate: int):
        try:
            while True:
                data = a.recv(8192)
                if not data:
                    break
                if rate:
                    with self.lock:
                        now = time.monotonic()
                        self.next_send = max(self.next_send, now) + len(data) / rate
                        wait = self.next_send - now
                    time.sleep(wait)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@contextmanager
def slow_pull(converted, hub, hf_env, out: Path):
    """`converted` published to the test Hub, then `flashmoe-pull REPO -o out` started in a process that
    reads it through a proxy sending 400 kB/s: yields the process (text output), killed on the way out if
    it still runs."""
    from flashmoe.hub import publish_bundle

    publish_bundle(converted, REPO, token=TOKEN, progress=False, backoff=0.01)
    port = int(hub.endpoint.rsplit(":", 1)[1])
    with SlowProxy(port, rate=400_000) as proxy:
        env = dict(os.environ, HF_ENDPOINT=proxy.endpoint, HF_HOME=str(hf_env / "hf_home"))
        proc = subprocess.Popen([sys.executable, "-m", "flashmoe.hub.cli", "pull", REPO, "-o", str(out), "-q"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)


def test_kill_9_pull_then_resume(converted, hub, hf_env, tmp_path):
    from flashmoe.hub import pull_bundle

    out = tmp_path / "out"
    with slow_pull(converted, hub, hf_env, out) as proc:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if any((d / "experts").is_dir() and any((d / "experts").iterdir()) for d in (out, out / ".flashmoe-pull")):
                    break  # part of the bundle is there (staged, or already in place)
                time.sleep(0.05)
            assert proc.poll() is None, proc.communicate()
        finally:
            proc.kill()  # SIGKILL: no cleanup of any kind
            proc.communicate(timeout=30)
    assert proc.returncode == -9
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert not set(manifest_files(converted)) <= got  # it really was killed midway
    with pytest.raises(BundleError):
        Bundle.open(out)  # an interrupted pull is never mistaken for a bundle
    assert pull_bundle(REPO, token=False, progress=False, local_dir=out) == out.resolve()
    same_bytes(converted, out)


# ---- 11. round two: pull -o DIR never writes through a link; batch lines never end the job ----------------
def _outside_links(out: Path, tmp_path: Path, every_kind: bool) -> dict[Path, bytes]:
    """Replace an expert file of a pulled DIR (every_kind: also README.md, the manifest and the dense/ folder)
    with links to files (a folder) outside it; returns {outside file: its bytes}, which must never change."""
    victims = {}
    later = time.time() + 5  # modified after the pull (huggingface_hub then re-checks the file, and rewrites it)
    for i, name in enumerate(["experts/layer-001.bin", "README.md", MANIFEST][:3 if every_kind else 1]):
        outside = tmp_path / f"precious-{i}"
        outside.write_bytes(b"precious %d\n" % i)
        os.utime(outside, (later, later))
        (out / name).unlink()
        (out / name).symlink_to(outside)
        victims[outside] = outside.read_bytes()
    if not every_kind:
        return victims
    far = tmp_path / "far-dense"
    shutil.copytree(out / "dense", far)
    for f in far.iterdir():
        f.write_bytes(b"precious dense\n")
        os.utime(f, (later, later))
        victims[f] = f.read_bytes()
    shutil.rmtree(out / "dense")
    (out / "dense").symlink_to(far, target_is_directory=True)
    return victims


@pytest.mark.parametrize("every_kind", [False, True], ids=["expert-file", "files-and-folder"])
def test_11_pull_never_writes_through_a_link_in_the_directory(converted, hub, hf_env, tmp_path, every_kind):
    """Once the blobs are in the Hugging Face cache, huggingface_hub copied them into -o DIR by opening the
    existing path for writing: a link there to a file outside DIR got the expert bytes (rc 0)."""
    from flashmoe.hub import pull_bundle

    _publish_and_pull(converted)  # every blob in the cache
    out = tmp_path / "out"
    pull_bundle(REPO, token=False, progress=False, local_dir=out)
    victims = _outside_links(out, tmp_path, every_kind)
    r = cli("flashmoe.hub.cli", "pull", REPO, "-o", out, "-q",
            env=dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(hf_env / "hf_home")))
    assert {p: p.read_bytes() for p in victims} == victims  # not one byte outside DIR written
    assert r.returncode == 0, r.stderr
    assert not [p for p in out.rglob("*") if p.is_symlink()]
    assert not (out / ".flashmoe-pull").exists()  # the staging folder is gone
    same_bytes(converted, out)


def batch_cli(bundle, src, out, *extra, timeout=300):
    return cli("flashmoe.batch.cli", bundle, src, "-o", out, "-q", "--max-tokens", "2", *extra, timeout=timeout)


def test_11_bad_token_ids_and_roles_are_error_lines(bundles, tmp_path):
    """`"prompt": [5, 999999]` segfaulted the job (and every resume); ids >= 2**31 and a dict role aborted it
    (internal error, nothing written); -3 was answered. Each is now that line's error line."""
    oa = lambda cid, prompt: json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",  # noqa: E731
                                         "body": {"prompt": prompt, "max_tokens": 2}})
    lines = [json.dumps({"id": "ok1", "prompt": "the cat"}), oa("oov", [5, 999999]), oa("huge", [5, 2 ** 31]),
             oa("neg", [5, -3]), json.dumps({"id": "role", "messages": [{"role": {"a": 1}, "content": "x"}]}),
             json.dumps({"id": "rolel", "messages": [{"role": ["user"], "content": "x"}]}),
             json.dumps({"id": "sur", "prompt": "caf\ud800"}), oa("ok2", [5, 6, 7])]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    r = batch_cli(bundles[None], src, out)
    assert r.returncode == 0, r.stderr
    recs = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert len(out.read_text().splitlines()) == len(lines)
    assert recs["ok1"]["error"] is None and recs["ok2"]["error"] is None
    for cid in ("oov", "huge", "neg"):
        assert recs[cid]["error"]["code"] == "invalid_prompt" and "token id" in recs[cid]["error"]["message"]
    assert "999999" in recs["oov"]["error"]["message"] and "vocabulary" in recs["oov"]["error"]["message"]
    assert recs["role"]["error"]["code"] == recs["rolel"]["error"]["code"] == "invalid_request"
    assert any("surrogate" in x["error"]["message"] for x in recs.values() if x["error"])
    assert "2 done, 6 failed" in r.stderr


def test_11_every_per_line_failure_is_that_lines_error(loaded, tmp_path, monkeypatch):
    """A failure no check foresaw (here the tokenizer raising) is the line's error line, and the job goes on."""
    from flashmoe.batch import JobOptions, run_jobs
    from flashmoe.runtime import generate as gen

    model, tok = loaded(None)
    real = gen.prompt_ids

    def flaky(tokenizer, prompt, chat_template=True):
        if "boom" in json.dumps(prompt):
            raise RuntimeError("template exploded")
        return real(tokenizer, prompt, chat_template)

    monkeypatch.setattr(gen, "prompt_ids", flaky)
    lines = [json.dumps({"id": f"d{i}", "prompt": "boom" if i == 1 else f"the cat {i}"}) for i in range(3)]
    s = run_jobs(model, tok, [x.encode() for x in lines], tmp_path / "o.jsonl",
                 JobOptions(progress=False, batch_size=2))
    assert (s.done, s.failed) == (2, 1)
    (err,) = [json.loads(x)["error"] for x in (tmp_path / "o.jsonl").read_text().splitlines()
              if json.loads(x)["error"]]
    assert err["line"] == 2 and "template exploded" in err["message"]


def test_11_unwritable_outputs_are_refused_at_once(bundles, tmp_path, monkeypatch, capsys):
    """`-o /dev/full`, a link, a read-only disk: one line, rc 2. `--stats-json DIR` used to run the whole job and
    then fail, leaving a temp file. A failed start used to leave an empty output file."""
    import errno

    from flashmoe.batch import cli as bcli
    from flashmoe.batch import journal

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "the cat"}) + "\n")
    one_line_error(batch_cli(bundles[None], src, "/dev/full"), "not a regular file")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    one_line_error(batch_cli(bundles[None], src, tmp_path / "link.jsonl"), "is a link")
    assert not (tmp_path / "elsewhere.jsonl").exists()
    statsdir = tmp_path / "stats"
    statsdir.mkdir()
    t = time.monotonic()
    one_line_error(batch_cli(bundles[None], src, tmp_path / "o.jsonl", "--stats-json", statsdir), "is a directory")
    assert time.monotonic() - t < 60 and list(statsdir.iterdir()) == [] and not (tmp_path / "o.jsonl").exists()
    # a failed start (no such bundle) leaves no empty output behind
    one_line_error(batch_cli(tmp_path / "no-bundle", src, tmp_path / "o.jsonl"), "no such bundle directory")
    assert not (tmp_path / "o.jsonl").exists()
    real_open = os.open

    def ro(path, flags, *a):
        if str(path).endswith("ro.jsonl"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(journal.os, "open", ro)
    assert bcli.main([str(bundles[None]), str(src), "-o", str(tmp_path / "ro.jsonl"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "internal error" not in err[0]


def test_11_sigterm_ends_a_batch_job_like_ctrl_c(bundles, tmp_path):
    """SIGTERM ended the job with 143 and no message; now: the line being written is finished, the output is
    whole, the message says how to resume, rc 143; the same command then finishes the job."""
    import signal

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps({"id": f"d{i}", "prompt": f"the cat sat {i}"}) for i in range(300)) + "\n")
    cmd = [sys.executable, "-m", "flashmoe.batch.cli", str(bundles[None]), str(src), "-o", str(out), "-q",
           "--max-tokens", "8", "--max-batch", "4"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Run the same command to resume" in err and "Traceback" not in err
    data = out.read_bytes()
    assert data.endswith(b"\n") and 0 < len(data.splitlines()) < 300  # whole lines only, stopped midway
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 300, r.stderr


def test_11_publish_prints_each_retry_once(converted, hub, capfd):
    from flashmoe.hub import publish_bundle

    hub.state.fail_next = {"h_commit": 2}
    publish_bundle(converted, REPO, token=TOKEN, backoff=0.01, progress=True)
    lines = [x for x in capfd.readouterr().err.splitlines() if "retrying" in x]
    assert len(lines) == 2, lines  # two failures, two lines (each was printed twice)


# ---- 12. a path is never a Hub repo id ---------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["./models/x", "~/nope/x", "/abs/nope", "models/q/x", "a/b/c/d"])
def test_12_a_missing_path_fails_at_once_without_the_hub(hub, arg, tmp_path, monkeypatch):
    import flashmoe
    from flashmoe.convert.source import resolve
    from flashmoe.hub import HubError, resolve_bundle

    n = len(hub.state.requests)
    t = time.monotonic()
    with pytest.raises(HubError, match="no such bundle directory: "):
        resolve_bundle(arg)
    with pytest.raises(BundleError, match="no such bundle directory: "):
        flashmoe.load(arg)  # flashmoe-run, flashmoe-batch, flashmoe-eval load this way
    with pytest.raises(BundleError, match="no such checkpoint directory: "):
        resolve(arg)  # flashmoe-convert
    assert time.monotonic() - t < 2 and hub.state.requests[n:] == []
    monkeypatch.chdir(tmp_path)  # a name that exists here is a path, even if it looks like a repo id
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("x")
    with pytest.raises(HubError, match="is a file, not a bundle directory"):
        resolve_bundle("org/name")


def test_12_batch_cli_missing_bundle_path(bundles, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x"}) + "\n")
    t = time.monotonic()
    one_line_error(batch_cli("./no/such/bundle", src, tmp_path / "o.jsonl"), "no such bundle directory: ")
    assert time.monotonic() - t < 60


def test_11_sigterm_ends_a_pull_like_ctrl_c(converted, hub, hf_env, tmp_path):
    import signal

    from flashmoe.hub import pull_bundle

    out = tmp_path / "out"
    with slow_pull(converted, hub, hf_env, out) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not (out / ".flashmoe-pull").is_dir():
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert pull_bundle(REPO, token=False, progress=False, local_dir=out) == out.resolve()
    same_bytes(converted, out)
