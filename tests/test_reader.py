"""ExpertReader: the I/O plans it owns (pread iovecs, mmap copies, direct I/O, sequential pieces), each
checked against pread's bytes and the model's logits; direct I/O shown to bypass the page cache."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

import flashmoe  # noqa: E402
from flashmoe.errors import BundleError  # noqa: E402
from flashmoe.format import Bundle  # noqa: E402
from flashmoe.runtime.expert_cache import ExpertCache  # noqa: E402
from flashmoe.runtime.integrity import RecordVerifier  # noqa: E402
from flashmoe.runtime.reader import ExpertReader  # noqa: E402


def read_all(bundle: Bundle, io: str, sequential: float = 0.5, layers=None, verify=True):
    """Every record of `layers` read into slots; returns ({(layer, expert): record bytes}, syscalls)."""
    cfg = bundle.config
    reader = ExpertReader(bundle, io=io, sequential=sequential)
    if verify:
        reader.verifier = RecordVerifier(bundle).check
    E = cfg.num_experts
    cache = ExpertCache(reader.info, E, cfg.num_hidden_layers, E)
    out = {}
    try:
        for layer in layers if layers is not None else range(cfg.num_hidden_layers):
            experts = list(range(E))[::-1]  # any order: the reader sorts pieces by file offset
            slot_of, to_read, slots = cache.place(layer, experts)
            reader.read(layer, to_read, slots, cache)
            for e, s in zip(experts, slot_of.tolist()):
                out[(layer, e)] = b"".join(bytes(d) for d, _ in cache.destinations(s))
        return out, reader.syscalls
    finally:
        reader.close()


def file_records(bundle: Bundle) -> dict:
    """The same records read straight from the files (the components' bytes, in record order)."""
    out = {}
    for layer in range(bundle.config.num_hidden_layers):
        f = bundle.expert_file(layer)
        raw = Path(f.path).read_bytes()
        for e in range(f.info.num_experts):
            base = f.offset(e)
            out[(layer, e)] = b"".join(raw[base + c.offset : base + c.offset + c.nbytes]
                                       for c in sorted(f.info.components, key=lambda c: c.offset))
        f.close()
    return out


@pytest.mark.parametrize("io", ["pread", "mmap", "direct"])
def test_every_mode_reads_the_file_bytes(bundles, io):
    b = Bundle.open(bundles[4])
    got, _ = read_all(b, io, sequential=2.0)  # one read per record
    assert got == file_records(b)


@pytest.mark.parametrize("io", ["pread", "direct"])
def test_sequential_pieces_same_bytes_fewer_calls(bundles, io):
    b = Bundle.open(bundles[4])
    per_record, calls_per_record = read_all(b, io, sequential=2.0)
    pieces, calls_pieces = read_all(b, io, sequential=0.5)
    L, E = b.config.num_hidden_layers, b.config.num_experts
    assert pieces == per_record
    assert calls_per_record == L * E
    stride = b.expert_info(0).record_stride
    per = max(1, (8 << 20) // stride)
    assert calls_pieces == L * -(-E // per) < calls_per_record


def test_direct_checks_each_record_crc(bundles, tmp_path):
    root = Path(shutil.copytree(bundles[4], tmp_path / "b"))
    b = Bundle.open(root)
    info = b.expert_info(2)
    path = root / "experts/layer-002.bin"
    data = bytearray(path.read_bytes())
    data[info.data_offset + 3 * info.record_stride + 7] ^= 0x10
    path.write_bytes(bytes(data))
    for seq in (2.0, 0.5):
        with pytest.raises(BundleError, match="expert 3 of layer 2 fails its checksum"):
            read_all(Bundle.open(root), "direct", sequential=seq, layers=[2])


def resident_pages(path: Path, start: int = 0) -> int:
    """How many of the file's pages from byte `start` on are in the page cache (mincore on a mapping;
    touching nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    page = mmap.PAGESIZE
    n = (size + page - 1) // page
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            vec = (ctypes.c_ubyte * n)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            del anchor
            assert rc == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec[start // page :])
        finally:
            mm.close()


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore/posix_fadvise check written for Linux")
@pytest.mark.parametrize("io", ["direct", "pread"])
def test_direct_reads_bypass_the_page_cache(bundles, tmp_path, io):
    """After dropping a layer file from the page cache, direct reads of all its records leave them out of
    the cache; the same reads through pread bring them in (so the check does see the cache)."""
    root = Path(shutil.copytree(bundles[4], tmp_path / "b"))
    path = root / "experts/layer-001.bin"
    records = Bundle.open(root).expert_info(1).data_offset  # the header is read through the cache at open
    os.sync()
    drop_from_page_cache(path)
    before = resident_pages(path)
    if before:
        pytest.skip(f"the kernel kept {before} pages of a dropped file cached; cannot observe the cache here")
    got, _ = read_all(Bundle.open(root), io, layers=[1])
    assert len(got) == Bundle.open(root).config.num_experts
    after = resident_pages(path, records)
    total = -(-(path.stat().st_size - records) // mmap.PAGESIZE)
    if io == "direct":
        assert after == 0, f"{after} of {total} pages came into the page cache"
    else:
        assert after >= total // 2, f"pread left only {after} of {total} pages cached"


def test_direct_logits_match_pread(bundles, corpus_ids, monkeypatch):
    from flashmoe.runtime import config as rc

    if "direct" not in rc.IO_MODES:  # RuntimeConfig learns "direct" in the engine work; the reader has it
        monkeypatch.setattr(rc, "IO_MODES", (*rc.IO_MODES, "direct"))
    ids = corpus_ids[5:25]
    outs = []
    for io, slots in (("pread", None), ("direct", None), ("direct", 64)):
        model, _ = flashmoe.load(bundles[4], io=io, slots=slots)
        cache = model.make_cache()
        outs.append(np.array(model(mx.array([ids]), cache))[0])
        model.experts.close()
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
