"""Conversion benchmark: source GB/s converted vs the raw disk read and write speed measured in the same
run, and peak RSS of converting synthetic checkpoints of different depths (it must not grow with layers).

    python benchmarks/bench_convert.py [--layers 4 16] [--hidden 1024] [--inter 512] [--experts 64] [--dir DIR]

Synthetic checkpoints are bf16 safetensors with the Qwen3.5-MoE key layout (per-expert keys), one shard
per layer, written with numpy: no transformers needed. Page cache is evicted (posix_fadvise DONTNEED)
before each timed read so the numbers are disk numbers where the OS honours it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def evict(path: Path) -> None:
    for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_speed(d: Path, nbytes: int = 1 << 30) -> tuple[float, float]:
    """(write GB/s with fsync, cold sequential read GB/s) of a file of nbytes in d."""
    p = d / "disk-probe.bin"
    block = np.random.default_rng(0).integers(0, 255, size=64 << 20, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    with open(p, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    w = nbytes / (time.perf_counter() - t) / 1e9
    evict(p)
    t = time.perf_counter()
    with open(p, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    r = nbytes / (time.perf_counter() - t) / 1e9
    p.unlink()
    return w, r


def bf16(rng, shape, std=0.02) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * std).view(np.uint32).__rshift__(16).astype(np.uint16)


def make_checkpoint(out: Path, layers: int, hidden: int, inter: int, experts: int, vocab: int = 4096) -> int:
    from flashmoe.format.st import SafetensorsWriter

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    heads, kv, hd, lk, lv, nk, nv = 8, 2, 128, 128, 128, 4, 8
    cfg = dict(model_type="qwen3_5_moe_text", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, linear_key_head_dim=lk,
               linear_value_head_dim=lv, linear_num_key_heads=nk, linear_num_value_heads=nv,
               moe_intermediate_size=inter, shared_expert_intermediate_size=inter, num_experts=experts,
               num_experts_per_tok=8, linear_conv_kernel_dim=4)
    (out / "config.json").write_text(json.dumps(cfg))
    from flashmoe.bench.synth import write_byte_tokenizer

    write_byte_tokenizer(out, vocab)  # convert refuses a checkpoint without a tokenizer
    total = 0
    conv = 2 * nk * lk + nv * lv
    for L in range(layers):
        w = SafetensorsWriter(out / f"model-{L:05d}.safetensors")
        p = f"model.layers.{L}"
        for e in range(experts):
            for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                w.add(f"{p}.mlp.experts.{e}.{proj}.weight", "BF16", bf16(rng, shape))
        dense = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 "mlp.gate.weight": (experts, hidden), "mlp.shared_expert_gate.weight": (1, hidden),
                 "mlp.shared_expert.gate_proj.weight": (inter, hidden), "mlp.shared_expert.up_proj.weight": (inter, hidden),
                 "mlp.shared_expert.down_proj.weight": (hidden, inter)}
        if (L + 1) % 4:
            dense.update({"linear_attn.in_proj_qkv.weight": (conv, hidden), "linear_attn.in_proj_z.weight": (nv * lv, hidden),
                          "linear_attn.in_proj_b.weight": (nv, hidden), "linear_attn.in_proj_a.weight": (nv, hidden),
                          "linear_attn.conv1d.weight": (conv, 1, 4), "linear_attn.dt_bias": (nv,), "linear_attn.A_log": (nv,),
                          "linear_attn.norm.weight": (lv,), "linear_attn.out_proj.weight": (hidden, nv * lv)})
        else:
            dense.update({"self_attn.q_proj.weight": (2 * heads * hd, hidden), "self_attn.k_proj.weight": (kv * hd, hidden),
                          "self_attn.v_proj.weight": (kv * hd, hidden), "self_attn.o_proj.weight": (hidden, heads * hd),
                          "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
        for k, shape in dense.items():
            w.add(f"{p}.{k}", "BF16", bf16(rng, shape))
        total += w.close()[0]
    w = SafetensorsWriter(out / "model-globals.safetensors")
    w.add("model.embed_tokens.weight", "BF16", bf16(rng, (vocab, hidden)))
    w.add("model.norm.weight", "BF16", bf16(rng, (hidden,)))
    w.add("lm_head.weight", "BF16", bf16(rng, (vocab, hidden)))
    total += w.close()[0]
    return total


def convert_in_child(src: Path, out: Path, bits: int) -> dict:
    """Run the conversion in a fresh process so its peak RSS is its own."""
    code = (
        "import json, resource, sys, time\n"
        "from flashmoe.convert import convert_checkpoint\n"
        "t = time.perf_counter()\n"
        f"convert_checkpoint({str(src)!r}, {str(out)!r}, bits={bits}, progress=False, log=lambda m: None)\n"
        "dt = time.perf_counter() - t\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'seconds': dt, 'peak_rss_mb': rss / (1024 if sys.platform != 'darwin' else 1024 * 1024)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: system temp)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=a.dir, prefix="flashmoe-bench-convert-"))
    try:
        wr, rd = disk_speed(root)
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.system()}; scratch {root}")
        print(f"raw disk: write {wr:.2f} GB/s (fsync), cold sequential read {rd:.2f} GB/s")
        print(f"{'layers':>6} {'source GB':>10} {'seconds':>8} {'GB/s':>6} {'vs read':>8} {'peak RSS MB':>12}")
        for L in a.layers:
            src = root / f"src-{L}"
            size = make_checkpoint(src, L, a.hidden, a.inter, a.experts)
            evict(src)
            res = convert_in_child(src, root / f"out-{L}", a.bits)
            gbs = size / res["seconds"] / 1e9
            print(f"{L:>6} {size / 1e9:>10.3f} {res['seconds']:>8.2f} {gbs:>6.2f} {gbs / rd:>7.0%} {res['peak_rss_mb']:>12.0f}")
            import shutil

            shutil.rmtree(src)
            shutil.rmtree(root / f"out-{L}")
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
