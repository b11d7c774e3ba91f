"""Checkpoint converters: Hugging Face folders and Meta checkpoints -> GGUF.

``convert(src, out, outtype="f16", configs=(...))`` detects the kind of folder and dispatches:
a Meta / LLaMA2-Accessory folder (``params.json`` + ``consolidated.*.pth``) goes to
:func:`convert_meta`, a Hugging Face folder (``config.json``) to :func:`convert_hf`.
``configs`` are JSON files (or dicts) merged in order over the folder's own config, later keys
winning; they may carry fastllm-style overrides (see :mod:`pyllm.tools.convert.overrides`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pyllm.atomic import check_destination
from pyllm.errors import ConvertError
from pyllm.tools.convert.hf import HFConfig, convert_hf
from pyllm.tools.convert.meta import convert_meta, is_meta_folder
from pyllm.tools.convert.overrides import ConfigSource, merge_configs


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    outtype: str = "f16",
    configs: Iterable[ConfigSource] = (),
    *,
    name: str | None = None,
    tokenizer_pre: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a checkpoint folder to one GGUF file; returns the output path.

    ``outtype``: ``f32``, ``f16``, ``bf16`` or ``q8_0``. ``configs``: JSON files or mappings
    merged in order over ``params.json`` / ``config.json``. ``tokenizer_pre`` applies to
    Hugging Face byte-level BPE tokenizers only.

    Args:
        src: The checkpoint folder (Hugging Face or Meta / LLaMA2-Accessory).
        out: The GGUF file to write.
        outtype: The type of the matrices.
        configs: Config overrides, merged in order.
        name: The model name written to ``general.name`` (default: the folder's).
        tokenizer_pre: The byte-level BPE pre-tokenizer name, when not recognised.
        progress: Show a progress bar on a terminal.

    Returns:
        The output path.
    """
    folder = Path(src)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a directory")
    check_destination(out, error=ConvertError)  # before minutes of converting, not after
    extra = merge_configs(configs)
    if is_meta_folder(folder):
        return convert_meta(folder, out, outtype, extra_config=extra, name=name,
                            progress=progress)
    if (folder / "config.json").is_file():
        return convert_hf(folder, out, outtype, name=name, extra_config=extra,
                          tokenizer_pre=tokenizer_pre, progress=progress)
    raise ConvertError(f"{folder}: neither a Hugging Face folder (config.json) nor a Meta "
                       "checkpoint (params.json + consolidated.*.pth)")


__all__ = ["HFConfig", "convert", "convert_hf", "convert_meta"]
