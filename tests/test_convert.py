"""flashmoe-convert and the bundle format on tiny Qwen3.5-MoE checkpoints built here with transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import tiny
from flashmoe.convert import convert_checkpoint
from flashmoe.convert import converter as conv_mod
from flashmoe.format import Bundle, BundleError, ExpertFile, record_views
from flashmoe.format.layout import COMPONENT_ALIGN, RECORD_ALIGN

PROJS = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def model():
    return tiny.build_model(seed=1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "fp32": tiny.save_checkpoint(tiny.build_model(seed=1), root / "fp32", "float32", "per_expert"),
        "bf16_fused": tiny.save_checkpoint(tiny.build_model(seed=1), root / "bf16_fused", "bfloat16", "fused"),
        "mlx4": tiny.save_mlx_quantized(tiny.build_model(seed=1), root / "mlx4", bits=4, group_size=64),
    }


def torch_experts(model, layer):
    """{proj: [E, out, in]} float32 numpy from the transformers model (fused in memory)."""
    ex = model.model.layers[layer].mlp.experts
    gu = ex.gate_up_proj.detach().float().numpy()
    inter = gu.shape[1] // 2
    return {"gate_proj": gu[:, :inter], "up_proj": gu[:, inter:], "down_proj": ex.down_proj.detach().float().numpy()}


def load_record(bundle, layer, expert):
    f = bundle.expert_file(layer)
    buf = np.zeros(f.info.record_stride, dtype=np.uint8)
    f.read_into(expert, buf)
    views = record_views(f.info, buf)
    f.close()
    out = {}
    for c in f.info.components:
        a = mx.array(views[c.name])
        out[c.name] = a.view(mx.bfloat16) if c.dtype == "bfloat16" else a
    return out


def load_raw(path):
    """{name: numpy array of the stored bytes} (bf16 as uint16), via our bounded safetensors reader."""
    from flashmoe.format.st import read_header, read_tensor

    return {k: read_tensor(t) for k, t in read_header(Path(path)).items()}


def assert_same(a: mx.array, b: mx.array):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert mx.array_equal(a, b).item()


@pytest.mark.parametrize("name,dtype", [("fp32", mx.float32), ("bf16_fused", mx.bfloat16)])
@pytest.mark.parametrize("bits", [4, 2, 8])
def test_records_equal_mx_quantize(tmp_path, ckpts, model, name, dtype, bits):
    out = convert_checkpoint(ckpts[name], tmp_path / "b", bits=bits, group_size=64, progress=False)
    b = Bundle.open(out)
    assert b.manifest["experts"]["dtype"] == ("float32" if dtype == mx.float32 else "bfloat16")
    for layer in (0, 3):
        ref = torch_experts(model, layer)
        for e in (0, 7, 15):
            rec = load_record(b, layer, e)
            for p in PROJS:
                w = mx.array(ref[p][e]).astype(dtype)
                q, s, z = mx.quantize(w, group_size=64, bits=bits)
                assert_same(rec[f"{p}.weight"], q)
                assert_same(rec[f"{p}.scales"], s)
                assert_same(rec[f"{p}.biases"], z)


def test_float_experts_are_exact(tmp_path, ckpts, model):
    b = Bundle.open(convert_checkpoint(ckpts["fp32"], tmp_path / "b", bits=None, dense_bits=None, progress=False))
    rec = load_record(b, 2, 5)
    ref = torch_experts(model, 2)
    for p in PROJS:
        np.testing.assert_array_equal(np.array(rec[f"{p}.weight"]), ref[p][5])


def test_layout_and_manifest_invariants(tmp_path, ckpts):
    out = convert_checkpoint(ckpts["bf16_fused"], tmp_path / "b", bits=4, progress=False)
    b = Bundle.open(out)
    m = b.manifest
    e = m["experts"]
    assert e["data_offset"] % RECORD_ALIGN == 0 and e["record_stride"] % RECORD_ALIGN == 0
    assert e["record_size"] <= e["record_stride"]
    spans = sorted((c["offset"], c["offset"] + c["nbytes"]) for c in e["components"])
    assert all(a1 <= b0 for (_, a1), (b0, _) in zip(spans, spans[1:]))
    assert all(c["offset"] % COMPONENT_ALIGN == 0 for c in e["components"])
    for layer in range(b.config.num_hidden_layers):
        p = out / f"experts/layer-{layer:03d}.bin"
        assert p.stat().st_size == e["data_offset"] + e["num_experts"] * e["record_stride"]
        f = ExpertFile(p, expected=b.expert_info(layer))
        assert f.offset(3) % RECORD_ALIGN == 0
        f.close()
    listed = {f["path"] for f in m["files"]}
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"flashmoe.json"}
    assert listed == on_disk
    assert not list(out.rglob("*.partial")) and not (out / ".flashmoe-progress.json").exists()
    # router and shared-expert gate never below 8 bits, even with 4-bit dense weights
    b4 = Bundle.open(convert_checkpoint(ckpts["bf16_fused"], tmp_path / "d4", dense_bits=4, progress=False))
    q = b4.manifest["dense"]["quantized"]
    assert q["layers.0.mlp.gate"]["bits"] == 8 and q["layers.0.mlp.shared_expert_gate"]["bits"] == 8
    assert q["layers.0.linear_attn.in_proj_qkv"]["bits"] == 4
    # no absolute local path leaks into a (publishable) manifest
    assert str(ckpts["bf16_fused"].parent) not in json.dumps(m)
    jsonschema = pytest.importorskip("jsonschema")  # the published schema describes what the converter writes

    schema = json.loads((Path(__file__).parents[1] / "format" / "manifest.schema.json").read_text())
    jsonschema.validate(m, schema)


def test_dense_conventions(tmp_path, ckpts, model):
    out = convert_checkpoint(ckpts["fp32"], tmp_path / "b", bits=4, dense_bits=None, progress=False)
    d = mx.load(str(out / "dense/layer-000.safetensors"))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    # zero-centred norms are stored as (1 + w) in float32
    np.testing.assert_allclose(np.array(d["layers.0.input_layernorm.weight"]),
                               1.0 + sd["model.layers.0.input_layernorm.weight"], rtol=0, atol=1e-7)
    assert d["layers.0.input_layernorm.weight"].dtype == mx.float32
    assert d["layers.0.linear_attn.conv1d.weight"].shape == (model.config.linear_num_key_heads * 64 + 128, 4)
    np.testing.assert_array_equal(np.array(d["layers.0.linear_attn.in_proj_qkv.weight"]),
                                  sd["model.layers.0.linear_attn.in_proj_qkv.weight"])
    g = mx.load(str(out / "dense/global.safetensors"))
    assert set(g) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}


def test_mlx_source_repacks_byte_exact(tmp_path, ckpts):
    src = load_raw(ckpts["mlx4"] / "model.safetensors")
    b = Bundle.open(convert_checkpoint(ckpts["mlx4"], tmp_path / "b", bits=4, group_size=64, progress=False))
    assert b.manifest["source"]["kind"] == "mlx"
    for layer in (0, 3):
        f = b.expert_file(layer)
        buf = np.zeros(f.info.record_stride, dtype=np.uint8)
        for e in range(b.config.num_experts):
            f.read_into(e, buf)
            v = record_views(f.info, buf)
            for p in PROJS:
                for part in ("weight", "scales", "biases"):
                    want = src[f"language_model.model.layers.{layer}.mlp.switch_mlp.{p}.{part}"][e]
                    assert v[f"{p}.{part}"].tobytes() == want.tobytes()
    # dense 8-bit router copied byte-exact; norms kept as the (1 + w) the MLX checkpoint already holds
    d = load_raw(b.path / "dense/layer-000.safetensors")
    assert d["layers.0.mlp.gate.weight"].tobytes() == src["language_model.model.layers.0.mlp.gate.weight"].tobytes()
    assert b.manifest["dense"]["quantized"]["layers.0.mlp.gate"] == {"bits": 8, "group_size": 64}


def test_mlx_4_to_2_requantization_bound(tmp_path, ckpts):
    """4-bit -> 2-bit requantization: each weight of the 2-bit record lies within one 2-bit step (|scale|)
    of the 4-bit value it came from, plus bf16 rounding of scale and bias (relative 2^-8 of
    |bias| + 3|scale|). One step, not half: MLX aligns its affine grid so that a group's edge value is
    exact, which can push the far end's rounding error up to a full step (measured: max 1.0, mean
    0.25 step on Gaussian weights). On average the error must stay near a quarter step."""
    src = load_raw(ckpts["mlx4"] / "model.safetensors")
    b = Bundle.open(convert_checkpoint(ckpts["mlx4"], tmp_path / "b", bits=2, group_size=64, progress=False))
    worst = 0.0
    for layer in (1, 3):
        for e in (0, 9):
            rec = load_record(b, layer, e)
            for p in PROJS:
                base = f"language_model.model.layers.{layer}.mlp.switch_mlp.{p}"
                w4 = mx.dequantize(mx.array(src[f"{base}.weight"][e]), mx.array(src[f"{base}.scales"][e]).view(mx.bfloat16)
                                   if src[f"{base}.scales"].dtype == np.uint16 else mx.array(src[f"{base}.scales"][e]),
                                   mx.array(src[f"{base}.biases"][e]).view(mx.bfloat16)
                                   if src[f"{base}.biases"].dtype == np.uint16 else mx.array(src[f"{base}.biases"][e]),
                                   group_size=64, bits=4).astype(mx.float32)
                s = rec[f"{p}.scales"].astype(mx.float32)
                z = rec[f"{p}.biases"].astype(mx.float32)
                w2 = mx.dequantize(rec[f"{p}.weight"], rec[f"{p}.scales"], rec[f"{p}.biases"], group_size=64,
                                   bits=2).astype(mx.float32)
                s_full = mx.repeat(mx.abs(s), 64, axis=-1)
                z_full = mx.repeat(mx.abs(z), 64, axis=-1)
                bound = s_full + 2.0 ** -8 * (z_full + 3 * s_full) + 1e-6
                err = mx.abs(w2 - w4)
                assert mx.all(err <= bound).item(), float(mx.max(err - bound).item())
                worst = max(worst, float(mx.mean(err / (s_full + 1e-12)).item()))
    assert worst <= 0.35


def test_fp8_block_scaled_source(tmp_path, model):
    """FP8 e4m3 weights with 32x32 block scales: dequantized exactly like the reference, then quantized."""
    import torch
    from safetensors.torch import load_file, save_file

    ck = tiny.save_checkpoint(tiny.build_model(seed=1), tmp_path / "fp8src", "bfloat16", "per_expert")
    sd = load_file(str(ck / "model.safetensors"))
    blk = 32
    fp8 = {}
    ref = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and ("proj" in k or "mlp.gate" in k) and "norm" not in k:
            o, i = v.shape
            vf = v.float()
            so, si = -(-o // blk), -(-i // blk)
            pad = torch.zeros(so * blk, si * blk)
            pad[:o, :i] = vf.abs()
            amax = pad.reshape(so, blk, si, blk).amax(dim=(1, 3)).clamp(min=1e-8)
            scale = amax / 448.0
            full = scale.repeat_interleave(blk, 0)[:o].repeat_interleave(blk, 1)[:, :i]
            q = (vf / full).to(torch.float8_e4m3fn)
            fp8[k] = q
            fp8[k[: -len(".weight")] + ".weight_scale_inv"] = scale
            ref[k] = (q.float() * full).to(torch.bfloat16)
        else:
            fp8[k] = v
    (ck / "model.safetensors").unlink()
    save_file(fp8, str(ck / "model.safetensors"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [blk, blk]}
    (ck / "config.json").write_text(json.dumps(cfg))
    b = Bundle.open(convert_checkpoint(ck, tmp_path / "b", bits=4, dense_bits=None, progress=False))
    assert b.manifest["source"]["kind"] == "fp8" and b.manifest["experts"]["dtype"] == "bfloat16"
    rec = load_record(b, 1, 6)
    for p in PROJS:
        w = mx.array(ref[f"model.layers.1.mlp.experts.6.{p}.weight"].float().numpy()).astype(mx.bfloat16)
        q, s, z = mx.quantize(w, group_size=64, bits=4)
        assert_same(rec[f"{p}.weight"], q)
        assert_same(rec[f"{p}.scales"], s)
    d = mx.load(str(b.path / "dense/layer-3.safetensors".replace("-3", "-003")))
    want = ref["model.layers.3.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.array(d["layers.3.self_attn.q_proj.weight"].astype(mx.float32)), want)


def test_fp8_table_matches_torch():
    import torch

    from flashmoe.convert.source import fp8_e4m3_table

    bits = torch.arange(256, dtype=torch.uint8)
    ref = bits.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(fp8_e4m3_table(), ref)


def test_resume_after_interruption_is_byte_identical(tmp_path, ckpts, monkeypatch):
    full = convert_checkpoint(ckpts["bf16_fused"], tmp_path / "full", bits=4, progress=False)
    calls = {"n": 0}
    real = conv_mod.Converter._write_experts

    def crash_on_third(self, layer, bw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of layer 2
        return real(self, layer, bw)

    monkeypatch.setattr(conv_mod.Converter, "_write_experts", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ckpts["bf16_fused"], tmp_path / "part", bits=4, progress=False)
    part = tmp_path / "part"
    assert not (part / "flashmoe.json").exists()
    with pytest.raises(BundleError, match="did not finish"):
        Bundle.open(part)
    monkeypatch.setattr(conv_mod.Converter, "_write_experts", real)
    logs = []
    convert_checkpoint(ckpts["bf16_fused"], part, bits=4, progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    files = sorted(p.relative_to(full) for p in full.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(part) for p in part.rglob("*") if p.is_file())
    for f in files:
        assert (full / f).read_bytes() == (part / f).read_bytes(), f
    # different settings into the unfinished or finished directory are refused, nothing changed
    with pytest.raises(BundleError, match="other settings"):
        convert_checkpoint(ckpts["bf16_fused"], part, bits=2, progress=False)
    # the same command on a finished bundle is a no-op
    convert_checkpoint(ckpts["bf16_fused"], part, bits=4, progress=False)


def test_error_missing_weight_file(tmp_path, ckpts):
    ck = tmp_path / "ck"
    shutil.copytree(ckpts["fp32"], ck)
    (ck / "model.safetensors").rename(ck / "model-00001-of-00002.safetensors")
    idx = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(BundleError, match="missing: model-00002-of-00002.safetensors"):
        convert_checkpoint(ck, tmp_path / "b", progress=False)


@pytest.mark.parametrize("field,value,error", [
    ("model_type", "llama", "unsupported model_type 'llama'"),
    ("moe_intermediate_size", 96, r"does not match \[96, 128\] implied by config.json"),  # a shape mismatch
])
def test_error_config_field(tmp_path, ckpts, field, value, error):
    ck = tmp_path / "ck"
    shutil.copytree(ckpts["fp32"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=error):
        convert_checkpoint(ck, tmp_path / "b", progress=False)


def test_refuses_nonempty_output_and_checks_disk(tmp_path, ckpts, monkeypatch):
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        convert_checkpoint(ckpts["fp32"], out, progress=False)
    assert (out / "precious.txt").read_text() == "mine"
    import collections

    fake = collections.namedtuple("du", "total used free")(10**6, 10**6, 1000)
    monkeypatch.setattr(conv_mod.shutil, "disk_usage", lambda p: fake)
    with pytest.raises(BundleError, match=r"needs about [\d.]+ MB more but only 1 kB is free"):
        convert_checkpoint(ckpts["fp32"], tmp_path / "c", progress=False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_truncated_bundle_and_flipped_byte(tmp_path, ckpts):
    out = convert_checkpoint(ckpts["fp32"], tmp_path / "b", bits=4, progress=False)
    r = run_cli("flashmoe.format.cli", str(out), "--verify")
    assert r.returncode == 0 and "all files match" in r.stdout, r.stderr
    # flip one byte inside an expert record: sizes still match, only --verify can tell
    p = out / "experts/layer-001.bin"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x40
    p.write_bytes(bytes(data))
    Bundle.open(out)  # structure is fine
    r = run_cli("flashmoe.format.cli", str(out), "--verify")
    assert r.returncode == 1 and "experts/layer-001.bin" in r.stderr
    # truncate a file: refused at open, with the fix
    with open(p, "r+b") as f:
        f.truncate(len(data) - 100)
    with pytest.raises(BundleError, match="differs from the manifest"):
        Bundle.open(out)
    with pytest.raises(BundleError, match="truncated"):
        ExpertFile(p)
    r = run_cli("flashmoe.format.cli", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "flashmoe-pull" in r.stderr


def test_reader_rejects_corrupt_headers(tmp_path, ckpts):
    out = convert_checkpoint(ckpts["fp32"], tmp_path / "b", bits=4, progress=False)
    p = out / "experts/layer-000.bin"
    good = p.read_bytes()
    cases = {
        "magic": (b"NOTFLASH" + good[8:], "not a flashmoe expert file"),
        "version": (good[:8] + (99).to_bytes(4, "little") + good[12:], "newer than this flashmoe reads"),
        "hdrlen": (good[:12] + (2**31).to_bytes(4, "little") + good[16:], "header length"),
    }
    for name, (data, msg) in cases.items():
        p.write_bytes(data)
        with pytest.raises(BundleError, match=msg):
            ExpertFile(p)
    # a header whose components overlap
    import struct

    n = struct.unpack("<I", good[12:16])[0]
    h = json.loads(good[16:16 + n])
    h["components"][1]["offset"] = 0
    body = json.dumps(h).encode()
    p.write_bytes(good[:12] + struct.pack("<I", len(body)) + body + good[16 + len(body):])
    with pytest.raises(BundleError, match="overlap|aligned|match"):
        ExpertFile(p)
    # manifest with a path escaping the bundle
    m = json.loads((out / "flashmoe.json").read_text())
    m["files"][0]["path"] = "../../etc/passwd"
    (out / "flashmoe.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unsafe path"):
        Bundle.open(out)


def test_cli_help_and_dry_run(tmp_path, ckpts):
    r = run_cli("flashmoe.convert.cli", "--help")
    assert r.returncode == 0 and "--bits" in r.stdout and "--dry-run" in r.stdout and "resumes" in r.stdout
    r = run_cli("flashmoe.convert.cli", str(ckpts["fp32"]), "-o", str(tmp_path / "x"), "--dry-run")
    assert r.returncode == 0 and "experts/layer-003.bin" in r.stdout and "total" in r.stdout
    assert not (tmp_path / "x").exists()
    r = run_cli("flashmoe.convert.cli", str(tmp_path / "nope"), "-o", str(tmp_path / "y"))
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
