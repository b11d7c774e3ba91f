"""GGUF reading (memory-mapped, fully validated) and writing (atomic).

The writer (which needs numpy) is imported on first use, so that reading a model to run it
does not import numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyllm.formats.gguf.constants import GGMLType, ValueType
from pyllm.formats.gguf.reader import GGUFReader, TensorInfo
from pyllm.formats.gguf.strings import StringArray

if TYPE_CHECKING:
    from pyllm.formats.gguf.writer import GGUFWriter

__all__ = ["GGMLType", "GGUFReader", "GGUFWriter", "StringArray", "TensorInfo", "ValueType"]


def __getattr__(name: str) -> Any:
    if name == "GGUFWriter":
        from pyllm.formats.gguf.writer import GGUFWriter

        return GGUFWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
