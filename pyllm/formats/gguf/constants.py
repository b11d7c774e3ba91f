"""GGUF format constants: magic, versions, metadata value types and ggml tensor types.

Layout facts follow the GGUF specification (ggml's docs/gguf.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4


class ValueType(IntEnum):
    """Metadata value types (the u32 tag in front of each value)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype (little-endian) of each fixed-size scalar value type
SCALAR_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}

# struct format (little-endian, standard sizes) of each fixed-size scalar value type
STRUCT_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "<B",
    ValueType.INT8: "<b",
    ValueType.UINT16: "<H",
    ValueType.INT16: "<h",
    ValueType.UINT32: "<I",
    ValueType.INT32: "<i",
    ValueType.FLOAT32: "<f",
    ValueType.BOOL: "<B",
    ValueType.UINT64: "<Q",
    ValueType.INT64: "<q",
    ValueType.FLOAT64: "<d",
}


class GGMLType(IntEnum):
    """ggml tensor types as stored in GGUF tensor infos."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class TypeInfo:
    block_size: int  # elements per block
    type_size: int  # bytes per block


# (elements per block, bytes per block) for every type a GGUF file may hold
TYPE_INFO: dict[GGMLType, TypeInfo] = {
    GGMLType.F32: TypeInfo(1, 4),
    GGMLType.F16: TypeInfo(1, 2),
    GGMLType.Q4_0: TypeInfo(32, 18),
    GGMLType.Q4_1: TypeInfo(32, 20),
    GGMLType.Q5_0: TypeInfo(32, 22),
    GGMLType.Q5_1: TypeInfo(32, 24),
    GGMLType.Q8_0: TypeInfo(32, 34),
    GGMLType.Q8_1: TypeInfo(32, 36),  # d + s (f16 each) + 32 int8 (the gguf package says 40)
    GGMLType.Q2_K: TypeInfo(256, 84),
    GGMLType.Q3_K: TypeInfo(256, 110),
    GGMLType.Q4_K: TypeInfo(256, 144),
    GGMLType.Q5_K: TypeInfo(256, 176),
    GGMLType.Q6_K: TypeInfo(256, 210),
    GGMLType.Q8_K: TypeInfo(256, 292),
    GGMLType.IQ2_XXS: TypeInfo(256, 66),
    GGMLType.IQ2_XS: TypeInfo(256, 74),
    GGMLType.IQ3_XXS: TypeInfo(256, 98),
    GGMLType.IQ1_S: TypeInfo(256, 50),
    GGMLType.IQ4_NL: TypeInfo(32, 18),
    GGMLType.IQ3_S: TypeInfo(256, 110),
    GGMLType.IQ2_S: TypeInfo(256, 82),
    GGMLType.IQ4_XS: TypeInfo(256, 136),
    GGMLType.I8: TypeInfo(1, 1),
    GGMLType.I16: TypeInfo(1, 2),
    GGMLType.I32: TypeInfo(1, 4),
    GGMLType.I64: TypeInfo(1, 8),
    GGMLType.F64: TypeInfo(1, 8),
    GGMLType.IQ1_M: TypeInfo(256, 56),
    GGMLType.BF16: TypeInfo(1, 2),
    GGMLType.TQ1_0: TypeInfo(256, 54),
    GGMLType.TQ2_0: TypeInfo(256, 66),
    GGMLType.MXFP4: TypeInfo(32, 17),
}

# numpy dtype of the plain (non-block) types, used to expose such tensors as typed arrays
PLAIN_DTYPES: dict[GGMLType, str] = {
    GGMLType.F32: "<f4",
    GGMLType.F16: "<f2",
    GGMLType.I8: "<i1",
    GGMLType.I16: "<i2",
    GGMLType.I32: "<i4",
    GGMLType.I64: "<i8",
    GGMLType.F64: "<f8",
    GGMLType.BF16: "<u2",
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes that ``n_elements`` of ``ggml_type`` occupy (caller checks divisibility)."""
    info = TYPE_INFO[ggml_type]
    return n_elements // info.block_size * info.type_size
