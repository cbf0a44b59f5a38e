"""The one dtype table: every dtype a bundle stores, with its size, the numpy type that carries its
bytes, its safetensors code and the MLX dtype of the raw buffer that holds it; plus the safetensors codes
a source checkpoint may contain. Everything that maps dtype names (format, convert, runtime, tests)
derives from here.

numpy has no bfloat16: its bytes travel as uint16 bit patterns. MLX slot buffers are allocated as the
unsigned integer of the same size (`storage`) and viewed as the dtype itself (`name`, an MLX dtype name).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # the bundle's name (component tables, manifest); also the MLX dtype name
    size: int  # bytes per element
    numpy: type  # numpy type carrying the bytes
    st: str  # safetensors code
    storage: str  # MLX dtype name of a same-size raw buffer


DTYPES: dict[str, DType] = {d.name: d for d in (
    DType("uint32", 4, np.uint32, "U32", "uint32"),
    DType("bfloat16", 2, np.uint16, "BF16", "uint16"),
    DType("float16", 2, np.float16, "F16", "uint16"),
    DType("float32", 4, np.float32, "F32", "uint32"),
)}
FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # what scales, biases and float weights may be
BY_ST: dict[str, DType] = {d.st: d for d in DTYPES.values()}

# every safetensors code a source checkpoint may hold -> the numpy type carrying its bytes
ST_NUMPY: dict[str, type] = {
    **{d.st: d.numpy for d in DTYPES.values()},
    "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U64": np.uint64, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
ST_ITEMSIZE: dict[str, int] = {k: np.dtype(v).itemsize for k, v in ST_NUMPY.items()}
