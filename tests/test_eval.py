"""flashmoe-eval: perplexity against transformers on the demo model, chunking and windows, KL divergence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import flashmoe
from flashmoe.eval import compare, perplexity

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "model"
TEXT = ROOT / "demo" / "heldout.txt"


@pytest.fixture(scope="module")
def demo_bundles(tmp_path_factory):
    from flashmoe.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("demo")
    out = {}
    for bits in (8, 3):
        out[bits] = root / f"b{bits}"
        convert_checkpoint(DEMO, out[bits], bits=bits, progress=False, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def b8(demo_bundles):
    return flashmoe.load(demo_bundles[8])


@pytest.fixture(scope="module")
def ids(b8):
    return b8[1].encode(TEXT.read_text())


def test_perplexity_matches_transformers(b8, ids):
    """The 8-bit bundle's perplexity is within 1% of the same checkpoint's in transformers (float32), on
    the first 512 tokens of the held-out text (the whole text takes ~1 min on a busy 2-core CPU)."""
    ids = ids[:512]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    ref = transformers.Qwen3_5MoeForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    ours = perplexity(b8[0], ids)
    assert ours.tokens == len(ids) - 1
    assert abs(ours.ppl / math.exp(nll) - 1) < 0.01, (ours.ppl, math.exp(nll))


def test_chunks_do_not_change_the_result_and_windows_restart(b8, ids):
    model = b8[0]
    part = ids[:300]
    whole = perplexity(model, part, chunk=512)
    small = perplexity(model, part, chunk=37)
    assert small.tokens == whole.tokens == 299
    assert abs(small.nll - whole.nll) < 1e-4
    win = perplexity(model, part, window=100, chunk=37)  # three windows, each starting cold
    assert win.tokens == 99 + 99 + 99
    each = [perplexity(model, part[s: s + 100]) for s in (0, 100, 200)]
    assert abs(win.nll - sum(e.nll for e in each) / 3) < 1e-4


def test_compare(b8, demo_bundles, ids):
    model = b8[0]
    part = ids[:400]
    a, r, d = compare(model, model, part, chunk=128)
    assert d.kl < 1e-6 and d.top1 == 1.0 and abs(a.nll - r.nll) < 1e-9
    low, _ = flashmoe.load(demo_bundles[3])
    a, r, d = compare(low, model, part, chunk=128)
    assert r.nll == pytest.approx(perplexity(model, part).nll, abs=1e-5)
    assert d.kl > 1e-4 and d.kl_max >= d.kl and 0.5 < d.top1 < 1.0


def test_cli(demo_bundles, capsys, tmp_path):
    from flashmoe.eval.cli import main

    assert main([str(demo_bundles[8]), "--text", str(TEXT), "--max-tokens", "200", "--json", "-q"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["tokens"] == 199 and one["ppl"] > 1
    assert main([str(demo_bundles[3]), "--text", str(TEXT), "--max-tokens", "200", "--compare", str(demo_bundles[8]),
                 "--experts-per-token", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "KL(REF || BUNDLE)" in out and "3-bit experts, K=2" in out and "8-bit experts, K=4" in out
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    assert main([str(demo_bundles[8]), "--text", str(bad), "-q"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
