"""ExpertReader: the bundle's per-layer expert files, read into the slots the ExpertCache names.

One job: bytes from disk into slot buffers. The cache says which slot each record goes to and where a
slot's components lie (`cache.destinations(slot)`); the reader owns every I/O plan built from that:

* `pread` (default): one `os.preadv` per record straight into the slot's component views (an iovec per
  slot, built once; alignment gaps go to a scratch buffer). It releases the GIL, so a thread pool keeps
  several reads in flight.
* `mmap`: copies from a read-only mapping and drops the touched pages from the process afterwards
  (MADV_DONTNEED), so RSS stays bounded.
* `direct`: reads that bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS; format.ExpertFile),
  for machines whose page cache thrashes and for measuring the disk-bound regime. Every read is aligned
  (buffer address, file offset and length multiples of DIRECT_BLOCK; the bundle aligns record starts to
  RECORD_ALIGN): the record up to its last 4 KiB block into a per-thread aligned buffer, checked there,
  then copied into the slot.

When a layer's read set holds at least `sequential` (default half) of its experts, pread and direct read
the layer file in large sequential pieces (up to SEQ_PIECE bytes of consecutive records, one call each)
instead of one call per record, and scatter the wanted records from there. With an `uploader`
(upload.py; MLX's CUDA backend) a record is read into the thread's pinned buffer instead and copied to
the slot by the GPU's copy engine. Every record read is counted per (layer, expert) (`reads`), and every
read system call (`syscalls`) and every byte asked of the kernel (`requested`), which is how tests prove
that a step reads each record at most once, that sequential pieces need fewer calls, and that no mode reads
more than the records it was asked for (tests/test_coldio.py).

No over-read: the buffered modes turn the kernel's readahead off for the layer files (POSIX_FADV_RANDOM,
MADV_RANDOM on the mapping). Readahead guesses a sequential stream; ours is random records, and the
pinned path's 1 MiB pieces of one record look sequential, so each record pulled up to a readahead window
of the next record with it (measured here on cold files: +10% bytes from disk for pread, +68% for the
pinned path on the 35B shape; +16-20% on the H100/H200 397B runs). Sequential pieces cover runs of
consecutive wanted records only (never a record nobody asked for), and direct reads end at the record's
last 4 KiB block, not at its stride. `read` may be called from several threads at once (the prefetcher,
runtime/prefetch.py, reads in the background while the model asks for records).
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from flashmoe.errors import BundleError, InputError
from flashmoe.format import Bundle
from flashmoe.format.layout import RECORD_ALIGN, align_up

READ_MODES = ("pread", "mmap", "direct")
STAGE_CHUNK = 1 << 20  # pinned-path read size: a 6.75 MiB record is 7 requests in flight, not 1
STAGED_THREADS = 16
SEQUENTIAL_FRACTION = 0.5  # a layer read set this dense is read in sequential pieces
SEQ_PIECE = 8 << 20  # bytes of consecutive records per sequential read (at least one record)
DIRECT_BLOCK = 4096  # O_DIRECT length granularity: a multiple of every disk's logical block (512 B / 4 KiB)


def _check_read(f, expert: int, got: int, want: int, at: int | None = None) -> None:
    """A short read means the file changed under us: say so, and how to repair it."""
    if got != want:
        where = "" if at is None else f" at {at}"
        raise BundleError(f"{f.path}: short read of expert {expert} ({got} of {want} bytes{where}); the file "
                          "changed on disk: run `flashmoe-inspect --verify`, then re-run flashmoe-convert "
                          "or flashmoe-pull to repair it")


class ExpertReader:
    def __init__(self, bundle: Bundle, io: str = "pread", threads: int | None = None, stats=None,
                 sequential: float = SEQUENTIAL_FRACTION):
        if io not in READ_MODES:
            raise InputError(f"io mode {io!r} is unknown: choose one of {', '.join(READ_MODES)}")
        cfg = bundle.config
        self.io = io
        self.info = bundle.expert_info(0)
        # layer files: headers checked now, so a corrupt bundle fails at load, not mid-generation
        self.files = [bundle.expert_file(layer, direct=io == "direct") for layer in range(cfg.num_hidden_layers)]
        if io != "direct" and hasattr(os, "posix_fadvise"):  # no readahead past the records we ask for
            for f in self.files:
                os.posix_fadvise(f.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.maps: list[mmap.mmap | None] = [None] * len(self.files)
        self.threads = threads or min(16, max(4, cfg.num_experts_per_tok))
        self._threads_given = threads is not None
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashmoe-io")
        self.stats = stats
        self.sequential = sequential
        self.reads: Counter = Counter()  # (layer, expert) -> times read
        self.syscalls = 0  # read system calls issued
        self.requested = 0  # bytes asked of the kernel (read lengths; bytes copied out of a mapping)
        self._lock = threading.Lock()  # read() may run on several threads at once
        self._staging: queue.SimpleQueue | None = None  # the uploader's free pinned buffers
        self.verifier = None  # optional: verifier(layer, expert, record bytes) after each read (integrity)
        self.uploader = None  # optional: a PinnedUploader (records staged in pinned memory, then copied)
        comps = sorted(self.info.components, key=lambda c: c.offset)
        gaps = [b.offset - (a.offset + a.nbytes) for a, b in zip(comps, comps[1:])]
        self._scratch = np.zeros(max(gaps + [1]), np.uint8)  # where alignment gaps go (never read back)
        self._iov_of: dict[int, list[memoryview]] = {}  # slot -> its pread iovec
        self._planned_for = None  # the cache those iovecs point into
        self._local = threading.local()  # each thread's aligned buffer
        self._in_flight = 0  # read() calls running now, on any thread (for stats.io_busy)
        self._busy_since = 0.0

    # ---- plans -------------------------------------------------------------------------------
    def _iov(self, cache, slot: int) -> list[memoryview]:
        """The iovec that scatters a record into `slot` of `cache`: its component views in record order,
        a piece of the scratch buffer for each gap."""
        if self._planned_for is not cache:
            self._planned_for, self._iov_of = cache, {}
        iov = self._iov_of.get(slot)
        if iov is None:
            iov, pos = [], 0
            for dst, off in cache.destinations(slot):
                if off > pos:
                    iov.append(memoryview(self._scratch)[: off - pos])
                iov.append(memoryview(dst))
                pos = off + dst.nbytes
            self._iov_of[slot] = iov
        return iov

    def _image(self, cache, slot: int) -> bytes:
        """The record as it lies in the file (components and the zero gaps between them), rebuilt from the
        slot, for the integrity check of the pread and mmap paths."""
        out = bytearray(self.info.record_size)
        for dst, off in cache.destinations(slot):
            out[off : off + dst.nbytes] = dst.data.cast("B")
        return bytes(out)

    def _buffer(self, n: int) -> np.ndarray:
        """This thread's buffer of at least `n` bytes, page-aligned (an anonymous mapping), as uint8."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._local.buf = np.frombuffer(mmap.mmap(-1, align_up(n, RECORD_ALIGN)), np.uint8)
        return buf

    def _deliver(self, layer: int, expert: int, rec: np.ndarray, cache, slot: int) -> None:
        """Check a record held in `rec` (record_size bytes), then copy it into its slot."""
        if self.verifier is not None:  # before the copy: a corrupt record never reaches the slot
            self.verifier(layer, expert, rec)
        for dst, off in cache.destinations(slot):
            np.copyto(dst, rec[off : off + dst.nbytes])

    # ---- reads -------------------------------------------------------------------------------
    def _preadv(self, f, expert: int, iov, at: int, want: int, where: int | None = None) -> None:
        """One read system call of `want` bytes at `at` into `iov`, counted, and checked whole."""
        got = os.preadv(f.fd, iov, at)
        with self._lock:
            self.syscalls += 1
            self.requested += want
        _check_read(f, expert, got, want, where)

    def _read_record(self, layer: int, expert: int, slot: int, cache) -> None:
        """Read one record into its slot."""
        f = self.files[layer]
        base = f.offset(expert)
        size = self.info.record_size
        if self.io == "pread":
            self._preadv(f, expert, self._iov(cache, slot), base, size)
            if self.verifier is not None:
                self.verifier(layer, expert, self._image(cache, slot))
            return
        if self.io == "mmap":
            self._copy_from_map(layer, expert, cache.destinations(slot))
            if self.verifier is not None:
                self.verifier(layer, expert, self._image(cache, slot))
            return
        n = align_up(size, DIRECT_BLOCK)  # direct: aligned, up to the record's last block (not its stride)
        buf = self._buffer(n)[:n]
        self._preadv(f, expert, [memoryview(buf)], base, n)
        self._deliver(layer, expert, buf[:size], cache, slot)

    def _copy_from_map(self, layer: int, expert: int, plan) -> None:
        f = self.files[layer]
        base = f.offset(expert)
        size = self.info.record_size
        # a mapping of a file truncated under us raises SIGBUS on touch: check the size first
        if os.fstat(f.fd).st_size < base + size:
            raise BundleError(f"{f.path}: the file is shorter than its header says (truncated on disk); "
                              "re-run flashmoe-convert or flashmoe-pull to repair it")
        with self._lock:  # one mapping per layer, whichever thread comes first
            mm = self.maps[layer]
            if mm is None:
                mm = mmap.mmap(f.fd, 0, access=mmap.ACCESS_READ)
                if hasattr(mm, "madvise"):  # no fault read-around past the record: WILLNEED asks for it all
                    mm.madvise(mmap.MADV_RANDOM)
                self.maps[layer] = mm
        if len(mm) < base + size:
            raise BundleError(f"{f.path}: the file is shorter than its header says (truncated on disk); "
                              "re-run flashmoe-convert or flashmoe-pull to repair it")
        if hasattr(mm, "madvise"):  # one readahead request for the whole record instead of a fault per page
            mm.madvise(mmap.MADV_WILLNEED, base, align_up(size, mmap.PAGESIZE))
        for dst, off in plan:
            np.copyto(dst, np.frombuffer(mm, np.uint8, count=dst.nbytes, offset=base + off))
        with self._lock:
            self.requested += size
        if hasattr(mm, "madvise"):  # drop the mapped pages from our RSS (the page cache keeps them)
            mm.madvise(mmap.MADV_DONTNEED, base, self.info.record_stride)

    def _pieces(self, experts: list[int], slots: list[int]) -> list[list[tuple[int, int]]]:
        """(expert, slot) pairs in file order, grouped into sequential pieces: runs of consecutive experts
        (no record in between that nobody asked for), at most SEQ_PIECE bytes (at least one record) each."""
        per = max(1, SEQ_PIECE // self.info.record_stride)
        pieces: list[list[tuple[int, int]]] = []
        for e, s in sorted(zip(experts, slots)):
            if pieces and e == pieces[-1][-1][0] + 1 and e - pieces[-1][0][0] < per:
                pieces[-1].append((e, s))
            else:
                pieces.append([(e, s)])
        return pieces

    def _read_piece_of_records(self, layer: int, piece: list[tuple[int, int]], cache) -> None:
        """One read of the run of records from the piece's first to its last (strides, then the last record
        up to its last 4 KiB block, so it is aligned for direct I/O too), then each record checked and
        copied into its slot."""
        f = self.files[layer]
        stride, size = self.info.record_stride, self.info.record_size
        first = piece[0][0]
        n = (piece[-1][0] - first) * stride + align_up(size, DIRECT_BLOCK)
        buf = self._buffer(n)[:n]
        self._preadv(f, first, [memoryview(buf)], f.offset(first), n)
        for e, s in piece:
            o = (e - first) * stride
            self._deliver(layer, e, buf[o : o + size], cache, s)

    def attach_uploader(self, uploader) -> None:
        """Stage every read through `uploader` (a PinnedUploader). Unless the thread count was given, the
        pool grows to STAGED_THREADS: its reads are 1 MiB pieces, and more of them in flight keep the disk
        busier."""
        self.uploader = uploader
        if not self._threads_given and self.threads < STAGED_THREADS:
            self.pool.shutdown(wait=True)
            self.threads = STAGED_THREADS
            self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flashmoe-io")

    def read(self, layer: int, experts: list[int], slots: list[int], cache, timed: bool = True) -> None:
        """Read records `experts` of `layer` into `slots` of `cache` (an ExpertCache), in parallel. Safe to
        call from several threads at once (for different slots). `timed=False` (a background prefetch):
        the time is not added to stats.expert_io, which counts time the model waited for reads."""
        if not experts:
            return
        t0 = time.perf_counter()
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = t0
            self._in_flight += 1
        try:
            self._read(layer, experts, slots, cache)
        finally:
            with self._lock:
                self._in_flight -= 1
                if self.stats is not None and self._in_flight == 0:
                    self.stats.io_busy += time.perf_counter() - self._busy_since
        with self._lock:
            for e in experts:
                self.reads[(layer, e)] += 1
            if self.stats is not None:
                if timed:
                    self.stats.expert_io += time.perf_counter() - t0
                self.stats.expert_bytes += len(experts) * self.info.record_size
                self.stats.expert_reads += len(experts)

    def _read(self, layer: int, experts: list[int], slots: list[int], cache) -> None:
        if self.uploader is not None:
            self._read_staged(layer, experts, slots, cache)
        elif self.io != "mmap" and len(experts) > 1 and len(experts) >= self.sequential * self.info.num_experts:
            pieces = self._pieces(experts, slots)
            list(self.pool.map(lambda p: self._read_piece_of_records(layer, p, cache), pieces))
        elif len(experts) == 1:
            self._read_record(layer, experts[0], slots[0], cache)
        else:
            list(self.pool.map(lambda es: self._read_record(layer, es[0], es[1], cache), zip(experts, slots)))

    def _read_staged(self, layer: int, experts: list[int], slots: list[int], cache) -> int:
        """The uploader's path: each record is read in pieces spread over the pool (so the disk sees as many
        requests in flight as there are threads, not one per record): STAGE_CHUNK bytes, or the record split
        evenly over the threads where that is more (whole records with one thread: a disk fastest at a
        queue depth of one gets one large read at a time), into a pinned buffer of
        the arena; the thread finishing a record's last piece checks it and copies it to its slot, then
        frees the buffer for the next record. The free buffers are the reader's, shared by concurrent
        calls."""
        up, size = self.uploader, self.info.record_size
        with self._lock:
            if self._staging is None:  # one pinned buffer per thread: ~108 MiB for the 397B
                self._staging = queue.SimpleQueue()
                for b in up.arena(self.threads, size):
                    self._staging.put(b)
        free = self._staging
        step = max(STAGE_CHUNK, align_up(-(-size // self.threads), RECORD_ALIGN))  # aligned for direct reads
        pieces = [(off, min(step, size - off)) for off in range(0, size, step)]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def piece(rec, off, n):
            e, s, buf, left, bad = rec
            try:
                if not bad:
                    self._read_staged_piece(layer, e, buf, off, n)
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
                for dst, off0 in cache.destinations(s):
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

    def _read_staged_piece(self, layer: int, expert: int, buf, off: int, n: int) -> None:
        f = self.files[layer]
        base = f.offset(expert)
        if self.io == "pread":
            self._preadv(f, expert, [memoryview(buf)[off : off + n]], base + off, n, off)
            return
        if self.io == "direct":  # aligned: piece sizes and record starts are multiples of RECORD_ALIGN
            m = align_up(n, DIRECT_BLOCK)
            tmp = self._buffer(m)[:m]
            self._preadv(f, expert, [memoryview(tmp)], base + off, m, off)
            buf[off : off + n] = tmp[:n]
            return
        if off == 0:  # mmap: the whole record in its first piece's task
            self._copy_from_map(layer, expert, [(buf[: self.info.record_size], 0)])

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
