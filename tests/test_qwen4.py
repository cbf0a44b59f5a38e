"""Qwen4-Exp against transformers on a tiny checkpoint trained briefly by steps: logits, greedy tokens,
the n-gram tables streamed from disk (hash, read plan, CRC), the token indexer and hyper-connections."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe.format import DENSE_GLOBAL, BundleError, ExpertFileWriter, ExpertQuant, TextConfig, dense_layer_path, \
    expert_path
from flashmoe.format.experts import make_info
from flashmoe.format.layout import expert_components
from flashmoe.format.manifest import build_manifest, write_manifest
from flashmoe.format.names import ZERO_CENTRED_NORMS, layer_of
from flashmoe.format.tables import TableFileWriter, TableHash, make_table_info, table_path, tables_manifest
from flashmoe.format.verify import sha256_file

from runtime_bundle import _expert_weights, dequantized_reference, quantize

STEPS = 60

TINY4 = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
             linear_num_value_heads=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
             num_experts_per_tok=2, hc_count=2, hc_lowrank=16, ple_layer_ids=[1, 3], ple_embed_dim=32, ngram_size=3,
             heads_per_ngram=2, ngram_vocab_size_base=1000, make_ngram_vocab_size_divisible_by=128,
             split_ngram_parts=1, indexer_n_heads=8, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
             indexer_compress_ratio=4, eos_token_id=1, rms_norm_eps=1e-6,
             output_gate_type="sigmoid")  # as the published checkpoint


@pytest.fixture(scope="module")
def q4(corpus_ids):
    """The tiny Qwen4-Exp trained STEPS steps on the shared corpus (norm weights nudged off zero first, so
    the zero-centred norms are exercised). This module's tests run on one torch thread, as the model trains."""
    import torch
    from transformers import Qwen4ExpForCausalLM, Qwen4ExpTextConfig

    from tiny_models import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = Qwen4ExpForCausalLM(Qwen4ExpTextConfig(**TINY4))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.normal_(0.0, 0.1)
            if name.endswith("ple.conv1d.weight"):
                p.normal_(0.0, 0.2)
    try:
        yield train(m, corpus_ids, STEPS, batch=4, window=32)
    finally:
        torch.set_num_threads(threads)


def write_q4_bundle(model, out: Path, bits: int | None) -> Path:
    """A bundle of `model` (fp32): dense files, expert files, and one table file per PLE layer."""
    from tiny import save_tokenizer

    (out / "dense").mkdir(parents=True)
    (out / "experts").mkdir()
    (out / "tables").mkdir()
    hf = json.loads(model.config.to_json_string())
    cfg = TextConfig.from_hf(hf)
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    save_tokenizer(out, cfg.vocab_size)
    dense: dict[str, dict[str, np.ndarray]] = {}
    tables = {}
    for k, v in model.state_dict().items():
        name = k[len("model."):] if k.startswith("model.") else k
        if ".mlp.experts." in k or ".ple_embedding." in k:
            if name.endswith("ngram_embedding.weight"):
                tables[layer_of(name)] = v.detach().float().numpy()
            continue
        a = v.detach().float().numpy()
        if ZERO_CENTRED_NORMS.search(name):
            a = a + 1.0
        elif name.endswith("conv1d.weight"):
            a = a[:, 0, :]
        L = layer_of(name)
        dense.setdefault(DENSE_GLOBAL if L is None else dense_layer_path(L), {})[name] = np.ascontiguousarray(a)
    for rel, tensors in dense.items():
        mx.save_safetensors(str(out / rel), {k: mx.array(v) for k, v in tensors.items()})
    infos = []
    for L, w in sorted(tables.items()):
        emb = model.model.layers[L].ple.ple_embedding
        th = TableHash.build(cfg.vocab_size, emb.ngram_size, emb.heads_per_ngram, 1, emb.ngram_vocab_size_base,
                             emb.ple_layer_index, emb.seed)
        info = make_table_info(L, w.shape[0], w.shape[1], "float32", th)
        tw = TableFileWriter(out / table_path(L), info)
        for i in range(0, len(w), 1000):  # in pieces, as a converter streams them
            tw.write_rows(w[i : i + 1000])
        tw.close()
        infos.append(info)
    q = ExpertQuant(bits, 32, "float32")
    comps = expert_components(cfg.hidden_size, cfg.moe_intermediate_size, q)
    digests = []
    for L, (g, u, d) in _expert_weights(model).items():
        info = make_info(L, cfg.num_experts, comps)
        w = ExpertFileWriter(out / expert_path(L), info)
        for e in range(cfg.num_experts):
            parts = {}
            for proj, t in (("gate_proj", g[e]), ("up_proj", u[e]), ("down_proj", d[e])):
                if bits is None:
                    parts[f"{proj}.weight"] = t.astype(np.float32)
                else:
                    parts[f"{proj}.weight"], parts[f"{proj}.scales"], parts[f"{proj}.biases"] = quantize(t, bits, 32)
            w.write_record(parts)
        w.close()
        digests.append(w.record_digests)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    listed = {f: {"size": (out / f).stat().st_size, "sha256": sha256_file(out / f)} for f in files}
    dense_q = {"dtype": "float32", "bits": None, "group_size": 32, "quantized": {}}
    m = build_manifest(cfg, q, info, dense_q, {"path": "test", "kind": "float"},
                       {"vision": False, "mtp": False, "tensors": 0}, listed, "test", records=digests)
    m["tables"] = tables_manifest(infos)
    write_manifest(out, m)
    return out


@pytest.fixture(scope="module")
def q4_bundles(q4, tmp_path_factory):
    root = tmp_path_factory.mktemp("q4")
    return {bits: write_q4_bundle(q4, root / f"b{bits}", bits) for bits in (None, 8)}


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def run(model, ids):
    cache = model.make_cache()
    return np.array(model(mx.array([ids]), cache).astype(mx.float32))[0]


def nll(logits, ids):
    lg = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    return -lp[np.arange(len(ids) - 1), ids[1:]].mean()


def test_hash_matches_transformers(q4):
    """Hash parameters and row ids equal transformers' buffers and its embedding lookup."""
    import torch

    ids = [5, 9, 1, 7, 7, 300, 1, 1, 42, 8, 9, 10]  # eos (1) inside: n-grams restart after it
    for L in (0, 2):
        emb = q4.model.layers[L].ple.ple_embedding
        th = TableHash.build(512, 3, 2, 1, 1000, emb.ple_layer_index, 1234)
        assert list(th.multipliers) == emb.layer_multipliers.tolist()
        assert list(th.vocab_sizes) == emb.ngram_heads_vocab_sizes.tolist()
        assert list(th.offsets) == emb.ngram_heads_offsets.tolist()
        rows = th.row_ids(np.array([[1, 1, *ids]]))[0]  # [S, heads]
        table = emb.ngram_embedding.weight.detach().numpy()
        with torch.no_grad():
            ref = emb(torch.tensor([ids]), None)[0].numpy()
        np.testing.assert_array_equal(table[rows].reshape(len(ids), -1), ref)


def test_logits_unquantized(q4, q4_bundles, corpus_ids):
    """Prefill logits match transformers (the indexer selecting: 40 tokens > budget 8 + block 4), and the
    perplexity is within 1%."""
    model, _ = flashmoe.load(q4_bundles[None])
    ids = corpus_ids[:40]
    ref, got = hf_logits(q4, ids), run(model, ids)
    assert np.abs(got - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    p_ref, p_got = np.exp(nll(ref, ids)), np.exp(nll(got, ids))
    assert abs(p_got / p_ref - 1) < 0.01
    assert p_ref < 100  # trained: far below the 512 of a uniform guess
    st = model.tables.stats
    assert st.blocks_checked > 0 and st.bytes > 0 and model.stats.expert_bytes >= 0


def test_indexer_changes_attention(q4, q4_bundles, corpus_ids):
    """Sanity of the test above: with the indexer's budget lifted the logits differ from transformers', so
    the indexer's selection is what made them agree."""
    import copy

    ids = corpus_ids[:40]
    wide = copy.deepcopy(q4)
    for layer in wide.model.layers:
        if hasattr(layer, "self_attn"):
            layer.self_attn.indexer.token_budget = 64
            layer.self_attn.indexer.block_topk = 16
    assert np.abs(hf_logits(wide, ids) - hf_logits(q4, ids)).max() > 1e-3


def greedy(model, ids, n):
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache)
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits[0, -1]).item())
        out.append(t)
        logits = model.decode(mx.array([[t]]), cache)
    return out


def hf_greedy(model, ids, n):
    ids, out = list(ids), []
    for _ in range(n):
        t = int(np.argmax(hf_logits(model, ids)[-1]))
        out.append(t)
        ids.append(t)
    return out


def test_greedy_8bit(q4, q4_bundles, corpus_ids):
    """Greedy tokens at 8-bit experts equal transformers' with the same (dequantized) experts; decoding
    runs through the PLE conv state, the n-gram context and the indexer's key cache."""
    model, _ = flashmoe.load(q4_bundles[8])
    prompt = corpus_ids[:20]
    ref = dequantized_reference(q4, 8, group_size=32)
    assert greedy(model, prompt, 12) == hf_greedy(ref, prompt, 12)


def test_decode_equals_prefill(q4_bundles, corpus_ids):
    """A prompt decoded one token at a time gives the logits of its prefill (caches carry all state)."""
    model, _ = flashmoe.load(q4_bundles[None])
    ids = corpus_ids[:24]
    full = run(model, ids)
    cache = model.make_cache()
    model(mx.array([ids[:5]]), cache)
    for i in range(5, len(ids)):
        step = np.array(model.decode(mx.array([[ids[i]]]), cache).astype(mx.float32))[0, -1]
        np.testing.assert_allclose(step, full[i], atol=2e-4, rtol=1e-4)


def test_left_padded_batch(q4_bundles, corpus_ids):
    """Two prompts of different lengths in one left-padded batch give each its own logits."""
    model, _ = flashmoe.load(q4_bundles[None])
    a, b = corpus_ids[:30], corpus_ids[40:57]
    cache = model.make_cache(left_pad=[0, len(a) - len(b)])
    batch = mx.array([a, [0] * (len(a) - len(b)) + b])
    got = np.array(model(batch, cache).astype(mx.float32))
    np.testing.assert_allclose(got[0], run(model, a), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1, len(a) - len(b):], run(model, b), atol=2e-4, rtol=1e-4)


def test_read_plan_counts(q4_bundles):
    """One plan per call: each block read whole and CRC-checked once; later calls read only rows."""
    model, _ = flashmoe.load(q4_bundles[None])
    st = model.tables.stats
    st.reset()
    run(model, [5, 6, 7, 8])
    first = (st.blocks_checked, st.reads, st.bytes)
    assert first[0] == first[1] > 0 and first[2] == first[0] * 16384
    st.reset()
    run(model, [5, 6, 7, 8])
    assert st.blocks_checked == 0 and 0 < st.bytes <= 2 * 4 * 4 * 8 * 4  # layers * tokens * heads * row bytes


def test_crc_catches_corrupt_row(q4, tmp_path, corpus_ids):
    """A flipped byte in a table row is caught by its block's CRC the first time the row is read."""
    out = write_q4_bundle(q4, tmp_path / "b", None)
    model, _ = flashmoe.load(out)
    ids = corpus_ids[:6]
    rows = model.tables.info(0).hash.row_ids(np.array([[1, 1, *ids]]))[0]
    f = model.tables.files[0]
    path = out / table_path(0)
    raw = bytearray(path.read_bytes())
    raw[f.row_offset(int(rows[3, 1])) + 2] ^= 0x40
    path.write_bytes(bytes(raw))
    model2, _ = flashmoe.load(out)
    with pytest.raises(BundleError, match="CRC"):
        run(model2, ids)


def test_convert_checkpoint(q4, tmp_path, corpus_ids):
    """flashmoe-convert on the transformers checkpoint (save_pretrained: the tables as ngram_embedding.shard_K
    pieces, here split in 2): tables in tables/, not in the dense files; the bundle runs like transformers."""
    import copy

    from flashmoe.convert.converter import convert_checkpoint
    from safetensors import safe_open
    from tiny import save_tokenizer

    m = copy.deepcopy(q4)
    m.config.split_ngram_parts = 2
    m.save_pretrained(tmp_path / "ckpt")
    save_tokenizer(tmp_path / "ckpt", 512)
    with safe_open(str(next((tmp_path / "ckpt").glob("*.safetensors"))), "np") as f:
        assert any(".ngram_embedding.shard_1.weight" in k for k in f.keys())
    out = convert_checkpoint(tmp_path / "ckpt", tmp_path / "b", bits=None, dense_bits=None, progress=False,
                             log=lambda s: None)
    for L in (0, 2):
        assert not any("ple_embedding" in k for k in mx.load(str(out / dense_layer_path(L))))
    model, _ = flashmoe.load(out)
    ids = corpus_ids[:40]
    np.testing.assert_allclose(run(model, ids), hf_logits(q4, ids), atol=2e-4, rtol=1e-4)


def test_rows_join_and_leave(q4_bundles, corpus_ids):
    """Sequences joining a batch (Cache.concat) and leaving it (Cache.rows) keep their PLE and indexer state:
    the joined batch decodes each row as it decodes alone (what the batch engine does)."""
    from flashmoe.runtime.model import Cache

    model, _ = flashmoe.load(q4_bundles[None])
    a, b = corpus_ids[:30], corpus_ids[40:57]
    ca, cb = model.make_cache(), model.make_cache()
    la, lb = model(mx.array([a]), ca), model(mx.array([b]), cb)
    ta, tb = int(mx.argmax(la[0, -1]).item()), int(mx.argmax(lb[0, -1]).item())
    both = Cache.concat([ca.rows([0]), cb.rows([0])])
    got = np.array(model.decode(mx.array([[ta], [tb]]), both).astype(mx.float32))[:, -1]
    alone_a = np.array(model.decode(mx.array([[ta]]), ca).astype(mx.float32))[0, -1]
    alone_b = np.array(model.decode(mx.array([[tb]]), cb).astype(mx.float32))[0, -1]
    np.testing.assert_allclose(got[0], alone_a, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], alone_b, atol=2e-4, rtol=1e-4)
    left = both.rows([1])
    nxt = int(np.argmax(got[1]))
    np.testing.assert_allclose(np.array(model.decode(mx.array([[nxt]]), left).astype(mx.float32))[0, -1],
                               np.array(model.decode(mx.array([[nxt]]), cb).astype(mx.float32))[0, -1],
                               atol=2e-4, rtol=1e-4)


def _small_table(path: Path, rows: int = 700, dim: int = 40):
    th = TableHash.build(512, 3, 2, 1, 150, 0, 1234)
    info = make_table_info(4, rows, dim, "float16", th)
    data = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    from flashmoe.format.tables import write_table

    write_table(path, info, [data[:333], data[333:]])
    return info, data


def test_table_reader_is_defensive(tmp_path):
    """Rows round-trip through the file; a header from another conversion, a truncated file or a bad magic
    are refused with a BundleError naming the file."""
    from flashmoe.format.tables import TableFile
    from flashmoe.runtime.table_reader import TableReader

    path = tmp_path / table_path(4)
    info, data = _small_table(path)
    assert info.rows_per_block == 16384 // 80 and path.stat().st_size == info.file_size
    m = {"tables": tables_manifest([info]), "files": [{"path": table_path(4)}]}
    r = TableReader(tmp_path, m)
    ids = np.array([[0, 699, 204, 205, 3]])
    np.testing.assert_array_equal(r.gather({4: ids})[4], data[ids])
    np.testing.assert_array_equal(r.gather({4: ids})[4], data[ids])  # second time: rows only
    assert r.stats.blocks_checked == 3
    r.close()
    other = dataclasses.replace(info, rows=info.rows - 1)
    with pytest.raises(BundleError, match="disagrees"):
        TableFile(path, other)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(BundleError, match="bytes, expected"):
        TableFile(path, info)
    path.write_bytes(b"X" + raw[1:])
    with pytest.raises(BundleError, match="magic"):
        TableFile(path, info)
    with pytest.raises(BundleError, match="files does not list"):
        TableReader(tmp_path, {"tables": tables_manifest([info]), "files": []})


def test_convert_8bit_greedy(q4, tmp_path, corpus_ids):
    """Converted at 8 bits (experts and dense Linear weights, hyper-connection and PLE projections
    included): greedy tokens equal transformers' run on the weights the bundle decodes to."""
    from flashmoe.convert.converter import convert_checkpoint
    from runtime_bundle import reference_from_bundle
    from tiny import save_tokenizer

    q4.save_pretrained(tmp_path / "ckpt")
    save_tokenizer(tmp_path / "ckpt", 512)
    out = convert_checkpoint(tmp_path / "ckpt", tmp_path / "b", bits=8, group_size=32, dense_bits=8,
                             progress=False, log=lambda s: None)
    quantized = flashmoe.format.Bundle.open(out).dense_quant["quantized"]
    assert any("hyper_connection" in k for k in quantized) and any(".ple." in k for k in quantized)
    model, _ = flashmoe.load(out)
    prompt = corpus_ids[:20]
    assert greedy(model, prompt, 12) == hf_greedy(reference_from_bundle(q4, out), prompt, 12)


def test_generate_and_batch_engine(q4_bundles, corpus_ids):
    """flashmoe.generate and the batched engine (rows of different lengths, chunked prefill, rows leaving)
    give each prompt the tokens it gets alone."""
    from flashmoe.runtime.sampling import SamplingParams

    model, tok = flashmoe.load(q4_bundles[8])
    prompts = [corpus_ids[:n] for n in (3, 26, 15)]
    alone = [[c.token for c in flashmoe.generate(model, tok, p, max_tokens=m) if c.token is not None]
             for p, m in zip(prompts, (8, 5, 10))]
    assert alone[1] == greedy(model, prompts[1], 5)
    res = flashmoe.batch_generate(model, tok, prompts, params=[SamplingParams(max_tokens=m) for m in (8, 5, 10)])
    assert [r.tokens for r in res] == alone


def test_inspect_reads_per_token(q4_bundles, capsys):
    """flashmoe-inspect's per-token bytes: experts K x layers x record, tables cold (whole blocks) and warm
    (rows) from the layout; a fresh model's first token reads no more than cold, a repeat no more than warm."""
    from flashmoe.format import Bundle
    from flashmoe.format.cli import main, token_reads

    b = Bundle.open(q4_bundles[None])
    r = token_reads(b)
    rows = 2 * (3 - 1) * 2  # 2 tables (ple_layer_ids 1, 3) x (ngram_size-1) x heads_per_ngram, of 32/4 fp32 each
    assert r["experts"] == 2 * 4 * b.manifest["experts"]["record_size"]
    assert r["tables"] == {"layers": [0, 2], "rows": rows, "cold": rows * 16384, "warm": rows * 8 * 4}
    assert main([str(b.path)]) == 0
    out = capsys.readouterr().out
    assert f"experts {r['experts']:,} bytes" in out
    assert "tables cold 131,072 bytes" in out and "warm 256 bytes (8 rows x row bytes)" in out
    model, _ = flashmoe.load(b.path)
    st = model.tables.stats
    run(model, [5])
    assert 0 < st.bytes == st.blocks_checked * 16384 <= r["tables"]["cold"]
    st.reset()
    run(model, [5])
    assert st.blocks_checked == 0 and 0 < st.bytes == st.rows * 32 <= r["tables"]["warm"]


def test_bench_reports_table_bytes(q4_bundles):
    """flashmoe-bench run on a Qwen4-Exp bundle: the table bytes of each cold and warm pass (model.tables.stats)
    beside the expert bytes, and the layout's per-token figures."""
    from flashmoe.bench.run import format_table, run as bench_run

    rep = bench_run(q4_bundles[8], tokens=3, sweep_seconds=0.05, passes=2, log=lambda m: None)
    assert rep["table_bytes_per_token_layout"]["warm"] == 256
    for phase, r in rep["decode"].items():
        assert [p["table_bytes"] for p in r["passes"]] and all(p["table_bytes"] > 0 for p in r["passes"])
        assert r["table_bytes_per_token"] == r["table_bytes"] / 3 > 0
    assert rep["decode"]["warm"]["table_bytes_per_token"] <= 256  # rows only, blocks checked before
    text = format_table(rep)
    assert "warm  tables" in text and "bytes/tok read from the n-gram tables" in text
    assert "at most 131,072 bytes/tok cold (whole blocks), 256 warm (rows)" in text
