"""Quantization formats: decode and encode tensors of every GGUF weight type pyllm computes with.

The work is done by the C++ reference routines in :mod:`pyllm._core` (GIL released, split over
the kernel thread pool); this module resolves type names, checks shapes and sizes, and shapes the
results. Dequantization is bit-exact with the ``gguf`` package; quantization of F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0 and TQ2_0 reproduces its bytes, and the k-quants (Q2_K..Q6_K) and
IQ4_NL / IQ4_XS use llama.cpp's kind of scale search. The grid i-quants (IQ1_S, IQ1_M, IQ2_XXS,
IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) are written byte-identical with llama.cpp's quantizer; IQ1_S,
IQ2_XXS and IQ2_XS only with an importance matrix (``importance=``; without one
:func:`quantize` raises :class:`QuantError`, as llama.cpp refuses them). Q8_1 and Q8_K (the
activation formats of the dot kernels) are supported too.

Example::

    raw = quants.quantize("Q4_K", weights)          # float32 (..., k) -> uint8 (..., k/256*144)
    back = quants.dequantize("Q4_K", raw, weights.shape)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from numbers import Integral
from typing import TYPE_CHECKING, Any

from pyllm.errors import QuantError
from pyllm.formats.gguf.constants import GGMLType

if TYPE_CHECKING:
    import numpy as np

QTypeLike = GGMLType | int | str


# Element counts above this are refused outright (no real tensor is near it; it keeps every
# byte count far from int64 overflow in the C++ checks).
_MAX_ELEMENTS = 1 << 56


@dataclass(frozen=True)
class QuantTypeInfo:
    """Facts about one tensor type, as the C++ traits table states them."""

    type: GGMLType
    name: str
    block_size: int  # elements per block (1 for F32/F16/BF16)
    type_size: int  # bytes per block
    is_quantized: bool  # block-quantized (not a plain float type)
    is_weight: bool  # may be a weight type in a GGUF file (False for Q8_1/Q8_K)
    can_quantize: bool  # quantize() supports it (False for IQ1_S, IQ2_XXS, IQ2_XS)
    imatrix_quantize: bool  # quantize(..., importance=) supports it (not Q8_0, TQ1_0, TQ2_0)
    vec_dot_type: GGMLType  # activation format its dot kernels take

    def row_bytes(self, n: int) -> int:
        """Bytes of ``n`` elements; ``n`` must be a whole number of blocks.

        Args:
            n: Elements (a multiple of the block size).

        Returns:
            The bytes they take.
        """
        if n < 0 or n % self.block_size:
            raise QuantError(
                f"{self.name}: {n} elements is not a whole number of "
                f"{self.block_size}-element blocks"
            )
        return n // self.block_size * self.type_size


def _core() -> Any:
    from pyllm._native import load_core

    return load_core(QuantError)  # the extension, or a QuantError saying how to build it


def resolve_type(qtype: QTypeLike) -> GGMLType:
    """The supported :class:`GGMLType` named by a GGMLType, its integer id or its name ("q4_k").

    Args:
        qtype: A GGMLType, a GGUF type id or a type name (any case).

    Returns:
        The type.

    Raises:
        QuantError: An unknown or unsupported type.
    """
    if isinstance(qtype, GGMLType):
        t = qtype
    elif isinstance(qtype, str):
        try:
            t = GGMLType[qtype.strip().upper()]
        except KeyError:
            raise QuantError(f"unknown tensor type name {qtype!r}") from None
    elif isinstance(qtype, Integral) and not isinstance(qtype, bool):
        try:
            t = GGMLType(int(qtype))
        except ValueError:
            raise QuantError(f"unknown tensor type id {int(qtype)}") from None
    else:
        raise QuantError(f"tensor type must be a GGMLType, int or str, not {type(qtype).__name__}")
    if t not in supported_types():
        supported = ", ".join(s.name for s in supported_types())
        raise QuantError(f"tensor type {t.name} is not supported (supported: {supported})")
    return t


@cache
def _info(t: GGMLType) -> QuantTypeInfo:
    d = _core().type_traits(int(t))
    return QuantTypeInfo(
        type=t,
        name=str(d["name"]),
        block_size=int(d["block_size"]),
        type_size=int(d["type_size"]),
        is_quantized=bool(d["is_quantized"]),
        is_weight=bool(d["is_weight"]),
        can_quantize=bool(d["can_quantize"]),
        imatrix_quantize=bool(d["imatrix_quantize"]),
        vec_dot_type=GGMLType(int(d["vec_dot_type"])),
    )


@cache
def supported_types() -> tuple[GGMLType, ...]:
    """The types the C++ traits table implements (csrc/quant/registry.cc, the one list), in its
    order; their ids are the GGUF type ids, so each is the :class:`GGMLType` of that id.

    Returns:
        The types, in the table's order.
    """
    return tuple(GGMLType(i) for i in _core().quant_type_ids())


@cache
def weight_types() -> frozenset[GGMLType]:
    """The types a model's weights may have: the C++ table's types marked as weights (not the
    activation formats Q8_1 / Q8_K). Every ISA's kernel table covers exactly these.

    Returns:
        The weight types.
    """
    return frozenset(t for t in supported_types() if _info(t).is_weight)


def type_info(qtype: QTypeLike) -> QuantTypeInfo:
    """Block size, bytes per block and the other traits of a supported type.

    Args:
        qtype: A type, as :func:`resolve_type` takes it.

    Returns:
        Its traits.
    """
    return _info(resolve_type(qtype))


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(shape, Integral) and not isinstance(shape, bool):
        dims: tuple[Any, ...] = (shape,)
    else:
        try:
            dims = tuple(shape)  # type: ignore[arg-type]
        except TypeError:
            raise QuantError(f"shape must be an int or a sequence of ints, not {shape!r}") from None
    out = []
    for d in dims:
        if not isinstance(d, Integral) or isinstance(d, bool) or d < 0:
            raise QuantError(f"shape {shape!r} must hold non-negative integers")
        out.append(int(d))
    if math.prod(out) > _MAX_ELEMENTS:
        raise QuantError(f"shape {tuple(out)} is too large")
    return tuple(out)


def byte_shape(qtype: QTypeLike, shape: int | Sequence[int]) -> tuple[int, ...]:
    """Shape of the raw bytes of a tensor of ``shape`` (numpy order): the last dim becomes bytes.

    Args:
        qtype: A type, as :func:`resolve_type` takes it.
        shape: The tensor's shape in numpy order (an int for 1-D).

    Returns:
        The shape of its raw bytes.
    """
    info = type_info(qtype)
    dims = _check_shape(shape)
    if not dims:
        if info.block_size != 1:
            raise QuantError(f"{info.name}: a scalar is not a whole number of blocks")
        return (info.type_size,)
    return (*dims[:-1], info.row_bytes(dims[-1]))


def _as_bytes(data: Any) -> np.ndarray:
    """A C-contiguous array over the caller's bytes; no copy for contiguous arrays and buffers."""
    import numpy as np

    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise QuantError("data must hold raw bytes, not Python objects")
        return data if data.flags.c_contiguous else np.ascontiguousarray(data)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as e:
        raise QuantError(f"data must be a numpy array or a contiguous buffer: {e}") from None


def dequantize(qtype: QTypeLike, data: Any, shape: int | Sequence[int]) -> np.ndarray:
    """Decode raw tensor bytes of type ``qtype`` into a float32 array of ``shape`` (numpy order).

    ``data`` is a numpy array (any dtype; its bytes are used, e.g. a GGUF memmap view) or any
    buffer holding exactly the tensor's bytes. Contiguous inputs are read in place.

    Args:
        qtype: The type of the bytes.
        data: The raw bytes.
        shape: The tensor's shape in numpy order.

    Returns:
        A new float32 array of ``shape``.
    """
    info = type_info(qtype)
    dims = _check_shape(shape)
    n = math.prod(dims)
    if dims and dims[-1] % info.block_size:
        raise QuantError(
            f"{info.name}: last dimension {dims[-1]} is not a multiple of the block size "
            f"{info.block_size}"
        )
    need = info.row_bytes(n)
    buf = _as_bytes(data)
    if buf.nbytes != need:
        raise QuantError(
            f"{info.name}: shape {dims} needs {need} bytes of data, got {buf.nbytes}"
        )
    out: np.ndarray = _core().dequantize(int(info.type), buf, n)
    return out.reshape(dims)


def quantize(qtype: QTypeLike, array: Any, importance: Any = None) -> np.ndarray:
    """Encode a float array as type ``qtype``; returns the raw bytes as uint8 (..., row_bytes).

    The last dimension must be a multiple of the type's block size. Non-float32 real input is
    converted to float32 first. ``importance``: the importance of each column (a 1-D array of
    the last dimension's length: an importance matrix's mean squares,
    :meth:`pyllm.formats.imatrix.Imatrix.weights`) to guide the rounding as llama.cpp's
    quantizer does; types without such a quantizer (``type_info(t).imatrix_quantize``) raise
    :class:`QuantError`. IQ1_S, IQ2_XXS and IQ2_XS are written only with an importance matrix
    (:class:`QuantError` without one); the other grid i-quants (IQ1_M, IQ2_S, IQ3_XXS, IQ3_S)
    with or without, as llama.cpp's quantizer.

    Args:
        qtype: The type to encode to.
        array: Real numbers, last dimension a multiple of the block size.
        importance: Per-column importance (1-D, the last dimension's length), or None.

    Returns:
        The raw bytes, uint8 of shape (..., row bytes).
    """
    import numpy as np

    info = type_info(qtype)
    if not info.can_quantize and not (info.imatrix_quantize and importance is not None):
        if info.imatrix_quantize:
            raise QuantError(f"{info.name} can only be quantized with an importance matrix: its "
                             "grid search needs one (pyllm imatrix; quantize(..., importance=))")
        raise QuantError(
            f"no quantizer for {info.name} yet: quantize from an importance matrix "
            "(pyllm imatrix) is not implemented"
        )
    a = np.asarray(array)
    if a.dtype != np.float32:
        if a.dtype.kind not in "fiub":
            raise QuantError(f"quantize: input must be a real-valued array, not {a.dtype}")
        a = a.astype(np.float32)
    if a.ndim == 0:
        raise QuantError("quantize: input must have at least one dimension")
    a = np.ascontiguousarray(a)
    out_shape = byte_shape(info.type, a.shape)
    if importance is None:
        out: np.ndarray = _core().quantize(int(info.type), a)
        return out.reshape(out_shape)
    w = np.ascontiguousarray(importance, dtype=np.float32)
    if w.ndim != 1 or w.size != a.shape[-1]:
        raise QuantError(f"quantize: importance must be 1-D with {a.shape[-1]} values (one per "
                         f"column), got shape {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise QuantError("quantize: importance values must be finite and >= 0")
    out = _core().quantize_weighted(int(info.type), a, w)
    return out.reshape(out_shape)


__all__ = [
    "QTypeLike",
    "QuantTypeInfo",
    "byte_shape",
    "dequantize",
    "quantize",
    "resolve_type",
    "supported_types",
    "type_info",
    "weight_types",
]
