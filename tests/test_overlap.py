"""Reads overlapped with compute (issue #19) on the trained tiny model: a layer-major prefill reads layer
L+1's guessed union (the whole layer when L's union is most of its layer) while L computes, never
displacing L's records; a batched decode step of more rows than a few guesses the union of its rows'
next-layer routes. Correctness is unchanged: the same logits and greedy tokens with the reads ahead on
and off."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import flashmoe
from flashmoe.runtime import prefill
from flashmoe.runtime.engine import Engine
from flashmoe.runtime.sampling import SamplingParams

CHUNK = 24


def rows_of(corpus_ids, lengths):
    ids = list(corpus_ids) * 4
    return [ids[5 * i : 5 * i + n] for i, n in enumerate(lengths)]


def layer_major(model, rows):
    lens = np.array([len(r) for r in rows])
    cache = model.make_cache(left_pad=lens.max() - lens)
    return np.array(prefill.prefill(model, cache, rows, CHUNK)[:, -1])


@pytest.mark.parametrize("slots", [32, 20])  # two layers' records; one layer's and 4 more
@pytest.mark.parametrize("lengths", [(70, 30), (1,)], ids=["whole-layer", "router-guess"])
def test_prefill_reads_the_next_layer_ahead(bundles, corpus_ids, slots, lengths):
    off, _ = flashmoe.load(bundles[4], slots=slots, prefetch="off")
    on, _ = flashmoe.load(bundles[4], slots=slots, prefetch="on")
    try:
        rows = rows_of(corpus_ids, lengths)
        want = layer_major(off, rows)
        on.experts.reads.clear()
        got = layer_major(on, rows)
        np.testing.assert_array_equal(got, want)  # a record's slot changes, never its bytes
        pf = on.experts.prefetcher
        L, E = on.config.num_hidden_layers, on.config.num_experts
        assert sorted(pf.needed) == list(range(1, L))  # every layer after the first was guessed ahead
        assert sum(pf.prefetched.values()) > 0
        # the layer computing keeps its records: nothing it uses is read twice
        assert max(Counter(on.experts.reads).values()) == 1
        if lengths == (1,):  # 1 token x K=4: a union under half the layer, so its router guesses
            assert all(pf.prefetched[layer] < E for layer in range(1, L))
        elif slots == 32:  # room for the whole next layer beside the current one: every expert a hit
            assert pf.hit_rate() == {layer: 1.0 for layer in range(1, L)}
    finally:
        off.experts.close()
        on.experts.close()


def test_batched_decode_guesses_the_union_of_its_rows(bundles, corpus_ids):
    """12 rows (more than the few a decode guess used to be limited to): with prefetch on, each decode
    step reads the union of the rows' guesses ahead, and the greedy tokens are those with it off."""
    prompts = rows_of(corpus_ids, (9, 14, 20, 7, 31, 12, 18, 25, 11, 16, 22, 8))

    def run(mode):
        model, tok = flashmoe.load(bundles[4], slots=24, prefetch=mode)  # under 4*K*layers: host routing
        engine = Engine(model, tok, max_batch=16)
        sids = [engine.add(p, SamplingParams(max_tokens=6)) for p in prompts]
        out = {s: [] for s in sids}
        while engine.has_work():
            for ev in engine.step():
                if ev.token is not None:
                    out[ev.seq_id].append(ev.token)
        return [out[s] for s in sids], model.experts

    off_tokens, off = run("off")
    on_tokens, on = run("on")
    try:
        assert on_tokens == off_tokens
        pf = on.prefetcher
        assert sum(pf.needed.values()) > 0 and sum(pf.hits.values()) / sum(pf.needed.values()) > 0.5
    finally:
        off.close()
        on.close()


@pytest.mark.parametrize("io", ["pread", "direct"])
def test_staged_reads_split_records_over_the_threads(tmp_path, monkeypatch, io):
    """The pinned path's pieces: STAGE_CHUNK bytes with many threads, the record split over the threads
    where that is more, and one read per record with one thread (a disk fastest at queue depth 1); the
    bytes in the slots are the records' either way."""
    from flashmoe.bench.synth import make_bundle
    from flashmoe.format import Bundle
    from flashmoe.format.layout import RECORD_ALIGN
    from flashmoe.runtime import reader as R
    from flashmoe.runtime.expert_cache import ExpertCache

    from test_bench import SMALL
    from test_coldio import HostUploader

    make_bundle(dict(SMALL), 2, 4, tmp_path / "b", progress=False)
    bundle = Bundle.open(tmp_path / "b")
    monkeypatch.setattr(R, "STAGE_CHUNK", RECORD_ALIGN)
    got = {}
    for threads in (16, 2, 1):
        rd = R.ExpertReader(bundle, io=io, threads=threads)
        rd.attach_uploader(HostUploader())
        size = rd.info.record_size
        cache = ExpertCache(rd.info, 8, 2, bundle.config.num_experts)
        _, to_read, slots = cache.place(1, list(range(8)))
        try:
            rd.read(1, to_read, slots, cache)
            per = -(-size // threads)  # the record over the threads, rounded up to whole RECORD_ALIGN blocks
            step = max(RECORD_ALIGN, -(-per // RECORD_ALIGN) * RECORD_ALIGN)
            assert rd.syscalls == 8 * -(-size // step), threads
            assert threads > 1 or rd.syscalls == 8  # one read per record
            got[threads] = [b"".join(bytes(d) for d, _ in cache.destinations(s)) for s in slots]
        finally:
            rd.close()
    assert size > 2 * RECORD_ALIGN  # several pieces with 16 threads, 2 with 2, 1 with 1
    assert got[16] == got[2] == got[1]
