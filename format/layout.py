"""Byte layout of one expert record, derived from the model config and the quantization.

A record holds one routed expert's three projections, each as MLX affine-quantized parts
(packed weight, scales, biases) or, unquantized, one float weight. Letters used below:

    H  hidden_size                 I  moe_intermediate_size
    G  group_size                  b  bits per weight (2, 3, 4, 5, 6, 8)

    component            dtype     shape              bytes
    gate_proj.weight     uint32    [I, H*b/32]        I*H*b/8
    gate_proj.scales     f         [I, H/G]           I*H/G*sizeof(f)
    gate_proj.biases     f         [I, H/G]           same
    up_proj.*            (as gate_proj)
    down_proj.weight     uint32    [H, I*b/32]        H*I*b/8
    down_proj.scales     f         [H, I/G]
    down_proj.biases     f         [H, I/G]

Each component starts at a multiple of COMPONENT_ALIGN inside the record; a record occupies
`record_stride` bytes (its size rounded up to RECORD_ALIGN) so that every record in a layer file
starts on a 16 KiB boundary. format/SPEC.md is the normative description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from flashmoe.errors import BundleError

from .dtypes import DTYPES, FLOAT_DTYPES

RECORD_ALIGN = 16384  # Apple's VM page; also a multiple of 4 KiB pages and O_DIRECT's 512 B/4 KiB
COMPONENT_ALIGN = 64
QUANT_BITS = (2, 3, 4, 5, 6, 8)
MAX_RECORD_BYTES = 1 << 40  # far beyond any real expert; bounds arithmetic on hostile input
ROUTER_MIN_BITS = 8  # SPEC 4: routing is precision-sensitive: mlp.gate and shared_expert_gate never below 8 bits


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Component:
    name: str  # e.g. "gate_proj.scales"
    dtype: str  # uint32 | bfloat16 | float16 | float32
    shape: tuple[int, ...]
    offset: int  # bytes from the record's start
    nbytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class ExpertQuant:
    """How expert weights are stored: bits=None keeps them as float `dtype`; otherwise MLX affine
    quantization with `group_size`, and `dtype` is the dtype of scales and biases."""

    bits: int | None
    group_size: int
    dtype: str

    def check(self) -> None:
        if self.bits is not None and self.bits not in QUANT_BITS:
            raise BundleError(f"unsupported bits={self.bits}: choose one of {QUANT_BITS} (or none for float)")
        if self.group_size not in (32, 64, 128):
            raise BundleError(f"unsupported group_size={self.group_size}: choose 32, 64 or 128")
        if self.dtype not in FLOAT_DTYPES:
            raise BundleError(f"unsupported dtype {self.dtype!r}: choose one of {FLOAT_DTYPES}")


def is_router(module: str) -> bool:
    """Whether a dense module is the router (`mlp.gate`) or the shared-expert gate (SPEC section 4)."""
    return module.endswith(("mlp.gate", "shared_expert_gate"))


def dense_module_bits(module: str, bits: int) -> int:
    """The bits a dense module is stored at when dense weights are quantized to `bits`: the router rule."""
    return max(bits, ROUTER_MIN_BITS) if is_router(module) else bits


def check_quantizable(name: str, in_features: int, bits: int, group_size: int, fix: str = "") -> None:
    """MLX affine quantization of a weight with `in_features` inputs: whole groups and whole uint32 words."""
    if in_features % group_size:
        raise BundleError(f"{name}: input size {in_features} is not a multiple of group_size {group_size}"
                          + (f"; {fix}" if fix else ""))
    if (in_features * bits) % 32:
        raise BundleError(f"{name}: {in_features} inputs at {bits} bits do not fill whole uint32 words"
                          + (f"; {fix}" if fix else ""))


def projection_shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    """[out, in] of each projection of one expert (the PyTorch/MLX Linear weight convention)."""
    return {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def expert_components(hidden: int, inter: int, q: ExpertQuant) -> list[Component]:
    """The ordered component table of one expert record."""
    q.check()
    comps: list[Component] = []
    off = 0
    for proj, (out_f, in_f) in projection_shapes(hidden, inter).items():
        if q.bits is None:
            parts = [("weight", q.dtype, (out_f, in_f))]
        else:
            check_quantizable(proj, in_f, q.bits, q.group_size,
                              "pick a --group-size that divides both hidden_size and moe_intermediate_size")
            parts = [
                ("weight", "uint32", (out_f, in_f * q.bits // 32)),
                ("scales", q.dtype, (out_f, in_f // q.group_size)),
                ("biases", q.dtype, (out_f, in_f // q.group_size)),
            ]
        for part, dtype, shape in parts:
            nbytes = int(np.prod(shape)) * DTYPES[dtype].size
            off = align_up(off, COMPONENT_ALIGN)
            comps.append(Component(f"{proj}.{part}", dtype, tuple(shape), off, nbytes))
            off += nbytes
    return comps


def record_size(comps: list[Component]) -> int:
    return max(c.offset + c.nbytes for c in comps)


def record_stride(comps: list[Component]) -> int:
    return align_up(record_size(comps), RECORD_ALIGN)


def check_components(comps: list[Component], stride: int) -> None:
    """Defensive checks on a component table read from a file or manifest."""
    if not comps:
        raise BundleError("expert record has no components")
    if stride <= 0 or stride % RECORD_ALIGN or stride > MAX_RECORD_BYTES:
        raise BundleError(f"record stride {stride} is not a positive multiple of {RECORD_ALIGN}")
    spans = []
    for c in comps:
        if c.dtype not in DTYPES:
            raise BundleError(f"component {c.name}: unknown dtype {c.dtype!r}")
        if any((not isinstance(d, int)) or d <= 0 or d > 1 << 32 for d in c.shape):
            raise BundleError(f"component {c.name}: impossible shape {list(c.shape)}")
        if c.nbytes != int(np.prod(c.shape, dtype=object)) * DTYPES[c.dtype].size:
            raise BundleError(f"component {c.name}: nbytes {c.nbytes} does not match shape {list(c.shape)}")
        if c.offset < 0 or c.offset % COMPONENT_ALIGN:
            raise BundleError(f"component {c.name}: offset {c.offset} is not {COMPONENT_ALIGN}-byte aligned")
        if c.offset + c.nbytes > stride:
            raise BundleError(f"component {c.name} ends at {c.offset + c.nbytes}, past the record stride {stride}")
        spans.append((c.offset, c.offset + c.nbytes, c.name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise BundleError(f"components {an} and {bn} overlap inside the expert record")
