"""GGUF reading (memory-mapped, fully validated) and writing (atomic)."""

from __future__ import annotations

from pyllm.gguf.constants import GGMLType, ValueType
from pyllm.gguf.reader import GGUFReader, TensorInfo
from pyllm.gguf.writer import GGUFWriter

__all__ = ["GGMLType", "GGUFReader", "GGUFWriter", "TensorInfo", "ValueType"]
