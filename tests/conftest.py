"""Shared fixtures: a tiny Qwen3.5-MoE built with transformers and briefly trained (so greedy choices are
decisive), and bundles written from it. Every front end's tests (run, batch, server, distributed) use
these, so they all compare against the same model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import flashmoe

sys.path.insert(0, str(Path(__file__).parent))

from runtime_bundle import write_bundle  # noqa: E402
from tiny import build_model, save_tokenizer  # noqa: E402
from tiny_models import train  # noqa: E402

STEPS = 60  # training steps for the `trained` fixture

TEXT = ("The quick brown fox jumps over the lazy dog. "
        "A journey of a thousand miles begins with a single step. "
        "To be or not to be, that is the question. "
        "All that glitters is not gold. "
        "The early bird catches the worm, but the second mouse gets the cheese. ") * 4


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d, 512)
    return d


@pytest.fixture(scope="session")
def corpus_ids(tok_dir):
    from tokenizers import Tokenizer as HFTok

    return HFTok.from_file(str(tok_dir / "tokenizer.json")).encode(TEXT).ids


@pytest.fixture(scope="session")
def trained(corpus_ids):
    """The tiny model briefly trained on TEXT (~10-20 s, on one torch thread: tiny_models.train), so that greedy
    choices are decisive: a random tiny model has near-tied logits and 1e-6 differences could flip an argmax."""
    return train(build_model(seed=0), corpus_ids, STEPS)


@pytest.fixture(scope="session")
def bundles(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {bits: write_bundle(trained, root / f"b{bits}", bits=bits) for bits in (None, 8, 4)}


@pytest.fixture(scope="session")
def loaded(bundles):
    cache = {}

    def get(bits, **kw):
        key = (bits, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = flashmoe.load(bundles[bits], **kw)
        return cache[key]

    return get


