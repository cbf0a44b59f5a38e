"""Layer-major prefill (runtime/prefill.py) on the trained tiny model: the logits of the chunk-after-chunk
forward (bit for bit) and of transformers, each layer's expert union read exactly once per pass however
many chunks the rows take (where the whole-model forward per chunk reads it again for every chunk), unions
larger than the expert cache in groups read once each, and passes bounded by the hidden-state budget."""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

import flashmoe
from flashmoe.runtime import prefill
from flashmoe.runtime.runner import BatchRunner, forward_chunks

REL_TOL = 1e-4 if mx.default_device() == mx.cpu else 2e-3
CHUNK = 24  # tokens per layer call in these tests: several chunks per prefill


def rows_of(corpus_ids, lengths):
    ids = list(corpus_ids) * 4
    return [ids[7 * i : 7 * i + n] for i, n in enumerate(lengths)]


def chunked(model, rows, tokens=CHUNK):
    """The whole-model forward per chunk (today's path): last logits [B, V]."""
    lens = np.array([len(r) for r in rows])
    cache = model.make_cache(left_pad=lens.max() - lens)
    logits = None
    for _, logits in forward_chunks(model, cache, rows, tokens):
        pass
    return np.array(logits[:, -1])


def layer_major(model, rows, tokens=CHUNK, budget=prefill.HIDDEN_BUDGET_BYTES):
    lens = np.array([len(r) for r in rows])
    cache = model.make_cache(left_pad=lens.max() - lens)
    return np.array(prefill.prefill(model, cache, rows, tokens, budget)[:, -1])


class UnionSpy:
    """Records the union of expert ids each layer's run_layer call asks for, per layer."""

    def __init__(self, experts):
        self.experts, self.orig = experts, experts.run_layer
        self.unions: dict[int, list[set]] = {}

    def __enter__(self):
        def spy(layer, parts, ahead=None):
            u = set()
            for _, inds, _ in parts:
                u |= set(np.array(inds).reshape(-1).tolist())
            self.unions.setdefault(layer, []).append(u)
            return self.orig(layer, parts, ahead)

        self.experts.run_layer = spy
        return self

    def __exit__(self, *exc):
        del self.experts.run_layer  # the bound method again


@pytest.mark.parametrize("bits", [None, 4])
def test_layer_major_equals_chunked_forward(loaded, corpus_ids, bits):
    model, _ = loaded(bits, slots=64)
    rows = rows_of(corpus_ids, (70, 9, 41))  # left-padded rows over several chunks of 24 // 3 = 8 columns
    want = chunked(model, rows)
    got = layer_major(model, rows)
    np.testing.assert_array_equal(got, want)
    one = rows[:1]  # one row: 3 chunks of 24 columns
    np.testing.assert_array_equal(layer_major(model, one), chunked(model, one))


def test_layer_major_matches_transformers(loaded, trained, corpus_ids):
    import torch

    model, _ = loaded(None, slots=64)
    rows = rows_of(corpus_ids, (60, 23))
    got = layer_major(model, rows)
    for row, ours in zip(rows, got):
        with torch.no_grad():
            ref = trained(torch.tensor([row])).logits[0, -1].float().numpy()
        err = float(np.abs(ours - ref).max())
        assert err <= REL_TOL * max(1.0, float(np.abs(ref).max())), f"layer-major vs transformers: {err:.3g}"


def read_counts(model, run):
    model.experts.clear_cache()
    model.experts.reads.clear()
    run()
    return Counter(model.experts.reads)


def test_each_layer_reads_its_union_once(bundles, corpus_ids):
    """An expert cache of one layer's records (16 slots, 4 layers of 16 experts): the chunk-after-chunk
    forward reads each layer again for every chunk; layer-major reads exactly the union of all chunks once."""
    model, _ = flashmoe.load(bundles[4], slots=16)
    try:
        rows = rows_of(corpus_ids, (80, 33))
        runner = BatchRunner(model, prefill_tokens=CHUNK)
        assert runner.prefill_passes([len(r) for r in rows]) == 1
        with UnionSpy(model.experts) as spy:
            reads = read_counts(model, lambda: runner.prefill(list(enumerate(rows))))
        assert sorted(spy.unions) == list(range(model.config.num_hidden_layers))
        want = Counter({(layer, e): 1 for layer, (u,) in spy.unions.items() for e in u})
        assert reads == want  # every record of each layer's union once, nothing else
        old = read_counts(model, lambda: chunked(model, rows))
        assert set(old) == set(want) and sum(old.values()) > 2 * sum(want.values())  # re-read per chunk
    finally:
        model.experts.close()


def test_union_larger_than_the_cache_is_read_once_in_groups(bundles, corpus_ids):
    model, _ = flashmoe.load(bundles[4], slots=5)  # fewer slots than a layer's union
    ref, _ = flashmoe.load(bundles[4], slots=64)
    try:
        rows = rows_of(corpus_ids, (64, 30))
        with UnionSpy(model.experts) as spy:
            reads = read_counts(model, lambda: layer_major(model, rows))
        assert max(len(u) for (u,) in spy.unions.values()) > 5  # grouping exercised
        assert reads == Counter({(layer, e): 1 for layer, (u,) in spy.unions.items() for e in u})
        got, want = layer_major(model, rows), chunked(ref, rows)
        assert np.abs(got - want).max() <= REL_TOL * max(1.0, float(np.abs(want).max()))  # summed per group
    finally:
        model.experts.close()
        ref.experts.close()


def test_hidden_budget_splits_into_passes(bundles, corpus_ids):
    """A budget of two chunks' hidden states: a prefill of 4 chunks runs in 2 passes, each reading the
    union of its own chunks once per layer, with the logits of one pass."""
    model, _ = flashmoe.load(bundles[4], slots=16)
    try:
        rows = rows_of(corpus_ids, (40, 17))  # 40 columns in chunks of 24 // 2 = 12: 4 chunks
        per_chunk = 12 * 2 * prefill.column_bytes(model)
        runner = BatchRunner(model, prefill_tokens=CHUNK, hidden_budget_bytes=2 * per_chunk)
        assert runner.prefill_passes([40, 17]) == 2
        assert runner.prefill_passes([80, 17]) == 4
        assert BatchRunner(model, prefill_tokens=CHUNK).prefill_passes([80, 17]) == 1
        assert runner.prefill_passes([]) == 0
        with UnionSpy(model.experts) as spy:
            reads = read_counts(model, lambda: layer_major(model, rows, budget=2 * per_chunk))
        want = Counter()
        for layer, us in spy.unions.items():
            assert len(us) == 2  # one run_layer call per pass
            for u in us:
                want.update({(layer, e): 1 for e in u})
        assert reads == want
        np.testing.assert_array_equal(layer_major(model, rows, budget=2 * per_chunk), layer_major(model, rows))
    finally:
        model.experts.close()


def test_profile_counters_of_a_layer_major_pass(bundles, corpus_ids):
    """The runtime's profile counters (what bench/batch.py's StepMeter reports per step): one pass, each
    layer's union counted once as experts touched (= the records read from a cold cache), one expert call
    per chunk per layer over every real token's K pairs, and read time while reads were in flight."""
    model, _ = flashmoe.load(bundles[4], slots=16)
    try:
        rows = rows_of(corpus_ids, (50, 20))  # 50 columns in chunks of 12: 5 chunks; 70 real tokens
        st = model.stats
        model.experts.clear_cache()
        model.experts.reads.clear()
        st.reset()
        layer_major(model, rows)
        cfg = model.config
        assert st.prefill_passes == 1
        assert st.experts_touched == sum(model.experts.reads.values()) == st.expert_reads
        assert st.expert_calls == 5 * cfg.num_hidden_layers
        assert st.expert_pairs == 70 * cfg.num_experts_per_tok * cfg.num_hidden_layers
        assert st.io_busy > 0
        st.reset()
        assert (st.prefill_passes, st.experts_touched, st.expert_calls, st.io_busy) == (0, 0, 0, 0.0)
    finally:
        model.experts.close()
