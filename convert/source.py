"""Checkpoint sources: resolve a Hub repo id or local directory, index its safetensors lazily, and
hand out float32 expert and dense tensors whatever the source's kind:

    float   bf16/fp16/fp32 weights; experts per-expert (experts.E.gate_proj.weight) or fused
            (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])
    fp8     float8_e4m3 weights with block scales `weight_scale_inv` ([out/B, in/B], B from
            quantization_config.weight_block_size): w = fp8(w) * scale_inv
    mlx     mlx-lm / mlx-community: quantized `switch_mlp` experts [E, out, in*b/32] with scales
            and biases, quantized dense Linear layers, norms already shifted to (1 + w)

Qwen3-Next checkpoints (any kind) fuse two delta-net projections (`in_proj_qkvz`, `in_proj_ba`): the
source shows them as the Qwen3.5 projections they split into, views on their rows (format/names.py), so
the converter writes a Qwen3.5 bundle. Row picking commutes with everything a conversion does to a
weight (MLX quantization groups run along a row; fp8 block scales are applied before the pick).

Nothing is loaded up front: each read is one pread of exactly the bytes needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import mlx.core as mx
import numpy as np

from flashmoe.format import BundleError, TextConfig
from flashmoe.format.jsonio import read_json_file
from flashmoe.format.names import SPLIT_OF, ExpertKey, classify, fused_split, layer_of, split_rows
from flashmoe.format.paths import inside
from flashmoe.format.st import TensorInfo, read_header, read_tensor

# Files a conversion needs from a Hub repo: weights, configs and tokenizer; never other formats.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                     "merges.txt", "chat_template.jinja", "chat_template.json", "LICENSE*", "README.md"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json"]
PROJS = ("gate_proj", "up_proj", "down_proj")


def resolve(source: str, revision: str | None = None, progress: bool = True, timeout: float = 10.0) -> tuple[Path, dict]:
    """A local directory is used as is; anything else is a Hub repo id downloaded (resumable, cached)
    with huggingface_hub: every request under a `timeout`-second limit, a bounded number of attempts, and
    the cached copy when the Hub cannot be reached or HF_HUB_OFFLINE is set. Returns (directory, provenance)."""
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BundleError(f"{source}: is a file; expected a checkpoint directory (with config.json and "
                              "*.safetensors) or a Hub repo id")
        return p, {"path": str(p.resolve()), "revision": revision}
    from flashmoe.hub.common import looks_like_path

    if looks_like_path(source) or source.count("/") != 1:
        raise BundleError(f"no such checkpoint directory: {source} (a path, not a Hub repo id like "
                          "Qwen/Qwen3.5-397B-A17B)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from flashmoe.hub.common import network_timeout, with_retries

    def download() -> str:
        return snapshot_download(source, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                 tqdm_class=None if progress else _NoTqdm)

    try:
        with network_timeout(timeout):
            d = with_retries(download, "download", 3, 1.0, progress=False, note="the download resumes")
    except RepositoryNotFoundError:
        raise BundleError(f"{source}: repository not found on the Hub (or private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        cause = e.__cause__ or e.__context__
        why = f"{type(cause).__name__}: {str(cause)[:160]}" if cause else str(e)[:200]
        raise BundleError(f"{source}: cannot download it ({why}) and there is no cached copy; check the network "
                          "(or unset HF_HUB_OFFLINE) and re-run: the download resumes") from None
    except HfHubHTTPError as e:
        raise BundleError(f"{source}: download failed: {str(e)[:300]}") from None
    except OSError as e:  # network trouble that outlived the retries (httpx errors are not OSErrors)
        raise BundleError(f"{source}: download failed ({e}); re-run to resume") from None
    except Exception as e:
        from flashmoe.hub.common import is_transient

        if is_transient(e):
            raise BundleError(f"{source}: the Hub did not answer ({type(e).__name__}); re-run to resume the "
                              "download") from None
        raise
    # the snapshot folder is named after the commit it holds: no second request to learn it
    d = Path(d)
    return d, {"repo": source, "revision": d.name if re.fullmatch(r"[0-9a-f]{40}", d.name) else revision}


class _NoTqdm:  # tqdm stand-in that shows nothing
    def __init__(self, *a, **k):
        pass

    def update(self, *a):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def fp8_e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn bit patterns (no infinities; 0x7f/0xff are NaN)."""
    b = np.arange(256, dtype=np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = (b & 0x7).astype(np.float64)
    val = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    val = sign * val
    val[(b & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


_FP8 = None


def to_mx(a: np.ndarray, st_dtype: str) -> mx.array:
    """numpy array read from safetensors -> mx.array of its true dtype (float8 decoded to float32)."""
    global _FP8
    if st_dtype == "BF16":
        return mx.array(a).view(mx.bfloat16)
    if st_dtype == "F8_E4M3":
        if _FP8 is None:
            _FP8 = fp8_e4m3_table()
        return mx.array(_FP8[a])
    return mx.array(a)


@dataclass
class Source:
    path: Path
    raw_config: dict
    config: TextConfig
    kind: str  # float | fp8 | mlx
    tensors: dict[str, TensorInfo]
    dense: dict[int | None, list[str]] = field(default_factory=dict)  # layer (None = global) -> checkpoint names
    experts: dict[int, dict[ExpertKey, str]] = field(default_factory=dict)  # layer -> key -> checkpoint name
    skipped: dict = field(default_factory=dict)
    mlx_quant: dict = field(default_factory=dict)
    fp8_block: tuple[int, int] = (128, 128)
    # Qwen3-Next: split projection name -> (fused tensor name, its rows); fused names are not dense names
    views: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path) -> "Source":
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise BundleError(f"{path}: config.json not found; SOURCE must be a Hugging Face checkpoint directory")
        contained(cfg_path, path)
        raw = read_json_file(cfg_path, "config.json", "re-download the checkpoint", limit=16 << 20)
        config = TextConfig.from_hf(raw)
        files = _weight_files(path)
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(read_header(f))
        for k in ("quantization", "quantization_config"):
            if raw.get(k) is not None and not isinstance(raw[k], dict):
                raise BundleError(f"{cfg_path}: {k} must be an object, not {type(raw[k]).__name__}")
        qc = raw.get("quantization") or (raw.get("quantization_config") if "bits" in (raw.get("quantization_config") or {}) else None)
        if qc and any(k.endswith(".scales") for k in tensors):
            kind = "mlx"
        elif (raw.get("quantization_config") or {}).get("quant_method") == "fp8" or any(
                t.dtype == "F8_E4M3" for t in tensors.values()):
            kind = "fp8"
        else:
            kind = "float"
        src = cls(path, raw, config, kind, tensors, mlx_quant=dict(qc or {}))
        if kind == "fp8":
            blk = (raw.get("quantization_config") or {}).get("weight_block_size") or [128, 128]
            if not (isinstance(blk, list) and len(blk) == 2 and all(isinstance(b, int) and 0 < b <= 1 << 16 for b in blk)):
                raise BundleError(f"{cfg_path}: quantization_config.weight_block_size must be two positive integers")
            src.fp8_block = (blk[0], blk[1])
        src._split_fused()
        src._classify()
        return src

    def _split_fused(self) -> None:
        """Qwen3-Next: one view per Qwen3.5 projection (and MLX part) on the rows of its fused tensor."""
        cfg = self.config
        Hk, Dk, Hv, Dv = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads,
                          cfg.linear_value_head_dim)
        for name, t in list(self.tensors.items()):
            parsed = fused_split(name)
            if parsed is None or parsed[2] == "weight_scale_inv":  # fp8 scales: read with their fused weight
                continue
            prefix, fused, part = parsed
            parts = split_rows(fused, Hk, Dk, Hv, Dv)
            rows = sum(len(r) for r in parts.values())
            if not t.shape or t.shape[0] != rows:
                raise BundleError(f"{name}: shape {list(t.shape)} does not have the {rows} rows config.json implies "
                                  f"(linear heads {Hk}/{Hv}, head dims {Dk}/{Dv}); the checkpoint and its config "
                                  "disagree")
            for split, r in parts.items():
                v = f"{prefix}{split}.{part}"
                if v in self.tensors:
                    raise BundleError(f"{self.path}: checkpoint holds both {name} and {v}; a Qwen3-Next checkpoint "
                                      "has only the fused projection, a Qwen3.5 one only the split ones")
                self.views[v] = (name, r)
                self.tensors[v] = TensorInfo(t.file, t.dtype, (len(r), *t.shape[1:]), -1, t.row_bytes * len(r))

    def _classify(self) -> None:
        cfg = self.config
        n_skip, vision, mtp = 0, False, False
        fused = {f for f, _ in self.views.values()}
        for name in self.tensors:
            if name in fused or (fused and fused_split(name)):  # shown as their split views
                continue
            c = classify(name)
            if c is None:
                n_skip += 1
                vision |= "visual" in name or "vision" in name
                mtp |= "mtp" in name
                continue
            if isinstance(c, ExpertKey):
                if c.layer >= cfg.num_hidden_layers:
                    raise BundleError(f"tensor {name} names layer {c.layer}, but the config has {cfg.num_hidden_layers}")
                self.experts.setdefault(c.layer, {})[c] = name
                continue
            layer = layer_of(c)
            if layer is not None and layer >= cfg.num_hidden_layers:
                raise BundleError(f"tensor {name} names layer {layer}, but the config has {cfg.num_hidden_layers}")
            self.dense.setdefault(layer, []).append(name)
        self.skipped = {"vision": vision, "mtp": mtp, "tensors": n_skip}
        for layer in range(cfg.num_hidden_layers):
            self._check_expert_layer(layer)
        self._check_dense()

    def _check_dense(self) -> None:
        """Every dense tensor the runtime needs is present with the shape config.json implies (vocab_size,
        head counts, ...), so a checkpoint that disagrees with its config fails here, before writing."""
        have = {classify(n): n for names in self.dense.values() for n in names}
        for layer in [None, *range(self.config.num_hidden_layers)]:
            for name, want in self.config.dense_shapes(layer).items():
                n = have.get(name)
                if n is None:
                    raise BundleError(f"{self.path}: checkpoint has no {name} (config.json implies one); is a weight "
                                      "shard missing?")
                got = tuple(self.tensors[n].shape)
                if self.kind == "mlx" and self.tensors[n].dtype == "U32" and len(got) == 2 and len(want) == 2:
                    bits = self.mlx_module_quant(n[: -len(".weight")])[0]
                    ok = got[0] == want[0] and got[1] * 32 == want[1] * bits
                elif name.endswith("conv1d.weight"):  # [C, 1, W] (Hugging Face) or [C, W, 1] (mlx-lm)
                    ok = got in (want, (want[0], want[2], 1), (want[0], want[2]))
                else:
                    ok = got == want
                if not ok:
                    raise BundleError(f"{n}: shape {list(got)} does not match {list(want)} implied by config.json "
                                      "(vocab_size, hidden_size, head counts, ...); the checkpoint and its config "
                                      "disagree")

    def _check_expert_layer(self, layer: int) -> None:
        cfg = self.config
        keys = self.experts.get(layer)
        if not keys:
            raise BundleError(f"{self.path}: no expert weights for layer {layer}; is a weight shard missing?")
        H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
        by_kind = {(k.expert is None, k.proj, k.part): n for k, n in keys.items()}
        if self.kind == "mlx":
            for proj, (o, i) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                for part in ("weight", "scales", "biases"):
                    n = by_kind.get((True, proj, part))
                    if n is None:
                        raise BundleError(f"layer {layer}: missing switch_mlp.{proj}.{part} in the MLX checkpoint")
                    t = self.tensors[n]
                    if t.shape[:2] != (E, o):
                        raise BundleError(f"{n}: shape {list(t.shape)} does not match [num_experts={E}, {o}, ...] "
                                          "from config.json; the checkpoint and its config disagree")
            return
        fused = any(k.expert is None for k in keys)
        if fused:
            gu = by_kind.get((True, "gate_up_proj", "weight"))
            dn = by_kind.get((True, "down_proj", "weight"))
            if gu is None or dn is None:
                raise BundleError(f"layer {layer}: fused expert tensors incomplete (need experts.gate_up_proj "
                                  "and experts.down_proj)")
            self._need_shape(gu, (E, 2 * I, H))
            self._need_shape(dn, (E, H, I))
            return
        for e in range(E):
            for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                n = keys.get(ExpertKey(layer, e, proj, "weight"))
                if n is None:
                    raise BundleError(f"layer {layer}: expert {e} {proj} is missing (of {E} experts in config.json); "
                                      "is a weight shard missing?")
                self._need_shape(n, shape)

    def _need_shape(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.tensors[name].shape
        if tuple(got) != tuple(shape):
            raise BundleError(f"{name}: shape {list(got)} does not match {list(shape)} implied by config.json; "
                              "the checkpoint and its config disagree")

    # ---- reading ----------------------------------------------------------------------------
    def source_dtype(self) -> str:
        """The float dtype (bfloat16/float16/float32) the checkpoint's weights are in."""
        st = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
        if self.kind == "mlx":
            scales = next(n for n in self.tensors if n.endswith(".scales"))
            return st.get(self.tensors[scales].dtype, "bfloat16")
        for n in self.dense.get(None, []):
            if self.tensors[n].dtype in st:
                return st[self.tensors[n].dtype]
        return "bfloat16"

    def read(self, name: str, rows: slice | None = None, fetched: dict | None = None) -> mx.array:
        """A tensor (or rows of it) as mx.array; taken from `fetched` (see fetch) when it is there."""
        if name in self.views:
            fused, pick = self.views[name]
            return self.read(fused)[mx.array(pick)]
        t = self.tensors[name]
        key = (name, None if rows is None else (rows.start, rows.stop))
        a = fetched.get(key) if fetched else None
        return to_mx(read_tensor(t, rows) if a is None else a, t.dtype)

    def expert_reads(self, layer: int, e0: int, e1: int) -> list[tuple[str, slice | None]]:
        """Every (tensor, rows) that converting experts [e0, e1) of `layer` reads."""
        keys = self.experts[layer]
        rows = slice(e0, e1)
        if self.kind == "mlx":
            return [(keys[ExpertKey(layer, None, p, part)], rows) for p in PROJS for part in ("weight", "scales", "biases")]
        if any(k.expert is None for k in keys):
            names = [(keys[ExpertKey(layer, None, p, "weight")], rows) for p in ("gate_up_proj", "down_proj")]
        else:
            names = [(keys[ExpertKey(layer, e, p, "weight")], None) for e in range(e0, e1) for p in PROJS]
        if self.kind == "fp8":
            names += [(self._fp8_scale(n), r) for n, r in names if self._fp8_scale(n)]
        return names

    def fetch(self, reads: list[tuple[str, slice | None]]) -> dict:
        """Do the I/O of `reads` (pure preads, no MLX: safe in a background thread)."""
        return {(n, None if r is None else (r.start, r.stop)): read_tensor(self.tensors[n], r) for n, r in reads}

    def _fp8_scale(self, name: str) -> str | None:
        s = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        return s if s in self.tensors else None

    def read_float(self, name: str, rows: slice | None = None, fetched: dict | None = None) -> mx.array:
        """A weight as float (its own dtype, or float32 for fp8), with fp8 block scales applied."""
        if name in self.views:
            fused, pick = self.views[name]
            return self.read_float(fused)[mx.array(pick)]
        w = self.read(name, rows, fetched)
        scale = self._fp8_scale(name) if self.kind == "fp8" else None
        if scale is not None:
            s = self.read(scale, rows, fetched).astype(mx.float32)  # [..., out/B, in/B]
            bo, bi = self.fp8_block
            o, i = w.shape[-2:]
            s = mx.repeat(mx.repeat(s, bo, axis=-2)[..., :o, :], bi, axis=-1)[..., :i]
            w = w * s
        return w

    def mlx_module_quant(self, module: str) -> tuple[int, int]:
        """(bits, group_size) of a quantized module of an MLX checkpoint (per-module overrides first)."""
        q = self.mlx_quant
        head, _, last = module.rpartition(".")
        if self.views and last in SPLIT_OF:  # a split Qwen3-Next projection: quantized as its fused module
            module = f"{head}.{SPLIT_OF[last]}"
        entry = q
        for key in (module, "language_model." + module, "model." + module):
            if isinstance(q.get(key), dict):
                entry = q[key]
                break
        bits, gs = entry.get("bits"), entry.get("group_size")
        if bits not in (2, 3, 4, 5, 6, 8) or gs not in (32, 64, 128):
            raise BundleError(f"{self.path}/config.json: quantization of {module} is bits={str(bits)[:20]}, "
                              f"group_size={str(gs)[:20]}; expected bits in 2-8 and group_size 32, 64 or 128")
        return bits, gs

    def expert_chunk(self, layer: int, e0: int, e1: int, fetched: dict | None = None) -> dict[str, mx.array]:
        """Float weights of experts [e0, e1): {proj: [n, out, in]} (mlx sources: dequantized)."""
        keys = self.experts[layer]
        out = {}
        if self.kind == "mlx":
            for proj in PROJS:
                q = self.raw_expert(layer, proj, e0, e1, fetched)
                bits, gs = self.expert_source_quant(layer, proj)
                out[proj] = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=gs, bits=bits)
            return out
        if any(k.expert is None for k in keys):
            gu = self.read_float(keys[ExpertKey(layer, None, "gate_up_proj", "weight")], slice(e0, e1), fetched)
            inter = gu.shape[1] // 2
            return {"gate_proj": gu[:, :inter], "up_proj": gu[:, inter:],
                    "down_proj": self.read_float(keys[ExpertKey(layer, None, "down_proj", "weight")], slice(e0, e1),
                                                 fetched)}
        for proj in PROJS:
            out[proj] = mx.stack([self.read_float(keys[ExpertKey(layer, e, proj, "weight")], None, fetched)
                                  for e in range(e0, e1)])
        return out

    def raw_expert(self, layer: int, proj: str, e0: int, e1: int, fetched: dict | None = None) -> dict[str, mx.array]:
        """MLX sources: the stored quantized parts of experts [e0, e1) of one projection, untouched."""
        keys = self.experts[layer]
        return {part: self.read(keys[ExpertKey(layer, None, proj, part)], slice(e0, e1), fetched)
                for part in ("weight", "scales", "biases")}

    def expert_source_quant(self, layer: int, proj: str) -> tuple[int, int]:
        name = self.experts[layer][ExpertKey(layer, None, proj, "weight")]
        module = name[: -len(".weight")]
        bits, gs = self.mlx_module_quant(module)
        cfg = self.config
        in_f = cfg.moe_intermediate_size if proj == "down_proj" else cfg.hidden_size
        if self.tensors[name].shape[-1] * 32 != in_f * bits:
            raise BundleError(f"{name}: packed width {self.tensors[name].shape[-1]} does not match {bits}-bit "
                              f"quantization of {in_f} inputs; config.json's quantization is wrong")
        return bits, gs

    def bytes_per_layer(self, layer: int) -> int:
        names = list(self.experts.get(layer, {}).values()) + self.dense.get(layer, [])
        return sum(self.tensors[n].nbytes for n in names)


def contained(p: Path, root: Path) -> Path:
    """`p` itself, if it stays inside the checkpoint `root` with every link followed (a Hugging Face
    cache snapshot may link into its repo's blobs/); never a link out of the source."""
    if not inside(p, root):
        raise BundleError(f"{p} leads outside the checkpoint directory {root} (a link or path to "
                          f"{os.path.realpath(p)}); flashmoe never reads files from outside the source")
    return p


def _weight_files(path: Path) -> list[Path]:
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        fix = "the checkpoint's index is corrupt: re-download it"
        data = read_json_file(index[0], "the weight index", fix)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise BundleError(f"{index[0]}: weight_map must map tensor names to file names; {fix}")
        for f in set(wm.values()):
            pf = PurePosixPath(f)
            if not f or pf.is_absolute() or ".." in pf.parts or "\\" in f or "\0" in f or f.startswith("~"):
                raise BundleError(f"{index[0]}: weight_map names {f[:120]!r}, a path outside the checkpoint; "
                                  "flashmoe reads only files inside SOURCE. The index is corrupt or malicious")
        files = sorted({path / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BundleError(f"{path}: weight files listed in {index[0].name} are missing: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}. Re-run the download (it resumes).")
        return [contained(f, path) for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BundleError(f"{path}: no *.safetensors weight files found")
    return [contained(f, path) for f in files]


def copy_tokenizer_files(src: Path, names=TOKENIZER_FILES) -> list[str]:
    return [n for n in names if (src / n).is_file() and contained(src / n, src)]


def hub_license(raw_readme: Path) -> str | None:
    """license: field of a model card's YAML header, if any."""
    if not raw_readme.is_file() or not inside(raw_readme, raw_readme.parent):
        return None
    text = raw_readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        if line.strip().startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None
