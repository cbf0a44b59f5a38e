"""Serve a bundle through olah (a self-hosted Hugging Face mirror from PyPI, code nobody here wrote),
offline, from a local git repository: the realistic download path for tests.

olah's offline mode (`[accessibility] offline = true`) with `mirrors-path` serves
`MIRRORS/models/ORG/NAME` (a git work tree) over the Hub API: repo info, tree, paths-info, resolve.
Large files are committed the way the Hub stores them, as git-lfs pointer files, with their content at
`.git/lfs/objects/OID[:2]/OID[2:4]/OID`, where olah reads it (it needs no git-lfs binary).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

LFS_SUFFIXES = (".bin", ".safetensors")


def _git(cwd: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def make_mirror_repo(files_dir: Path, mirrors: Path, repo_id: str, message: str = "upload bundle") -> tuple[Path, str]:
    """Commit every file under files_dir into the mirror repo for repo_id (created if needed);
    .bin/.safetensors files go in as LFS pointers with their blobs under .git/lfs/objects.
    Returns (repo path, commit sha)."""
    repo = mirrors / "models" / repo_id
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
        (repo / ".gitattributes").write_text("".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n"
                                                     for s in LFS_SUFFIXES))
    for src in sorted(p for p in Path(files_dir).rglob("*") if p.is_file()):
        rel = src.relative_to(files_dir)
        if rel.name.startswith("."):
            continue
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = src.read_bytes()
        if rel.name.endswith(LFS_SUFFIXES):
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            dst.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        else:
            dst.write_bytes(data)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return repo, _git(repo, "rev-parse", "HEAD")


def lfs_object(repo: Path, oid: str) -> Path:
    return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OlahServer:
    """`python -m olah.server --config CFG` in a subprocess on 127.0.0.1, offline."""

    def __init__(self, workdir: Path, mirrors: Path):
        self.workdir = Path(workdir)
        self.mirrors = Path(mirrors)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "OlahServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.workdir / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "[accessibility]\noffline = true\n"
        )
        self.log = open(self.workdir / "olah.out", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from olah.server import main; main()", "--config", str(cfg),
             "--log-path", str(self.workdir / "logs")],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not listen on port {self.port} within {timeout} s: {self.output()}")

    def output(self) -> str:
        try:
            return (self.workdir / "olah.out").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".flashmoe-*"))
    return dst
