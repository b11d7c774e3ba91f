"""GGUF reading (memory-mapped, fully validated) and writing (atomic)."""

from __future__ import annotations

from pyllm.formats.gguf.constants import GGMLType, ValueType
from pyllm.formats.gguf.reader import GGUFReader, TensorInfo
from pyllm.formats.gguf.writer import GGUFWriter

__all__ = ["GGMLType", "GGUFReader", "GGUFWriter", "TensorInfo", "ValueType"]
