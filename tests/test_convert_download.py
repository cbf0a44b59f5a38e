"""flashmoe-convert with a Hub repo id: the real huggingface_hub download path, offline, through olah
(a Hub mirror nobody here wrote) serving a tiny Qwen3.5-MoE checkpoint from a local git repository."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tiny

REPO = "tiny-org/tiny-qwen3.5-moe"


def test_convert_from_hub_repo_id(tmp_path):
    pytest.importorskip("olah")
    from olahmirror import OlahServer, make_mirror_repo

    ck = tiny.save_checkpoint(tiny.build_model(seed=3), tmp_path / "ck", "bfloat16", "per_expert")
    (ck / "original").mkdir()
    (ck / "original" / "consolidated.bin").write_bytes(b"\0" * 4096)  # not needed: must not be downloaded
    mirrors = tmp_path / "mirrors"
    make_mirror_repo(ck, mirrors, REPO)
    local = subprocess.run([sys.executable, "-m", "flashmoe.convert.cli", str(ck), "-o", str(tmp_path / "local"), "-q"],
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    with OlahServer(tmp_path / "olah", mirrors) as olah:
        env = dict(os.environ, HF_ENDPOINT=olah.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost")
        env.pop("HF_TOKEN", None)
        env.pop("HF_HUB_OFFLINE", None)
        r = subprocess.run([sys.executable, "-m", "flashmoe.convert.cli", REPO, "-o", str(tmp_path / "hub"),
                            "--revision", "main"], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr + olah.output()
    out = tmp_path / "hub"
    # only the files a conversion needs were fetched into the cache
    cached = {p.name for p in (tmp_path / "hf").rglob("*") if p.is_file() or p.is_symlink()}
    assert "model.safetensors" in cached and "config.json" in cached
    assert "consolidated.bin" not in cached
    # the bundle is the same bytes as converting the local directory (only provenance differs)
    for rel in ["experts/layer-000.bin", "experts/layer-003.bin", "dense/global.safetensors", "dense/layer-002.safetensors",
                "tokenizer.json"]:
        assert (out / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
    import json

    src = json.loads((out / "flashmoe.json").read_text())["source"]
    assert src["repo"] == REPO
