"""Benchmark one layer's expert block: custom dequant-FMA kernels vs MLX built-ins (gather_qmm).

Run on a GPU machine (MLX default device = GPU):
    python benchmarks/bench_kernels.py [--model 397B] [--K 4 10] [--bits 4 2] [--T 1 4] [--sweep]
    python benchmarks/bench_kernels.py --pool 2260 --T 1 4 8 32 128   # slot ids into a GPU-cache-sized pool

Reports, in one run: device bandwidth measured here (1 GiB elementwise copy: bytes read + written;
and a read-only reduction), then per configuration the time per expert block for each backend, the
ratio builtin/custom (>1: custom faster), the bytes the block must touch (the K experts' records +
activations) and that over the measured bandwidth (the roofline floor).

Timing: a block's inputs rotate over enough expert sets to exceed 4x the L2 (so weights come from
HBM, as they do after an SSD read), after warm-up. With --pool N the experts are one table of N slots
(the runtime's GPU expert cache: 2260 slots = 16 GB at the 397B's 4-bit shape) and each set is a different
random choice of slots for the T tokens. 'stream' = N blocks queued then one mx.eval
(GPU-bound time per block); 'sync' = mx.eval after every block (what one decode layer waits, launch
and host overheads included). Median of --reps repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from flashmoe.bench import method
from flashmoe.metal import dispatch as D

MODELS = {  # H, I, E, K, shared intermediate
    "397B": (4096, 1024, 512, 10, 1024),
    "122B": (3072, 1024, 256, 8, 1024),
    "35B": (2048, 512, 256, 8, 512),
}
L2_BYTES = 60 << 20  # H100 50 MB, H200 60 MB; rotate over >= 4x this


def bandwidth(reps=20):
    a = mx.random.uniform(shape=(256 << 20,))  # 1 GiB float32
    mx.eval(a)
    out = {}
    for name, fn, nbytes in (("copy", lambda: a + 1.0, 2 * a.nbytes), ("read", lambda: mx.sum(a), a.nbytes)):
        mx.eval(fn())
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t0)
        out[name] = nbytes / statistics.median(ts)
    del a
    return out


def make_set(n, H, I, bits, G, seed):
    """Random packed experts (any uint32 is a valid code stream) with realistic scale/bias sizes."""
    mx.random.seed(seed)
    ex = {}
    for name, (rows, cols) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
        shape = (n, rows, cols * bits // 32)
        hi = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32)
        ex[f"{name}.weight"] = (hi << 16) | mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32)
        ex[f"{name}.scales"] = (mx.random.uniform(0.5, 1.5, (n, rows, cols // G)) * 0.004).astype(mx.bfloat16)
        ex[f"{name}.biases"] = (mx.random.normal((n, rows, cols // G)) * 0.01).astype(mx.bfloat16)
    mx.eval(ex)
    return ex


def time_block(fn, sets, n_stream=64, reps=5):
    nset = len(sets)
    for i in range(2 * nset):  # warm-up: compile + touch
        mx.eval(fn(sets[i % nset]))
    stream, sync = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(sets[i % nset]) for i in range(n_stream)]
        mx.eval(outs)
        stream.append((time.perf_counter() - t0) / n_stream)
        t0 = time.perf_counter()
        for i in range(n_stream // 4):
            mx.eval(fn(sets[i % nset]))
        sync.append((time.perf_counter() - t0) / (n_stream // 4))
    return statistics.median(stream), statistics.median(sync)


def run_config(model, Kr, bits, T, G, bw, with_shared=False, variants=None, reps=5, pool=None):
    H, I, E, _, Is = MODELS[model]
    n = min(T * Kr, E)
    per_expert = 3 * I * H * (bits / 8 + 2 * 2 / G)  # weights + bf16 scales/biases
    per_set = n * per_expert
    nset = max(2, int(-(-4 * L2_BYTES // per_set)))
    sets = []
    table = make_set(pool, H, I, bits, G, seed=0) if pool else None
    rng = np.random.default_rng(T * 100 + Kr)
    for s in range(nset):
        if pool:  # distinct slots per token, anywhere in the pool; tokens may share slots as real batches do
            ex = table
            idx = mx.array(np.stack([rng.choice(pool, Kr, replace=False) for _ in range(T)]).astype(np.int32))
        else:
            ex = make_set(n, H, I, bits, G, seed=s)
            idx = mx.array([[(t * Kr + k) % n for k in range(Kr)] for t in range(T)], dtype=mx.int32)
        sc = mx.softmax(mx.random.normal((T, Kr)), axis=-1)
        x = mx.random.normal((T, H)).astype(mx.bfloat16)
        sets.append((x, ex, idx, sc))
    if pool:  # bytes touched: the distinct slots of each set
        per_set = float(np.mean([len(np.unique(np.asarray(st[2]))) for st in sets])) * per_expert
    mx.eval([s[0] for s in sets] + [s[3] for s in sets])
    touched = per_set + (3 * H * Is * (1 + 4 / G) if with_shared else 0) + T * H * 2 * 2
    res = {"model": model, "K": Kr, "bits": bits, "T": T, "G": G, "shared": with_shared, "pool": pool,
           "bytes": touched, "roofline_us": touched / max(bw["read"], bw["copy"]) * 1e6}
    variants = variants or {"builtin": ("builtin", None, False), "custom": ("custom", None, False)}
    for label, (backend, tuning, literal) in variants.items():
        old_t, old_l = {k: dict(v) for k, v in D.TUNING.items()}, D.LITERAL_FMA
        if tuning:
            for k, v in tuning.items():
                D.TUNING[k].update(v)
        D.LITERAL_FMA = literal

        def fn(s, backend=backend):
            x, ex, idx, sc = s
            return D.expert_block(x, ex, idx, sc, bits, G, backend=backend)

        try:
            st, sy = time_block(fn, sets, reps=reps)
            res[label] = {"stream_us": st * 1e6, "sync_us": sy * 1e6, "GBps": touched / st / 1e9}
        except Exception as err:  # keep the other numbers if one variant fails
            res[label] = {"error": repr(err)[:300]}
        finally:
            D.TUNING.update(old_t)
            D.LITERAL_FMA = old_l
    del sets, table
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", default=["397B"], choices=list(MODELS), help="expert shapes to time")
    ap.add_argument("--K", nargs="+", type=int, default=[4, 10], help="experts per token")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 2], help="expert bit widths")
    ap.add_argument("--T", nargs="+", type=int, default=[1], help="tokens per block (batch size at decode)")
    ap.add_argument("--G", type=int, default=64, help="quantization group size")
    ap.add_argument("--sweep", action="store_true", help="also time launch-shape variants and the literal FMA form")
    ap.add_argument("--reps", type=int, default=5, help="repetitions; the median is reported")
    ap.add_argument("--pool", type=int, default=None, metavar="SLOTS",
                    help="experts live in one table of SLOTS slots (a GPU expert cache) and each token names K "
                         "random slots of it; default: a compact table of the T*K experts of the step")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    ap.add_argument("--ncu", action="store_true",
                    help="no timing: run each configuration 3 times per backend, for a profiler wrapper "
                         "(ncu --metrics gpu__time_duration.sum) to read per-kernel GPU time")
    args = ap.parse_args(argv)

    print(f"device: {mx.default_device()}  gpu backend: {D.gpu_backend()}  mlx {mx.__version__}", flush=True)
    if args.ncu:
        for model in args.model:
            for bits in args.bits:
                for Kr in args.K:
                    for T in args.T:
                        for shared in [False]:  # the shared expert runs in the MoE block, not in these kernels
                            H, I, E, _, Is = MODELS[model]
                            n = min(T * Kr, E)
                            ex = make_set(n, H, I, bits, args.G, seed=1)
                            idx = mx.array([[(t * Kr + k) % n for k in range(Kr)] for t in range(T)], dtype=mx.int32)
                            sc = mx.softmax(mx.random.normal((T, Kr)), axis=-1)
                            x = mx.random.normal((T, H)).astype(mx.bfloat16)
                            mx.eval(x, idx, sc)
                            for backend in ("builtin", "custom"):
                                print(f"NCU-MARK {model} bits={bits} K={Kr} T={T} shared={shared} {backend}", flush=True)
                                for _ in range(3):
                                    mx.eval(D.expert_block(x, ex, idx, sc, bits, args.G, backend=backend))
                                mx.synchronize()
        return 0
    bw = bandwidth()
    print(f"bandwidth: copy {bw['copy'] / 1e9:.0f} GB/s (read+write), read-only {bw['read'] / 1e9:.0f} GB/s", flush=True)
    rows = []
    for model in args.model:
        for bits in args.bits:
            for Kr in args.K:
                for T in args.T:
                    for shared in [False]:  # the shared expert runs in the MoE block, not in these kernels
                        variants = None
                        if args.sweep and T == 1 and not shared:
                            variants = {
                                "builtin": ("builtin", None, False),
                                "custom": ("custom", None, False),
                                "custom_literal": ("custom", None, True),
                                "custom_R2": ("custom", {"gate_up": {"R": 2}, "down": {"R": 2}}, False),
                                "custom_W4": ("custom", {"gate_up": {"NWARP": 4}, "down": {"NWARP": 4}}, False),
                                "custom_R2W4": ("custom", {"gate_up": {"R": 2, "NWARP": 4},
                                                           "down": {"R": 2, "NWARP": 4}}, False),
                                "custom_R1W4": ("custom", {"gate_up": {"R": 1, "NWARP": 4},
                                                           "down": {"R": 1, "NWARP": 4}}, False),
                            }
                        r = run_config(model, Kr, bits, T, args.G, bw, shared, variants, args.reps, args.pool)
                        rows.append(r)
                        print(json.dumps(r), flush=True)
    print(f"\npool: {args.pool or 'compact (T*K experts)'}")
    print("\n| model | bits | K | T | shared | MB touched | roofline us | variant | stream us | sync us | GB/s | % of best measured bw | builtin/variant (stream) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r.get("builtin", {}).get("stream_us")
        for label, v in r.items():
            if not isinstance(v, dict):
                continue
            if "error" in v:
                print(f"| {r['model']} | {r['bits']} | {r['K']} | {r['T']} | {r['shared']} | | | {label} | ERROR {v['error'][:80]} |")
                continue
            ratio = f"{b / v['stream_us']:.2f}" if b else ""
            print(f"| {r['model']} | {r['bits']} | {r['K']} | {r['T']} | {r['shared']} | {r['bytes'] / 1e6:.1f} | "
                  f"{r['roofline_us']:.1f} | {label} | {v['stream_us']:.1f} | {v['sync_us']:.1f} | {v['GBps']:.0f} | "
                  f"{100 * v['GBps'] * 1e9 / max(bw['read'], bw['copy']):.0f}% | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "rows": rows, "metadata": method.metadata()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
