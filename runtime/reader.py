"""ExpertReader: the bundle's per-layer expert files, read record by record.

One job: bytes from disk into slot buffers that the ExpertCache owns. `pread` (default) issues one
`os.preadv` per record straight into the slot's component views (it releases the GIL, so a thread pool
keeps several reads in flight); `mmap` copies from a read-only mapping and drops the touched pages from
the process afterwards (MADV_DONTNEED), so RSS stays bounded. With an `uploader` (upload.py; MLX's CUDA
backend) a record is read into the thread's pinned buffer instead and copied to the slot by the GPU's copy
engine. Every read is counted per (layer, expert), which is how tests prove that a step reads each record
at most once.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from flashmoe.format import Bundle, BundleError

STAGE_CHUNK = 1 << 20  # pinned-path read size: a 6.75 MiB record is 7 requests in flight, not 1
STAGED_THREADS = 16


def _check_read(f, expert: int, got: int, want: int, at: int | None = None) -> None:
    """A short read means the file changed under us: say so, and how to repair it."""
    if got != want:
        where = "" if at is None else f" at {at}"
        raise BundleError(f"{f.path}: short read of expert {expert} ({got} of {want} bytes{where}); the file "
                          "changed on disk: run `flashmoe-inspect --verify`, then re-run flashmoe-convert "
                          "or flashmoe-pull to repair it")


class ExpertReader:
    def __init__(self, bundle: Bundle, io: str = "pread", threads: int | None = None, stats=None):
        cfg = bundle.config
        self.io = io
        self.info = bundle.expert_info(0)
        # layer files: headers checked now, so a corrupt bundle fails at load, not mid-generation
        self.files = [bundle.expert_file(layer) for layer in range(cfg.num_hidden_layers)]
        self.maps: list[mmap.mmap | None] = [None] * len(self.files)
        self.threads = threads or min(16, max(4, cfg.num_experts_per_tok))
        self._threads_given = threads is not None
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashmoe-io")
        self.stats = stats
        self.reads: Counter = Counter()  # (layer, expert) -> times read
        self.verifier = None  # optional: verifier(layer, expert, record bytes) after each read (integrity)
        self.uploader = None  # optional: a PinnedUploader (records staged in pinned memory, then copied)

    def _read_one(self, layer: int, expert: int, iov: list, copy_plan: list) -> None:
        """Read one record into `iov` (pread) or the destinations of `copy_plan` (mmap)."""
        f = self.files[layer]
        base = f.offset(expert)
        size = self.info.record_size
        if self.io == "pread":
            _check_read(f, expert, os.preadv(f.fd, iov, base), size)
            return
        # a mapping of a file truncated under us raises SIGBUS on touch: check the size first
        if os.fstat(f.fd).st_size < base + size:
            raise BundleError(f"{f.path}: the file is shorter than its header says (truncated on disk); "
                              "re-run flashmoe-convert or flashmoe-pull to repair it")
        mm = self.maps[layer]
        if mm is None:
            mm = self.maps[layer] = mmap.mmap(f.fd, 0, access=mmap.ACCESS_READ)
        if len(mm) < base + size:
            raise BundleError(f"{f.path}: the file is shorter than its header says (truncated on disk); "
                              "re-run flashmoe-convert or flashmoe-pull to repair it")
        import numpy as np

        if hasattr(mm, "madvise"):  # one readahead request for the whole record instead of a fault per page
            mm.madvise(mmap.MADV_WILLNEED, base, self.info.record_stride)
        for dst, off in copy_plan:
            np.copyto(dst, np.frombuffer(mm, np.uint8, count=dst.nbytes, offset=base + off))
        if hasattr(mm, "madvise"):  # drop the mapped pages from our RSS (the page cache keeps them)
            mm.madvise(mmap.MADV_DONTNEED, base, self.info.record_stride)

    def attach_uploader(self, uploader) -> None:
        """Stage every read through `uploader` (a PinnedUploader). Unless the thread count was given, the
        pool grows to STAGED_THREADS: its reads are 1 MiB pieces, and more of them in flight keep the disk
        busier."""
        self.uploader = uploader
        if not self._threads_given and self.threads < STAGED_THREADS:
            self.pool.shutdown(wait=True)
            self.threads = STAGED_THREADS
            self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashmoe-io")

    def read(self, layer: int, experts: list[int], slots: list[int], cache) -> None:
        """Read records `experts` of `layer` into `slots` of `cache` (an ExpertCache), in parallel."""
        if not experts:
            return
        t0 = time.perf_counter()
        if self.uploader is not None:
            self._read_staged(layer, experts, slots, cache)
        else:
            def one(es):
                e, s = es
                self._read_one(layer, e, cache.iov[s], cache.copy_plan[s])
                if self.verifier is not None:
                    self.verifier(layer, e, cache.record_image(s))

            if len(experts) == 1:
                one((experts[0], slots[0]))
            else:
                list(self.pool.map(one, zip(experts, slots)))
        for e in experts:
            self.reads[(layer, e)] += 1
        if self.stats is not None:
            self.stats.expert_io += time.perf_counter() - t0
            self.stats.expert_bytes += len(experts) * self.info.record_size
            self.stats.expert_reads += len(experts)

    def _read_staged(self, layer: int, experts: list[int], slots: list[int], cache) -> None:
        """The uploader's path: each record is read in STAGE_CHUNK pieces spread over the pool (so the disk
        sees as many requests in flight as there are threads, not one per record), into a pinned buffer of
        the arena; the thread finishing a record's last piece checks it and copies it to its slot, then
        frees the buffer for the next record."""
        up, size = self.uploader, self.info.record_size
        bufs = up.arena(self.threads, size)  # one pinned buffer per thread: ~108 MiB for the 397B
        free: queue.SimpleQueue = queue.SimpleQueue()
        for b in bufs:
            free.put(b)
        pieces = [(off, min(STAGE_CHUNK, size - off)) for off in range(0, size, STAGE_CHUNK)]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def piece(rec, off, n):
            e, s, buf, left, bad = rec
            try:
                if not bad:
                    self._read_piece(layer, e, buf, off, n)
            except BaseException as ex:  # noqa: BLE001 - re-raised by the caller below
                bad.append(ex)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if not last:
                return
            try:
                if bad:
                    raise bad[0]
                if self.verifier is not None:  # before the copy: a corrupt record never reaches the GPU
                    self.verifier(layer, e, buf)
                for dst, off0 in cache.copy_plan[s]:
                    up.copy(dst.ctypes.data, buf[off0 : off0 + dst.nbytes])
            except BaseException as ex:  # noqa: BLE001
                with lock:
                    errors.append(ex)
            finally:
                free.put(buf)

        futures = []
        for e, s in zip(experts, slots):
            if errors:
                break
            rec = (e, s, free.get(), [len(pieces)], [])
            futures += [self.pool.submit(piece, rec, off, n) for off, n in pieces]
        for fu in futures:
            fu.result()
        if errors:
            raise errors[0]

    def _read_piece(self, layer: int, expert: int, buf, off: int, n: int) -> None:
        f = self.files[layer]
        base = f.offset(expert)
        if self.io == "pread":
            _check_read(f, expert, os.preadv(f.fd, [memoryview(buf)[off : off + n]], base + off), n, off)
            return
        if off == 0:  # mmap: the whole record in its first piece's task
            self._read_one(layer, expert, [memoryview(buf)], [(buf, 0)])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self.uploader is not None:
            self.uploader.close()
            self.uploader = None
        for i, mm in enumerate(self.maps):
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
                self.maps[i] = None
        for f in self.files:
            f.close()
