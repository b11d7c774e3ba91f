"""pyllm: run LLaMA-family GGUF models from Python.

The public API is here, as llama-cpp-python users look for it::

    import pyllm
    llm = pyllm.LLM("model.gguf")
    print(llm.generate("Once upon a time", max_tokens=32, temperature=0))

Only the error classes are imported with the package. Everything else is imported on first
use (PEP 562 module ``__getattr__``), so ``import pyllm`` stays fast and does not load numpy or
the compiled extension :mod:`pyllm._core`; the pure-Python parts (GGUF reading, tokenizers, chat
templates) work without that extension.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from pyllm.errors import (
    ChatTemplateError,
    ContextError,
    ConvertError,
    DeviceError,
    DownloadError,
    GGUFError,
    GrammarError,
    ModelError,
    OutputError,
    PipelineError,
    PyllmError,
    PyllmWarning,
    QuantError,
    SamplingError,
    SpeculativeError,
    StateFileError,
    TokenizerError,
    ToolCallError,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from pyllm.formats.gguf import GGUFReader, GGUFWriter
    from pyllm.runtime.devices import DeviceInfo, devices
    from pyllm.runtime.grammar import Grammar
    from pyllm.runtime.llm import LLM, LLMState
    from pyllm.runtime.loaded import LoadedModel
    from pyllm.runtime.mpi import Pipeline
    from pyllm.runtime.sampling import SamplingParams
    from pyllm.runtime.speculative import DraftModel, NgramDrafter
    from pyllm.tokenizer import Tokenizer

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "LLM": "pyllm.runtime.llm",
    "LLMState": "pyllm.runtime.llm",
    "LoadedModel": "pyllm.runtime.loaded",
    "Pipeline": "pyllm.runtime.mpi",
    "devices": "pyllm.runtime.devices",
    "DeviceInfo": "pyllm.runtime.devices",
    "SamplingParams": "pyllm.runtime.sampling",
    "Grammar": "pyllm.runtime.grammar",
    "NgramDrafter": "pyllm.runtime.speculative",
    "DraftModel": "pyllm.runtime.speculative",
    "Tokenizer": "pyllm.tokenizer",
    "GGUFReader": "pyllm.formats.gguf",
    "GGUFWriter": "pyllm.formats.gguf",
}


def _version() -> str:
    # importlib.metadata alone costs about as much as the rest of `import pyllm`: read on demand
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyllm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"pyllm.{name}") is not None:
        # a submodule used as an attribute (`pyllm.tokenizer.X`, once imported with the package)
        value = importlib.import_module(f"pyllm.{name}")
    else:
        raise AttributeError(f"module 'pyllm' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "__version__",
    "devices",
    "ChatTemplateError",
    "ContextError",
    "ConvertError",
    "DeviceError",
    "DeviceInfo",
    "DownloadError",
    "DraftModel",
    "GGUFError",
    "GGUFReader",
    "GGUFWriter",
    "Grammar",
    "GrammarError",
    "LLM",
    "LLMState",
    "LoadedModel",
    "ModelError",
    "NgramDrafter",
    "OutputError",
    "Pipeline",
    "PipelineError",
    "PyllmError",
    "PyllmWarning",
    "QuantError",
    "SamplingError",
    "SamplingParams",
    "SpeculativeError",
    "StateFileError",
    "Tokenizer",
    "TokenizerError",
    "ToolCallError",
]
