"""RuntimeConfig: every knob of the runtime in one object, resolved once by `flashmoe.load`.

Library code never reads environment variables; the CLIs build a RuntimeConfig with `from_env` (which
reads FLASHMOE_KERNELS, FLASHMOE_GPU_CACHE_GB, FLASHMOE_DTYPE, FLASHMOE_UPLOAD, FLASHMOE_PREFETCH,
FLASHMOE_STATE_DTYPE) and their flags, and pass it down.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace

from flashmoe.errors import CapacityError, InputError

IO_MODES = ("pread", "mmap", "direct")
UPLOADS = ("auto", "direct", "pinned")
KERNELS = ("auto", "builtin", "custom")
DTYPES = ("float32", "bfloat16", "float16")
STATE_DTYPES = ("float32", "bfloat16")  # the delta net's recurrent state between steps
PREFETCH_MODES = ("off", "on", "auto")


@dataclass(frozen=True)
class RuntimeConfig:
    io: str = "pread"  # expert read method: pread (measured faster), mmap or direct (O_DIRECT, runtime/reader.py)
    kernels: str = "auto"  # expert kernels: auto, builtin (MLX), custom (dequant-FMA, GPU only)
    gpu_cache_gb: float | None = None  # CUDA expert cache size; None: 16 GB or 40% of a smaller GPU
    dtype: str | None = None  # activation dtype; None: float32 on the CPU, the bundle's dtype on a GPU
    slots: int | None = None  # expert records resident at once; None: derived (see experts.default_slots)
    threads: int | None = None  # read threads; None: min(16, max(4, K))
    experts_per_token: int | None = None  # override the model's K
    verify: bool = False  # sha256 every file at load (slow)
    # how records reach a CUDA GPU's expert cache: pinned (staged in pinned host memory, copied by the copy
    # engine), direct (read straight into MLX's managed memory), auto (pinned on CUDA, else direct)
    upload: str = "auto"
    # speculative prefetch (runtime/prefetch.py): layer L+1's router on the state leaving layer L names the
    # records to read while L+1's attention runs, and a layer-major prefill reads the next layer's union
    # ahead; auto: off, by measurement (prefetch.prefetch_wanted); on: wherever asked
    prefetch: str = "auto"
    # the delta net's recurrent state as stored between steps (runtime/cache.py): float32, or bfloat16 for half
    # the bytes per sequence (twice the batch in the same memory; its quality cost: docs/batch.md)
    state_dtype: str = "float32"

    def check(self) -> "RuntimeConfig":
        if self.io not in IO_MODES:
            raise InputError(f"io mode {self.io!r} is unknown: choose one of {', '.join(IO_MODES)}")
        if self.kernels not in KERNELS:
            raise InputError(f"kernels {self.kernels!r} is unknown: choose one of {', '.join(KERNELS)}")
        if self.upload not in UPLOADS:
            raise InputError(f"upload {self.upload!r} is unknown: choose one of {', '.join(UPLOADS)}")
        if self.prefetch not in PREFETCH_MODES:
            raise InputError(f"prefetch {self.prefetch!r} is unknown: choose one of {', '.join(PREFETCH_MODES)}")
        if self.state_dtype not in STATE_DTYPES:
            raise InputError(f"state dtype {self.state_dtype!r} is unknown: choose one of {', '.join(STATE_DTYPES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
        if self.gpu_cache_gb is not None and (not math.isfinite(self.gpu_cache_gb) or self.gpu_cache_gb < 0):
            raise InputError(f"GPU cache size {self.gpu_cache_gb!r} GB: give a number >= 0 (0 = no GPU cache)")
        for name in ("slots", "threads", "experts_per_token"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise InputError(f"{name.replace('_', ' ')} must be a whole number >= 1 (got {v!r})")
        return self

    def with_(self, **changes) -> "RuntimeConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "RuntimeConfig":
        """For CLIs only: FLASHMOE_KERNELS, FLASHMOE_GPU_CACHE_GB, FLASHMOE_DTYPE, FLASHMOE_UPLOAD,
        FLASHMOE_PREFETCH, FLASHMOE_STATE_DTYPE, then `overrides` (flags; None means not given)."""
        env = os.environ if environ is None else environ
        kw: dict = {}
        if env.get("FLASHMOE_KERNELS", "").strip():
            kw["kernels"] = env["FLASHMOE_KERNELS"].strip().lower()
            if kw["kernels"] not in KERNELS:
                raise InputError(f"FLASHMOE_KERNELS={env['FLASHMOE_KERNELS']!r} is unknown: set it to one of "
                                 f"{', '.join(KERNELS)} (or unset it)")
        if env.get("FLASHMOE_DTYPE", "").strip():
            kw["dtype"] = env["FLASHMOE_DTYPE"].strip()
        if env.get("FLASHMOE_UPLOAD", "").strip():
            kw["upload"] = env["FLASHMOE_UPLOAD"].strip().lower()
        if env.get("FLASHMOE_PREFETCH", "").strip():
            kw["prefetch"] = env["FLASHMOE_PREFETCH"].strip().lower()
        if env.get("FLASHMOE_STATE_DTYPE", "").strip():
            kw["state_dtype"] = env["FLASHMOE_STATE_DTYPE"].strip().lower()
        gb = env.get("FLASHMOE_GPU_CACHE_GB", "").strip()
        if gb:
            try:
                kw["gpu_cache_gb"] = float(gb)
            except ValueError:
                raise InputError(f"FLASHMOE_GPU_CACHE_GB={gb!r}: give a number of gigabytes (0 = no GPU cache)") from None
        names = {f.name for f in fields(cls)}
        kw.update({k: v for k, v in overrides.items() if k in names and v is not None})
        return cls(**kw).check()


@dataclass(frozen=True)
class EngineConfig:
    """The batched engine's knobs (runtime/engine.py). None: the default named in each comment."""

    max_batch: int | None = None  # sequences decoded at once; None: MAX_BATCH, the memory budget binds first
    memory_budget_gb: float | None = None  # state of the running sequences; None: half the available memory
    prompt_cache_gb: float = 0.0  # finished sequences' state kept for prompts that extend them; 0: off
    prefill_tokens: int | None = None  # tokens per prefill forward, all joining rows together; None: 2048

    def check(self) -> "EngineConfig":
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise CapacityError(f"max batch must be >= 1 (got {self.max_batch!r})")
        if self.memory_budget_gb is not None and not (isinstance(self.memory_budget_gb, (int, float))
                                                      and math.isfinite(self.memory_budget_gb)
                                                      and self.memory_budget_gb > 0):
            raise CapacityError(f"memory budget {self.memory_budget_gb!r} GB: give a positive number of gigabytes")
        if not (isinstance(self.prompt_cache_gb, (int, float)) and math.isfinite(self.prompt_cache_gb)
                and self.prompt_cache_gb >= 0):
            raise InputError(f"prompt cache {self.prompt_cache_gb!r} GB: give a number >= 0 (0 = off)")
        if self.prefill_tokens is not None and (not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 1):
            raise InputError(f"prefill tokens must be a whole number >= 1 (got {self.prefill_tokens!r})")
        return self

    def with_(self, **changes) -> "EngineConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
