"""The one place that imports the compiled extension :mod:`pyllm._core`.

Everything that computes (the model, the sampler, the quant kernels) needs the extension; the
pure-Python parts (GGUF, tokenizers, chat templates) do not, so it is imported on first use. When
it is missing, the usual cause is not a broken install but a source checkout that was never
built, or a working directory holding the source tree that shadows the installed package (Python
puts the script's folder / the current folder first on ``sys.path``). The error says so, once,
with the fix, instead of "cannot import name '_core'".
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from pyllm.errors import PyllmError

# README, "Development": the editable build
EDITABLE_INSTALL = 'pip install --no-build-isolation -e ".[test]" -Cbuild-dir=build/editable'


def missing_core_message(reason: str) -> str:
    """One line: what is missing, why that usually happens, and what to do."""
    where = Path(__file__).resolve().parent
    return (f"the compiled extension pyllm._core is missing ({reason}); pyllm was imported from "
            f"{where}, which usually means a source checkout that was never built, or a working "
            f"directory that shadows the installed pyllm. Fix: build and install it with "
            f"`pip install .` (or, to develop, `{EDITABLE_INSTALL}`) in the checkout, or run "
            f"from another folder")


def load_core(error: type[PyllmError] = PyllmError) -> ModuleType:
    """The extension module; raises ``error`` (a PyllmError type) with the one-line message
    when it cannot be imported."""
    try:
        return importlib.import_module("pyllm._core")
    except ModuleNotFoundError as e:
        if e.name != "pyllm._core":  # the extension is there but needs a module that is not
            raise error(f"the compiled extension pyllm._core cannot be loaded: {e}") from None
        raise error(missing_core_message(str(e))) from None
    except ImportError as e:  # present but unloadable (wrong platform, missing symbol)
        raise error(f"the compiled extension pyllm._core cannot be loaded: {e}; rebuild it with "
                    f"`pip install .` (or `{EDITABLE_INSTALL}`)") from None


@functools.cache
def optional_core(name: str) -> Any:
    """The extension's function ``name`` where it is there, else None: for the pure-Python parts
    that only go faster with it (a source tree never built still reads GGUF files and
    tokenizes)."""
    try:
        from pyllm import _core
    except ImportError:
        return None
    return getattr(_core, name, None)


__all__ = ["EDITABLE_INSTALL", "load_core", "missing_core_message", "optional_core"]
