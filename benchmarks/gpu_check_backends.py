"""End-to-end check of the expert kernels inside the runtime: the same bundle and tokens through
kernels "builtin" and "custom" (RuntimeConfig.kernels; routed + shared experts through flashmoe.metal.dispatch);
prints the largest logit difference relative to the logits' scale, and whether greedy tokens agree.

    python benchmarks/gpu_check_backends.py BUNDLE [--steps 8]
"""

import argparse

import mlx.core as mx
import numpy as np

import flashmoe


def run(bundle, steps, kernels, forced=None):
    """Logits of a 4-token prompt and `steps` decode steps; greedy, or fed `forced` tokens (so both
    backends see the same inputs even where near-tied random logits would make greedy choices differ)."""
    model, _ = flashmoe.load(bundle, kernels=kernels)
    cache = model.make_cache()
    logits = model(mx.array([[1, 2, 3, 4]]), cache, last_only=True)
    out, toks = [np.array(logits[0, -1].astype(mx.float32))], []
    for _ in range(steps):
        t = forced[len(toks)] if forced else int(mx.argmax(logits[0, -1]).item())
        toks.append(t)
        logits = model(mx.array([[t]]), cache, last_only=True)
        out.append(np.array(logits[0, -1].astype(mx.float32)))
    model.experts.close()
    return np.stack(out), toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    res = {}
    res["builtin"] = run(a.bundle, a.steps, "builtin")
    res["custom"] = run(a.bundle, a.steps, "custom", forced=res["builtin"][1])
    (lb, _), (lc, _) = res["builtin"], res["custom"]
    scale = float(np.abs(lb).max())
    top_b, top_c = lb.argmax(-1), lc.argmax(-1)
    print(f"max |logit diff| / max |logit| = {float(np.abs(lb - lc).max()) / scale:.2e}; "
          f"same top-1 at {int((top_b == top_c).sum())} of {len(top_b)} positions")


if __name__ == "__main__":
    main()
