"""PEFT LoRA adapters -> GGUF adapter files (llama.cpp's layout, see :mod:`pyllm.formats.lora`).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``
through ``torch.load(weights_only=True)``), maps each ``...<module>.lora_A/B.weight`` onto the
base's GGUF tensor name with the model converter's table, and applies the converter's row
transforms to ``B`` (the rows of ``B @ A`` are the rows of the adapted matrix): the q/k row
permutation of llama-arch files, InternLM2's fused-wqkv split (``A`` is shared by the three
parts). The scaling PEFT applies is ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA, per-module
values from ``rank_pattern`` / ``alpha_pattern``); the file carries one alpha, so any other
factor is folded into ``B``, and ``alpha / rank`` of each pair is what PEFT used.

Refused with a message naming what: DoRA (``use_dora``), full copies of modules
(``modules_to_save``: embeddings or the output head), LoRA on embeddings or the head, trained
biases, a module the base does not have or of another shape.

:func:`convert_lora` also takes LLaMA2-Accessory checkpoint folders, handed on to
:mod:`pyllm.tools.convert.accessory`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.errors import ConvertError
from pyllm.formats.lora import KEY_ADAPTER_TYPE, KEY_ALPHA, KEY_TYPE
from pyllm.tools.convert.checkpoint import SafetensorsShard, TorchBinShard
from pyllm.tools.convert.hf import PlannedTensor, check_inputs, write_gguf
from pyllm.tools.convert.overrides import ConfigSource
from pyllm.tools.convert.tensor_map import (
    PERMUTED_QK_ARCHS,
    map_name,
    permute_qk,
    split_internlm2_wqkv,
)

# "base_model.model.<module>.lora_A[.<adapter name>].weight"
_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<half>[AB])"
                  r"(?:\.[\w-]+)?\.weight")
_BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate",
                   "ffn_up", "ffn_down")


@dataclass(frozen=True)
class BaseShape:
    """What the conversion needs to know of the base model."""

    arch: str
    n_head: int
    n_head_kv: int
    head_dim: int
    shapes: dict[str, tuple[int, ...]]  # GGUF name -> numpy shape (empty: not checked)


def base_of(path: str | os.PathLike[str]) -> BaseShape:
    """The base model from its GGUF file or its Hugging Face folder (config.json)."""
    p = Path(path)
    if p.is_dir():
        from pyllm.tools.convert.hf import load_config

        cfg = load_config(p)
        return BaseShape(cfg.arch, cfg.n_head, cfg.n_head_kv, cfg.head_dim, {})
    from pyllm.formats.gguf.split import open_gguf

    try:
        reader = open_gguf(p)
    except FileNotFoundError:
        raise ConvertError(f"base model {p} does not exist") from None
    with reader:
        md = reader.metadata
        arch = md.get("general.architecture")
        if not isinstance(arch, str):
            raise ConvertError(f"{p.name}: no general.architecture")
        n_head = md.get(f"{arch}.attention.head_count")
        n_head_kv = md.get(f"{arch}.attention.head_count_kv", n_head)
        if not isinstance(n_head, int) or not isinstance(n_head_kv, int) or n_head <= 0:
            raise ConvertError(f"{p.name}: no {arch}.attention.head_count")
        shapes = {t.name: t.shape for t in reader}
        n_embd = md.get(f"{arch}.embedding_length", 0)
        head_dim = md.get(f"{arch}.attention.key_length") or (n_embd // n_head)
    return BaseShape(arch, n_head, n_head_kv, int(head_dim), shapes)


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{src}: no adapter_config.json (not a PEFT adapter folder) and no "
                           "consolidated.*.pth shards (not a LLaMA2-Accessory one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: unreadable: {e}") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ConvertError(f"{path}: peft_type {kind!r}; only LORA adapters convert")
    if cfg.get("use_dora"):
        raise ConvertError(f"{path}: use_dora is set: DoRA adapters cannot be applied as a "
                           "low-rank sum (convert without DoRA, or merge with peft first)")
    if cfg.get("modules_to_save"):
        raise ConvertError(f"{path}: modules_to_save {cfg['modules_to_save']} are full copies "
                           "of modules, not a LoRA (merge them into the base model instead)")
    if cfg.get("bias", "none") not in (None, "none"):
        raise ConvertError(f"{path}: bias {cfg['bias']!r}: trained biases are not part of a "
                           "LoRA adapter file (train with bias='none')")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConvertError(f"{path}: {key} must be a positive number, got {value!r}")
    return cfg


def _open_weights(src: Path) -> Any:
    st, pt = src / "adapter_model.safetensors", src / "adapter_model.bin"
    if st.is_file():
        return SafetensorsShard(st)
    if pt.is_file():
        return TorchBinShard(pt)
    raise ConvertError(f"{src}: no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(pattern: Mapping[str, Any] | None, module: str, default: float) -> float:
    """PEFT's per-module override: the first key that the module's name ends with (PEFT matches
    keys as suffixes of the module path)."""
    for key, value in (pattern or {}).items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return float(value)
    return default


def plan_adapter(src: Path, base: BaseShape) -> tuple[float, list[PlannedTensor]]:
    """The adapter's alpha and its GGUF tensors (each a float32 loader), checked against the
    base; nothing is loaded yet."""
    cfg = _read_config(src)
    weights = _open_weights(src)
    alpha = float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora"))
    halves: dict[str, dict[str, str]] = {}
    for key in weights.names():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ConvertError(f"{key}: not a LoRA tensor (lora_A / lora_B); embedding LoRAs, "
                               "DoRA magnitudes and trained biases cannot be converted")
        halves.setdefault(m["module"], {})[m["half"]] = key
    if not halves:
        raise ConvertError(f"{src}: the adapter holds no tensors")
    planned: list[PlannedTensor] = []
    for module, half in sorted(halves.items()):
        if set(half) != {"A", "B"}:
            raise ConvertError(f"{module}: lora_{'B' if 'A' in half else 'A'} is missing")
        mapped = map_name(base.arch, module + ".weight") if base.arch in (
            "llama", "qwen2", "internlm2") else None
        if mapped is None or mapped.block is None or \
                mapped.gguf.split(".")[2] not in _BLOCK_MATRICES:
            raise ConvertError(f"{module}: only the attention and feed-forward matrices of a "
                               "block can carry a LoRA (not embeddings or the output head)")
        a_shape, b_shape = weights.shape(half["A"]), weights.shape(half["B"])
        rank = a_shape[0]
        if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
            raise ConvertError(f"{module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} "
                               "do not make a low-rank product")
        # PEFT's factor for this module, and the one the file's alpha gives: fold the ratio
        mod_alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        mod_rank = _pattern_value(cfg.get("rank_pattern"), module, float(cfg["r"]))
        if int(mod_rank) != rank:
            raise ConvertError(f"{module}: lora_A has rank {rank}, adapter_config.json says "
                               f"{int(mod_rank)}")
        peft_factor = mod_alpha / (math.sqrt(rank) if rslora else rank)
        fold = peft_factor / (alpha / rank)
        for name, shape, load in _targets(base, mapped.gguf, weights, half, a_shape, b_shape,
                                          fold):
            want = base.shapes.get(name)
            got = (shape[0], a_shape[1])
            if base.shapes and want is None:
                raise ConvertError(f"{module}: the base model has no tensor {name}")
            if want is not None and tuple(want) != got:
                raise ConvertError(f"{module}: {name} is {list(want)} in the base model, the "
                                   f"adapter's B @ A is {list(got)}: an adapter for another "
                                   "model?")
            planned.append(PlannedTensor(name + ".lora_a", a_shape,
                                         lambda k=half["A"]: weights.load(k)))
            planned.append(PlannedTensor(name + ".lora_b", shape, load))
    return alpha, planned


def _targets(base: BaseShape, gguf: str, weights: Any, half: dict[str, str],
             a_shape: tuple[int, ...], b_shape: tuple[int, ...], fold: float
             ) -> list[tuple[str, tuple[int, ...], Any]]:
    """(GGUF matrix name, lora_b shape, lora_b loader) for one PEFT module: one target, or
    InternLM2's fused wqkv split into three."""
    blk, kind = gguf.rsplit(".", 2)[0], gguf.split(".")[2]

    def b_rows(transform: Any) -> Any:
        return lambda: transform(weights.load(half["B"]) * np.float32(fold))

    permute = base.arch in PERMUTED_QK_ARCHS
    if kind == "attn_qkv":
        hd = base.head_dim
        sizes = (base.n_head * hd, base.n_head_kv * hd, base.n_head_kv * hd)
        out = []
        for i, part in enumerate(("attn_q", "attn_k", "attn_v")):
            heads = (base.n_head, base.n_head_kv, None)[i]

            def take(b: np.ndarray, i: int = i, heads: int | None = heads) -> np.ndarray:
                piece = split_internlm2_wqkv(b, base.n_head, base.n_head_kv, base.head_dim)[i]
                return permute_qk(piece, heads) if heads is not None and permute else piece
            out.append((f"{blk}.{part}.weight", (sizes[i], b_shape[1]), b_rows(take)))
        return out
    heads = {"attn_q": base.n_head, "attn_k": base.n_head_kv}.get(kind) if permute else None
    if heads is None:
        return [(gguf, b_shape, b_rows(lambda b: b))]
    return [(gguf, b_shape, b_rows(lambda b, h=heads: permute_qk(b, h)))]


def convert_lora(src_dir: str | os.PathLike[str], base: str | os.PathLike[str],
                 out_path: str | os.PathLike[str], outtype: str = "f16", *,
                 configs: Iterable[ConfigSource] = (),
                 merge_tuning: str | os.PathLike[str] | None = None,
                 progress: bool = True) -> Path:
    """Convert a PEFT LoRA folder for ``base`` (GGUF file or Hugging Face folder) to a GGUF
    adapter; ``outtype`` f32, f16, bf16 or q8_0 (a lora_b whose rank is not a multiple of 32
    stays f16). Atomic: the file appears whole or not at all. Returns the output path.

    A LLaMA2-Accessory folder (``consolidated.*.pth`` shards, no ``adapter_config.json``) goes
    to :func:`pyllm.tools.convert.accessory.convert_accessory_lora`, which alone takes
    ``configs`` and ``merge_tuning``."""
    folder = Path(src_dir)
    if not (folder / "adapter_config.json").is_file() and any(folder.glob("consolidated.*.pth")):
        from pyllm.tools.convert.accessory import convert_accessory_lora

        return convert_accessory_lora(folder, base, out_path, outtype, configs=configs,
                                      merge_tuning=merge_tuning, progress=progress)
    if (folder / "adapter_config.json").is_file() and (list(configs) or merge_tuning is not None):
        raise ConvertError(f"{folder}: configs and merge_tuning apply to LLaMA2-Accessory "
                           "checkpoints; this is a PEFT adapter folder")
    src, outtype = check_inputs(src_dir, outtype)
    shape = base_of(base)
    alpha, planned = plan_adapter(src, shape)
    md: dict[str, Any] = {"general.architecture": shape.arch, KEY_TYPE: "adapter",
                          "general.name": src.name, KEY_ADAPTER_TYPE: "lora",
                          KEY_ALPHA: float(alpha)}
    return write_gguf(Path(out_path), md, planned, outtype, progress)


__all__ = ["BaseShape", "base_of", "convert_lora", "plan_adapter"]
