"""flashmoe.hub against real servers on 127.0.0.1, driven by the real huggingface_hub client, offline.

* Uploads go to tests/hubserver.py (our Hub-compatible server: repo create, preupload, LFS batch +
  PUT with sha256 check, ndjson commit, tree / paths-info, resolve with Range, private repos behind a
  token), with HF_HUB_DISABLE_XET=1: with hf_xet importable, huggingface_hub 2.x uploads only over
  Xet, whose storage service cannot run offline.
* Downloads also go through olah (PyPI: a self-hosted Hub mirror nobody here wrote), serving a local
  git repository offline with the large files as LFS pointers (tests/olahmirror.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hubserver import HubServer, HubState  # noqa: E402

# huggingface_hub's LFS PUT passes a file object as data=, which httpx2 deprecates (not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

TOKEN = "hf_test_write_token"
REPO = "tester/tiny-moe-q4"


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real bundle: the tiny Qwen3.5-MoE checkpoint converted by flashmoe.convert (4-bit experts)."""
    tiny = pytest.importorskip("tiny")
    try:
        from flashmoe.convert import convert_checkpoint
    except ImportError as e:
        pytest.skip(f"flashmoe.convert.convert_checkpoint is not available yet ({e})")
    d = tmp_path_factory.mktemp("bundle")
    ckpt = tiny.save_checkpoint(tiny.build_model(), d / "ckpt")
    return Path(convert_checkpoint(ckpt, d / "bundle", bits=4, group_size=64, progress=False))


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Isolate huggingface_hub: no stored token, no Xet, caches under tmp_path, loopback only."""
    from huggingface_hub import constants

    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return tmp_path


@pytest.fixture
def hub(hf_env, monkeypatch):
    from huggingface_hub import constants

    state = HubState(hf_env / "server")
    with HubServer(state) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", srv.endpoint)  # as if HF_ENDPOINT was set before the import
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            srv.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        yield srv


def sha256(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def manifest_files(bundle: Path) -> list[str]:
    return sorted(f["path"] for f in json.loads((bundle / "flashmoe.json").read_text())["files"])


def same_bytes(a: Path, b: Path) -> None:
    for n in manifest_files(a) + ["flashmoe.json"]:
        assert sha256(a / n) == sha256(b / n), n


def flip_byte(p: Path, at: int | None = None) -> None:
    p = Path(os.path.realpath(p))
    data = bytearray(p.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    os.chmod(p, 0o644)
    p.write_bytes(bytes(data))


def publish(bundle, repo=REPO, **kw):
    from flashmoe.hub import publish_bundle

    kw.setdefault("token", TOKEN)
    return publish_bundle(bundle, repo, progress=False, backoff=0.01, **kw)


def pull(repo=REPO, **kw):
    from flashmoe.hub import pull_bundle

    kw.setdefault("token", False)
    return pull_bundle(repo, progress=False, **kw)


def run_tokens(path: Path, prompt: str = "the cat sat", n: int = 8) -> list[int]:
    import flashmoe

    model, tok = flashmoe.load(str(path))
    return [c.token for c in flashmoe.generate(model, tok, prompt, max_tokens=n, chat_template=False)
            if c.token is not None]


def runtime_missing() -> str | None:
    try:
        import flashmoe.runtime.generate  # noqa: F401
        import flashmoe.runtime.loader  # noqa: F401
    except ImportError as e:
        return f"flashmoe.runtime (flashmoe.load / flashmoe.generate) is not importable: {e}"
    return None


# ---- tests ------------------------------------------------------------------------------------------
def test_roundtrip_convert_publish_pull_run(bundle, hub, hf_env, tmp_path, monkeypatch):
    """convert -> flashmoe-publish (CLI, token from HF_TOKEN) -> pull elsewhere -> same bytes and same tokens."""
    env = dict(os.environ, HF_TOKEN=TOKEN, HF_ENDPOINT=hub.endpoint)
    work = tmp_path / "pub"
    shutil.copytree(bundle, work)
    r = subprocess.run([sys.executable, "-m", "flashmoe.hub.cli", "publish", str(work), REPO, "-q",
                        "--speed", "1000 tok/s on a test server"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert TOKEN not in r.stdout + r.stderr  # tokens are never printed
    assert f"flashmoe-run {REPO}" in r.stdout

    # what is on the server: exactly the bundle + card (+ the .gitattributes every new Hub repo has)
    st = hub.state
    files = st.head_files(REPO)
    assert sorted(files) == sorted(manifest_files(bundle) + ["flashmoe.json", "README.md", ".gitattributes"])
    for n in manifest_files(bundle):
        assert files[n].sha256 == sha256(bundle / n)
        assert files[n].lfs == n.endswith((".bin", ".safetensors")), n
    # the manifest arrives in the last commit, after every file it lists (never a partial bundle)
    repo = st.repo(REPO)
    head = repo.commits[repo.branches["main"]]
    parent = repo.commits[head.parent]
    assert "flashmoe.json" not in parent.files and set(manifest_files(bundle)) <= set(parent.files)
    from huggingface_hub import ModelCard

    card = ModelCard(st.read_file(REPO, "README.md").decode())
    assert card.data.library_name == "flashmoe" and "4-bit" in card.data.tags
    assert f"flashmoe-run {REPO}" in card.text and "1000 tok/s" in card.text

    # pull elsewhere, through the CLI, into a directory
    from flashmoe.hub.cli import pull_main

    out = tmp_path / "pulled"
    assert pull_main([REPO, "-o", str(out), "-q"]) == 0
    same_bytes(bundle, out)
    assert not (out / ".gitattributes").exists()  # only bundle files are downloaded

    # and into the HF cache through resolve_bundle (what flashmoe-run REPO_ID calls)
    from flashmoe.hub import resolve_bundle

    cached = resolve_bundle(REPO, progress=False)
    assert str(cached).startswith(str(hf_env / "hf_home" / "hub"))
    same_bytes(bundle, cached)

    reason = runtime_missing()
    if reason:
        pytest.skip(f"bytes round-trip verified; token comparison skipped: {reason}")
    want = run_tokens(bundle)
    assert len(want) > 0
    assert run_tokens(out) == want
    assert run_tokens(REPO) == want  # flashmoe.load(REPO_ID) -> runtime/loader.py -> flashmoe.hub.pull


def test_second_pull_is_instant(bundle, hub):
    publish(bundle)
    st = hub.state
    p1 = pull()
    n = len(st.requests)
    t = time.perf_counter()
    p2 = pull()
    dt = time.perf_counter() - t
    assert p2 == p1
    assert st.requests[n:] == [("GET", f"/api/models/{REPO}/revision/main")]  # one API call, no downloads
    assert dt < 1.0
    # offline, the cached ref and the verified record are enough
    hub.stop()
    assert pull() == p1


def test_pull_through_olah_mirror(bundle, hf_env, tmp_path):
    """Download through olah, a Hub mirror we did not write, serving a git repo (LFS pointers) offline."""
    pytest.importorskip("olah")
    from olahmirror import OlahServer, make_mirror_repo

    from flashmoe.hub import HubError

    mirrors = tmp_path / "mirrors"
    repo_dir, commit = make_mirror_repo(bundle, mirrors, REPO)
    with OlahServer(tmp_path / "olah", mirrors) as olah:
        p = pull(endpoint=olah.endpoint)
        assert p.name == commit
        same_bytes(bundle, p)
        assert not (p / ".gitattributes").exists()

        # -o DIR works the same; a second pull hashes nothing and downloads nothing
        out = pull(endpoint=olah.endpoint, local_dir=tmp_path / "out")
        same_bytes(bundle, out)
        t = time.perf_counter()
        assert pull(endpoint=olah.endpoint, local_dir=tmp_path / "out") == out
        assert time.perf_counter() - t < 1.0

        # a blob corrupted on the server: detected, re-fetched, still wrong -> named, deleted, never used
        victim = "experts/layer-001.bin"
        from olahmirror import lfs_object

        obj = lfs_object(repo_dir, sha256(bundle / victim))
        good = obj.read_bytes()
        flip_byte(obj)
        fresh = hf_env / "fresh-cache"
        with pytest.raises(HubError) as ei:
            pull(endpoint=olah.endpoint, cache_dir=fresh)
        msg = str(ei.value)
        assert victim in msg and "corrupt" in msg and "re-downloading" in msg
        snap = fresh / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
        assert not (snap / victim).exists()  # the bad copy is not kept
        assert (snap / "experts/layer-000.bin").exists()

        # the server is fixed: the next pull fetches only what is missing and succeeds
        obj.write_bytes(good)
        p = pull(endpoint=olah.endpoint, cache_dir=fresh)
        same_bytes(bundle, p)


def test_transient_corruption_is_refetched(bundle, hub, caplog):
    """A download that arrives corrupted (size intact, so huggingface_hub accepts it) is caught by the
    sha256 check, named, and downloaded again."""
    publish(bundle)
    victim = "dense/layer-002.safetensors"
    hub.state.corrupt_next_get.add(victim)
    with caplog.at_level("INFO", logger="flashmoe.hub"):
        p = pull()
    assert victim not in hub.state.corrupt_next_get  # the corrupted copy was served
    assert any(victim in r.getMessage() and "re-downloading" in r.getMessage() for r in caplog.records)
    same_bytes(bundle, p)
    gets = [path for m, path in hub.state.requests if m == "GET" and path.endswith(victim)]
    assert len(gets) == 2


def test_local_corruption_is_repaired(bundle, hub):
    publish(bundle)
    p = pull()
    # truncation changes the size: caught by every pull, even without --verify
    victim = Path(os.path.realpath(p / "experts/layer-003.bin"))
    os.chmod(victim, 0o644)
    with open(victim, "r+b") as f:
        f.truncate(1000)
    assert pull() == p
    same_bytes(bundle, p)
    # bit rot that keeps size and mtime is caught by a full verification (flashmoe-pull --verify)
    victim = Path(os.path.realpath(p / "dense/global.safetensors"))
    st = victim.stat()
    flip_byte(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    pull(full_verify=True)
    same_bytes(bundle, p)


def test_interrupted_upload_resumes(bundle, hub, tmp_path):
    """Kill flashmoe-publish mid-upload; the repo shows no manifest; re-running sends only what is missing."""
    st = hub.state
    st.hold_puts_after = 2  # the first two LFS PUTs complete, the rest hang until the client dies
    env = dict(os.environ, HF_TOKEN=TOKEN, HF_ENDPOINT=hub.endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "flashmoe.hub.cli", "publish", str(bundle), REPO, "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while st.held_puts == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert st.held_puts > 0, proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    st.release_puts.set()
    assert "flashmoe.json" not in st.head_files(REPO)  # nothing half-published is visible
    first = set(st.lfs_puts[:2])
    n = len(st.lfs_puts)
    st.hold_puts_after = None

    publish(bundle)
    lfs = {sha256(bundle / f) for f in manifest_files(bundle) if f.endswith((".bin", ".safetensors"))}
    resent = st.lfs_puts[n:]
    assert set(resent) == lfs - first and len(resent) == len(lfs) - 2  # already-uploaded objects were skipped
    assert "flashmoe.json" in st.head_files(REPO)
    same_bytes(bundle, pull())
    # publishing again changes nothing and uploads nothing
    head = st.repo(REPO).branches["main"]
    publish(bundle)
    assert st.repo(REPO).branches["main"] == head and len(st.lfs_puts) == n + len(resent)


def test_transient_errors_are_retried(bundle, hub, capsys):
    hub.state.fail_next = {"h_commit": 2, "h_preupload": 1}
    from flashmoe.hub import publish_bundle

    publish_bundle(bundle, REPO, token=TOKEN, backoff=0.01, progress=True)
    assert "flashmoe.json" in hub.state.head_files(REPO)
    err = capsys.readouterr().err
    assert "retrying" in err and TOKEN not in err


def test_private_repo_needs_token(bundle, hub, monkeypatch):
    from flashmoe.hub import HubError

    publish(bundle, private=True, revision="exp")
    assert hub.state.repo(REPO).private
    with pytest.raises(HubError) as ei:
        pull(revision="exp")
    msg = str(ei.value)
    assert "private" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    with pytest.raises(HubError, match="does not give access"):
        pull(revision="exp", token="hf_wrong")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the usual place
    same_bytes(bundle, pull(revision="exp", token=None))
    with pytest.raises(HubError, match="no revision"):
        pull(revision="nope", token=None)


def test_publish_needs_a_token_and_never_prints_it(bundle, hub):
    from flashmoe.hub import HubError

    with pytest.raises(HubError, match="no Hugging Face token"):
        publish(bundle, token=None)
    with pytest.raises(HubError, match="refused the token") as ei:
        publish(bundle, token="hf_bad_secret_value")
    assert "hf_bad_secret_value" not in str(ei.value)
    assert not hub.state.repos


def test_corrupt_bundle_is_never_published(bundle, hub, tmp_path):
    from flashmoe.hub import HubError

    bad = shutil.copytree(bundle, tmp_path / "bad", ignore=shutil.ignore_patterns(".flashmoe-*"))
    flip_byte(bad / "experts/layer-002.bin")
    with pytest.raises(HubError, match="experts/layer-002.bin") as ei:
        publish(bad)
    assert "not publishing" in str(ei.value)
    assert hub.state.requests == [] and not hub.state.repos


def test_resolve_bundle_local_and_errors(bundle, hf_env):
    from flashmoe.hub import HubError, resolve_bundle

    assert resolve_bundle(bundle) == bundle
    assert resolve_bundle(str(bundle)) == bundle
    with pytest.raises(HubError, match="no such bundle directory"):
        resolve_bundle(str(hf_env / "nope"))
    with pytest.raises(HubError, match="no such bundle directory"):
        resolve_bundle("./models/x")


def test_model_card_fields(bundle):
    from huggingface_hub import ModelCard

    from flashmoe.format import Bundle
    from flashmoe.hub.card import card_text

    b = Bundle.open(bundle)
    b.manifest = dict(b.manifest, source={"repo": "Qwen/Qwen3.5-397B-A17B", "revision": "abc123", "kind": "float",
                                          "license": "apache-2.0", "base_model": "Qwen/Qwen3.5-397B-A17B"})
    card = ModelCard(card_text(b, "me/qwen-q4", speed=None))
    assert card.data.library_name == "flashmoe"
    assert card.data.base_model == "Qwen/Qwen3.5-397B-A17B"
    assert card.data.license == "apache-2.0"
    assert {"flashmoe", "4-bit"} <= set(card.data.tags)
    assert "flashmoe-run me/qwen-q4" in card.text and "Not measured yet" in card.text
    assert "Qwen/Qwen3.5-397B-A17B" in card.text and "abc123" in card.text
