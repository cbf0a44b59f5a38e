"""The fault matrix of issue 14: one test per defect, each reproducing the fault and checking the fixed
behaviour. Run it as one command:

    pytest tests/test_faults.py

The table of cases and outcomes is docs/faults.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tiny
from flashmoe.convert import convert_checkpoint
from flashmoe.convert import converter as conv_mod
from flashmoe.format import Bundle, BundleError, ExpertFile, validate_manifest, write_manifest
from flashmoe.format.manifest import MANIFEST
from flashmoe.runtime.integrity import RecordVerifier, check_dense, check_finite, check_logits
from test_hub import REPO, TOKEN, hf_env, hub, manifest_files, same_bytes  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

# ---- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny.save_checkpoint(tiny.build_model(seed=2), tmp_path_factory.mktemp("src") / "ck", "bfloat16", "fused")


@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory) -> Path:
    return convert_checkpoint(ckpt, tmp_path_factory.mktemp("conv") / "b", bits=4, progress=False)


@pytest.fixture
def bundle(converted, tmp_path) -> Path:
    """A private copy of the converted bundle (tests damage it)."""
    return Path(shutil.copytree(converted, tmp_path / "b"))


@pytest.fixture
def src_copy(ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "ck"))


def cli(module: str, *args, env=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, no traceback, not an internal error, and the error as one line that contains every needle."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err
    line = err.splitlines()[-1]
    assert "error" in line.lower(), err
    for n in needles:
        assert n in line, (n, line)


def flip(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0x40
    p.write_bytes(bytes(data))


def record_offset(b: Bundle, layer: int, expert: int, component: str) -> int:
    info = b.expert_info(layer)
    comp = next(c for c in info.components if c.name == component)
    return info.data_offset + expert * info.record_stride + comp.offset


def convert_logs(ckpt, out, **kw) -> list[str]:
    logs: list[str] = []
    convert_checkpoint(ckpt, out, bits=4, progress=False, log=logs.append, **kw)
    return logs


# ---- 1. a corrupted bundle must not run silently -------------------------------------------------------------
def test_1_record_checksums_catch_a_flipped_scale(bundle):
    b = Bundle.open(bundle)
    assert b.record_digests and len(b.record_digests) == b.config.num_hidden_layers
    v = RecordVerifier(b)
    buf = np.zeros(b.expert_info(0).record_stride, np.uint8)
    for layer in range(b.config.num_hidden_layers):  # every record of a good bundle passes
        f = b.expert_file(layer)
        for e in range(b.config.num_experts):
            f.read_into(e, buf)
            assert v.check(layer, e, buf)
        f.close()
    assert v.verified == b.config.num_hidden_layers * b.config.num_experts
    assert not v.check(0, 0, buf)  # once per process: already verified, not hashed again
    # the fault: one byte of expert 5's gate_proj.scales in layer 2; sizes and headers stay valid
    flip(bundle / "experts/layer-002.bin", record_offset(b, 2, 5, "gate_proj.scales") + 3)
    b = Bundle.open(bundle)
    f = b.expert_file(2)
    f.read_into(5, buf)
    with pytest.raises(BundleError, match=r"expert 5 of layer 2 fails its checksum.*flashmoe-inspect .* --verify"):
        RecordVerifier(b).check(2, 5, buf)
    f.read_into(4, buf)
    RecordVerifier(b).check(2, 4, buf)  # its neighbours are fine


def test_1_dense_corruption_caught_at_load(bundle):
    b = Bundle.open(bundle)
    check_dense(b)  # hashes once and records it; a second check only stats
    t = time.perf_counter()
    check_dense(b)
    assert time.perf_counter() - t < 0.5
    flip(bundle / "dense/layer-001.safetensors", -100)
    with pytest.raises(BundleError, match=r"dense/layer-001.safetensors: sha256 .*--verify"):
        check_dense(Bundle.open(bundle))


def test_1_nan_and_degenerate_activations_are_named():
    import mlx.core as mx

    check_finite(mx.ones((1, 4)), "layer 3")
    check_logits(mx.array([[0.1, 2.0, -1.0]]))
    with pytest.raises(BundleError, match=r"^layer 3 produced NaN: the bundle may be corrupt; run `flashmoe-inspect"):
        check_finite(mx.array([[1.0, float("nan")]]), "layer 3")
    with pytest.raises(BundleError, match="produced an infinite value"):
        check_finite(np.array([np.inf]), "layer 0")
    with pytest.raises(BundleError, match="constant logits"):
        check_logits(mx.zeros((1, 512)))


def test_1_corrupt_bundle_fails_the_run_instead_of_printing_nothing(bundles, tmp_path):
    """Every record's scales of layer 0 set to NaN bit patterns (what a bad sector could do): the run must
    stop with a one-line error, not exit 0 with empty output."""
    out = Path(shutil.copytree(bundles[4], tmp_path / "b"))
    b = Bundle.open(out)
    p = out / "experts/layer-000.bin"
    data = bytearray(p.read_bytes())
    for e in range(b.config.num_experts):
        at = record_offset(b, 0, e, "gate_proj.scales")
        data[at:at + 64] = b"\xff" * 64
    p.write_bytes(bytes(data))
    r = cli("flashmoe.runtime.cli", out, "--prompt", "the cat", "--max-tokens", "4", "--temperature", "0",
            "--no-chat-template")
    one_line_error(r, "flashmoe-inspect")


# ---- 2. re-running flashmoe-convert repairs ------------------------------------------------------------------
def test_2_rerun_rebuilds_a_deleted_file(ckpt, converted, bundle):
    (bundle / "experts/layer-002.bin").unlink()
    logs = convert_logs(ckpt, bundle)
    assert any("repaired 1 file(s): experts/layer-002.bin (missing)" in m for m in logs), logs
    same_bytes(converted, bundle)


def test_2_rerun_repairs_corrupt_bytes(ckpt, converted, bundle):
    flip(bundle / "dense/layer-001.safetensors", -100)
    flip(bundle / "experts/layer-000.bin", 20000)
    logs = convert_logs(ckpt, bundle)
    done = [m for m in logs if m.startswith("repaired")]
    assert done and "dense/layer-001.safetensors (sha256" in done[0] and "experts/layer-000.bin (sha256" in done[0]
    same_bytes(converted, bundle)
    assert Bundle.open(bundle).verify(progress=False) == []
    logs = convert_logs(ckpt, bundle)  # an intact bundle: a check, nothing rebuilt
    assert any("nothing to repair" in m for m in logs) and not any(m.startswith("repaired") for m in logs)


def test_2_second_converter_refuses(ckpt, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    with conv_mod.OutputLock(out):  # a converter holding the directory
        with pytest.raises(BundleError, match=f"another flashmoe-convert \\(pid {os.getpid()}\\) is writing"):
            convert_checkpoint(ckpt, out, progress=False)
        r = cli("flashmoe.convert.cli", ckpt, "-o", out, "-q")
        one_line_error(r, "another flashmoe-convert")
    assert list(out.iterdir()) == []  # nothing written by the refused converters; the lock file is gone
    (out / conv_mod.LOCK).write_text("12345")  # left by a converter killed with -9: nobody holds it
    convert_checkpoint(ckpt, out, progress=False)
    assert not (out / conv_mod.LOCK).exists()


# ---- 3. no Hub call waits forever --------------------------------------------------------------------------
class LocalListener:
    """A TCP listener on 127.0.0.1 (`endpoint`) whose accept loop hands each connection to `on_connect`."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                conn = self.sock.accept()[0]
            except OSError:
                return
            self.on_connect(conn)

    def on_connect(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def __exit__(self, *exc):
        self.sock.close()


class SilentServer(LocalListener):
    """Accepts TCP connections and never answers a byte."""

    def __enter__(self):
        self.conns: list[socket.socket] = []
        return super().__enter__()

    def on_connect(self, conn):
        self.conns.append(conn)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for c in self.conns:
            c.close()


def _publish_and_pull(bundle_dir, **kw):
    from flashmoe.hub import publish_bundle, pull_bundle

    publish_bundle(bundle_dir, REPO, token=TOKEN, progress=False, backoff=0.01)
    return pull_bundle(REPO, token=False, progress=False, **kw)


def test_3_cached_bundle_never_waits_on_a_silent_hub(converted, hub, hf_env, tmp_path):
    from flashmoe.hub import pull_bundle, resolve_bundle

    cached = _publish_and_pull(converted)
    out = _publish_and_pull(converted, local_dir=tmp_path / "out")
    with SilentServer() as silent:
        for kw in ({}, {"local_dir": tmp_path / "out"}):
            t = time.perf_counter()
            p = pull_bundle(REPO, token=False, progress=False, endpoint=silent.endpoint, **kw)
            assert time.perf_counter() - t < 8 and p == (cached if not kw else out)
        # -o DIR at a commit, Hub silent: DIR is used as it is (nothing is staged or fetched)
        assert pull_bundle(REPO, revision=cached.name, token=False, progress=False, endpoint=silent.endpoint,
                           local_dir=tmp_path / "out") == out
        t = time.perf_counter()
        assert resolve_bundle(REPO, progress=False, endpoint=silent.endpoint, token=False) == cached
        assert time.perf_counter() - t < 8
        # end to end: flashmoe-run REPO_ID on the cached bundle, with HF_ENDPOINT pointing at the silent server
        env = dict(os.environ, HF_ENDPOINT=silent.endpoint, HF_HOME=str(hf_env / "hf_home"),
                   HF_HUB_CACHE=str(hf_env / "hf_home" / "hub"))
        t = time.perf_counter()
        r = cli("flashmoe.runtime.cli", REPO, "--prompt", "the cat", "--max-tokens", "2", "--no-chat-template",
                env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert time.perf_counter() - t < 60


def test_3_uncached_pull_publish_and_convert_time_out(converted, hf_env, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flashmoe.hub import HubError, publish_bundle, pull_bundle

    with SilentServer() as silent:
        monkeypatch.setattr(constants, "ENDPOINT", silent.endpoint)
        t = time.perf_counter()
        with pytest.raises(HubError, match="cannot reach the Hub"):
            pull_bundle(REPO, token=False, progress=False, endpoint=silent.endpoint, timeout=1)
        with pytest.raises(HubError, match="cannot reach the Hub"):
            publish_bundle(converted, REPO, token=TOKEN, endpoint=silent.endpoint, progress=False, timeout=1,
                           retries=2, backoff=0.01)
        with pytest.raises(BundleError, match="cannot download it"):
            convert_checkpoint("tiny-org/tiny", tmp_path / "c", progress=False, timeout=1)
        assert time.perf_counter() - t < 45  # before: each of these hung forever


def test_3_hf_hub_offline_is_honoured(converted, hub, hf_env, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flashmoe.hub import HubError, publish_bundle, pull_bundle

    cached = _publish_and_pull(converted)
    n = len(hub.state.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert pull_bundle(REPO, token=False, progress=False) == cached
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        publish_bundle(converted, REPO, token=TOKEN, progress=False)
    with pytest.raises(BundleError, match="HF_HUB_OFFLINE"):
        convert_checkpoint("tiny-org/not-cached", tmp_path / "c", progress=False)
    assert hub.state.requests[n:] == []  # not one request


# ---- 4. never follow a link out of the bundle or the source -----------------------------------------------
def test_4_pull_never_deletes_a_link_target_outside_the_directory(converted, hub, tmp_path):
    from flashmoe.hub import pull_bundle

    out = _publish_and_pull(converted, local_dir=tmp_path / "out")
    victim = out / "experts/layer-001.bin"
    outside = tmp_path / "precious.bin"
    outside.write_bytes(victim.read_bytes()[:-1] + b"!")  # fails verification
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(out)
    pull_bundle(REPO, token=False, progress=False, local_dir=out, full_verify=True)
    assert outside.exists() and outside.read_bytes().endswith(b"!")  # untouched
    assert not victim.is_symlink()
    same_bytes(converted, out)


def test_4_converter_never_reads_through_a_link_out_of_the_source(src_copy, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"private": 1}')
    (src_copy / "tokenizer_config.json").unlink()
    (src_copy / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(BundleError, match="leads outside the checkpoint directory"):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)


# ---- 5. dense shapes are checked against config.json before writing ----------------------------------------
@pytest.mark.parametrize("field,value,tensor", [("vocab_size", 600, "embed_tokens.weight"),
                                                ("num_key_value_heads", 1, "k_proj.weight"),
                                                ("linear_num_value_heads", 8, "in_proj_qkv.weight")])
def test_5_converter_checks_dense_shapes(src_copy, tmp_path, field, value, tensor):
    cfg = json.loads((src_copy / "config.json").read_text())
    cfg[field] = value
    (src_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=rf"{tensor}: shape .* does not match .* implied by config.json"):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()  # refused before writing anything


# ---- 6. tracebacks become one-line errors ------------------------------------------------------------------
def test_6_disk_full_mid_write(ckpt, converted, tmp_path):
    # a stale temporary name that is a link (here to /dev/full) is removed, never written through; ENOSPC
    # itself is simulated in tests/test_faults_format.py (test_disk_full_mid_write_is_one_error_...)
    out = tmp_path / "b"
    (out / "experts").mkdir(parents=True)
    (out / "experts/layer-000.bin.partial").symlink_to("/dev/full")
    convert_checkpoint(ckpt, out, progress=False)
    assert not (out / "experts/layer-000.bin.partial").is_symlink()
    same_bytes(converted, out)
    # EFBIG in a real flashmoe-convert process whose file size limit is lower than an expert file
    out2 = tmp_path / "c"
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = cli("flashmoe.convert.cli", ckpt, "-o", out2, "-q", preexec_fn=limit)
    one_line_error(r, "file size limit", "it resumes")
    for d in (out, out2):  # space is back: the same command finishes the bundle
        convert_checkpoint(ckpt, d, progress=False)
        same_bytes(converted, d)


def test_6_output_is_a_file_or_holds_a_corrupt_manifest(ckpt, bundle, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(cli("flashmoe.convert.cli", ckpt, "-o", f, "-q"), "is a file")
    (bundle / MANIFEST).write_text('{"format": "flashmoe-bundle", ')
    one_line_error(cli("flashmoe.convert.cli", ckpt, "-o", bundle, "-q"), "not valid JSON",
                   f"delete {bundle / MANIFEST}")
    (bundle / MANIFEST).unlink()  # as the message says: the same command now rebuilds it in place
    logs = convert_logs(ckpt, bundle)
    assert any("no manifest or progress record: rebuilding" in m for m in logs)
    Bundle.open(bundle)


def test_6_deeply_nested_expert_header(bundle):
    p = bundle / "experts/layer-000.bin"
    good = p.read_bytes()
    body = b"[" * 5000 + b"]" * 5000
    assert len(body) < len(good) - 16
    p.write_bytes(good[:12] + struct.pack("<I", len(body)) + body + good[16 + len(body):])
    with pytest.raises(BundleError, match="expert file header is not valid JSON .*nested deeper"):
        ExpertFile(p)
    one_line_error(cli("flashmoe.format.cli", bundle), "layer-000.bin")


def test_6_corrupt_safetensors_header_names_the_file(src_copy, tmp_path):
    p = src_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"[[[["  # the JSON header, broken
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=re.escape(f"{p}: the safetensors header is not valid JSON")):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)


def test_6_corrupt_dense_header_in_a_bundle_names_the_file(bundle):
    import flashmoe

    p = bundle / "dense/layer-001.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"[[[["
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="dense/layer-001.safetensors"):
        flashmoe.load(bundle)


MANIFEST_MUTATIONS = {  # each crashed somewhere (validator, Bundle, inspect summary, loader) before
    "format_version true": lambda m: m.update(format_version=True),
    "format_version Infinity": lambda m: m.update(format_version=float("inf")),
    "dense is a list": lambda m: m.update(dense=[]),
    "dense null": lambda m: m.update(dense=None),
    "dense.quantized is a list": lambda m: m["dense"].update(quantized=[]),
    "dense.group_size string": lambda m: m["dense"].update(group_size="64"),
    "layer_types is a dict": lambda m: m["config"].update(layer_types={}),
    "layer_types holds null": lambda m: m["config"].update(layer_types=[None] * 4),
    "model_type is a number": lambda m: m.update(model_type=3),
    "sha256 is a number": lambda m: m["files"][0].update(sha256=5),
    "size is null": lambda m: m["files"][0].update(size=None),
    "files is a dict": lambda m: m.update(files={}),
    "config is a list": lambda m: m.update(config=[]),
    "hidden_size NaN": lambda m: m["config"].update(hidden_size=float("nan")),
    "rms_norm_eps is a string": lambda m: m["config"].update(rms_norm_eps="1e-6"),
    "eos_token_id is a string": lambda m: m["config"].update(eos_token_id="2"),
    "experts.group_size float": lambda m: m["experts"].update(group_size=64.0),
    "components shape null": lambda m: m["experts"]["components"][0].update(shape=None),
    "source.revision is a number": lambda m: m["source"].update(revision=12345),
    "skipped is a list": lambda m: m.update(skipped=[1]),
    "router below 8 bits": lambda m: m["dense"]["quantized"]["layers.0.mlp.gate"].update(bits=4),
    "records of the wrong length": lambda m: m.update(records={"algorithm": "crc32", "digests": ["00000000"]}),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_MUTATIONS))
def test_6_8_wrong_typed_manifest_fields(converted, case):
    m = json.loads((converted / MANIFEST).read_text())
    MANIFEST_MUTATIONS[case](m)
    with pytest.raises(BundleError, match="flashmoe.json: .*corrupt or not a flashmoe bundle"):
        validate_manifest(m, "flashmoe.json")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parents[1] / "format/manifest.schema.json").read_text())
    # SPEC rules a schema cannot state, and 64.0 (which JSON Schema's enum equates with 64)
    beyond_schema = ("router below 8 bits", "records of the wrong length", "experts.group_size float")
    if case not in beyond_schema:  # the schema itself rejects it: the validator enforces the schema
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(m, schema)


def test_6_wrong_typed_manifest_on_disk_is_one_line(bundle):
    text = (bundle / MANIFEST).read_text().replace('"hidden_size": 128', '"hidden_size": Infinity')
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="not valid JSON .*Infinity"):
        Bundle.open(bundle)
    one_line_error(cli("flashmoe.format.cli", bundle), "Infinity")


CONFIG_MUTATIONS = {
    "vocab_size null": ("vocab_size", None),
    "vocab_size string": ("vocab_size", "512"),
    "hidden_size float": ("hidden_size", 128.5),
    "text_config list": ("text_config", [1]),
    "rope_parameters list": ("rope_parameters", [1]),
    "layer_types dict": ("layer_types", {"a": 1}),
    "eos_token_id string": ("eos_token_id", "x"),
    "tie_word_embeddings string": ("tie_word_embeddings", "no"),
    "quantization_config list": ("quantization_config", [4]),
    "num_experts bool": ("num_experts", True),
}


@pytest.mark.parametrize("case", sorted(CONFIG_MUTATIONS))
def test_6_wrong_typed_source_config_fields(src_copy, tmp_path, case):
    key, value = CONFIG_MUTATIONS[case]
    cfg = json.loads((src_copy / "config.json").read_text())
    cfg[key] = value
    (src_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)


def test_6_infinity_in_source_config(src_copy, tmp_path):
    text = (src_copy / "config.json").read_text()
    (src_copy / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": Infinity'))
    one_line_error(cli("flashmoe.convert.cli", src_copy, "-o", tmp_path / "b", "-q"), "config.json", "Infinity")


# ---- 7. run inputs (fixed in the runtime CLI) --------------------------------------------------------------
@pytest.mark.parametrize("args", [["--seed", "-5"], ["--seed", "1e23"], ["--temperature", "nan"]],
                         ids=["seed-negative", "seed-huge", "temperature-nan"])
def test_7_bad_run_inputs_are_one_line_errors(bundles, args):
    r = cli("flashmoe.runtime.cli", bundles[4], "--prompt", "the cat", "--max-tokens", "2", *args)
    one_line_error(r)


def test_7_invalid_utf8_prompt(bundles):
    r = subprocess.run([sys.executable.encode(), b"-m", b"flashmoe.runtime.cli", str(bundles[4]).encode(), b"--prompt",
                        b"caf\xff\xfe", b"--max-tokens", b"2"], capture_output=True, timeout=300)
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                    r.stderr.decode(errors="replace"))
    one_line_error(r, "UTF-8")


def test_7_mmap_file_truncated_under_the_run(bundles, tmp_path):
    out = Path(shutil.copytree(bundles[4], tmp_path / "b"))
    script = f"""
import os, flashmoe
model, tok = flashmoe.load({str(out)!r}, io="mmap")
for L in range(4):
    os.truncate({str(out)!r} + f"/experts/layer-{{L:03d}}.bin", 20000)
try:
    list(flashmoe.generate(model, tok, "the cat sat", max_tokens=4, chat_template=False))
except flashmoe.format.BundleError as e:
    print("BundleError:", e)
    raise SystemExit(2)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "BundleError" in r.stdout, (r.returncode, r.stderr[-1500:])  # not -SIGBUS


# ---- 8. one validator, one writer, one verifier -------------------------------------------------------------
def test_8_one_writer_writes_the_manifest_last(converted, tmp_path):
    out = Path(shutil.copytree(converted, tmp_path / "b"))
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).unlink()
    (out / "dense/layer-003.safetensors").unlink()
    with pytest.raises(BundleError, match="must all be written before its manifest"):
        write_manifest(out, m)
    assert not (out / MANIFEST).exists()


def test_8_one_verifier(bundle):
    import flashmoe.hub
    from flashmoe.format import verify as verifier

    flip(bundle / "experts/layer-003.bin", 40000)
    b = Bundle.open(bundle)
    assert b.verify(progress=False) == ["experts/layer-003.bin"]
    assert list(verifier.verify(b, full=True, progress=False)) == ["experts/layer-003.bin"]
    assert not hasattr(flashmoe.hub, "verify") or flashmoe.hub.verify is verifier


# ---- 9. the source index is not trusted -----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_9_weight_map_paths_outside_the_checkpoint(src_copy, tmp_path, path):
    (src_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": path}}))
    with pytest.raises(BundleError, match="a path outside the checkpoint"):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)


def test_9_weight_file_linked_out_of_the_checkpoint(src_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(src_copy / "model.safetensors", outside)
    (src_copy / "model.safetensors").symlink_to(outside)
    with pytest.raises(BundleError, match="leads outside the checkpoint directory"):
        convert_checkpoint(src_copy, tmp_path / "b", progress=False)


# ---- 10. messages that mislead -------------------------------------------------------------------------------
def test_10_disk_space_message_has_real_numbers(ckpt, tmp_path, monkeypatch):
    import collections

    fake = collections.namedtuple("du", "total used free")(10**9, 10**9, 0)
    monkeypatch.setattr(conv_mod.shutil, "disk_usage", lambda p: fake)
    with pytest.raises(BundleError, match=r"needs about \d+\.\d MB more but only 0 kB is free"):
        convert_checkpoint(ckpt, tmp_path / "b", progress=False)


def test_10_corrupt_progress_file_is_not_other_settings(ckpt, converted, tmp_path, monkeypatch):
    out = tmp_path / "b"
    real = conv_mod.Converter._write_dense

    def crash(self, L, path):
        if L == 2:
            raise KeyboardInterrupt
        return real(self, L, path)

    monkeypatch.setattr(conv_mod.Converter, "_write_dense", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ckpt, out, progress=False)
    monkeypatch.setattr(conv_mod.Converter, "_write_dense", real)
    (out / ".flashmoe-progress.json").write_text("{ corrupt")
    logs = convert_logs(ckpt, out)
    assert any("unreadable (corrupt): rebuilding" in m for m in logs) and not any("other settings" in m for m in logs)
    same_bytes(converted, out)


def test_10_a_file_is_not_reported_as_a_missing_directory(converted, tmp_path):
    from flashmoe.hub import HubError, resolve_bundle

    f = tmp_path / "bundle.txt"
    f.write_text("x")
    with pytest.raises(BundleError, match="is a file, not a bundle directory"):
        Bundle.open(f)
    with pytest.raises(HubError, match="is a file, not a bundle directory"):
        resolve_bundle(f)
