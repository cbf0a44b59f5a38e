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

import os
from pathlib import Path

from .config import TextConfig
from flashmoe.errors import BundleError
from .experts import ExpertFile, ExpertFileInfo, parse_components
from .layout import ExpertQuant
from .jsonio import read_json_file
from .manifest import DENSE_GLOBAL, MANIFEST, dense_layer_path, expert_path, safe_relpath, validate_manifest
from .paths import link_problem
from .verify import verify

PROGRESS = ".flashmoe-progress.json"


class Bundle:
    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.config = TextConfig.from_dict(manifest["config"])
        e = manifest["experts"]
        self.expert_quant = ExpertQuant(e["bits"], e["group_size"], e["dtype"])
        self.files: dict[str, dict] = {safe_relpath(f["path"]): f for f in manifest["files"]}
        digests = (manifest.get("records") or {}).get("digests")
        self.record_digests: list[str] | None = digests

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, check_files: bool = True) -> "Bundle":
        path = Path(path).expanduser()
        mpath = path / MANIFEST
        if path.exists() and not path.is_dir():
            raise BundleError(f"{path} is a file, not a bundle directory; give the directory flashmoe-convert -o wrote")
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle directory. Convert one with `flashmoe-convert SOURCE -o {path}`")
        if not mpath.is_file():
            partial = (path / PROGRESS).exists()
            hint = ("a conversion into it did not finish: re-run the same flashmoe-convert command to resume"
                    if partial else "it is not a flashmoe bundle: convert one with `flashmoe-convert SOURCE -o DIR`")
            raise BundleError(f"{path}: {MANIFEST} is missing; {hint}")
        fix = "the bundle is corrupt: re-pull it, or re-run flashmoe-convert with the same arguments"
        manifest = read_json_file(mpath, "the manifest", fix)
        validate_manifest(manifest, mpath)
        b = cls(path, manifest)
        if check_files:
            b.check_files()
        return b

    def check_files(self) -> None:
        """Every listed file exists inside the bundle with its listed size (cheap; `verify` also checks
        content)."""
        for rel, f in self.files.items():
            p = self.path / rel
            why = link_problem(self.path, rel)
            if why:
                raise BundleError(f"{p}: {why}; flashmoe never follows a link out of a bundle. Replace it with "
                                  "the file itself (format/SPEC.md 1)")
            if not p.is_file():
                raise BundleError(
                    f"{self.path}: {rel} is missing. Re-run flashmoe-convert (it repairs) or flashmoe-pull (it repairs)."
                )
            if p.stat().st_size != f["size"]:
                raise BundleError(
                    f"{p}: size {p.stat().st_size} differs from the manifest's {f['size']} (truncated or replaced). "
                    "Re-run flashmoe-pull or flashmoe-convert with the same arguments to repair it."
                )

    # ---- parts ---------------------------------------------------------------------------
    def expert_info(self, layer: int) -> ExpertFileInfo:
        e = self.manifest["experts"]
        return ExpertFileInfo(layer, int(e["num_experts"]), int(e["data_offset"]), int(e["record_size"]),
                              int(e["record_stride"]), parse_components(e["components"]))

    def expert_file(self, layer: int, direct: bool = False) -> ExpertFile:
        """Layer `layer`'s expert file, open; `direct`: reads bypass the page cache (ExpertFile)."""
        return ExpertFile(self.path / expert_path(layer), expected=self.expert_info(layer), direct=direct)

    def dense_path(self, layer: int | None) -> Path:
        return self.path / (DENSE_GLOBAL if layer is None else dense_layer_path(layer))

    @property
    def dense_quant(self) -> dict:
        return self.manifest["dense"]

    def total_bytes(self, prefix: str = "") -> int:
        return sum(f["size"] for rel, f in self.files.items() if rel.startswith(prefix))

    # ---- verification --------------------------------------------------------------------
    def verify(self, progress: bool = True, files: list[str] | None = None, full: bool = True) -> list[str]:
        """sha256 of every file (or the given ones) against the manifest (flashmoe.format.verify). Returns
        the sorted names of files that do not match (empty when all do); a missing file counts."""
        return sorted(verify(self, names=files, full=full, progress=progress))
