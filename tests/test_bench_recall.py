"""flashmoe-bench recall (issue #20): the prediction recall of speculative prefetch, against transformers on
the trained tiny model, and the subcommand on it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import flashmoe
from flashmoe.bench.recall import recall_of


def _torch_recall(model, ids):
    """The same measurement on the transformers model: hidden states entering each layer, layer L's
    post-attention norm and router on the state entering / leaving layer L-1, against layer L's actual top-K."""
    import torch

    actual = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out, _i=i: actual.__setitem__(_i, out[2]))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:  # before the guesses below, which call the routers again
            h.remove()
    out = {"entering": [], "leaving": []}
    with torch.no_grad():
        for L in range(1, len(model.model.layers)):
            layer = model.model.layers[L]
            for src, h in (("entering", hs[L - 1]), ("leaving", hs[L])):
                guess = layer.mlp.gate(layer.post_attention_layernorm(h))[2]
                k = guess.shape[1]
                out[src].append(float(np.mean([len(set(g.tolist()) & set(a.tolist())) / k
                                               for g, a in zip(guess, actual[L])])))
    return out


def test_recall_matches_transformers_on_the_trained_tiny_model(trained, bundles, corpus_ids):
    ids = corpus_ids[:200]
    model, _ = flashmoe.load(bundles[None])
    ours = recall_of(model, ids)
    ref = _torch_recall(trained, ids)
    for src in ("entering", "leaving"):
        assert len(ours[src]) == 3
        assert ours[src] == pytest.approx(ref[src], abs=0.02), (src, ours[src], ref[src])
    # routing is observed, not changed: the model routes as before afterwards
    assert "route" not in vars(model.layers[1].mlp)


def test_recall_subcommand(bundles, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", "recall", str(bundles[None]), "--text", str(text),
                        "--tokens", "64", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["tokens"] == 64 and rep["chance"] == 4 / 16
    assert set(rep["recall_by_layer"]) == {"entering", "leaving"}
    assert all(0 <= v <= 1 for v in rep["recall_by_layer"]["leaving"].values())
    assert rep["metadata"]["settings"]["experts_per_token"] == 4
    assert "entering" in r.stdout and "chance 25%" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "flashmoe.bench.cli", "recall", str(bundles[None]), "--text",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot read it" in bad.stderr and "Traceback" not in bad.stderr
