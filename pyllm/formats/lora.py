"""LoRA adapters as GGUF files, in llama.cpp's layout, read and checked against a base model.

An adapter file has ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha`` (float) and ``general.architecture`` (the base's). For each adapted base
matrix ``W`` (GGUF name ``blk.N.attn_q.weight`` ...) it holds ``<name>.lora_a`` (numpy shape
``(rank, n_in)``) and ``<name>.lora_b`` (``(n_out, rank)``): the adapted matrix is
``W + scale * (alpha / rank) * B @ A``, ``scale`` being the user's (1.0 by default).

pyllm also writes (and applies) what LLaMA2-Accessory's bias and norm tuning trains, which
llama.cpp's format has no place for: ``<name>.delta`` tensors added to a base bias or norm weight
(``blk.N.attn_q.bias``, ``blk.N.attn_norm.weight``), or a bias the base lacks. llama.cpp skips
tensors it does not know, so such a file still loads there (without those deltas).

Everything here is checked before anything is used: the metadata keys, each pair's presence and
shapes, the rank's agreement within a pair, and (:func:`check_against`) the names and shapes
against a base model, so an adapter for another model is a :class:`~pyllm.errors.ModelError`
naming the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyllm.errors import GGUFError, ModelError
from pyllm.formats.gguf import GGMLType, GGUFReader

KEY_TYPE = "general.type"
KEY_ADAPTER_TYPE = "adapter.type"
KEY_ALPHA = "adapter.lora.alpha"
SUFFIX_A, SUFFIX_B, SUFFIX_DELTA = ".lora_a", ".lora_b", ".delta"

# The base tensors a LoRA may adapt: the seven matrices of a block (what PEFT targets).
# Embeddings and the output matrix are not low-rank-adapted at run time (PEFT trains those as
# full copies, ``modules_to_save``, which is a different model, not an adapter).
ADAPTABLE = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass
class LoraPair:
    """One adapted matrix: ``a`` (rank, n_in) and ``b`` (n_out, rank), float32 copies; how the
    file stores them, so that the run time keeps them so: ``a_half`` / ``b_half`` F16 (float16
    holds them exactly), ``a_q8``: A's Q8_0 rows as in the file (uint8, rank x row bytes)."""

    a: np.ndarray
    b: np.ndarray
    a_half: bool = False
    b_half: bool = False
    a_q8: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, factor: float) -> np.ndarray:
        """``factor * B @ A`` (n_out, n_in) in float32 (computed in float64)."""
        return (factor * (self.b.astype(np.float64) @ self.a.astype(np.float64))).astype(
            np.float32)


@dataclass
class LoraAdapter:
    """An adapter file's contents: its alpha, architecture, low-rank pairs by base tensor name,
    and pyllm's bias/norm deltas by base tensor name."""

    path: Path
    arch: str
    alpha: float
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    deltas: dict[str, np.ndarray] = field(default_factory=dict)

    def factor(self, name: str, scale: float = 1.0) -> float:
        """What ``B @ A`` of ``name`` is multiplied by: scale * alpha / rank."""
        return float(scale) * self.alpha / self.pairs[name].rank


AdapterSpec = str | os.PathLike[str] | tuple[str | os.PathLike[str], float]


def adapter_specs(adapters: Sequence[AdapterSpec]) -> list[tuple[Path, float]]:
    """``["a.gguf", ("b.gguf", 0.5)]`` -> [(path, scale)], checked."""
    out: list[tuple[Path, float]] = []
    for spec in adapters:
        path, scale = (spec if isinstance(spec, tuple) else (spec, 1.0))
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or \
                not np.isfinite(scale):
            raise ModelError(f"the scale of LoRA adapter {path} must be a finite number, "
                             f"got {scale!r}")
        out.append((Path(path), float(scale)))
    return out


def _float(t_data: np.ndarray, ttype: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    from pyllm.formats import qtypes

    try:
        return np.ascontiguousarray(qtypes.dequantize(ttype, t_data, shape), dtype=np.float32)
    except Exception as e:  # a type or size the dequantizer refuses: name the tensor
        raise GGUFError(f"adapter tensor {name}: {e}") from None


def read_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read and check a LoRA adapter GGUF (see the module doc); float32 copies of its tensors."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"LoRA adapter {p} does not exist" if not p.exists() else
                         f"LoRA adapter {p} is not a file")
    with GGUFReader(p) as reader:
        md = reader.metadata
        where = f"LoRA adapter {p.name}"
        if md.get(KEY_TYPE) != "adapter":
            raise ModelError(f"{where} is not an adapter file ({KEY_TYPE} is "
                             f"{md.get(KEY_TYPE)!r}, expected 'adapter'): a model, not a LoRA?")
        if md.get(KEY_ADAPTER_TYPE) != "lora":
            raise ModelError(f"{where}: {KEY_ADAPTER_TYPE} is {md.get(KEY_ADAPTER_TYPE)!r}; "
                             "only 'lora' adapters are supported")
        alpha = md.get(KEY_ALPHA)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not \
                np.isfinite(alpha) or alpha <= 0:
            raise ModelError(f"{where} lacks a positive {KEY_ALPHA} (got {alpha!r})")
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise ModelError(f"{where} has no general.architecture")
        halves: dict[str, dict[str, np.ndarray]] = {}
        f16: set[str] = set()  # tensors stored as F16
        q8: dict[str, np.ndarray] = {}  # Q8_0 tensors' rows as stored
        deltas: dict[str, np.ndarray] = {}
        for t in reader:
            data = _float(t.raw, t.type, t.shape, t.name)
            if t.type == GGMLType.F16:
                f16.add(t.name)
            elif t.type == GGMLType.Q8_0 and len(t.shape) == 2:
                q8[t.name] = np.array(t.data)
            for suffix in (SUFFIX_A, SUFFIX_B):
                if t.name.endswith(suffix):
                    halves.setdefault(t.name[: -len(suffix)], {})[suffix] = data
                    break
            else:
                if not t.name.endswith(SUFFIX_DELTA):
                    raise ModelError(f"{where}: unexpected tensor {t.name} (an adapter holds "
                                     f"<name>{SUFFIX_A} / {SUFFIX_B} pairs)")
                deltas[t.name[: -len(SUFFIX_DELTA)]] = data
    pairs: dict[str, LoraPair] = {}
    for name, half in sorted(halves.items()):
        if set(half) != {SUFFIX_A, SUFFIX_B}:
            missing = SUFFIX_B if SUFFIX_A in half else SUFFIX_A
            raise ModelError(f"{where}: {name}{missing} is missing (its pair is there)")
        a, b = half[SUFFIX_A], half[SUFFIX_B]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ModelError(f"{where}: {name} has lora_a {list(a.shape)} and lora_b "
                             f"{list(b.shape)}; expected (rank, n_in) and (n_out, rank)")
        pairs[name] = LoraPair(a, b, name + SUFFIX_A in f16, name + SUFFIX_B in f16,
                               q8.get(name + SUFFIX_A))
    if not pairs and not deltas:
        raise ModelError(f"{where} holds no LoRA tensors")
    return LoraAdapter(p, arch, float(alpha), pairs, deltas)


def check_against(adapter: LoraAdapter, arch: str,
                  base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """An adapter made for this base: same architecture, every adapted tensor one of the seven
    block matrices with the base's shape, every delta a bias or norm of the base's size (or a
    bias the base lacks, of its matrix's row count). ``base_shapes``: GGUF name -> numpy shape."""
    where = f"LoRA adapter {adapter.path.name}"
    if adapter.arch != arch:
        raise ModelError(f"{where} is for architecture {adapter.arch!r}, the model is {arch!r}")
    for name, pair in adapter.pairs.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in ADAPTABLE or \
                parts[3] != "weight":
            raise ModelError(f"{where}: {name} cannot be adapted at run time (only the seven "
                             f"block matrices {', '.join(ADAPTABLE)} can)")
        if name not in base_shapes:
            raise ModelError(f"{where}: the model has no tensor {name}")
        n_out, n_in = base_shapes[name]
        if pair.a.shape[1] != n_in or pair.b.shape[0] != n_out:
            raise ModelError(f"{where}: {name} is {n_out} x {n_in} in the model, the adapter's "
                             f"B @ A is {pair.b.shape[0]} x {pair.a.shape[1]}")
    for name, delta in adapter.deltas.items():
        if name in base_shapes:
            if tuple(base_shapes[name]) != delta.shape:
                raise ModelError(f"{where}: {name} is {list(base_shapes[name])} in the model, "
                                 f"its delta {list(delta.shape)}")
            continue
        matrix = name.removesuffix(".bias") + ".weight"
        if not name.endswith(".bias") or matrix not in base_shapes or \
                delta.shape != (base_shapes[matrix][0],):
            raise ModelError(f"{where}: the model has no tensor {name} for its delta")


__all__ = ["ADAPTABLE", "KEY_ADAPTER_TYPE", "KEY_ALPHA", "KEY_TYPE", "AdapterSpec", "LoraAdapter",
           "LoraPair", "adapter_specs", "check_against", "read_adapter"]
