"""Fuzzing the readers of untrusted input with hypothesis, field- and byte-level: the manifest, expert-file
headers, the source's weight index, config.json and safetensors headers. Every input must give either a
valid object or one BundleError, never another exception; and what the manifest validator accepts, the
published JSON Schema accepts too (the validator enforces the schema, plus rules it cannot state).
Batch input lines (both forms) go through a whole job on the tiny model: no exception, and exactly one
output line per non-blank input line (100 examples by default).

Fast by default (CI); FLASHMOE_FUZZ_EXAMPLES=N runs N examples per test (e.g. 5000 for a long run).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmoe.format import Bundle, BundleError, ExpertFile, ExpertQuant, TextConfig, validate_manifest
from flashmoe.format.experts import encode_header, make_info
from flashmoe.format.layout import expert_components
from flashmoe.format.jsonio import load_json
from flashmoe.format.manifest import build_manifest

EXAMPLES = int(os.environ.get("FLASHMOE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="FLASHMOE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCHEMA = json.loads((Path(__file__).parents[1] / "format" / "manifest.schema.json").read_text())

HF_CONFIG = {
    "model_type": "qwen3_5_moe_text", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "linear_key_head_dim": 32,
    "linear_value_head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "linear_conv_kernel_dim": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_experts": 16, "num_experts_per_tok": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "eos_token_id": 1, "bos_token_id": None, "full_attention_interval": 4, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25},
}


def valid_manifest() -> dict:
    cfg = TextConfig.from_hf(HF_CONFIG)
    q = ExpertQuant(4, 64, "bfloat16")
    info = make_info(0, cfg.num_experts, expert_components(cfg.hidden_size, cfg.moe_intermediate_size, q))
    names = ["config.json", "dense/global.safetensors",
             *[f"dense/layer-{i:03d}.safetensors" for i in range(4)], *[f"experts/layer-{i:03d}.bin" for i in range(4)]]
    files = {n: {"size": 1000 + i, "sha256": f"{i:064x}"} for i, n in enumerate(names)}
    dense = {"dtype": "bfloat16", "bits": 8, "group_size": 64,
             "quantized": {"layers.0.mlp.gate": {"bits": 8, "group_size": 64},
                           "layers.0.linear_attn.in_proj_qkv": {"bits": 8, "group_size": 64}}}
    m = build_manifest(cfg, q, info, dense, {"repo": "a/b", "revision": "0" * 40, "kind": "float", "license": None,
                                             "base_model": None},
                       {"vision": False, "mtp": False, "tensors": 0}, files, "0123456789abcdef",
                       records=["0" * 8 * cfg.num_experts] * cfg.num_hidden_layers)
    validate_manifest(m)  # the starting point is valid
    return m


def paths(obj, prefix=()):
    """Every (key path) of a JSON tree, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


SCALARS = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12)
           | st.sampled_from([0, -1, 1, 2, 64, 64.0, 16384, 2 ** 31, 2 ** 62, 2 ** 64, "", "../x", "/etc/passwd",
                              "bfloat16", "full_attention", "0" * 64, "flashmoe-bundle", 1e308, -0.0]))
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=8)


def apply(draw, obj, n_max=3):
    """Replace, delete or add 1..n_max fields anywhere in `obj` (in place)."""
    for _ in range(draw(st.integers(1, n_max))):
        all_paths = [p for p in paths(obj) if p]
        if not all_paths:
            return
        path = draw(st.sampled_from(all_paths))
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(VALUES)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))


def mutate_bytes(draw, raw: bytes, region: int | None = None) -> bytes:
    """Flip, overwrite, insert, delete or truncate bytes (within the first `region` bytes if given)."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        end = min(len(b), region or len(b))
        if end == 0:
            break
        i = draw(st.integers(0, end - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[i] = draw(st.sampled_from(list(b'[]{}",:0-9eE.\\ntfu') + [0, 255]))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 8))]
        elif region is None:
            del b[i:]
    return bytes(b)


# ---- the manifest ---------------------------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_manifest_fields(data):
    jsonschema = pytest.importorskip("jsonschema")
    m = valid_manifest()
    apply(data.draw, m)
    try:
        validate_manifest(m, "flashmoe.json")
    except BundleError:
        return
    # accepted: the schema agrees, and everything that reads a manifest works on it
    jsonschema.validate(m, SCHEMA)
    b = Bundle(Path("/nonexistent"), m)
    b.expert_info(1).check()
    from flashmoe.format.cli import summary

    assert "experts" in summary(b)


@FUZZ
@given(st.data())
def test_manifest_bytes(data):
    raw = json.dumps(valid_manifest(), indent=1).encode()
    bad = mutate_bytes(data.draw, raw)
    try:
        m = load_json(bad, "flashmoe.json", "the manifest")
        validate_manifest(m, "flashmoe.json")
    except BundleError:
        return


@FUZZ
@given(depth=st.integers(60, 20_000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_one_error(depth, opener):
    text = opener * depth + "1" + ("]" if opener == "[" else "}") * depth
    try:
        load_json(text, "x.json")
    except BundleError as e:
        assert depth > 64 and "nested deeper" in str(e)


def test_nonstandard_json_constants_are_refused():
    for text in ('{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '[1e400]'):
        try:
            v = load_json(text, "x.json")
        except BundleError as e:
            assert "not valid JSON" in str(e)
        else:  # 1e400 parses as inf in Python: the validator's number check refuses it
            assert not all(math.isfinite(x) for x in v)


# ---- expert file headers ---------------------------------------------------------------------------------------
def expert_file_bytes() -> tuple[bytes, int]:
    comps = expert_components(128, 64, ExpertQuant(4, 64, "bfloat16"))
    info = make_info(0, 2, comps)
    return encode_header(info) + bytes(2 * info.record_stride), info.data_offset


def _open_expert(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "layer-000.bin"
        p.write_bytes(raw)
        try:
            f = ExpertFile(p)
        except BundleError:
            return
        info = f.info
        assert p.stat().st_size == info.file_size
        assert all(c.offset + c.nbytes <= info.record_stride for c in info.components)
        buf = np.zeros(info.record_stride, np.uint8)
        f.read_into(info.num_experts - 1, buf)
        f.close()


@FUZZ
@given(st.data())
def test_expert_header_bytes(data):
    raw, data_offset = expert_file_bytes()
    _open_expert(mutate_bytes(data.draw, raw, region=min(data_offset, 2048)))


@FUZZ
@given(st.data())
def test_expert_header_fields(data):
    raw, data_offset = expert_file_bytes()
    (n,) = struct.unpack("<I", raw[12:16])
    header = json.loads(raw[16:16 + n])
    apply(data.draw, header)
    body = json.dumps(header).encode()
    if 16 + len(body) > data_offset:
        body = body[: data_offset - 16]
    _open_expert(raw[:12] + struct.pack("<I", len(body)) + body + bytes(data_offset - 16 - len(body)) + raw[data_offset:])


# ---- the source: weight index, config.json, safetensors headers ---------------------------------------------------
def _source_dir(d: Path) -> None:
    from flashmoe.format.st import SafetensorsWriter

    w = SafetensorsWriter(d / "model-00001-of-00001.safetensors")
    w.add("a", "F32", np.arange(4, dtype=np.float32))
    w.close()


@FUZZ
@given(st.data())
def test_weight_index(data):
    from flashmoe.convert.source import _weight_files

    index = {"metadata": {"total_size": 16}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}
    byte_level = data.draw(st.booleans())
    if not byte_level:
        apply(data.draw, index)
        entry = data.draw(st.sampled_from([None, "/etc/passwd", "../x.safetensors", "a/../../b", "~/x", "a\\..\\b"]))
        if entry is not None:
            index.setdefault("weight_map", {})
            if isinstance(index["weight_map"], dict):
                index["weight_map"]["b"] = entry
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _source_dir(d)
        raw = json.dumps(index).encode()
        (d / "model.safetensors.index.json").write_bytes(mutate_bytes(data.draw, raw) if byte_level else raw)
        try:
            files = _weight_files(d)
        except BundleError:
            return
        for f in files:  # anything accepted lies inside the checkpoint
            assert os.path.realpath(f).startswith(os.path.realpath(d) + os.sep)


@FUZZ
@given(st.data())
def test_config_json(data):
    cfg = copy.deepcopy(HF_CONFIG)
    apply(data.draw, cfg)
    try:
        c = TextConfig.from_hf(cfg)
    except BundleError:
        return
    c.check()
    for layer in [None, *range(c.num_hidden_layers)]:
        assert all(all(isinstance(d, int) and d >= 0 for d in s) for s in c.dense_shapes(layer).values())


@FUZZ
@given(st.data())
def test_safetensors_header(data):
    from flashmoe.format.st import read_header, read_tensor

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _source_dir(d)
        p = d / "model-00001-of-00001.safetensors"
        raw = p.read_bytes()
        p.write_bytes(mutate_bytes(data.draw, raw, region=len(raw) - 16))
        try:
            tensors = read_header(p)
        except BundleError as e:
            assert str(p) in str(e)  # every error names the file
            return
        for t in tensors.values():
            read_tensor(t)


# ---- batch input lines: every line gets exactly one output line, and the job never crashes --------------------
BATCH_EXAMPLES = int(os.environ.get("FLASHMOE_FUZZ_EXAMPLES", "100"))
BATCH_FUZZ = settings(max_examples=BATCH_EXAMPLES, deadline=None,
                      derandomize="FLASHMOE_FUZZ_EXAMPLES" not in os.environ,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_CHARS = st.characters(codec=None, categories=None)  # every code point, lone surrogates included
_TEXT = st.text(_CHARS, max_size=12) | st.sampled_from(["the cat", "", " ", "user", "\ud800", "caf\u00e9"])
_INT = st.integers(-2 ** 70, 2 ** 70) | st.sampled_from([-3, -1, 0, 1, 5, 511, 512, 999999, 2 ** 31, 2 ** 63])
_SCALAR = st.none() | st.booleans() | _INT | st.floats(allow_nan=True, allow_infinity=True) | _TEXT
_JUNK = st.recursive(_SCALAR, lambda c: st.lists(c, max_size=3) | st.dictionaries(_TEXT, c, max_size=3), max_leaves=8)
_MAX_TOKENS = st.sampled_from([0, 1, 2, -1, -(2 ** 40), 1.5, 2.0, "2", None, True, [], {}])  # never a long answer
_TEMP = st.sampled_from([0, 0.0, 0.7, -1, float("nan"), float("inf"), "0", None, 1e308])


@st.composite
def _messages(draw):
    def message():
        role = draw(st.sampled_from(["user", "system", "developer", "assistant", "tool", None, 3, {"a": 1}, ["user"]]))
        content = draw(_TEXT | _JUNK | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]),
                                                                       "text": _TEXT | _JUNK}), max_size=2))
        m = {"role": role, "content": content}
        return draw(st.sampled_from([m, {"content": content}, {"role": role}, content]))

    return draw(st.lists(st.builds(message), max_size=3) | _JUNK)


def _sampling(draw, obj: dict) -> dict:
    for key, values in (("max_tokens", _MAX_TOKENS), ("temperature", _TEMP), ("top_p", _TEMP), ("top_k", _INT),
                        ("seed", _INT | _JUNK), ("stop", _TEXT | st.lists(_TEXT, max_size=2) | _JUNK)):
        if draw(st.booleans()):
            obj[key] = draw(values)
    return obj


_IDS = st.lists(_INT | st.integers(0, 511) | _JUNK, max_size=4)


@st.composite
def batch_line(draw) -> str:
    kind = draw(st.sampled_from(["openai", "simple", "junk", "nested", "bytes"]))
    if kind == "openai":
        url = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", None, 7]))
        body = _sampling(draw, {})
        if draw(st.booleans()):
            body["messages"] = draw(_messages())
        if draw(st.booleans()):
            body["prompt"] = draw(_TEXT | _IDS | st.lists(_IDS, max_size=2) | _JUNK)
        if draw(st.booleans()):
            body[draw(st.sampled_from(["n", "stream", "logprobs", "tools", "model", "x"]))] = draw(_JUNK)
        obj = {"custom_id": draw(_TEXT | _INT | _JUNK), "method": draw(st.sampled_from(["POST", "GET", None])),
               "url": url, "body": draw(st.just(body) | _JUNK)}
        for k in draw(st.lists(st.sampled_from(list(obj)), max_size=2)):
            obj.pop(k, None)
    elif kind == "simple":
        obj = _sampling(draw, {})
        if draw(st.booleans()):
            obj["id"] = draw(_TEXT | _INT | _JUNK)
        which = draw(st.sampled_from(["prompt", "messages", "both", "none"]))
        if which in ("prompt", "both"):
            obj["prompt"] = draw(_TEXT | _IDS | _JUNK)
        if which in ("messages", "both"):
            obj["messages"] = draw(_messages())
        if draw(st.booleans()):
            obj["system"] = draw(_TEXT | _JUNK)
    elif kind == "junk":
        return json.dumps(draw(_JUNK))
    elif kind == "nested":
        depth = draw(st.integers(1, 3000))
        return "[" * depth + "]" * depth if draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth
    else:
        return draw(st.binary(max_size=20)).decode("latin-1")
    return json.dumps(obj)


@pytest.fixture(scope="module")
def batch_engine(loaded):
    from flashmoe.runtime.engine import Engine

    model, tok = loaded(None)
    return model, tok, Engine(model, tok, max_batch=8, memory_budget_gb=1.0)


@BATCH_FUZZ
@given(st.lists(batch_line() | st.just(json.dumps({"prompt": "the cat"})), min_size=1, max_size=5))
def test_batch_lines(batch_engine, lines):
    from flashmoe.batch import Defaults, JobOptions, run_jobs
    from flashmoe.batch.output import line_of

    model, tok, engine = batch_engine
    lines = [x.replace("\n", " ").replace("\r", " ") for x in lines]  # one input line each
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.jsonl"
        s = run_jobs(model, tok, [x.encode("utf-8", "surrogatepass") for x in lines], out,
                     JobOptions(Defaults(max_tokens=2), progress=False), engine=engine)
        got = [json.loads(x) for x in out.read_bytes().decode("utf-8").splitlines()]
    want = [n for n, x in enumerate(lines, 1) if x.strip()]
    assert sorted(line_of(r) for r in got) == want
    assert s.done + s.failed == len(want)
    assert all((r["error"] is None) != (r["response"] is None) for r in got)
