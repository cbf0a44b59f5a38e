"""Start-up checks of a distributed run (runtime/distributed.py): every rank holds the same conversion of the
bundle, and its own part of a sharded one (`flashmoe-pull --shard r/N`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flashmoe.hub.shard import SHARD_MARKER  # written by `flashmoe-pull --shard r/N`

from .experts import ExpertShard


def bundle_digest(bundle_dir: Path, experts_per_token: int | None) -> bytes:
    """sha256 of the manifest (which names the conversion and every file's sha256) and the run settings
    every rank must share."""
    h = hashlib.sha256((bundle_dir / "flashmoe.json").read_bytes())
    h.update(json.dumps({"experts_per_token": experts_per_token}).encode())
    return h.digest()


def bundle_part_problem(bundle_dir: Path, shard: ExpertShard) -> str | None:
    """Why this rank cannot run from `bundle_dir` (a message naming the rank, the file and the fix), or
    None. A bundle pulled with `flashmoe-pull --shard r/N` holds only rank r's expert records and says so
    in SHARD_MARKER; a whole bundle serves any rank."""
    from flashmoe.format.manifest import expert_path

    who = f"rank {shard.rank} of {shard.size}"
    marker = bundle_dir / SHARD_MARKER
    if not (bundle_dir / "flashmoe.json").is_file():
        return (f"{who}: {bundle_dir / 'flashmoe.json'} is missing: this host has no copy of the bundle. On this host "
                f"run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o {bundle_dir}` (or copy the bundle there)")
    if not marker.is_file():
        return None
    try:
        m = json.loads(marker.read_text())
        have = ExpertShard(int(m["rank"]), int(m["size"]))
    except (OSError, ValueError, KeyError, TypeError):
        return f"{who}: {marker} is unreadable; re-run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o {bundle_dir}`"
    fix = (f"on this host run `flashmoe-pull REPO --shard {shard.rank}/{shard.size} -o DIR` and give this rank that "
           "directory (or a whole bundle)")
    if (have.rank, have.size) != (shard.rank, shard.size):
        if shard.size == 1:
            return (f"{bundle_dir} holds only the experts of shard {have.rank}/{have.size} (flashmoe-pull --shard): run it "
                    f"on {have.size} ranks with mlx.launch, or pull the whole bundle without --shard")
        return f"{who}: {bundle_dir} holds the experts of shard {have.rank}/{have.size}, not this rank's; {fix}"
    if m.get("manifest_sha256") != hashlib.sha256((bundle_dir / "flashmoe.json").read_bytes()).hexdigest():
        return f"{who}: {marker} belongs to another version of the bundle; {fix}"
    layers = json.loads((bundle_dir / "flashmoe.json").read_text())["config"].get("num_hidden_layers", 0)
    for layer in range(int(layers)):
        p = bundle_dir / expert_path(layer)
        if not p.is_file():
            return f"{who}: {p} is missing; {fix} (it resumes)"
    return None
