"""The manifest (flashmoe.json): one strict JSON reader, one validator, one writer.

* `load_json` (format/jsonio.py) parses JSON the way every flashmoe reader must.
* `validate_manifest` enforces `manifest.schema.json` as it is (a small interpreter of the JSON Schema
  keywords that file uses: the schema is the one source of truth, and a keyword this interpreter does not
  know fails at import), then the cross-field rules a schema cannot state (SPEC sections 2-4).
* `write_manifest` is the one writer of the manifest-last protocol: it validates, checks that every
  listed file is on disk with its size, and renames the manifest into place last.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath

from .config import TextConfig
from flashmoe.errors import BundleError
from .experts import FORMAT_VERSION, ExpertFileInfo, parse_components
from .files import write_file
from .layout import ROUTER_MIN_BITS, ExpertQuant, check_quantizable, expert_components, is_router

MANIFEST = "flashmoe.json"
FORMAT_NAME = "flashmoe-bundle"
DENSE_GLOBAL = "dense/global.safetensors"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


def expert_path(layer: int) -> str:
    return f"experts/layer-{layer:03d}.bin"


def dense_layer_path(layer: int) -> str:
    return f"dense/layer-{layer:03d}.safetensors"


# ---- the schema interpreter -----------------------------------------------------------------------
_KNOWN = {"$schema", "$id", "$comment", "title", "type", "const", "enum", "required", "properties",
          "additionalProperties", "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
          "multipleOf", "pattern"}


def _is_type(v, t: str) -> bool:
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "null":
        return v is None
    raise AssertionError(f"schema type {t!r}")


def _same(a, b) -> bool:
    """Equality of JSON scalars, stricter than JSON Schema's: true is not 1, and 64.0 is not 64."""
    return type(a) is type(b) and a == b


def _check_schema_keywords(s, at="#") -> None:
    if isinstance(s, dict):
        unknown = set(s) - _KNOWN
        assert not unknown, f"manifest.schema.json {at}: keyword(s) {sorted(unknown)} not enforced by flashmoe"
        for k in ("properties",):
            for name, sub in s.get(k, {}).items():
                _check_schema_keywords(sub, f"{at}/{k}/{name}")
        for k in ("items", "additionalProperties"):
            if isinstance(s.get(k), dict):
                _check_schema_keywords(s[k], f"{at}/{k}")


def schema_error(v, s: dict, at: str = "") -> str | None:
    """The first way `v` violates schema `s` ("where: what"), or None."""
    here = at or "(top level)"
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is_type(v, t) for t in types):
            return f"{here}: expected {' or '.join(types)}, got {_describe(v)}"
    if "const" in s and not _same(v, s["const"]):
        return f"{here}: must be {json.dumps(s['const'])}, got {_describe(v)}"
    if "enum" in s and not any(_same(v, e) for e in s["enum"]):
        return f"{here}: must be one of {json.dumps(s['enum'])}, got {_describe(v)}"
    if _is_type(v, "number"):
        if "minimum" in s and v < s["minimum"]:
            return f"{here}: {v} is below the minimum {s['minimum']}"
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            return f"{here}: {v} must be greater than {s['exclusiveMinimum']}"
        if "maximum" in s and v > s["maximum"]:
            return f"{here}: {v} is above the maximum {s['maximum']}"
        if "multipleOf" in s and v % s["multipleOf"]:
            return f"{here}: {v} is not a multiple of {s['multipleOf']}"
    elif isinstance(v, float) and not math.isfinite(v):
        return f"{here}: {v} is not a finite number"
    if isinstance(v, str) and "pattern" in s and not re.search(s["pattern"], v):
        return f"{here}: {v[:80]!r} is malformed"
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            return f"{here}: needs at least {s['minItems']} items, has {len(v)}"
        if "maxItems" in s and len(v) > s["maxItems"]:
            return f"{here}: allows at most {s['maxItems']} items, has {len(v)}"
        if isinstance(s.get("items"), dict):
            for i, item in enumerate(v):
                err = schema_error(item, s["items"], f"{at}[{i}]")
                if err:
                    return err
    if isinstance(v, dict):
        for k in s.get("required", []):
            if k not in v:
                return f"{here}: missing key {k!r}"
        props = s.get("properties", {})
        for k, item in v.items():
            sub = props.get(k, s.get("additionalProperties"))
            if isinstance(sub, dict):
                err = schema_error(item, sub, f"{at}.{k}" if at else k)
                if err:
                    return err
    return None


def _describe(v) -> str:
    r = json.dumps(v)[:60] if not isinstance(v, float) or math.isfinite(v) else str(v)
    return f"{type(v).__name__ if v is not None else 'null'} {r}"


SCHEMA = json.loads(SCHEMA_PATH.read_text())
_check_schema_keywords(SCHEMA)


# ---- the validator --------------------------------------------------------------------------------
def safe_relpath(p) -> str:
    """Manifest paths are relative POSIX paths inside the bundle; anything else is rejected."""
    pp = PurePosixPath(p) if isinstance(p, str) else None
    if pp is None or not p or pp.is_absolute() or ".." in pp.parts or "\\" in p or p.startswith("~") or "\0" in p:
        raise BundleError(f"manifest names an unsafe path {p!r}; the bundle is corrupt or malicious")
    return str(pp)


def validate_manifest(m, where: Path | str = MANIFEST) -> None:
    """Everything manifest.schema.json says, then SPEC's cross-field rules. Raises one BundleError."""
    def fail(msg):
        raise BundleError(f"{where}: {msg}; the bundle is corrupt or not a flashmoe bundle")

    if isinstance(m, dict) and isinstance(m.get("format_version"), int) and not isinstance(m["format_version"], bool) \
            and m["format_version"] > FORMAT_VERSION and m.get("format") == FORMAT_NAME:
        raise BundleError(f"{where}: bundle format version {m['format_version']} is newer than this flashmoe reads "
                          f"({FORMAT_VERSION}); upgrade flashmoe (pip install -U flashmoe)")
    if isinstance(m, dict) and isinstance(m.get("files"), list):  # the most dangerous field first, named as such
        for f in m["files"]:
            if isinstance(f, dict) and isinstance(f.get("path"), str):
                safe_relpath(f["path"])
    err = schema_error(m, SCHEMA)
    if err:
        fail(err)
    paths = [f["path"] for f in m["files"]]
    if len(set(paths)) != len(paths):
        fail("files lists a path twice")
    cfg = TextConfig.from_dict(m["config"])
    cfg.check()
    e = m["experts"]
    q = ExpertQuant(e["bits"], e["group_size"], e["dtype"])
    if e["num_experts"] != cfg.num_experts:
        fail("experts.num_experts disagrees with config.num_experts")
    info = ExpertFileInfo(0, e["num_experts"], e["data_offset"], e["record_size"], e["record_stride"],
                          parse_components(e["components"]))
    info.check()
    if list(info.components) != expert_components(cfg.hidden_size, cfg.moe_intermediate_size, q):
        fail("expert component table does not match the shapes implied by config and quantization")
    shapes = {}
    for layer in [None, *range(cfg.num_hidden_layers)]:
        shapes.update(cfg.dense_shapes(layer))
    if cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = shapes["embed_tokens.weight"]
    for module, mq in m["dense"]["quantized"].items():
        if is_router(module) and mq["bits"] < ROUTER_MIN_BITS:
            fail(f"dense.quantized.{module} is {mq['bits']}-bit; the router and shared-expert gate are never "
                 f"stored below {ROUTER_MIN_BITS} bits (SPEC section 4)")
        shape = shapes.get(module + ".weight")
        if shape is None and cfg.model_type == "qwen4_exp":
            continue  # its hyper-connection, PLE and indexer Linears: checked against the model when loaded
        if shape is None or len(shape) != 2:
            fail(f"dense.quantized names {module[:80]!r}, which is not a Linear or embedding weight of this config")
        try:  # the config's shapes must be quantizable as listed (e.g. head_dim 65 breaks o_proj's 64-groups)
            check_quantizable(f"dense.quantized.{module} ({list(shape)} from config)", shape[1], mq["bits"],
                              mq["group_size"])
        except BundleError as e:
            fail(str(e))
    listed = set(paths)
    for layer in range(cfg.num_hidden_layers):
        for p in (expert_path(layer), dense_layer_path(layer)):
            if p not in listed:
                fail(f"files does not list {p}")
    if DENSE_GLOBAL not in listed:
        fail(f"files does not list {DENSE_GLOBAL}")
    rec = m.get("records")
    if rec is not None:
        d = rec["digests"]
        if len(d) != cfg.num_hidden_layers or any(len(x) != 8 * cfg.num_experts for x in d):
            fail("records.digests must hold one CRC-32 (8 hex digits) per expert of every layer")


def build_manifest(config, quant, info, dense: dict, source: dict, skipped: dict, files: dict[str, dict],
                   conversion: str, records: list[str] | None = None) -> dict:
    """The manifest dict (SPEC section 2) for a finished bundle; `files` maps path -> {size, sha256};
    `records` is one CRC-32 hex string per layer (SPEC 3.2), or None to leave them out."""
    m = {
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
    if records is not None:
        m["records"] = {"algorithm": "crc32", "digests": list(records)}
    return m


def write_json_atomic(path: Path, obj) -> None:
    """JSON to `path` via a new `path.partial`, fsynced, then renamed: a reader sees the old file or the new one."""
    write_file(Path(path), (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def write_manifest(out: Path, manifest: dict) -> Path:
    """The last step of writing a bundle (SPEC section 1): validate the manifest, check that every file it
    lists is in place with its size, then rename flashmoe.json into place. Returns its path."""
    out = Path(out)
    validate_manifest(manifest, out / MANIFEST)
    for f in manifest["files"]:
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            raise BundleError(f"{p}: missing or not {f['size']} bytes; a bundle's files must all be written "
                              "before its manifest")
    write_json_atomic(out / MANIFEST, manifest)
    return out / MANIFEST
