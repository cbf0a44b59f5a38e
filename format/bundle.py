"""The bundle: a directory with a manifest (flashmoe.json), per-layer expert files, dense weights in
safetensors, and the tokenizer. Open it with `Bundle.open(path)`; `verify()` checks every sha256.

    BUNDLE/
      flashmoe.json                 manifest (schema: format/manifest.schema.json)
      config.json                   the source's config.json, unchanged
      tokenizer.json, ...           tokenizer and chat template files copied from the source
      dense/global.safetensors      embed_tokens, final norm, lm_head
      dense/layer-NNN.safetensors   non-expert weights of layer NNN (attention, router, shared expert, norms)
      experts/layer-NNN.bin         routed experts of layer NNN, one 16 KiB-aligned record per expert
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Callable

from .config import TextConfig
from .errors import BundleError
from .experts import FORMAT_VERSION, ExpertFile, ExpertFileInfo, parse_components
from .layout import ExpertQuant

MANIFEST = "flashmoe.json"
FORMAT_NAME = "flashmoe-bundle"
MAX_MANIFEST_BYTES = 64 << 20
HASH_CHUNK = 8 << 20


def expert_path(layer: int) -> str:
    return f"experts/layer-{layer:03d}.bin"


def dense_layer_path(layer: int) -> str:
    return f"dense/layer-{layer:03d}.safetensors"


DENSE_GLOBAL = "dense/global.safetensors"


def safe_relpath(p: str) -> str:
    """Manifest paths are relative POSIX paths inside the bundle; anything else is rejected."""
    pp = PurePosixPath(p)
    if not p or pp.is_absolute() or ".." in pp.parts or "\\" in p or p.startswith("~"):
        raise BundleError(f"manifest names an unsafe path {p!r}; the bundle is corrupt or malicious")
    return str(pp)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        mv = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            if progress:
                progress(n)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Bundle:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.config = TextConfig.from_dict(manifest["config"])
        e = manifest["experts"]
        self.expert_quant = ExpertQuant(e["bits"], int(e["group_size"]), e["dtype"])
        self.files: dict[str, dict] = {safe_relpath(f["path"]): f for f in manifest["files"]}

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, check_files: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        mpath = path / MANIFEST
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory. Convert one with `flashmoe-convert SOURCE -o {path}`")
        if not mpath.is_file():
            partial = (path / ".flashmoe-progress.json").exists()
            hint = ("a conversion into it did not finish: re-run the same flashmoe-convert command to resume"
                    if partial else "it is not a flashmoe bundle: convert one with `flashmoe-convert SOURCE -o DIR`")
            raise BundleError(f"{path}: {MANIFEST} is missing; {hint}")
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath}: manifest is {size} bytes, larger than any valid one; the bundle is corrupt")
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath}: not valid JSON ({e}); the bundle is corrupt, re-pull or re-convert it") from None
        validate_manifest(manifest, mpath)
        b = cls(path, manifest)
        if check_files:
            b.check_files()
        return b

    def check_files(self) -> None:
        """Every listed file exists with its listed size (cheap; `verify` also checks content)."""
        for rel, f in self.files.items():
            p = self.path / rel
            if not p.is_file():
                raise BundleError(
                    f"{self.path}: {rel} is missing. Re-run flashmoe-convert (it resumes) or flashmoe-pull (it repairs)."
                )
            if p.stat().st_size != f["size"]:
                raise BundleError(
                    f"{p}: size {p.stat().st_size} differs from the manifest's {f['size']} (truncated or replaced). "
                    "Re-run flashmoe-pull to repair, or re-convert."
                )

    # ---- parts ---------------------------------------------------------------------------
    def expert_info(self, layer: int) -> ExpertFileInfo:
        e = self.manifest["experts"]
        return ExpertFileInfo(layer, int(e["num_experts"]), int(e["data_offset"]), int(e["record_size"]),
                              int(e["record_stride"]), parse_components(e["components"]))

    def expert_file(self, layer: int) -> ExpertFile:
        return ExpertFile(self.path / expert_path(layer), expected=self.expert_info(layer))

    def dense_path(self, layer: int | None) -> Path:
        return self.path / (DENSE_GLOBAL if layer is None else dense_layer_path(layer))

    @property
    def dense_quant(self) -> dict:
        return self.manifest["dense"]

    def total_bytes(self, prefix: str = "") -> int:
        return sum(f["size"] for rel, f in self.files.items() if rel.startswith(prefix))

    # ---- verification --------------------------------------------------------------------
    def verify(self, progress: bool = True, files: list[str] | None = None) -> list[str]:
        """sha256 of every file (or the given ones) against the manifest. Returns the names of files that
        do not match (empty when all do); a missing file counts as a mismatch."""
        from tqdm.auto import tqdm

        names = sorted(files if files is not None else self.files)
        total = sum(self.files[n]["size"] for n in names)
        bad = []
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for n in names:
                p = self.path / n
                if not p.is_file() or p.stat().st_size != self.files[n]["size"]:
                    bad.append(n)
                    bar.update(self.files[n]["size"])
                    continue
                if sha256_file(p, bar.update) != self.files[n]["sha256"]:
                    bad.append(n)
        return bad


def build_manifest(config: TextConfig, quant: ExpertQuant, info: ExpertFileInfo, dense: dict, source: dict,
                   skipped: dict, files: dict[str, dict], conversion: str) -> dict:
    """The manifest dict (section 2 of SPEC.md) for a finished bundle; `files` maps path -> {size, sha256}."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "conversion": conversion,
        "model_type": "qwen3_5_moe",
        "config": config.to_dict(),
        "experts": {
            "bits": quant.bits, "group_size": quant.group_size, "dtype": quant.dtype,
            "num_experts": info.num_experts, "data_offset": info.data_offset,
            "record_size": info.record_size, "record_stride": info.record_stride,
            "components": [c.to_dict() for c in info.components],
        },
        "dense": dense,
        "source": source,
        "skipped": skipped,
        "files": [{"path": p, "size": f["size"], "sha256": f["sha256"]} for p, f in sorted(files.items())],
    }


def validate_manifest(m, where: Path | str = MANIFEST) -> None:
    """Structural checks beyond JSON syntax (the schema in manifest.schema.json says the same)."""

    def need(cond, msg):
        if not cond:
            raise BundleError(f"{where}: {msg}; the bundle is corrupt or not a flashmoe bundle")

    need(isinstance(m, dict), "manifest is not a JSON object")
    need(m.get("format") == FORMAT_NAME, f"format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    v = m.get("format_version")
    need(isinstance(v, int) and v >= 1, f"format_version {v!r} is invalid")
    if v > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {v} is newer than this flashmoe reads ({FORMAT_VERSION}); "
            "upgrade flashmoe (pip install -U flashmoe)"
        )
    for key in ("config", "experts", "dense", "files"):
        need(key in m, f"missing key {key!r}")
    need(isinstance(m["files"], list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
        and f["size"] >= 0 and isinstance(f.get("sha256"), str) and len(f["sha256"]) == 64
        for f in m["files"]), "files must list {path, size, sha256}")
    e = m["experts"]
    for key in ("bits", "group_size", "dtype", "num_experts", "data_offset", "record_size", "record_stride",
                "components"):
        need(key in e, f"experts lacks {key!r}")
    try:
        cfg = TextConfig.from_dict(m["config"])
        cfg.check()
    except TypeError as ex:
        raise BundleError(f"{where}: config is incomplete ({ex})") from None
    ExpertQuant(e["bits"], int(e["group_size"]), e["dtype"]).check()
    need(int(e["num_experts"]) == cfg.num_experts, "experts.num_experts disagrees with config.num_experts")
    info = ExpertFileInfo(0, int(e["num_experts"]), int(e["data_offset"]), int(e["record_size"]),
                          int(e["record_stride"]), parse_components(e["components"]))
    info.check()
    from .layout import expert_components

    want = expert_components(cfg.hidden_size, cfg.moe_intermediate_size,
                             ExpertQuant(e["bits"], int(e["group_size"]), e["dtype"]))
    need(list(info.components) == want,
         "expert component table does not match the shapes implied by config and quantization")
    listed = {f["path"] for f in m["files"]}
    for layer in range(cfg.num_hidden_layers):
        need(expert_path(layer) in listed, f"files does not list {expert_path(layer)}")
        need(dense_layer_path(layer) in listed, f"files does not list {dense_layer_path(layer)}")
    need(DENSE_GLOBAL in listed, f"files does not list {DENSE_GLOBAL}")
