"""`convert_checkpoint`: a Qwen3.5-MoE checkpoint -> a flashmoe bundle (format/SPEC.md).

Works layer by layer and expert chunk by expert chunk, so peak memory is one chunk of experts plus
one layer's dense weights, whatever the model's depth or expert count. Every file is written under
a `.partial` name and renamed when complete; `.flashmoe-progress.json` records finished files, so an
interrupted run resumes where it stopped and ends byte-identical to an uninterrupted one. The
manifest is written last.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from flashmoe.format import BundleError, BundleWriter, ExpertQuant, expert_components
from flashmoe.format.bundle import PROGRESS
from flashmoe.format.jsonio import read_json_file
from flashmoe.format.manifest import (DENSE_GLOBAL, MANIFEST, build_manifest, dense_layer_path, expert_path,
                                      validate_manifest, write_json_atomic)
from flashmoe.format.dtypes import DTYPES
from flashmoe.format.experts import FORMAT_VERSION, file_record_digests, make_info
from flashmoe.format.layout import dense_module_bits
from flashmoe.format.names import ZERO_CENTRED_NORMS, classify
from flashmoe.format.tables import is_table_tensor, plan_tables, table_path, tables_manifest
from flashmoe.runtime.tokenizer import check_tokenizer

from .source import PROJS, Source, copy_tokenizer_files, hub_license, resolve

LOCK = ".flashmoe-convert.lock"
CHUNK_BYTES = 256 << 20  # float32 bytes of experts converted at once (bounds peak memory)


@dataclass
class Options:
    bits: int | None = 4  # expert bits; None keeps experts as float `dtype`
    group_size: int = 64
    dtype: str | None = None  # float dtype of scales / unquantized tensors; None: the source's (bf16 for fp8)
    dense_bits: int | None = 8  # None keeps dense Linear weights as float
    dense_group_size: int = 64


@dataclass
class PlannedFile:
    path: str
    size: int
    exact: bool


def to_numpy(a: mx.array) -> tuple[str, np.ndarray]:
    """mx.array -> (safetensors dtype, numpy array holding its bytes)."""
    d = DTYPES[str(a.dtype).rsplit(".", 1)[-1]]
    return d.st, np.array(a.view(getattr(mx, np.dtype(d.numpy).name)))


def _mx_dtype(name: str):
    return getattr(mx, name)


class Converter:
    def __init__(self, src: Source, out: Path, opts: Options, provenance: dict, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        self.src, self.out, self.opts, self.progress = src, out, opts, progress
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.cfg = src.config
        self.provenance = provenance
        self.dtype = opts.dtype or (src.source_dtype() if src.kind != "fp8" else "bfloat16")
        self.quant = ExpertQuant(opts.bits, opts.group_size, self.dtype)
        self.quant.check()
        if opts.dense_bits not in (None, 4, 8):
            raise BundleError(f"--dense-bits must be 4 or 8 (or omitted for float), not {opts.dense_bits}")
        copy_tokenizer_files(src.path)  # refuses a tokenizer file linked out of the source
        try:
            check_tokenizer(src.path)
        except BundleError as e:
            raise BundleError(f"the source's tokenizer is not usable, so no bundle made from it would be: {e}. "
                              "Download the checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json, "
                              "chat_template.jinja) again") from None
        self.comps = expert_components(self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.quant)
        self.info0 = make_info(0, self.cfg.num_experts, self.comps)
        # sanitized mlx-lm checkpoints store conv1d as [C, K, 1] and norms already as (1 + w)
        self.norms_shifted = any(
            n.endswith("conv1d.weight") and src.tensors[n].shape[-1] == 1 for names in src.dense.values() for n in names
        )
        # Qwen4-Exp's n-gram tables go to tables/ (format/tables.py), not to the dense files
        self.tables = plan_tables(src.raw_config, self.cfg.vocab_size, self.dtype, {
            n: tuple(src.tensors[n].shape) for ns in src.dense.values() for n in ns if is_table_tensor(n)})

    # ---- plan --------------------------------------------------------------------------------
    def plan_key(self) -> dict:
        return {"source": self.provenance, "config": self.cfg.to_dict(), "options": asdict(self.opts),
                "dtype": self.dtype, "kind": self.src.kind, "format_version": FORMAT_VERSION}

    def plan(self) -> list[PlannedFile]:
        files = [PlannedFile(expert_path(L), self.info0.file_size, True) for L in range(self.cfg.num_hidden_layers)]
        for L in [*range(self.cfg.num_hidden_layers), None]:
            est = sum(self._dense_estimate(n) for n in self.src.dense.get(L, []) if not is_table_tensor(n))
            files.append(PlannedFile(DENSE_GLOBAL if L is None else dense_layer_path(L), est, False))
        for n in ["config.json", *copy_tokenizer_files(self.src.path)]:
            files.append(PlannedFile(n, (self.src.path / n).stat().st_size, True))
        return files + [PlannedFile(table_path(i.layer), i.file_size, True) for i, _ in self.tables]

    def _dense_estimate(self, name: str) -> int:
        t = self.src.tensors[name]
        n = int(np.prod(t.shape, dtype=object))
        if name.endswith((".scales", ".biases", "_scale_inv")):
            return 0 if self.opts.dense_bits is None else t.nbytes
        if self.src.kind == "mlx" and t.dtype == "U32":
            n = n * 32 // self.src.mlx_module_quant(name[: -len(".weight")])[0]
        bits = self.opts.dense_bits
        if bits and len(t.shape) == 2 and "norm" not in name and "conv1d" not in name:
            return n * bits // 8 + 2 * (n // self.opts.dense_group_size) * 2
        return n * (4 if "norm" in name or name.endswith(("A_log", "dt_bias")) else np.dtype(self.dtype).itemsize
                    if self.dtype != "bfloat16" else 2)

    # ---- run ---------------------------------------------------------------------------------
    def run(self) -> Path:
        """Convert, resume, or repair: files already in OUT are checked (size and sha256) against the
        manifest or the progress record, and exactly the missing or wrong ones are (re)built."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise BundleError(f"{out} is a file; -o takes a directory (new, empty, or a bundle to repair)")
        try:
            out.mkdir(parents=True, exist_ok=True)
            with OutputLock(out):
                return self._run()
        except OSError as e:
            raise io_error(e, out) from None

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        out = self.out
        state = self._load_state()
        done = state["done"]
        plan = self.plan()
        repaired = self._check_done(state)
        remaining = sum(f.size for f in plan if f.path not in done)
        need = remaining + (64 << 20) if remaining else 0
        free = shutil.disk_usage(out).free
        if need > free:
            raise BundleError(f"{out}: needs about {human(need)} more but only {human(free)} is free; "
                              "free some space or choose another -o directory")
        if done and remaining:
            self.log(f"resuming: {len(done)} of {len(plan)} files already converted")
        L_total = self.cfg.num_hidden_layers
        todo_bytes = sum(self.src.bytes_per_layer(L) for L in range(L_total)
                         if expert_path(L) not in done or dense_layer_path(L) not in done)
        t0 = time.perf_counter()
        read_bytes = 0
        bw = BundleWriter(out, known=done, records={int(k): v for k, v in state["records"].items()})
        with tqdm(total=todo_bytes, unit="B", unit_scale=True, desc="convert", disable=not self.progress) as bar:
            for L in range(L_total):
                if expert_path(L) in bw.files and dense_layer_path(L) in bw.files:
                    continue
                bar.set_postfix_str(f"layer {L + 1}/{L_total}")
                if expert_path(L) not in bw.files:
                    self._write_experts(L, bw)
                    self._save_progress(state, bw)
                if dense_layer_path(L) not in bw.files:
                    state["quantized"].update(self._write_dense(L, bw))
                    self._save_progress(state, bw)
                b = self.src.bytes_per_layer(L)
                read_bytes += b
                bar.update(b)
            if DENSE_GLOBAL not in bw.files:
                state["quantized"].update(self._write_dense(None, bw))
                self._save_progress(state, bw)
            for info, names in self.tables:
                if table_path(info.layer) not in bw.files:
                    bw.table(info, self._table_rows(names))
                    self._save_progress(state, bw)
        for name in ["config.json", *copy_tokenizer_files(self.src.path)]:
            if name not in bw.files:
                bw.copy(self.src.path / name, name)
        for L in range(L_total):  # bundles converted before per-record CRCs: computed from the checked files
            if L not in bw.records:
                bw.records[L] = file_record_digests(out / expert_path(L))
        state["done"], state["records"] = bw.files, {str(k): v for k, v in bw.records.items()}
        manifest = self._manifest(state)
        bw.finish(manifest)
        (out / PROGRESS).unlink(missing_ok=True)
        dt = time.perf_counter() - t0
        total = sum(f["size"] for f in manifest["files"])
        if repaired:
            self.log(f"repaired {len(repaired)} file(s): " + "; ".join(f"{n} ({why})" for n, why in repaired))
        elif state.get("finished"):
            self.log(f"checked {len(manifest['files'])} files against the manifest (size and sha256): nothing to repair")
        self.log(f"done: {out} ({total / 1e9:.3f} GB in {len(manifest['files'])} files; "
                 f"{L_total} layers x {self.cfg.num_experts} experts at "
                 f"{'float ' + self.dtype if self.quant.bits is None else str(self.quant.bits) + '-bit'}; "
                 f"read {read_bytes / 1e9:.3f} GB in {dt:.1f} s = {read_bytes / max(dt, 1e-9) / 1e9:.2f} GB/s)")
        return out

    def _load_state(self) -> dict:
        """What OUT already holds: a finished bundle of this conversion (its manifest), an unfinished one
        (the progress record), a directory of our own files without either (rebuilt), or nothing."""
        key = self.plan_key()
        fresh = {"key": key, "done": {}, "quantized": {}, "records": {}}
        mpath, ppath = self.out / MANIFEST, self.out / PROGRESS
        if mpath.exists():
            m = read_json_file(mpath, "the manifest", f"delete {mpath} and re-run the same command: it rebuilds the "
                               "bundle in place")
            if isinstance(m, dict) and m.get("conversion") == _digest(key):
                try:
                    validate_manifest(m, mpath)
                except BundleError as e:
                    raise BundleError(f"{e}. Delete {mpath} and re-run the same command: it rebuilds the bundle "
                                      "in place") from None
                digests = (m.get("records") or {}).get("digests") or []
                return {"key": key, "done": {f["path"]: {"size": f["size"], "sha256": f["sha256"]} for f in m["files"]},
                        "quantized": m["dense"]["quantized"], "records": {str(i): d for i, d in enumerate(digests)},
                        "finished": True}
            raise BundleError(f"{self.out} already holds a bundle converted with other settings or from another source; "
                              "choose an empty -o directory (nothing was changed)")
        if ppath.exists():
            try:
                state = read_json_file(ppath, "the progress record", "")
                ok = (isinstance(state, dict) and isinstance(state.get("done"), dict)
                      and isinstance(state.get("quantized"), dict) and isinstance(state.get("records", {}), dict)
                      and all(isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
                              for f in state["done"].values()))
            except BundleError:
                ok = False
            if not ok:
                self.log(f"{ppath.name} is unreadable (corrupt): rebuilding every file of the conversion")
                return fresh
            if state.get("key") != json.loads(json.dumps(key)):
                raise BundleError(f"{self.out} holds an unfinished conversion with other settings or from another "
                                  "source; re-run that command to finish it, or choose an empty -o directory")
            state.setdefault("records", {})
            return state
        stray = sorted(x.name for x in self.out.iterdir() if not x.name.endswith(".partial") and x.name != LOCK)
        if stray and not set(stray) <= self._own_names():
            raise BundleError(f"{self.out} is not empty ({', '.join(stray[:4])}...); flashmoe-convert writes only "
                              "into an empty or new directory, or resumes or repairs its own conversion")
        if stray:
            self.log(f"{self.out} holds bundle files but no manifest or progress record: rebuilding every file")
        return fresh

    def _own_names(self) -> set[str]:
        """Top-level names a conversion writes (what a directory of our own may hold)."""
        return {"experts", "dense", "config.json", ".flashmoe-verified.json", "README.md",
                *copy_tokenizer_files(self.src.path)}

    def _check_done(self, state: dict) -> list[tuple[str, str]]:
        """Size and sha256 of every file already written, against the record; the ones that fail are
        dropped from `done` (so they are rebuilt) and returned with the reason."""
        from flashmoe.format.verify import check_files

        done = state["done"]
        if not done:
            return []
        bad, _ = check_files(self.out, done, progress=self.progress)
        for n, why in sorted(bad.items()):
            self.log(f"repairing {n}: {why}")
            del done[n]
            if n.startswith("experts/"):
                state["records"].pop(str(int(n[len("experts/layer-"):-len(".bin")])), None)
        return sorted(bad.items())

    def _save_progress(self, state: dict, bw: BundleWriter) -> None:
        state["done"], state["records"] = bw.files, {str(k): v for k, v in bw.records.items()}
        write_json_atomic(self.out / PROGRESS, state)

    # ---- experts -----------------------------------------------------------------------------
    def _write_experts(self, L: int, bw: BundleWriter) -> None:
        """Three stages overlap: preads of chunk i+1 and writes of chunk i-1 run in threads while the
        main thread (the only one touching MLX) quantizes chunk i."""
        cfg = self.cfg
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
        chunk = max(1, min(cfg.num_experts, CHUNK_BYTES // per_expert))
        chunks = [(e0, min(cfg.num_experts, e0 + chunk)) for e0 in range(0, cfg.num_experts, chunk)]

        def write(w, parts, n):
            for i in range(n):
                w.write_record({k: v[i] for k, v in parts.items()})

        with bw.experts(make_info(L, cfg.num_experts, self.comps)) as w, \
                ThreadPoolExecutor(2, thread_name_prefix="flashmoe-io") as pool:
            reading = pool.submit(self.src.fetch, self.src.expert_reads(L, *chunks[0]))
            writing = None
            for i, (e0, e1) in enumerate(chunks):
                fetched = reading.result()
                if i + 1 < len(chunks):
                    reading = pool.submit(self.src.fetch, self.src.expert_reads(L, *chunks[i + 1]))
                parts = self._expert_parts(L, e0, e1, fetched)
                del fetched
                if writing is not None:
                    writing.result()
                writing = pool.submit(write, w, parts, e1 - e0)
            writing.result()

    def _expert_parts(self, L: int, e0: int, e1: int, fetched: dict | None = None) -> dict[str, np.ndarray]:
        """{component name: numpy [n, ...]} for experts [e0, e1) in the bundle's representation."""
        src, q = self.src, self.quant
        out: dict[str, np.ndarray] = {}
        dt = _mx_dtype(self.dtype)
        if src.kind == "mlx" and q.bits is not None:
            exact = all(src.expert_source_quant(L, p) == (q.bits, q.group_size) for p in PROJS)
            if exact:
                for proj in PROJS:
                    raw = src.raw_expert(L, proj, e0, e1, fetched)
                    if raw["scales"].dtype == dt:  # same bits, group and scale dtype: copy bytes unchanged
                        for part, a in raw.items():
                            out[f"{proj}.{part}"] = to_numpy(a)[1]
                if len(out) == 9:
                    return out
                out.clear()
        floats = src.expert_chunk(L, e0, e1, fetched)
        for proj in PROJS:
            wf = floats[proj].astype(dt)
            if q.bits is None:
                out[f"{proj}.weight"] = to_numpy(wf)[1]
                continue
            wq, s, b = mx.quantize(wf, group_size=q.group_size, bits=q.bits)
            out[f"{proj}.weight"], out[f"{proj}.scales"], out[f"{proj}.biases"] = (to_numpy(a)[1] for a in (wq, s, b))
        return out

    # ---- dense -------------------------------------------------------------------------------
    def _write_dense(self, L: int | None, bw: BundleWriter) -> dict:
        """Write the dense file of layer L (None: the global one); returns its quantized modules."""
        with bw.safetensors(DENSE_GLOBAL if L is None else dense_layer_path(L), {"format": "mlx", "flashmoe": "dense"}) as w:
            return self._dense_tensors(w, L)

    def _dense_tensors(self, w, L: int | None) -> dict:
        src = self.src
        quantized: dict[str, dict] = {}
        names = src.dense.get(L, [])
        present = set(names)
        for name in sorted(names):
            ours = classify(name)
            if is_table_tensor(ours):
                continue  # written by BundleWriter.table
            if name.endswith(("_scale_inv",)) or (src.kind == "mlx" and name.endswith((".scales", ".biases"))
                                                   and name[: -len(".scales")] + ".weight" in present):
                continue  # consumed with their weight
            module = ours[: -len(".weight")] if ours.endswith(".weight") else None
            is_q_src = src.kind == "mlx" and src.tensors[name].dtype == "U32" and module is not None
            if ZERO_CENTRED_NORMS.search(ours):
                v = src.read(name).astype(mx.float32)
                w.add(ours, *to_numpy(v if self.norms_shifted else v + 1.0))
                continue
            if ours.endswith(("A_log", "dt_bias", "linear_attn.norm.weight")):
                w.add(ours, *to_numpy(src.read(name).astype(mx.float32)))
                continue
            if ours.endswith("conv1d.weight"):
                v = src.read(name)
                v = v.reshape(v.shape[0], -1)  # [C, 1, K] or [C, K, 1] -> [C, K]
                w.add(ours, *to_numpy(v.astype(_mx_dtype(self.dtype))))
                continue
            bits = self._dense_bits_for(ours, src.tensors[name].shape, is_q_src, module)
            if is_q_src:
                sb, sg = src.mlx_module_quant(name[: -len(".weight")])
                raw = {p: src.read(name[: -len("weight")] + p) for p in ("weight", "scales", "biases")}
                if bits == (sb, sg) and raw["scales"].dtype == _mx_dtype(self.dtype):
                    for p, a in raw.items():
                        w.add(f"{module}.{p}", *to_numpy(a))
                    quantized[module] = {"bits": sb, "group_size": sg}
                    continue
                v = mx.dequantize(raw["weight"], raw["scales"], raw["biases"], group_size=sg, bits=sb)
            else:
                v = src.read_float(name)
            v = v.astype(_mx_dtype(self.dtype))
            if bits is None:
                w.add(ours, *to_numpy(v))
            else:
                qw, s, b = mx.quantize(v, group_size=bits[1], bits=bits[0])
                for p, a in (("weight", qw), ("scales", s), ("biases", b)):
                    w.add(f"{module}.{p}", *to_numpy(a))
                quantized[module] = {"bits": bits[0], "group_size": bits[1]}
        return quantized

    def _dense_bits_for(self, ours: str, shape, is_q_src: bool, module: str | None) -> tuple[int, int] | None:
        """(bits, group) for a dense 2-D weight, or None to keep it float."""
        if module is None or len(shape) != 2:
            return None
        if self.opts.dense_bits is None:
            return None
        bits = dense_module_bits(module, self.opts.dense_bits)
        gs = self.opts.dense_group_size
        in_f = shape[1] * 32 // self.src.mlx_module_quant(module)[0] if is_q_src else shape[1]
        if in_f % gs:
            return None
        return bits, gs

    # ---- manifest ----------------------------------------------------------------------------
    def _manifest(self, state: dict) -> dict:
        src, info = self.src, self.info0
        prov = dict(self.provenance)
        if "path" in prov:  # a bundle may be published: keep only the directory's name, never the user's full path
            prov["path"] = Path(prov["path"]).name
        prov["kind"] = src.kind
        def text(v):  # config.json fields are untrusted: only a non-empty string goes into the manifest
            return v if isinstance(v, str) and v else None

        prov["license"] = hub_license(src.path / "README.md") or text(src.raw_config.get("license"))
        prov["base_model"] = prov.get("repo") or text(src.raw_config.get("_name_or_path"))
        dense = {"dtype": self.dtype, "bits": self.opts.dense_bits, "group_size": self.opts.dense_group_size,
                 "quantized": dict(sorted(state["quantized"].items()))}
        records = [state["records"][str(L)] for L in range(self.cfg.num_hidden_layers)]
        m = build_manifest(self.cfg, self.quant, info, dense, prov, src.skipped, state["done"],
                           _digest(self.plan_key()), records=records)
        if self.tables:
            m["tables"] = tables_manifest([i for i, _ in self.tables])
        return m

    def _table_rows(self, names: list[str]):
        """A table's rows in order, 64k at a time, in the bundle's dtype (bfloat16 as uint16 bits)."""
        src = self.src
        for n in names:
            rows = src.tensors[n].shape[0]
            for r in range(0, rows, 1 << 16):
                yield to_numpy(src.read(n, slice(r, min(r + (1 << 16), rows))).astype(_mx_dtype(self.dtype)))[1]


def human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def io_error(e: OSError, out: Path) -> BundleError:
    """An OSError while converting, as one sentence that says how to go on."""
    what = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return BundleError(f"{what}the disk is full ({e.strerror}) while writing into {out}; free some space (or "
                           "choose another -o) and re-run the same command: it resumes")
    if e.errno == errno.EFBIG:
        return BundleError(f"{what}the file outgrew this system's file size limit ({e.strerror}; see `ulimit -f` "
                           f"and the file system's maximum) while writing into {out}; lift the limit or choose "
                           "another -o, then re-run the same command: it resumes")
    return BundleError(f"{what}{e.strerror or e} while converting into {out}; fix that and re-run the same command: "
                       "it resumes")


class OutputLock:
    """An exclusive fcntl lock on OUT/.flashmoe-convert.lock for the whole conversion, so that a second
    converter into the same directory refuses at once instead of interleaving files."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd = -1

    def __enter__(self) -> "OutputLock":
        while True:
            try:  # never through a link: a lock file that is a link would have its target truncated
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                raise BundleError(f"{self.path} is a link; flashmoe-convert never writes through a link. Remove it "
                                  "and re-run") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise BundleError(f"{self.path.parent}: another flashmoe-convert (pid {holder or '?'}) is writing into "
                                  "this directory; wait for it to finish, or choose another -o") from None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.path.unlink(missing_ok=True)  # while still holding the lock
        finally:
            os.close(self.fd)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def convert_checkpoint(source: str | Path, out: str | Path, bits: int | None = 4, group_size: int = 64,
                       dtype: str | None = None, dense_bits: int | None = 8, revision: str | None = None,
                       progress: bool = True, dry_run: bool = False,
                       log: Callable[[str], None] | None = None, timeout: float = 10.0) -> Path | list[PlannedFile]:
    """Convert SOURCE (a local checkpoint directory or a Hub repo id) into a bundle at OUT, or check and repair
    the bundle already there. With dry_run, returns the plan (files and sizes) and writes nothing. `timeout`
    bounds each Hub request (seconds)."""
    path, provenance = resolve(str(source), revision=revision, progress=progress, timeout=timeout)
    src = Source.open(path)
    conv = Converter(src, Path(out).expanduser(), Options(bits, group_size, dtype, dense_bits, group_size),
                     provenance, progress=progress, log=log)
    if dry_run:
        return conv.plan()
    return conv.run()
