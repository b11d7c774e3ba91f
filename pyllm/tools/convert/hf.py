"""Hugging Face folder -> GGUF: ``convert_hf(src_dir, out_path, outtype="f16")``.

Owns: reading ``config.json`` into GGUF hyper-parameter metadata (including every RoPE scaling
kind transformers writes, old ``rope_scaling`` and new ``rope_parameters`` spellings), planning
and validating the GGUF tensors against the config, the tokenizer metadata, and streaming the
tensors one at a time into :class:`pyllm.formats.gguf.GGUFWriter` (lazy sources), so the model is
never held twice in memory; the file appears atomically.

Weight files are read by :mod:`pyllm.tools.convert.checkpoint`; name mapping and per-tensor
transforms live in :mod:`pyllm.tools.convert.tensor_map`."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.errors import ConvertError, GGUFError
from pyllm.formats.gguf import GGMLType, GGUFWriter
from pyllm.tools.convert.checkpoint import Checkpoint
from pyllm.tools.convert.overrides import fastllm_metadata, merge_config
from pyllm.tools.convert.tensor_map import (
    HF_ARCHS,
    PERMUTED_QK_ARCHS,
    keeps_f32,
    map_name,
    permute_qk,
    split_internlm2_wqkv,
)

log = logging.getLogger("pyllm.tools.convert")

# general.file_type values (llama.cpp's llama_ftype)
FILE_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
OUT_GGML_TYPES: dict[str, GGMLType] = {
    "f32": GGMLType.F32,
    "f16": GGMLType.F16,
    "bf16": GGMLType.BF16,
    "q8_0": GGMLType.Q8_0,
}

_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "internlm2": "internlm2"}


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------


@dataclass
class HFConfig:
    """The hyper-parameters of an HF Llama-family config, validated."""

    arch: str  # GGUF architecture
    hf_arch: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    n_ctx: int
    rope_theta: float
    rope: dict[str, Any]  # normalised rope parameters; "rope_type" is always set
    tied: bool
    vocab_size: int | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> HFConfig:
        cfg = dict(cfg)
        archs = cfg.get("architectures") or []
        hf_arch = archs[0] if isinstance(archs, list) and archs else None
        if hf_arch in HF_ARCHS:
            arch = HF_ARCHS[hf_arch]
        elif hf_arch is None and cfg.get("model_type") in _MODEL_TYPES:
            arch = _MODEL_TYPES[cfg["model_type"]]
            hf_arch = str(cfg["model_type"])
        else:
            raise ConvertError(
                f"unsupported model {hf_arch or cfg.get('model_type')!r}; supported: "
                + ", ".join(sorted(HF_ARCHS))
            )

        def need_int(key: str, default: int | None = None) -> int:
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConvertError(f"config.json: {key} must be a positive integer, got {value!r}")
            return value

        def get_float(key: str, default: float) -> float:
            value = cfg.get(key, default)
            if value is None:
                value = default
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConvertError(f"config.json: {key} must be a number, got {value!r}")
            return float(value)

        act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise ConvertError(f"config.json: hidden_act {act!r} is not supported (only silu)")
        n_embd = need_int("hidden_size")
        n_head = need_int("num_attention_heads")
        n_head_kv = need_int("num_key_value_heads", n_head) if cfg.get(
            "num_key_value_heads") is not None else n_head
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if n_embd % n_head:
                raise ConvertError(f"hidden_size {n_embd} is not a multiple of {n_head} heads")
            head_dim = n_embd // n_head
        head_dim = need_int("head_dim", head_dim)
        if n_head % n_head_kv:
            raise ConvertError(f"num_attention_heads {n_head} is not a multiple of "
                               f"num_key_value_heads {n_head_kv}")
        if head_dim % 2:
            raise ConvertError(f"head_dim {head_dim} must be even for RoPE")
        if cfg.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
            raise ConvertError("partial_rotary_factor != 1 is not supported")
        window = cfg.get("sliding_window")
        uses_window = bool(cfg.get("use_sliding_window")) if arch == "qwen2" else (
            isinstance(window, int) and window < cfg.get("max_position_embeddings", 0))
        if uses_window:
            # GGUF llama/qwen2 have no sliding-window key; llama.cpp attends to everything too
            log.warning("config.json sets a %s-token sliding window; the GGUF model attends to "
                        "the full context, so outputs differ beyond the window", window)

        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise ConvertError("per-layer-type rope parameters are not supported")
        rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
            raise ConvertError(f"config.json: rope_theta must be a number > 1, got {theta!r}")
        vocab = cfg.get("vocab_size")
        return cls(
            arch=arch,
            hf_arch=str(hf_arch),
            n_embd=n_embd,
            n_ff=need_int("intermediate_size"),
            n_layer=need_int("num_hidden_layers"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            rms_eps=get_float("rms_norm_eps", 1e-6),
            n_ctx=need_int("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rope=rope,
            tied=bool(cfg.get("tie_word_embeddings", arch != "internlm2")),
            vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None,
            raw=cfg,
        )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_metadata(cfg: HFConfig) -> tuple[dict[str, Any], np.ndarray | None]:
    """GGUF ``{arch}.rope.*`` entries, and the ``rope_freqs.weight`` tensor for llama3 scaling."""
    a, rope = cfg.arch, cfg.rope
    kind = rope["rope_type"]
    md: dict[str, Any] = {
        f"{a}.rope.freq_base": cfg.rope_theta,
        f"{a}.rope.dimension_count": cfg.head_dim,
    }
    factor = rope.get("factor")

    def need_factor() -> float:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise ConvertError(f"rope scaling {kind!r} needs a positive factor, got {factor!r}")
        return float(factor)

    freqs = None
    if kind == "default":
        pass
    elif kind == "linear":
        md[f"{a}.rope.scaling.type"] = "linear"
        md[f"{a}.rope.scaling.factor"] = need_factor()
    elif kind == "dynamic":
        # transformers stretches the base once a sequence outgrows max_position_embeddings
        md[f"{a}.rope.scaling.type"] = "dynamic"
        md[f"{a}.rope.scaling.factor"] = need_factor()
        md[f"{a}.rope.scaling.original_context_length"] = cfg.n_ctx
    elif kind == "yarn":
        orig = int(rope.get("original_max_position_embeddings") or cfg.n_ctx)
        f = float(factor) if factor is not None else cfg.n_ctx / orig
        if f <= 0:
            raise ConvertError(f"yarn factor must be positive, got {f}")
        if rope.get("truncate", True) is False:
            raise ConvertError("yarn with truncate=false is not supported")
        # transformers multiplies cos/sin by attention_factor; GGUF stores a multiplier of
        # llama.cpp's own 1 + 0.1 ln(factor), so store the ratio.
        attn = rope.get("attention_factor")
        if attn is None:
            ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
            attn = (_yarn_mscale(f, ms) / _yarn_mscale(f, ms_all)) if ms and ms_all \
                else _yarn_mscale(f)
        md[f"{a}.rope.scaling.type"] = "yarn"
        md[f"{a}.rope.scaling.factor"] = f
        md[f"{a}.rope.scaling.original_context_length"] = orig
        md[f"{a}.rope.scaling.yarn_attn_factor"] = float(attn) / _yarn_mscale(f)
        md[f"{a}.rope.scaling.yarn_beta_fast"] = float(rope.get("beta_fast") or 32.0)
        md[f"{a}.rope.scaling.yarn_beta_slow"] = float(rope.get("beta_slow") or 1.0)
    elif kind == "llama3":
        freqs = llama3_rope_factors(
            cfg.rope_theta, cfg.head_dim, need_factor(),
            float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0)),
            int(rope.get("original_max_position_embeddings", 8192)),
        )
    else:
        raise ConvertError(f"rope scaling type {kind!r} is not supported")
    return md, freqs


def llama3_rope_factors(base: float, dim: int, factor: float, low_ff: float, high_ff: float,
                        old_ctx: int) -> np.ndarray:
    """Per-pair divisors of the RoPE frequency (Llama 3.1 scaling), as ``rope_freqs.weight``.

    Pairs whose wavelength is short next to the original context keep their speed (1), long
    ones are slowed by ``factor``, and those in between blend smoothly.
    """
    if high_ff <= low_ff:
        raise ConvertError("llama3 rope: high_freq_factor must exceed low_freq_factor")
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (dim/2,)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high_ff, 1.0,
                   np.where(wavelen > old_ctx / low_ff, factor, blended))
    return out.astype(np.float32)


def model_metadata(cfg: HFConfig, n_vocab: int, name: str, outtype: str) -> dict[str, Any]:
    a = cfg.arch
    md: dict[str, Any] = {
        "general.architecture": a,
        "general.name": name,
        "general.file_type": FILE_TYPES[outtype],
        "general.quantization_version": 2,
        f"{a}.vocab_size": n_vocab,
        f"{a}.context_length": cfg.n_ctx,
        f"{a}.embedding_length": cfg.n_embd,
        f"{a}.block_count": cfg.n_layer,
        f"{a}.feed_forward_length": cfg.n_ff,
        f"{a}.attention.head_count": cfg.n_head,
        f"{a}.attention.head_count_kv": cfg.n_head_kv,
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps,
        f"{a}.attention.key_length": cfg.head_dim,
        f"{a}.attention.value_length": cfg.head_dim,
    }
    return md


# ------------------------------------------------------------------------------------------------
# output encoding
# ------------------------------------------------------------------------------------------------


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even, NaNs kept quiet (as ggml does).

    Works in place on one uint32 temporary: this runs on whole embedding matrices."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    r = (u >> 16) & 1  # the lowest kept bit decides ties
    r += 0x7FFF
    r += u  # only wraps for NaN bit patterns, which are replaced below
    r >>= 16
    out = r.astype(np.uint16)
    del r
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return out



# ------------------------------------------------------------------------------------------------
# the conversion plan: GGUF tensors, each with a shape and a loader
# ------------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    load: Callable[[], np.ndarray]  # float32 in ``shape``


def _expected_shapes(cfg: HFConfig, n_vocab: int) -> dict[str, tuple[int, ...]]:
    D, F, hd = cfg.n_embd, cfg.n_ff, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_head_kv * hd
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (n_vocab, D),
        "output.weight": (n_vocab, D),
        "output_norm.weight": (D,),
    }
    per_block = {
        "attn_norm.weight": (D,), "ffn_norm.weight": (D,),
        "attn_q.weight": (q, D), "attn_q.bias": (q,),
        "attn_k.weight": (kv, D), "attn_k.bias": (kv,),
        "attn_v.weight": (kv, D), "attn_v.bias": (kv,),
        "attn_qkv.weight": (q + 2 * kv, D), "attn_qkv.bias": (q + 2 * kv,),
        "attn_output.weight": (D, q), "attn_output.bias": (D,),
        "ffn_gate.weight": (F, D), "ffn_gate.bias": (F,),
        "ffn_up.weight": (F, D), "ffn_up.bias": (F,),
        "ffn_down.weight": (D, F), "ffn_down.bias": (D,),
    }
    for i in range(cfg.n_layer):
        for k, v in per_block.items():
            shapes[f"blk.{i}.{k}"] = v
    return shapes


_REQUIRED_PER_BLOCK = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                       "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight",
                       "ffn_up.weight", "ffn_down.weight")


def plan_tensors(cfg: HFConfig, ckpt: Checkpoint) -> list[PlannedTensor]:
    """Map, validate and order every GGUF tensor; nothing is loaded yet."""
    by_gguf: dict[str, str] = {}
    for hf_name in ckpt.names():
        mapped = map_name(cfg.arch, hf_name)
        if mapped is None:
            continue
        if mapped.block is not None and mapped.block >= cfg.n_layer:
            raise ConvertError(f"{hf_name}: block {mapped.block} but num_hidden_layers is "
                               f"{cfg.n_layer}")
        if mapped.gguf in by_gguf:
            raise ConvertError(f"{hf_name} and {by_gguf[mapped.gguf]} both map to {mapped.gguf}")
        by_gguf[mapped.gguf] = hf_name
    if "token_embd.weight" not in by_gguf:
        raise ConvertError("the checkpoint has no token embeddings")
    emb_shape = ckpt.shape(by_gguf["token_embd.weight"])
    if len(emb_shape) != 2:
        raise ConvertError(f"token embeddings have shape {emb_shape}")
    n_vocab = emb_shape[0]
    if cfg.tied:
        by_gguf.pop("output.weight", None)  # tied: the GGUF reuses token_embd
    elif "output.weight" not in by_gguf:
        raise ConvertError("tie_word_embeddings is false but the checkpoint has no lm_head")

    expected = _expected_shapes(cfg, n_vocab)
    for g, hf_name in by_gguf.items():
        got = ckpt.shape(hf_name)
        if expected.get(g) != got:
            raise ConvertError(f"{hf_name}: shape {list(got)}, expected {list(expected[g])} "
                               "from config.json")

    planned: list[PlannedTensor] = []

    def add(name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray]) -> None:
        planned.append(PlannedTensor(name, shape, load))

    def plain(hf_name: str, n_head: int | None = None) -> Callable[[], np.ndarray]:
        if n_head is None:
            return lambda: ckpt.load(hf_name)
        return lambda: permute_qk(ckpt.load(hf_name), n_head)

    permute = cfg.arch in PERMUTED_QK_ARCHS
    add("token_embd.weight", expected["token_embd.weight"], plain(by_gguf["token_embd.weight"]))
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        split = _plan_internlm2_qkv(cfg, ckpt, by_gguf, b, expected, add) \
            if cfg.arch == "internlm2" else set()
        missing = [n for n in _REQUIRED_PER_BLOCK if b + n not in by_gguf and b + n not in split]
        if missing:
            raise ConvertError(f"block {i} lacks {', '.join(missing)}")
        for suffix in ("attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight",
                       "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight",
                       "attn_output.bias", "ffn_norm.weight", "ffn_gate.weight", "ffn_gate.bias",
                       "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias"):
            g = b + suffix
            if g not in by_gguf:
                continue
            heads = None
            if permute and suffix.startswith("attn_q."):
                heads = cfg.n_head
            elif permute and suffix.startswith("attn_k."):
                heads = cfg.n_head_kv
            add(g, expected[g], plain(by_gguf[g], heads))
    if "output_norm.weight" not in by_gguf:
        raise ConvertError("the checkpoint has no final norm")
    add("output_norm.weight", expected["output_norm.weight"], plain(by_gguf["output_norm.weight"]))
    if "output.weight" in by_gguf:
        add("output.weight", expected["output.weight"], plain(by_gguf["output.weight"]))
    return planned


def _plan_internlm2_qkv(cfg: HFConfig, ckpt: Checkpoint, by_gguf: dict[str, str], b: str,
                        expected: dict[str, tuple[int, ...]],
                        add: Callable[[str, tuple[int, ...], Callable[[], np.ndarray]], None],
                        ) -> set[str]:
    """Split the fused wqkv of one block into q/k/v (q and k permuted like llama); returns the
    names planned."""
    done: set[str] = set()
    for kind in ("weight", "bias"):
        fused = by_gguf.pop(f"{b}attn_qkv.{kind}", None)
        if fused is None:
            continue
        for idx, part in enumerate(("q", "k", "v")):
            def load(fused: str = fused, idx: int = idx) -> np.ndarray:
                parts = split_internlm2_wqkv(ckpt.load(fused), cfg.n_head, cfg.n_head_kv,
                                             cfg.head_dim)
                if idx == 0:
                    return permute_qk(parts[0], cfg.n_head)
                if idx == 1:
                    return permute_qk(parts[1], cfg.n_head_kv)
                return np.ascontiguousarray(parts[2])
            name = f"{b}attn_{part}.{kind}"
            add(name, expected[name], load)
            done.add(name)
    return done


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------


def pad_vocab(md: dict[str, Any], n_vocab: int) -> None:
    """Pad ``tokenizer.ggml.*`` in place to ``n_vocab`` entries with unused ``[PAD<i>]`` tokens
    (checkpoints often round the embedding rows up); more tokens than rows is an error."""
    from pyllm.tokenizer import TokenType

    tokens = list(md["tokenizer.ggml.tokens"])
    if len(tokens) > n_vocab:
        raise ConvertError(f"the tokenizer has {len(tokens)} tokens but the model only "
                           f"{n_vocab} embedding rows")
    if len(tokens) < n_vocab:
        n_pad = n_vocab - len(tokens)
        md["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
        for key, fill in (("tokenizer.ggml.token_type", int(TokenType.UNUSED)),
                          ("tokenizer.ggml.scores", 0.0)):
            if key in md:
                old = np.asarray(md[key])
                md[key] = np.concatenate([old, np.full(n_pad, fill, dtype=old.dtype)])


def tokenizer_metadata(src: Path, n_vocab: int, pre: str | None = None) -> dict[str, Any]:
    """``tokenizer.*`` entries for the folder's ``tokenizer.model`` / ``tokenizer.json`` (via
    :func:`pyllm.tools.convert.tokenizer_files.hf_tokenizer_metadata`) and
    ``tokenizer_config.json``'s chat template.

    A vocabulary shorter than the embedding matrix is padded with unused ``[PAD<i>]`` tokens
    (checkpoints often round the embedding rows up); a longer one is an error. ``pre`` names
    the byte-level pre-tokenizer when it cannot be recognised from ``tokenizer.json``.
    """
    from pyllm.errors import TokenizerError
    from pyllm.tools.convert.tokenizer_files import hf_tokenizer_metadata

    md: dict[str, Any] = {}
    if (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file():
        try:
            md = dict(hf_tokenizer_metadata(src, pre))
        except TokenizerError as e:
            raise ConvertError(f"tokenizer: {e}") from None
        pad_vocab(md, n_vocab)
    else:
        log.warning("no tokenizer.json / tokenizer.model: the GGUF has no vocabulary")
    tc = src / "tokenizer_config.json"
    if tc.is_file() and "tokenizer.chat_template" not in md:
        try:
            template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ConvertError(f"tokenizer_config.json: {e}") from None
        if isinstance(template, str):
            md["tokenizer.chat_template"] = template
        elif template is not None:
            log.warning("tokenizer_config.json: only a single chat_template string is kept")
    return md


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------


def _encoder(outtype: str) -> Callable[[str, np.ndarray], tuple[np.ndarray, GGMLType]]:
    """float32 tensor -> (bytes-ready array, GGML type) for the chosen output type."""
    quantize: Callable[[GGMLType, np.ndarray], np.ndarray] | None = None
    if outtype == "q8_0":
        from pyllm._native import load_core
        from pyllm.formats.qtypes import quantize

        load_core(ConvertError)  # q8_0 is computed in the extension: fail now, with the fix

    def encode(name: str, a: np.ndarray) -> tuple[np.ndarray, GGMLType]:
        if outtype == "f32" or keeps_f32(name, a.ndim):
            return np.ascontiguousarray(a, dtype=np.float32), GGMLType.F32
        if outtype == "f16":
            return a.astype(np.float16), GGMLType.F16
        if outtype == "bf16":
            return f32_to_bf16(a), GGMLType.BF16
        if a.shape[-1] % 32:  # Q8_0 rows come in blocks of 32; odd rows stay f16 (llama.cpp too)
            return a.astype(np.float16), GGMLType.F16
        assert quantize is not None
        return np.asarray(quantize(GGMLType.Q8_0, a)), GGMLType.Q8_0

    return encode


def _out_type(outtype: str, name: str, shape: tuple[int, ...]) -> GGMLType:
    if outtype == "f32" or keeps_f32(name, len(shape)):
        return GGMLType.F32
    if outtype == "q8_0" and shape[-1] % 32:
        return GGMLType.F16
    return OUT_GGML_TYPES[outtype]


def _progress(items: list[PlannedTensor], enabled: bool) -> Any:
    """A tqdm bar over the tensors, or None (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=len(items), unit="tensor", desc="converting")


def check_inputs(src_dir: str | os.PathLike[str], outtype: str) -> tuple[Path, str]:
    """A converter's source folder and output type, checked before any reading: the folder
    exists, the type is one of FILE_TYPES and can be produced here (q8_0 needs the extension)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory")
    outtype = outtype.lower()
    if outtype not in FILE_TYPES:
        raise ConvertError(f"outtype must be one of {', '.join(FILE_TYPES)}, got {outtype!r}")
    _encoder(outtype)
    return src, outtype


def load_config(src: Path, extra: Mapping[str, Any] | None = None) -> HFConfig:
    path = src / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{src}: no config.json (is this a Hugging Face model folder?)") \
            from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    if extra:
        raw = merge_config(raw, extra)  # later keys override earlier ones
    return HFConfig.from_dict(raw)


def convert_hf(
    src_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    outtype: str = "f16",
    *,
    name: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
    tokenizer_pre: str | None = None,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face Llama / Mistral / Qwen2 / InternLM2 folder to one GGUF file.

    ``outtype`` is ``f32``, ``f16``, ``bf16`` (1-D tensors stay F32, as in llama.cpp) or
    ``q8_0`` (via :mod:`pyllm.formats.qtypes`, needs the extension). ``extra_config`` overrides
    ``config.json`` keys;
    ``tokenizer_pre`` names the pre-tokenizer (``tokenizer.ggml.pre``) of a byte-level BPE
    ``tokenizer.json`` whose split pattern is not recognised.
    Tensors are read, transformed and written one at a time; the file appears atomically.
    Returns the output path.

    Args:
        src_dir: The Hugging Face folder (``config.json``, weights, tokenizer files).
        out_path: The GGUF file to write.
        outtype: The type of the matrices.
        name: The model name written to ``general.name`` (default: the folder's).
        extra_config: Keys overriding ``config.json``.
        tokenizer_pre: The pre-tokenizer name, when not recognised.
        progress: Show a progress bar on a terminal.

    Returns:
        The output path.
    """
    src, outtype = check_inputs(src_dir, outtype)
    cfg = load_config(src, extra_config)
    ckpt = Checkpoint(src)
    planned = plan_tensors(cfg, ckpt)
    n_vocab = planned[0].shape[0]
    if cfg.vocab_size is not None and cfg.vocab_size != n_vocab:
        log.warning("config.json vocab_size %d != %d embedding rows; using the rows",
                    cfg.vocab_size, n_vocab)

    rope_md, rope_freqs = rope_metadata(cfg)
    if rope_freqs is not None:
        planned.insert(1, PlannedTensor("rope_freqs.weight", rope_freqs.shape,
                                        lambda: rope_freqs))
    md = model_metadata(cfg, n_vocab, name or str(cfg.raw.get("_name_or_path") or src.name),
                        outtype)
    md.update(rope_md)
    md.update(tokenizer_metadata(src, n_vocab, tokenizer_pre))
    if "tokenizer.ggml.tokens" in md:  # config.json's ids fill in what the tokenizer left out
        for key in ("bos_token_id", "eos_token_id"):
            value = cfg.raw.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_vocab:
                md.setdefault(f"tokenizer.ggml.{key}", value)
    if extra_config:  # fastllm-style overrides given on top of config.json
        md.update(fastllm_metadata(extra_config, md))

    try:
        return write_gguf(Path(out_path), md, planned, outtype, progress)
    finally:
        ckpt.forget()


def write_gguf(out: Path, md: Mapping[str, Any], planned: list[PlannedTensor], outtype: str,
               progress: bool) -> Path:
    """Write metadata and the planned tensors (loaded, checked and encoded one at a time, as
    the writer asks for them) to ``out``; the file appears atomically, or not at all."""
    encode = _encoder(outtype)
    writer = GGUFWriter(out)
    bar = _progress(planned, progress)
    try:
        for key, value in md.items():
            writer.add_kv(key, value)  # ints -> UINT32, floats -> FLOAT32, str -> STRING
        for t in planned:
            def source(t: PlannedTensor = t) -> np.ndarray:
                arr = t.load()
                if arr.shape != t.shape:
                    raise ConvertError(f"{t.name}: loaded shape {arr.shape}, expected {t.shape}")
                data, _ = encode(t.name, arr)
                if bar is not None:
                    bar.update(1)
                return data
            writer.add_tensor(t.name, source, _out_type(outtype, t.name, t.shape),
                              tuple(reversed(t.shape)))
        writer.write()
    except GGUFError as e:
        raise ConvertError(f"writing {out}: {e}") from None
    finally:
        if bar is not None:
            bar.close()
    return out
