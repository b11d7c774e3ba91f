"""Meta (model-parallel ``consolidated.NN.pth``) checkpoints -> GGUF: ``convert_meta``.

Owns: reading ``params.json`` (merged with extra JSON configs, later keys winning) into the
same validated hyper-parameters the HF converter uses, finding the shards (Meta's
``consolidated.00.pth`` and LLaMA2-Accessory's ``consolidated.00-of-02.model.pth``), and
re-assembling each tensor from its model-parallel slices:

    tok_embeddings            ParallelEmbedding splits the embedding dim (Llama 1/2): axis 1;
                              Llama 3's VocabParallelEmbedding splits the vocabulary: axis 0
                              (told apart by the slice shapes)
    wq wk wv w1 w3 output     ColumnParallelLinear: output rows split -> axis 0 (biases too)
    wo w2                     RowParallelLinear: input columns split -> axis 1 (bias replicated)
    norms                     replicated: shard 0

Meta's attention applies RoPE to adjacent pairs (2i, 2i+1) of each head, viewed as complex
numbers -- exactly llama.cpp's "normal" RoPE for the llama architecture -- so, unlike HF
checkpoints, q/k rows are written as they are (no permutation).

Shards are opened with ``torch.load(weights_only=True, mmap=True)`` (see
:mod:`pyllm.tools.convert.checkpoint`, which refuses pickles that reach for anything but tensors);
only one merged tensor is in memory at a time and the file appears atomically.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.errors import ConvertError, TokenizerError
from pyllm.tools.convert.checkpoint import TorchBinShard
from pyllm.tools.convert.hf import (
    HFConfig,
    PlannedTensor,
    _expected_shapes,
    check_inputs,
    model_metadata,
    pad_vocab,
    rope_metadata,
    write_gguf,
)
from pyllm.tools.convert.overrides import ConfigSource, fastllm_metadata, merge_configs, read_config

log = logging.getLogger("pyllm.tools.convert")

_SHARD_RE = re.compile(r"consolidated\.(\d+)(?:-of-(\d+))?(?:\.model)?\.pth")

# Meta name (after an optional "llma." prefix, LLaMA2-Accessory's module name) -> GGUF name.
_GLOBAL = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_BLOCK_RE = re.compile(r"layers\.(\d+)\.(.+)")
_BLOCK = {
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wq.bias": "attn_q.bias",
    "attention.wk.weight": "attn_k.weight", "attention.wk.bias": "attn_k.bias",
    "attention.wv.weight": "attn_v.weight", "attention.wv.bias": "attn_v.bias",
    "attention.wo.weight": "attn_output.weight", "attention.wo.bias": "attn_output.bias",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w1.bias": "ffn_gate.bias",
    "feed_forward.w3.weight": "ffn_up.weight", "feed_forward.w3.bias": "ffn_up.bias",
    "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w2.bias": "ffn_down.bias",
}
_IGNORED = re.compile(r"rope\.freqs|.*\.inner_attention\.rope\.freqs")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")  # input dim split
_REPLICATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight",
               "attention.wo.bias", "feed_forward.w2.bias")


def feed_forward_length(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, optionally scaled, rounded up to a
    multiple of ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_config(params: Mapping[str, Any]) -> HFConfig:
    """Validated hyper-parameters from a (merged) ``params.json``."""

    def need_int(key: str, default: int | None = None) -> int:
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConvertError(f"params.json: {key} must be a positive integer, got {value!r}")
        return value

    def number(key: str, default: float | None) -> float | None:
        value = params.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConvertError(f"params.json: {key} must be a positive number, got {value!r}")
        return float(value)

    dim = need_int("dim")
    n_head = need_int("n_heads")
    n_head_kv = need_int("n_kv_heads", n_head) if params.get("n_kv_heads") is not None \
        else n_head
    if dim % n_head:
        raise ConvertError(f"params.json: dim {dim} is not a multiple of {n_head} heads")
    if n_head % n_head_kv:
        raise ConvertError(f"params.json: n_heads {n_head} is not a multiple of n_kv_heads "
                           f"{n_head_kv}")
    head_dim = dim // n_head
    if head_dim % 2:
        raise ConvertError(f"head dim {head_dim} must be even for RoPE")
    if "n_ff" in params or "hidden_dim" in params:  # some exports state it outright
        n_ff = need_int("n_ff" if "n_ff" in params else "hidden_dim")
    else:
        n_ff = feed_forward_length(dim, need_int("multiple_of", 256),
                                   number("ffn_dim_multiplier", None))
    eps = number("norm_eps", 1e-5)
    assert eps is not None
    theta = number("rope_theta", 10000.0)
    assert theta is not None
    if theta <= 1:
        raise ConvertError(f"params.json: rope_theta must be > 1, got {theta}")
    # Meta's params.json carries no context length; Llama 2 (norm_eps 1e-5) was trained on
    # 4096 tokens, Llama 1 (1e-6) on 2048. LLaMA2-Accessory states max_seq_len.
    n_ctx = need_int("max_seq_len", 4096 if eps == 1e-5 else 2048)

    rope = dict(params.get("rope_scaling") or {})
    if params.get("use_scaled_rope"):  # Llama 3.1's params.json: Meta's apply_scaling
        rope = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, **rope}
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    vocab = params.get("vocab_size")
    return HFConfig(
        arch="llama", hf_arch="meta", n_embd=dim, n_ff=n_ff, n_layer=need_int("n_layers"),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, rms_eps=eps, n_ctx=n_ctx,
        rope_theta=theta, rope=rope, tied=False,
        vocab_size=vocab if isinstance(vocab, int) and not isinstance(vocab, bool)
        and vocab > 0 else None,  # Llama 2's params.json says -1: the tokenizer decides
        raw=dict(params),
    )


def shard_files(src: Path) -> list[Path]:
    """The ``consolidated.*.pth`` shards of a folder, in model-parallel rank order."""
    found: list[tuple[int, Path]] = []
    totals: set[int] = set()
    for path in src.glob("consolidated.*.pth"):
        m = _SHARD_RE.fullmatch(path.name)
        if m is None:
            raise ConvertError(f"{path.name}: unexpected shard file name")
        found.append((int(m.group(1)), path))
        if m.group(2) is not None:
            totals.add(int(m.group(2)))
    if not found:
        raise ConvertError(f"{src}: no consolidated.*.pth checkpoint shards")
    found.sort()
    ranks = [r for r, _ in found]
    if ranks != list(range(len(found))) or (totals and totals != {len(found)}):
        raise ConvertError(f"{src}: shards {[p.name for _, p in found]} are not one complete "
                           "model-parallel set (consolidated.00 .. NN)")
    return [p for _, p in found]


def _meta_name(name: str) -> str:
    return name[len("llma."):] if name.startswith("llma.") else name


def _gguf_name(name: str, n_layer: int) -> str | None:
    if _IGNORED.fullmatch(name):
        return None
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLOCK_RE.fullmatch(name)
    if m is not None and m.group(2) in _BLOCK:
        bid = int(m.group(1))
        if bid >= n_layer:
            raise ConvertError(f"{name}: block {bid} but n_layers is {n_layer}")
        return f"blk.{bid}.{_BLOCK[m.group(2)]}"
    if "lora" in name:
        raise ConvertError(f"{name}: unmerged LoRA weights are not supported; merge them into "
                           "the base weights first")
    raise ConvertError(f"unexpected tensor {name!r} in a Meta llama checkpoint")


def _merge_axis(name: str, shapes: list[tuple[int, ...]], dim: int) -> int | None:
    """The axis the model-parallel slices of ``name`` are concatenated on; None = replicated."""
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    if len(shapes) == 1 or leaf in _REPLICATED:
        return None
    if leaf in _ROW_PARALLEL:
        return 1
    if leaf == "tok_embeddings.weight":
        # Llama 1/2 split the embedding dim, Llama 3 the vocabulary: full-width slices mean
        # the rows were split.
        return 0 if shapes[0][-1] == dim else 1
    return 0  # column-parallel: wq wk wv w1 w3 output and their biases


class MetaCheckpoint:
    """All shards behind one name -> merged-tensor interface (nothing read until ``load``).
    ``split_axis(name, slice shapes)`` says how a tensor's slices join (None: replicated; the
    model's by default); replicated 1-D tensors are checked equal in every shard, or all of
    them with ``check_replicas``."""

    def __init__(self, files: list[Path], dim: int,
                 split_axis: Callable[[str, list[tuple[int, ...]]], int | None] | None = None,
                 check_replicas: bool = False) -> None:
        self.files = files
        self.shards = [TorchBinShard(p) for p in files]
        self._dim = dim
        self._split_axis = split_axis
        self._check_replicas = check_replicas
        self._keys = {_meta_name(n): n for n in self.shards[0].names()}
        for shard in self.shards[1:]:
            if {_meta_name(n) for n in shard.names()} != set(self._keys):
                raise ConvertError(f"{shard.path.name} holds other tensors than "
                                   f"{self.shards[0].path.name}")

    def names(self) -> list[str]:
        return list(self._keys)

    def _slices(self, name: str) -> list[tuple[int, ...]]:
        return [s.shape(self._keys[name]) for s in self.shards]

    def _axis(self, name: str, shapes: list[tuple[int, ...]]) -> int | None:
        if len(shapes) == 1:
            return None
        if self._split_axis is not None:
            return self._split_axis(name, shapes)
        return _merge_axis(name, shapes, self._dim)

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = self._slices(name)
        axis = self._axis(name, shapes)
        if axis is None:
            if any(s != shapes[0] for s in shapes):
                raise ConvertError(f"{name}: replicated tensor has shapes {shapes} in the shards")
            return shapes[0]
        if any(len(s) <= axis or s[:axis] + s[axis + 1:] != shapes[0][:axis] + shapes[0][axis + 1:]
               for s in shapes):
            raise ConvertError(f"{name}: shard slices {shapes} do not join along axis {axis}")
        merged = list(shapes[0])
        merged[axis] = sum(s[axis] for s in shapes)
        return tuple(merged)

    def load(self, name: str) -> np.ndarray:
        """The whole tensor as float32: the slices are read one by one and joined."""
        key = self._keys[name]
        axis = self._axis(name, self._slices(name))
        if axis is None:
            first = self.shards[0].load(key)
            # 1-D replicas are tiny: check them, it catches shards of different models
            if (first.ndim == 1 or self._check_replicas) and any(
                    not np.array_equal(s.load(key), first) for s in self.shards[1:]):
                raise ConvertError(f"{name}: replicated tensor differs between shards")
            return first
        return np.concatenate([s.load(key) for s in self.shards], axis=axis)


def plan_meta_tensors(cfg: HFConfig, ckpt: MetaCheckpoint) -> list[PlannedTensor]:
    """Map, validate and order the GGUF tensors (llama.cpp's order: embeddings, blocks, output
    norm, output); nothing is loaded yet."""
    by_gguf: dict[str, str] = {}
    for name in ckpt.names():
        g = _gguf_name(name, cfg.n_layer)
        if g is not None:
            by_gguf[g] = name
    for meta_name, g in _GLOBAL.items():
        if g not in by_gguf:
            raise ConvertError(f"the checkpoint has no {meta_name} tensor")
    emb = ckpt.shape(by_gguf["token_embd.weight"])
    if len(emb) != 2:
        raise ConvertError(f"tok_embeddings has shape {list(emb)}")
    n_vocab = emb[0]
    expected = _expected_shapes(cfg, n_vocab)
    for g, name in by_gguf.items():
        got = ckpt.shape(name)
        if expected[g] != got:
            raise ConvertError(f"{name}: shape {list(got)}, expected {list(expected[g])} from "
                               "params.json")
    required = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                "ffn_down.weight")
    order = ["token_embd.weight"]
    for i in range(cfg.n_layer):
        missing = [r for r in required if f"blk.{i}.{r}" not in by_gguf]
        if missing:
            raise ConvertError(f"block {i} lacks {', '.join(missing)}")
        order += [g for g in expected if g.startswith(f"blk.{i}.") and g in by_gguf]
    order += ["output_norm.weight", "output.weight"]

    def loader(name: str) -> Callable[[], np.ndarray]:
        return lambda: ckpt.load(name)

    return [PlannedTensor(g, expected[g], loader(by_gguf[g])) for g in order]


def _find_tokenizer(src: Path) -> Path | None:
    # Meta's downloads keep tokenizer.model beside the model folders, one level up
    for folder in (src, src.parent):
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    return None


def convert_meta(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    configs: Iterable[ConfigSource] = (),
    extra_config: Mapping[str, Any] | None = None,
    name: str | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Convert a Meta/LLaMA2-Accessory llama folder (``params.json`` + ``consolidated.*.pth``)
    to one GGUF file.

    ``configs`` are JSON files (or mappings) merged over ``params.json`` in order, then
    ``extra_config``; later keys win. Besides ``params.json`` keys they may hold fastllm-style
    overrides (``rope_theta``, ``rope_scaling.type``/``.factor``, ``tokenizer_add_dummy_prefix``,
    ``bos_token_id``, ``pre_prompt``/``user_role``/``bot_role``/``history_sep``).
    The vocabulary comes from ``tokenizer_path`` or a ``tokenizer.model`` in the folder or its
    parent. ``outtype`` as for :func:`pyllm.tools.convert.convert_hf`. Returns the output path.

    Args:
        src_dir: The Meta folder.
        out_path: The GGUF file to write.
        outtype: The type of the matrices: ``f32``, ``f16``, ``bf16`` or ``q8_0``.
        configs: Config files or mappings, merged in order.
        extra_config: Keys merged last.
        name: The model name written to ``general.name`` (default: the folder's).
        tokenizer_path: The ``tokenizer.model`` (default: in the folder or its parent).
        progress: Show a progress bar on a terminal.

    Returns:
        The output path.
    """
    src, outtype = check_inputs(src_dir, outtype)
    if not (src / "params.json").is_file():
        raise ConvertError(f"{src}: no params.json (is this a Meta checkpoint folder?)")
    overrides = merge_configs([*configs, *([extra_config] if extra_config else [])])
    params = merge_configs([overrides], read_config(src / "params.json"))
    cfg = meta_config(params)

    ckpt = MetaCheckpoint(shard_files(src), cfg.n_embd)
    planned = plan_meta_tensors(cfg, ckpt)
    n_vocab = planned[0].shape[0]
    if cfg.vocab_size is not None and cfg.vocab_size != n_vocab:
        log.warning("params.json vocab_size %d != %d embedding rows; using the rows",
                    cfg.vocab_size, n_vocab)
    rope_md, rope_freqs = rope_metadata(cfg)
    if rope_freqs is not None:
        planned.insert(1, PlannedTensor("rope_freqs.weight", rope_freqs.shape,
                                        lambda: rope_freqs))
    md = model_metadata(cfg, n_vocab, name or src.name, outtype)
    md.update(rope_md)

    tok_path = Path(tokenizer_path) if tokenizer_path is not None else _find_tokenizer(src)
    if tok_path is not None:
        from pyllm.tools.convert.tokenizer_files import sentencepiece_metadata

        try:
            md.update(sentencepiece_metadata(tok_path))
        except TokenizerError as e:
            if _is_tiktoken(tok_path):
                raise ConvertError(f"{tok_path}: a tiktoken BPE vocabulary (Llama 3) is not "
                                   "supported here; convert the Hugging Face release of the "
                                   "model instead") from None
            raise ConvertError(f"tokenizer: {e}") from None
        pad_vocab(md, n_vocab)
    else:
        log.warning("no tokenizer.model: the GGUF has no vocabulary")
    md.update(fastllm_metadata(overrides, md))
    return write_gguf(Path(out_path), md, planned, outtype, progress)


def _is_tiktoken(path: Path) -> bool:
    """Llama 3's tokenizer.model: text lines of ``<base64 token> <rank>``."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(4096)
    except OSError:
        return False
    return re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", line) is not None


def is_meta_folder(src: Path) -> bool:
    return (src / "params.json").is_file() and any(src.glob("consolidated.*.pth"))
