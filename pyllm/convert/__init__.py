"""Checkpoint converters: Hugging Face folders -> GGUF.

``convert_hf(src_dir, out_path, outtype="f16")`` is the entry point; see :mod:`pyllm.convert.hf`.
"""

from __future__ import annotations

from pyllm.convert.hf import HFConfig, convert_hf

__all__ = ["HFConfig", "convert_hf"]
