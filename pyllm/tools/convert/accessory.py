"""LLaMA2-Accessory ``llama_peft`` checkpoints -> a GGUF LoRA adapter: ``convert_accessory_lora``.

Owns: reading the trained tensors of Accessory's parameter-efficient fine-tunes
(``consolidated.NN-of-MM.model.pth`` shards, ``{"model": {key: tensor}}``, keys ``llma.``...),
re-assembling their model-parallel slices, checking them against the base GGUF (and against the
``params.json`` / PEFT configs when given), and writing them in pyllm's adapter layout (see
:mod:`pyllm.formats.lora`):

    layers.N.<matrix>.lora_a/lora_b.weight   -> blk.N.<gguf matrix>.weight.lora_a / .lora_b
    layers.N.<matrix>.bias                   -> blk.N.<gguf matrix>.bias.delta
    layers.N.attention_norm / ffn_norm, norm -> blk.N.attn_norm / ffn_norm, output_norm .delta

Accessory's forward is ``W x + bias + lora_b(lora_a(x))``: no alpha/rank factor, so the file's
alpha is the rank (a pair of another rank gets ``rank / alpha`` folded into its B). Biases and
norms are saved as their tuned values; the delta stored is tuned minus the base's value (read
from the base GGUF, zero for a bias the base lacks), and an all-zero delta is left out.
Meta's q/k row order is the GGUF order (see :mod:`pyllm.tools.convert.meta`): nothing is
permuted. Frozen base weights that older checkpoints also hold are ignored.

Model-parallel slices (fairscale's layers in Accessory's ``peft.py``): the column-parallel
wq wk wv w1 w3 split their lora_b and bias by rows and replicate lora_a; the row-parallel wo w2
split their lora_a by columns and replicate lora_b and bias; norms are replicated.
Replicated tensors are checked equal in every shard.

With ``merge_tuning`` the bias/norm deltas are baked into a copy of the base instead (through
:func:`pyllm.tools.export_lora.export_lora`) and the adapter holds only the LoRA pairs: the two
files llama.cpp can run, since it has no place for the deltas.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.atomic import check_destination, temp_name
from pyllm.errors import ConvertError, GGUFError, ModelError
from pyllm.formats.lora import ADAPTABLE, KEY_ADAPTER_TYPE, KEY_ALPHA, KEY_TYPE, SUFFIX_DELTA
from pyllm.tools.convert.hf import PlannedTensor, check_inputs, write_gguf
from pyllm.tools.convert.lora import BaseShape, base_of
from pyllm.tools.convert.meta import (
    _BLOCK,
    _BLOCK_RE,
    _GLOBAL,
    _IGNORED,
    _ROW_PARALLEL,
    MetaCheckpoint,
    _merge_axis,
    _meta_name,
    shard_files,
)
from pyllm.tools.convert.overrides import ConfigSource, merge_configs

log = logging.getLogger("pyllm.tools.convert")

# "<module>.lora_a.weight" within a block ("attention.wq", "feed_forward.w2", ...)
_LORA_RE = re.compile(r"(?P<module>.+)\.lora_(?P<half>[ab])\.weight")
# the order tensors are written in, within a block (then the output norm)
_ORDER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
          "ffn_up", "ffn_down")


def _split_axis(key: str, shapes: list[tuple[int, ...]]) -> int | None:
    """The axis the model-parallel slices of ``key`` are joined on; None: replicated (the
    split of :class:`~pyllm.tools.convert.meta.MetaCheckpoint` for an adapter's tensors)."""
    name = _meta_name(key)
    m = _BLOCK_RE.fullmatch(name)
    lora = _LORA_RE.fullmatch(m.group(2)) if m is not None else None
    if lora is None:  # biases and norms split as in a full Meta checkpoint (the embedding
        return _merge_axis(name, shapes, 0)  # width, 0 here, only matters for tok_embeddings
    row_parallel = lora["module"] + ".weight" in _ROW_PARALLEL
    if lora["half"] == "a":  # a plain Linear in column-parallel layers, row-split in row ones
        return 1 if row_parallel else None
    return None if row_parallel else 0


@dataclass
class _Trained:
    """A checkpoint's keys by what they are, under their GGUF target names."""

    halves: dict[str, dict[str, str]] = field(default_factory=dict)  # matrix -> {a|b: key}
    values: dict[str, str] = field(default_factory=dict)  # bias / norm -> key (tuned value)
    ignored: list[str] = field(default_factory=list)  # frozen base weights

    def bias_keys(self) -> list[str]:
        return [k for g, k in sorted(self.values.items()) if g.endswith(".bias")]


def _classify(keys: Iterable[str], n_layer: int) -> _Trained:
    out = _Trained()
    for key in sorted(keys):
        name = _meta_name(key)
        if _IGNORED.fullmatch(name):
            continue  # RoPE buffers: no weights at all
        m = _BLOCK_RE.fullmatch(name)
        if m is None:
            if name not in _GLOBAL:
                raise ConvertError(f"unexpected tensor {key!r} in a LLaMA2-Accessory llama_peft "
                                   "checkpoint")
            if name == "norm.weight":
                out.values[_GLOBAL[name]] = key
            else:
                out.ignored.append(key)  # the embeddings and the output matrix
            continue
        bid, rest = int(m.group(1)), m.group(2)
        lora = _LORA_RE.fullmatch(rest)
        gguf = _BLOCK.get(lora["module"] + ".weight" if lora else rest)
        if gguf is None or (lora and gguf.split(".")[0] not in ADAPTABLE):
            raise ConvertError(f"unexpected tensor {key!r} in a LLaMA2-Accessory llama_peft "
                               "checkpoint")
        if bid >= n_layer:
            raise ConvertError(f"{key}: block {bid}, but the base model has {n_layer} blocks")
        target = f"blk.{bid}.{gguf}"
        if lora:
            out.halves.setdefault(target, {})[lora["half"]] = key
        elif gguf.endswith(".bias") or "norm" in gguf:
            out.values[target] = key
        else:
            out.ignored.append(key)
    return out


def _order(gguf: str) -> tuple[int, int, str]:
    """Blocks in order, each in llama.cpp's tensor order, the output norm last."""
    parts = gguf.split(".")
    if parts[0] != "blk":
        return (1 << 30, 0, gguf)
    return (int(parts[1]), _ORDER.index(parts[2]), gguf)


@dataclass(frozen=True)
class _Base:
    """The base GGUF as far as the conversion needs it."""

    path: Path
    shape: BaseShape
    n_layer: int
    n_embd: int


def _open_base(path: str | os.PathLike[str]) -> _Base:
    p = Path(path)
    if p.is_dir():
        raise ConvertError(f"base model {p} is a folder: a LLaMA2-Accessory checkpoint needs the "
                           "base as a GGUF file (its norm deltas are taken against its norms)")
    try:
        shape = base_of(p)
        from pyllm.formats.gguf.split import open_gguf

        with open_gguf(p) as reader:
            n_layer = reader.get(f"{shape.arch}.block_count")
            n_embd = reader.get(f"{shape.arch}.embedding_length")
    except GGUFError as e:
        raise ConvertError(f"base model {p} is not a readable GGUF file: {e}") from None
    if shape.arch != "llama":
        raise ConvertError(f"base model {p.name} is a {shape.arch!r} model; LLaMA2-Accessory "
                           "llama_peft checkpoints adapt 'llama' ones")
    for key, value in (("block_count", n_layer), ("embedding_length", n_embd)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"base model {p.name}: no llama.{key}")
    return _Base(p, shape, n_layer, n_embd)


def _base_values(base: _Base, names: Iterable[str]) -> dict[str, np.ndarray]:
    """float64 copies of the base tensors ``names`` that the base has."""
    from pyllm.formats import qtypes
    from pyllm.formats.gguf.split import open_gguf

    out: dict[str, np.ndarray] = {}
    with open_gguf(base.path) as reader:
        for name in names:
            if reader.has_tensor(name):
                t = reader.tensor(name)
                out[name] = np.asarray(qtypes.dequantize(t.type, t.raw, t.shape), np.float64)
    return out


def _require_tuning(trained: _Trained, src: Path) -> None:
    """A checkpoint with nothing a llama_peft run trains is a mistake, not an empty adapter."""
    if trained.halves or trained.bias_keys():
        return
    if trained.ignored:
        raise ConvertError(f"{src}: no LoRA or bias tensors, but {len(trained.ignored)} full "
                           f"weights ({trained.ignored[0]}, ...): a full fine-tune? convert it "
                           "as a model with pyllm convert")
    if not trained.values:
        raise ConvertError(f"{src}: the checkpoint holds no LoRA, bias or norm tensors")


def _int_key(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"config {key} must be an integer, got {value!r}")
    return value


def _check_config(cfg: Mapping[str, Any], trained: _Trained, shards: MetaCheckpoint,
                  base: _Base) -> None:
    """The checkpoint is what the (merged) params.json and PEFT configs say it is."""
    for key, have in (("n_layers", base.n_layer), ("dim", base.n_embd),
                      ("n_heads", base.shape.n_head), ("n_kv_heads", base.shape.n_head_kv)):
        want = _int_key(cfg, key)
        if want is not None and want != have:
            raise ConvertError(f"config {key} is {want}, the base model {base.path.name} has "
                               f"{have}")
    rank = _int_key(cfg, "lora_rank")
    lora_keys = sorted(k for half in trained.halves.values() for k in half.values())
    if rank is not None and rank <= 0 and lora_keys:
        raise ConvertError(f"config lora_rank is {rank} (no LoRA), but the checkpoint holds "
                           f"{lora_keys[0]}")
    if rank is not None and rank > 0:
        if not lora_keys:
            raise ConvertError(f"config lora_rank is {rank}, but the checkpoint holds no LoRA "
                               "tensors")
        for key in (k for k in lora_keys if k.endswith(".lora_a.weight")):
            got = shards.shape(key)[0]
            if got != rank:
                raise ConvertError(f"{key}: rank {got}, but config lora_rank is {rank}")
    bias = cfg.get("bias_tuning")
    if bias is not None and not isinstance(bias, bool):
        raise ConvertError(f"config bias_tuning must be true or false, got {bias!r}")
    if bias is False and trained.bias_keys():
        raise ConvertError(f"config bias_tuning is false, but the checkpoint holds "
                           f"{trained.bias_keys()[0]}")


def _check_pair(target: str, half: dict[str, str], shards: MetaCheckpoint,
                base: _Base) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one pair's A and B, checked against each other and the base matrix."""
    if set(half) != {"a", "b"}:
        have, miss = ("a", "b") if "a" in half else ("b", "a")
        raise ConvertError(f"{half[have]}: its lora_{miss} is missing (a LoRA needs both)")
    module = half["a"].removesuffix(".lora_a.weight")
    a, b = shards.shape(half["a"]), shards.shape(half["b"])
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] == 0:
        raise ConvertError(f"{module}: lora_a {list(a)} and lora_b {list(b)} do not make a "
                           "low-rank product")
    want = base.shape.shapes.get(target)
    if want is None:
        raise ConvertError(f"{module}: the base model has no tensor {target}")
    if tuple(want) != (b[0], a[1]):
        raise ConvertError(f"{module}: {target} is {list(want)} in the base model, the "
                           f"checkpoint's B @ A is {[b[0], a[1]]}: a checkpoint for another "
                           "model?")
    return a, b


def _plan_pairs(trained: _Trained, shards: MetaCheckpoint, base: _Base
                ) -> tuple[float, list[PlannedTensor]]:
    """The file's alpha and the lora_a / lora_b tensors (loaded when written)."""
    shapes = {t: _check_pair(t, h, shards, base) for t, h in trained.halves.items()}
    if not shapes:
        return 1.0, []  # bias/norm tuning only; the file still needs a positive alpha
    # the most common rank: those pairs are written as they are, the others folded
    alpha = Counter(a[0] for a, _ in shapes.values()).most_common(1)[0][0]
    planned: list[PlannedTensor] = []
    for target in sorted(shapes, key=_order):
        (a_shape, b_shape), half = shapes[target], trained.halves[target]
        fold = np.float32(a_shape[0] / alpha)  # alpha / rank * (rank / alpha) B @ A == B @ A

        def load_b(key: str = half["b"], fold: np.float32 = fold) -> np.ndarray:
            b = shards.load(key)
            return b if fold == 1 else b * fold

        planned.append(PlannedTensor(target + ".lora_a", a_shape,
                                     lambda key=half["a"]: shards.load(key)))
        planned.append(PlannedTensor(target + ".lora_b", b_shape, load_b))
    return float(alpha), planned


def _delta_shape(target: str, key: str, base: _Base) -> tuple[int, ...]:
    """What the base says ``target`` (a bias or norm) is; a bias it lacks has its matrix's
    rows."""
    shapes = base.shape.shapes
    if target in shapes:
        return tuple(shapes[target])
    matrix = target.removesuffix(".bias") + ".weight"
    if target.endswith(".bias") and matrix in shapes:
        return (shapes[matrix][0],)
    raise ConvertError(f"{key}: the base model has no tensor {target}")


def _plan_deltas(trained: _Trained, shards: MetaCheckpoint, base: _Base) -> list[PlannedTensor]:
    """The bias/norm deltas (tuned - base), computed now: they are small, and a zero one is
    left out."""
    for target, key in trained.values.items():
        want, got = _delta_shape(target, key, base), shards.shape(key)
        if got != want:
            raise ConvertError(f"{key}: shape {list(got)}, the base model's {target} is "
                               f"{list(want)}")
    base_values = _base_values(base, trained.values)
    planned: list[PlannedTensor] = []
    for target in sorted(trained.values, key=_order):
        key = trained.values[target]
        tuned = shards.load(key).astype(np.float64)
        if not np.all(np.isfinite(tuned)):
            raise ConvertError(f"{key}: holds NaN or infinite values")
        delta = (tuned - base_values.get(target, 0.0)).astype(np.float32)
        if not delta.any():
            continue  # unchanged (a norm that was not trained, a bias still at zero)
        planned.append(PlannedTensor(target + SUFFIX_DELTA, delta.shape, lambda d=delta: d))
    return planned


def _merge_into_base(base: _Base, md: Mapping[str, Any], deltas: list[PlannedTensor],
                     merged: Path) -> None:
    """Write ``merged``: the base with the deltas added (export_lora of a deltas-only
    adapter, written next to it and removed afterwards)."""
    tmp = merged.parent / temp_name(merged)  # a pyllm temp name: swept if we are SIGKILLed
    try:
        write_gguf(tmp, md, deltas, "f32", False)
        from pyllm.tools.export_lora import export_lora

        try:
            export_lora(base.path, [tmp], merged)
        except ModelError as e:
            raise ConvertError(f"merging the bias/norm tuning into {merged}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def convert_accessory_lora(
    src_dir: str | os.PathLike[str],
    base_gguf: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    configs: Iterable[ConfigSource] = (),
    merge_tuning: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Convert a LLaMA2-Accessory llama_peft checkpoint folder for ``base_gguf`` to a GGUF
    adapter at ``out_path``: the LoRA pairs in ``outtype`` (f32, f16, bf16 or q8_0, as
    :func:`pyllm.tools.convert.lora.convert_lora`) and the bias/norm tuning as F32 ``.delta``
    tensors; with ``merge_tuning``, that tuning is baked into a copy of the base written there
    instead. ``configs``: ``params.json`` and PEFT configs (files or mappings, merged in order)
    the checkpoint is checked against. Everything is checked before anything is written; each
    file appears whole or not at all. Returns the adapter's path."""
    src, outtype = check_inputs(src_dir, outtype)
    out = Path(out_path)
    base = _open_base(base_gguf)
    merged = None if merge_tuning is None else Path(merge_tuning)
    # before reading the shards, not after
    check_destination(out, sources=[base.path], error=ConvertError)
    if merged is not None:
        check_destination(merged, sources=[base.path, out], error=ConvertError)
    cfg = merge_configs(configs)
    # every replica is checked: an adapter's are small, and it catches shards of different
    # runs and slices saved on the wrong axis
    shards = MetaCheckpoint(shard_files(src), 0, split_axis=_split_axis, check_replicas=True)
    trained = _classify(shards.names(), base.n_layer)
    _require_tuning(trained, src)
    if trained.ignored:
        log.info("%s: ignored %d frozen base weights", src.name, len(trained.ignored))
    _check_config(cfg, trained, shards, base)
    alpha, pairs = _plan_pairs(trained, shards, base)
    deltas = _plan_deltas(trained, shards, base)
    md: dict[str, Any] = {"general.architecture": base.shape.arch, KEY_TYPE: "adapter",
                          "general.name": src.name, KEY_ADAPTER_TYPE: "lora", KEY_ALPHA: alpha}
    if merged is None:
        return write_gguf(out, md, pairs + deltas, outtype, progress)
    if not pairs:
        raise ConvertError(f"{src}: no LoRA pairs to write beside the merged base; convert "
                           "without merge_tuning (a deltas-only adapter) and merge that with "
                           "export-lora")
    if not deltas:
        raise ConvertError(f"{src}: merge_tuning: the checkpoint's biases and norms equal the "
                           "base's, there is nothing to merge")
    _merge_into_base(base, md, deltas, merged)
    return _write_or_remove(out, md, pairs, outtype, progress, merged)


def _write_or_remove(out: Path, md: Mapping[str, Any], pairs: list[PlannedTensor],
                     outtype: str, progress: bool, merged: Path) -> Path:
    """The adapter beside a merged base: the two are one result, so if the adapter cannot be
    written the merged base is removed rather than left without its pairs."""
    try:
        return write_gguf(out, md, pairs, outtype, progress)
    except BaseException:
        merged.unlink(missing_ok=True)
        raise


__all__ = ["convert_accessory_lora"]
