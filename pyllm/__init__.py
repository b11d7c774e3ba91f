"""pyllm: run LLaMA-family GGUF models from Python.

Pure-Python parts (GGUF reading, tokenizers, chat templates) import without the compiled
extension; compute goes through :mod:`pyllm._core`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pyllm.errors import (
    ChatTemplateError,
    ContextError,
    ConvertError,
    DownloadError,
    GGUFError,
    ModelError,
    PyllmError,
    PyllmWarning,
    QuantError,
    SamplingError,
    TokenizerError,
)
from pyllm.tokenizer import Tokenizer

try:
    __version__ = version("pyllm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "ChatTemplateError",
    "ContextError",
    "ConvertError",
    "DownloadError",
    "GGUFError",
    "ModelError",
    "PyllmError",
    "PyllmWarning",
    "QuantError",
    "SamplingError",
    "Tokenizer",
    "TokenizerError",
]
