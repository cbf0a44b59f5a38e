"""PinnedUploader: expert records into MLX's CUDA arrays through pinned host memory and the copy engine.

MLX's CUDA arrays live in CUDA managed memory. Reading a record straight into a slot of the GPU expert
cache (what `upload="direct"` does) makes the CPU write pages that sit on the GPU: each 4-64 KiB page
faults back to the host, and faults again onto the GPU when a kernel first reads it. Measured on an H100
that path moves ~2.5 GB/s, and it slows the disk read itself, since the `pread` runs inside those faults.

This path instead reads each record into a pinned (page-locked) host buffer of the reading thread, at the
disk's or the page cache's own speed, then copies it to the slot with `cuMemcpyHtoD` (the copy engine, at
PCIe speed, onto pages that stay on the GPU). The CUDA driver API is reached through ctypes (libcuda.so.1
ships with every NVIDIA driver), so nothing is compiled and MLX is not patched.

The copies are synchronous: a record is on the GPU when `copy` returns, and no MLX kernel can be reading a
slot being written, because the expert cache hands out only slots that the current step does not use and
every step is evaluated before the next one places records.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9


class CudaError(RuntimeError):
    pass


class PinnedUploader:
    """One per ExpertReader. `arena(n, nbytes)` is n pinned buffers of nbytes each (allocated once, grown on
    demand); `copy(dst_addr, src)` puts the bytes of `src` (a slice of one of them) at device address
    `dst_addr` (an address inside an MLX CUDA array). Any thread may call `copy`."""

    def __init__(self, lib, ctx):
        self._lib = lib
        self._ctx = ctx
        self._local = threading.local()
        self._buffers: list[int] = []  # pinned allocations, freed by close()
        self._arena: list[np.ndarray] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, probe_addr: int) -> "PinnedUploader":
        """The uploader for the device that owns the allocation at `probe_addr` (a slot buffer's address).
        Raises CudaError when the driver API is missing or refuses."""
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaError(f"the CUDA driver library is not loadable ({e})") from None
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemHostAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cuMemFreeHost.argtypes = [ctypes.c_void_p]
        lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self = cls(lib, None)
        self._check(lib.cuInit(0), "cuInit")
        ordinal = ctypes.c_int(-1)
        self._check(lib.cuPointerGetAttribute(ctypes.byref(ordinal), _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                              ctypes.c_uint64(probe_addr)), "cuPointerGetAttribute")
        dev = ctypes.c_int(-1)
        self._check(lib.cuDeviceGet(ctypes.byref(dev), ordinal.value), "cuDeviceGet")
        ctx = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev.value), "cuDevicePrimaryCtxRetain")
        self._ctx = ctx
        self.device = ordinal.value
        return self

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self._lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise CudaError(f"{what} failed: {(msg.value or b'?').decode()} (CUDA error {rc})")

    def _bind(self) -> None:
        """Make the device's primary context current on this thread (once per thread)."""
        if not getattr(self._local, "bound", False):
            self._check(self._lib.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._local.bound = True

    def arena(self, n: int, nbytes: int) -> list[np.ndarray]:
        """n pinned buffers, uint8 [nbytes] each."""
        self._bind()
        with self._lock:
            if self._arena and self._arena[0].nbytes < nbytes:
                raise ValueError("the arena's buffers are smaller than a record")  # one record size per reader
            while len(self._arena) < n:
                ptr = ctypes.c_void_p()
                self._check(self._lib.cuMemHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 0), "cuMemHostAlloc")
                self._buffers.append(ptr.value)
                self._arena.append(np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr.value)))
            return self._arena[:n]

    def copy(self, dst_addr: int, src: np.ndarray) -> None:
        self._bind()
        self._check(self._lib.cuMemcpyHtoD_v2(ctypes.c_uint64(dst_addr), ctypes.c_void_p(src.ctypes.data),
                                              ctypes.c_size_t(src.nbytes)), "cuMemcpyHtoD")

    def close(self) -> None:
        """Free the pinned buffers (call after the reader threads have stopped)."""
        with self._lock:
            bufs, self._buffers, self._arena = self._buffers, [], []
        for p in bufs:
            self._lib.cuMemFreeHost(ctypes.c_void_p(p))
