"""Which part of a GPU prefill drifts from transformers? Trains the tests' tiny model, writes a float bundle,
and compares 80-token prefill logits with transformers several times per setting (upload direct / pinned),
then checks mx.fast.gated_delta_update and the model's fused (compiled) helpers on the GPU against the CPU.
Usage: python benchmarks/diag_gpu_logits.py [TRIALS]"""
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import flashmoe  # noqa: E402


def trained_model():
    import torch
    from conftest import STEPS, TEXT
    from tiny import build_model, save_tokenizer
    from tokenizers import Tokenizer as HFTok

    d = Path(tempfile.mkdtemp())
    save_tokenizer(d, 512)
    ids = HFTok.from_file(str(d / "tokenizer.json")).encode(TEXT).ids
    torch.manual_seed(0)
    m = build_model(seed=0)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3, weight_decay=0.0)
    data = torch.tensor(ids)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        x = torch.stack([data[s : s + 64] for s in starts])
        y = torch.stack([data[s + 1 : s + 65] for s in starts])
        lg = m(x).logits
        loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), ids


def main():
    from runtime_bundle import write_bundle
    from tiny import logits_of

    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    m, corpus = trained_model()
    root = Path(tempfile.mkdtemp())
    b = write_bundle(m, root / "bf", bits=None)
    for n in (9, 80):
        ids = corpus[5 : 5 + n]
        ref = logits_of(m, ids)
        scale = max(1.0, float(np.abs(ref).max()))
        from flashmoe.metal.dispatch import gpu_backend

        for upload in ("direct", "pinned") if gpu_backend() == "cuda" else ("direct",):
            for t in range(trials):
                model, _ = flashmoe.load(b, upload=upload)
                out = np.array(model(mx.array([ids]), model.make_cache()))[0]
                print(f"n={n} upload={upload} trial {t}: max|diff|/scale {np.abs(out - ref).max() / scale:.2e}",
                      flush=True)
                model.experts.close()
    # the kernels alone, GPU vs CPU
    from flashmoe.runtime import model as M

    mx.random.seed(0)
    B, T, Hk, Hv, Dk, Dv = 1, 80, 2, 4, 16, 16
    q, k = mx.random.normal((B, T, Hk, Dk)), mx.random.normal((B, T, Hk, Dk))
    q, k = M.qk_l2norm(q, k, Dk ** -0.5)  # as the model feeds it: unit-norm keys keep the state bounded
    v = mx.random.normal((B, T, Hv, Dv))
    g, beta = mx.random.uniform(0.5, 1.0, (B, T, Hv)), mx.random.uniform(0, 1, (B, T, Hv))
    S0 = mx.zeros((B, Hv, Dv, Dk))
    oc, sc = mx.fast.gated_delta_update(q, k, v, g, beta, S0, stream=mx.cpu)
    for t in range(trials):
        og, sg = mx.fast.gated_delta_update(q, k, v, g, beta, S0)
        print(f"gated_delta_update T={T} trial {t}: max |GPU - CPU| / max |CPU|: out "
              f"{float(mx.abs(og - oc).max() / mx.abs(oc).max()):.2e}, state "
              f"{float(mx.abs(sg - sc).max() / mx.abs(sc).max()):.2e}", flush=True)
    x, z = mx.random.normal((1, T, Hv, Dv)), mx.random.normal((1, T, Hv, Dv))
    w = mx.random.normal((Dv,))
    for name, fn, args in [("gated_rms_norm", M.gated_rms_norm, (x, w, z, 1e-6)),
                           ("qk_l2norm", M.qk_l2norm, (q, k, 0.25)),
                           ("delta_gates", M.delta_gates, (g, beta, mx.random.normal((Hv,)), mx.random.normal((Hv,)))),
                           ("swiglu", M.swiglu, (x, z)), ("sigmoid_gate", M.sigmoid_gate, (x, z))]:
        for shape_first in (True, False):
            if shape_first:  # trace first with a decode-shaped call, as the model does
                fn(*[a[:, :1] if isinstance(a, mx.array) and a.ndim >= 3 else a for a in args])
            got = fn(*args)
            with mx.stream(mx.cpu):
                want = fn(*args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            err = max(float(mx.abs(a - b_).max()) for a, b_ in zip(got, want))
            print(f"{name} (traced at S=1 first: {shape_first}): GPU vs CPU max {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
