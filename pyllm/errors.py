"""The pyllm error family.

Every error that bad input can cause is a subclass of :class:`PyllmError`, so callers (and the
CLI, which prints one ``error: ...`` line) can catch the whole family at once.
"""

from __future__ import annotations


class PyllmError(Exception):
    """Base class of every error pyllm raises on purpose."""


class GGUFError(PyllmError):
    """A GGUF file is malformed, truncated or uses something this version cannot read."""


class QuantError(PyllmError):
    """Bad input to a quantize/dequantize/matmul entry point (unknown type, wrong size)."""


class ModelError(PyllmError):
    """A model cannot be loaded or run (unsupported architecture, missing tensor, bad shape)."""


class ContextError(PyllmError):
    """A request does not fit the context window or the KV cache."""


class TokenizerError(PyllmError):
    """Vocabulary metadata is inconsistent, or text/ids cannot be tokenized/detokenized."""


class ChatTemplateError(PyllmError):
    """A chat template failed to render or tried to do something the sandbox forbids."""


class SamplingError(PyllmError):
    """Invalid sampling parameters."""


class DownloadError(PyllmError):
    """The default model could not be fetched or verified."""


class ConvertError(PyllmError):
    """A checkpoint cannot be converted to GGUF."""


class OutputError(PyllmError):
    """An output file cannot be written (missing or unwritable folder, a folder in the way,
    the input file itself)."""


class DeviceError(PyllmError):
    """A backend or device that cannot do what was asked: a build without that backend, no
    device found, not enough device memory for the layers placed on it."""


class GrammarError(PyllmError):
    """A grammar, JSON schema or regular expression that cannot constrain generation (a syntax
    error, an unsupported schema keyword), or the grammar engine is not installed."""


class ToolCallError(PyllmError):
    """Tools or a tool choice that cannot be used (bad shape, unknown function name)."""


class StateFileError(PyllmError):
    """A saved state that cannot be used: another model or KV type, a truncated, corrupt or
    unreadable file (prompt caches, the server's slot files)."""


class SpeculativeError(PyllmError):
    """A drafter that cannot serve a model (a draft model of another vocabulary, bad draft
    settings)."""


class PipelineError(PyllmError):
    """A layer pipeline over MPI cannot start or go on: mpi4py missing, a bad layer split,
    ranks that run another pyllm or see another model file, a rank that failed (named)."""


class PyllmWarning(UserWarning):
    """Something works but probably not as the user wants (a context beyond the trained length,
    more threads than CPUs). The CLI prints these as ``pyllm: warning: ...`` lines."""


__all__ = [
    "DeviceError",
    "GrammarError",
    "ToolCallError",
    "SpeculativeError",
    "StateFileError",
    "PyllmError",
    "GGUFError",
    "QuantError",
    "ModelError",
    "ContextError",
    "TokenizerError",
    "ChatTemplateError",
    "SamplingError",
    "DownloadError",
    "ConvertError",
    "OutputError",
    "PipelineError",
    "PyllmWarning",
]
