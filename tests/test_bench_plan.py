"""flashmoe-bench plan (bench/plan.py): the largest batch from the engine's memory plan, checked against a
hand computation for the 397B, and the dense weights' bytes against what flashmoe-bench make writes."""

from __future__ import annotations

import json

import pytest

from flashmoe.bench.cli import main
from flashmoe.bench.plan import MACHINES, Machine, dense_bytes, largest_batch, table
from flashmoe.bench.presets import config
from flashmoe.format import InputError
from flashmoe.format.st import read_header

from test_bench import SMALL

SHAPE = "qwen3.5-397b-a17b"


def q8(o, i):  # 8-bit weights plus bfloat16 scale and bias per 64 inputs
    return o * i + o * (i // 64) * 4


def hand_dense_397b() -> int:
    H, V = 4096, 248320
    linear = q8(12288, H) + q8(8192, H) + 2 * q8(64, H) + q8(H, 8192) + 12288 * 4 * 2 + (64 + 64 + 128) * 4
    full = q8(2 * 32 * 256, H) + 2 * q8(2 * 256, H) + q8(H, 32 * 256) + 2 * 256 * 4
    every = q8(512, H) + 2 * q8(1024, H) + q8(H, 1024) + q8(1, H) + 2 * H * 4  # router, shared expert, norms
    return 45 * linear + 15 * full + 60 * every + 2 * q8(V, H) + H * 4


def test_dense_bytes_of_the_397b_by_hand():
    assert dense_bytes(config(SHAPE)) == hand_dense_397b()
    assert 10.4e9 < hand_dense_397b() < 10.5e9


def test_dense_bytes_equal_what_bench_make_writes(tmp_path):
    from flashmoe.bench.synth import make_bundle

    out = tmp_path / "b"
    make_bundle(dict(SMALL), 4, 4, out, progress=False)
    written = sum(t.nbytes for f in sorted((out / "dense").rglob("*.safetensors")) for t in read_header(f).values())
    assert dense_bytes(config(dict(SMALL), 4)) == written


def test_largest_batch_by_hand():
    p = largest_batch(SHAPE, MACHINES["mac48"], "bfloat16", 2048)
    state = 45 * 64 * 128 * 128 * 2 + 45 * 3 * 12288 * 2  # recurrent state (bf16) + 3 conv inputs (bf16)
    kv = 15 * 2 * 2 * 256 * 2 * 2048  # 15 full-attention layers, K and V, 2 heads of 256, bf16, 2048 tokens
    ws = 248320 * (2 + 4) + 2 * 64 * 128 * 128 * 4  # logits bf16 + f32; one layer's f32 state twice
    assert (p.state_bytes, p.kv_bytes, p.decode_workspace_bytes) == (state, kv, ws)
    usable = 48 * 2**30 * 3 // 4
    left = usable - hand_dense_397b() - 250_000_000 - 2_000_000_000
    assert p.usable_bytes == usable and p.left_bytes == left
    assert p.batch == left // (state + kv + ws) == 152
    f32 = largest_batch(SHAPE, MACHINES["mac48"], "float32", 2048)
    assert f32.state_bytes - p.state_bytes == 45 * 64 * 128 * 128 * 2  # the recurrent state halves
    assert f32.batch == left // (state + 45 * 64 * 128 * 128 * 2 + kv + ws) == 98
    # more context, fewer sequences; no room, B = 0
    assert largest_batch(SHAPE, MACHINES["mac48"], "bfloat16", 8192).batch < p.batch
    assert largest_batch(SHAPE, Machine("tiny", 8 * 10**9, 1.0, 0.0)).batch == 0


def test_table_covers_every_machine_and_dtype():
    plans = table(SHAPE)
    assert [(p.machine, p.state_dtype) for p in plans] == \
        [(m.name, d) for m in MACHINES.values() for d in ("float32", "bfloat16")]
    for f32, bf16 in zip(plans[::2], plans[1::2]):
        assert bf16.batch > f32.batch > 0


def test_cli(tmp_path, capsys):
    assert main(["plan", "--shape", SHAPE, "--memory-gb", "48", "--usable-share", "0.75", "--context", "2048",
                 "--state-dtype", "bfloat16", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    usable = int(48e9 * 0.75)
    b = (usable - hand_dense_397b() - 2_000_000_000) // 170_482_688
    assert f"largest batch B = {b}" in out and "--max-batch" in out
    assert json.loads((tmp_path / "p.json").read_text())["plans"][0]["batch"] == b
    assert main(["plan", "--table"]) == 0
    assert "Mac, 128 GB unified memory" in capsys.readouterr().out
    assert main(["plan", "--machine", "h200", "--usable-share", "0.5"]) == 2
    assert main(["plan", "--memory-gb", "-1"]) == 2
    assert main(["plan", "--machine", "h200", "--context", "0"]) == 2
    assert main(["plan", "--machine", "h200", "--shape", "qwen4-exp-flash-next"]) == 2
    with pytest.raises(SystemExit):
        main(["plan"])  # a machine, a memory size or --table


def test_unknown_state_dtype():
    with pytest.raises(InputError):
        largest_batch(SHAPE, MACHINES["h200"], "float16")
