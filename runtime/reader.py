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
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from flashmoe.format import Bundle, BundleError


class ExpertReader:
    def __init__(self, bundle: Bundle, io: str = "pread", threads: int | None = None, stats=None):
        cfg = bundle.config
        self.io = io
        self.info = bundle.expert_info(0)
        # layer files: headers checked now, so a corrupt bundle fails at load, not mid-generation
        self.files = [bundle.expert_file(layer) for layer in range(cfg.num_hidden_layers)]
        self.maps: list[mmap.mmap | None] = [None] * len(self.files)
        self.pool = ThreadPoolExecutor(max_workers=threads or min(16, max(4, cfg.num_experts_per_tok)),
                                       thread_name_prefix="flashmoe-io")
        self.stats = stats
        self.reads: Counter = Counter()  # (layer, expert) -> times read
        self.verifier = None  # optional: verifier(layer, expert, record bytes) after each read (integrity)
        self.uploader = None  # optional: a PinnedUploader (records staged in pinned memory, then copied)

    def _read_one(self, layer: int, expert: int, iov: list, copy_plan: list):
        """Read one record: into the slot's views (returns None), or with an uploader into this thread's
        pinned buffer (returns it: the record as it lies in the file, not yet copied to the slot)."""
        f = self.files[layer]
        base = f.offset(expert)
        size = self.info.record_size
        staged = None
        if self.uploader is not None:
            staged = self.uploader.staging(size)
            iov = [memoryview(staged)]
            copy_plan = [(staged, 0)]
        if self.io == "pread":
            got = os.preadv(f.fd, iov, base)
            if got != size:
                raise BundleError(f"{f.path}: short read of expert {expert} ({got} of {size} bytes); the file "
                                  "changed on disk: run `flashmoe-inspect --verify`, then re-run flashmoe-convert "
                                  "or flashmoe-pull to repair it")
            return staged
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
        return staged

    def read(self, layer: int, experts: list[int], slots: list[int], cache) -> None:
        """Read records `experts` of `layer` into `slots` of `cache` (an ExpertCache), in parallel."""
        if not experts:
            return
        t0 = time.perf_counter()

        def one(es):
            e, s = es
            staged = self._read_one(layer, e, cache.iov[s], cache.copy_plan[s])
            if self.verifier is not None:  # before the copy: a corrupt record never reaches the GPU
                self.verifier(layer, e, staged if staged is not None else cache.record_image(s))
            if staged is not None:
                for dst, off in cache.copy_plan[s]:
                    self.uploader.copy(dst.ctypes.data, staged[off : off + dst.nbytes])

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
