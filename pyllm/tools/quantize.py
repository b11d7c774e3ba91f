"""Model quantization: rewrite a GGUF file with its weight matrices in another type.

``quantize_file(src, dst, "Q4_K_M")`` reads ``src`` (memory-mapped), picks a type for every tensor
(:func:`plan_types`), converts the tensors on a thread pool (the C++ quantizers release the GIL)
and streams them into ``dst`` through :class:`~pyllm.formats.gguf.GGUFWriter`'s lazy tensors, so at
most a few tensors are held in memory at a time. The output appears atomically; all metadata is
copied, ``general.file_type`` is set to llama.cpp's ``LLAMA_FTYPE`` number and
``general.quantization_version`` to 2.

File types (``LLAMA_FTYPE`` id, bulk type of the weight matrices)::

    F32 0 F32    F16 1 F16    BF16 32 BF16    Q8_0 7 Q8_0
    Q4_0 2 Q4_0  Q4_1 3 Q4_1  Q5_0 8 Q5_0     Q5_1 9 Q5_1
    Q2_K 10 Q2_K    Q3_K_S 11 Q3_K  Q3_K_M 12 Q3_K  Q3_K_L 13 Q3_K
    Q4_K_S 14 Q4_K  Q4_K_M 15 Q4_K  Q5_K_S 16 Q5_K  Q5_K_M 17 Q5_K  Q6_K 18 Q6_K
    IQ1_S 24 IQ1_S  IQ1_M 31 IQ1_M  IQ2_XXS 19 IQ2_XXS  IQ2_XS 20 IQ2_XS  IQ2_S 28 IQ2_XS
    IQ2_M 29 IQ2_S  IQ3_XXS 23 IQ3_XXS  IQ3_XS 22 IQ3_S  IQ3_S 26 IQ3_S  IQ3_M 27 IQ3_S
    IQ4_NL 25 IQ4_NL  IQ4_XS 30 IQ4_XS  TQ1_0 36 TQ1_0  TQ2_0 37 TQ2_0
    (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ2_M, IQ3_XXS and IQ3_XS need an importance matrix:
    ``imatrix=``, ``--imatrix``; llama-quantize refuses them without one too. With one, a tensor
    the mix makes IQ1_S / IQ1_M / IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS needs its entry.)
    (aliases as llama-quantize: Q3_K = Q3_K_M, Q4_K = Q4_K_M, Q5_K = Q5_K_M)

Which tensors are converted (as llama.cpp's quantizer decides): tensors with at least 2 dims whose
name ends in ``weight``, except ``*_norm.weight``, ``ffn_gate_inp.weight`` (MoE router),
``position_embd``/``token_types``, ``ssm_conv1d``, ``attn_rel_b`` and a few small tensors of
other architectures. Everything else (1-D norms, biases, rope factors) is copied
unchanged. A converted tensor gets the bulk type, then, for the block-quantized file types only
(not F32/F16/BF16), the per-tensor rules of llama.cpp's ``llama_tensor_get_type`` apply. With
``more(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` ("use more bits": the first and last
eighth of the layers and every third layer in between), ``i`` counting the attn_v (resp.
ffn_down) tensors in layer order, ``n`` their count (resp. the block count), ``gqa`` = n_head /
n_head_kv:

=================  ==========================================================================
tensor             rule
=================  ==========================================================================
output.weight      Q6_K, except Q8_0 stays Q8_0, and Q5_K for IQ1_S / IQ1_M / IQ2_XXS / IQ2_XS /
                   IQ2_S / IQ2_M / IQ3_XXS; Q8_0 when the row length is not a multiple of the
                   bulk type's block (and for falcon). Without output.weight (tied embeddings)
                   token_embd.weight takes this rule instead.
token_embd.weight  the bulk type; Q4_K for TQ1_0 / TQ2_0; Q2_K for IQ1_S / IQ1_M / IQ2_XXS /
                   IQ2_XS; IQ3_S for IQ2_S / IQ2_M / IQ3_XXS
low-bit i-quants   IQ1_S / IQ1_M / IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M ("q2" below: IQ3_S for IQ2_S
                   / IQ2_M, else Q2_K), their only rules: attn_v Q4_K if gqa >= 4 or 4+
                   experts, else q2; ffn_down q2 for i < n/8; attn_output Q5_K with 8 experts,
                   else IQ2_XXS for IQ1_S / IQ1_M, IQ3_S for IQ2_S / IQ2_M; attn_k Q4_K with 8
                   experts. None of the rules below.
attn_v.weight      (fused attn_qkv and MLA attn_kv_b count as attn_v, as in llama.cpp)
                   Q2_K: Q4_K if gqa >= 4 else Q3_K; IQ3_XXS: Q4_K if gqa >= 4, else IQ3_S
                   without an importance matrix; IQ3_XS / IQ3_S: Q4_K if gqa >= 4; IQ3_M: Q4_K;
                   Q3_K_M: Q5_K for i < 2 else Q4_K; Q3_K_L: Q5_K; IQ4_NL / IQ4_XS: Q5_K if
                   gqa >= 4; Q4_K_M / Q5_K_M: Q6_K if more(i, n); Q4_K_S: Q5_K for i < 4.
                   Then 70B llama (80 layers): Q3_K/Q4_K -> Q5_K; 8 experts: Q8_0.
attn_k.weight      8 experts: Q8_0; IQ3_XS: IQ3_XXS; IQ3_XXS: IQ2_S
attn_q.weight      IQ3_XS: IQ3_XXS; IQ3_XXS: IQ2_S
ffn_gate / ffn_up  IQ3_XS: IQ3_XXS for n/8 <= i < 7n/8 (i their layer counter)
ffn_down           Q2_K: Q3_K; IQ3_XXS without an importance matrix: Q4_K if i < n/8 else Q3_K;
                   IQ3_M: Q4_K if i < n/8 (8 experts: or more(i, n));
                   Q3_K_M: Q5_K if i < n/16, else Q4_K (falcon: Q4_K only if
                   more(i, n), else Q3_K); Q3_K_L: Q5_K (falcon Q4_K); Q4_K_M: Q6_K if
                   more(i, n) (falcon: Q6_K if i < n/16, Q5_K if more, else Q4_K);
                   IQ4_NL / IQ4_XS without an importance matrix: Q5_K if i < n/8;
                   Q5_K_M: Q6_K if more(i, n); Q4_K_S: Q5_K if i < n/8 (not falcon);
                   with an importance matrix Q4_0 / Q5_0: Q4_1 / Q5_1 if i < n/8
attn_output        Q2_K: Q3_K; IQ3_XXS: IQ3_S; Q3_K_M / IQ3_M: Q4_K; Q3_K_L: Q5_K (falcon:
                   Q3_K_L -> Q4_K only); 8 experts: Q5_K for Q2_K, Q3_K_S, Q3_K_M, Q4_K_S,
                   Q4_K_M, IQ3_XXS, IQ3_XS, IQ3_S, IQ3_M, IQ4_NL, IQ4_XS
=================  ==========================================================================

Row lengths that are not a multiple of the chosen type's block fall back as llama.cpp does:
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0 (some llama.cpp versions took
IQ4_NL, which has Q4_0's size), IQ4_XS and the grid i-quants (IQ1_*, IQ2_*, IQ3_*) -> IQ4_NL,
TQ1_0/TQ2_0 -> Q4_0, and F16 when the row is not a multiple of 32 either.

Checked against llama.cpp's quantizer (llama-cpp-python 0.3.36): for every file type the
per-tensor types, the tensor bytes (k-quants included) and the file sizes are identical, on a
tiny 8-layer llama and on a tiny tied-embedding llama whose rows (192, 320) take the fallbacks.
tests/test_quantize.py compares with digests llama.cpp produced
(tests/data/llamacpp_quant_figures.json; tests/data/make_llamacpp_quant_figures.py redoes them);
with an importance matrix, tests/test_quantize_imatrix.py (llama-quantize --imatrix: every
block file type on the 8-layer llama, the i-quant mixes also on a 16-layer gqa-4 llama with
tied embeddings).

Interrupting: Ctrl-C (exit 130 in the CLI) and SIGTERM (exit 143) remove the temp file; a
SIGKILLed run's temp file is removed by the next write into the folder (see
:mod:`pyllm.formats.gguf.writer`).

Requantizing (a tensor already in a block-quantized type that must change type) is refused unless
``allow_requantize`` is set; then it is dequantized to float32 and quantized again, which loses
more precision than quantizing from F16/F32.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pyllm.atomic import check_destination
from pyllm.errors import QuantError
from pyllm.formats.gguf import GGUFWriter
from pyllm.formats.gguf.constants import TYPE_INFO, GGMLType, ValueType
from pyllm.formats.gguf.split import ModelFile, open_gguf
from pyllm.formats.imatrix import Imatrix, read_imatrix
from pyllm.runtime.sysinfo import available_cpus

T = GGMLType


@dataclass(frozen=True)
class FileType:
    """One target of ``pyllm quantize``: its name, llama.cpp ftype id and bulk tensor type."""

    name: str
    ftype: int  # LLAMA_FTYPE_* number stored as general.file_type
    bulk: GGMLType
    # never made without an importance matrix: the 1-2 bit i-quant files and the IQ3 ones with
    # IQ3_XXS tensors (the grid searches need one; llama.cpp refuses them too)
    needs_imatrix: bool = False

    @property
    def is_mix(self) -> bool:
        """Block-quantized targets get llama.cpp's per-tensor rules; float targets do not."""
        return TYPE_INFO[self.bulk].block_size > 1


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("F32", 0, T.F32),
        FileType("F16", 1, T.F16),
        FileType("BF16", 32, T.BF16),
        FileType("Q8_0", 7, T.Q8_0),
        FileType("Q4_0", 2, T.Q4_0),
        FileType("Q4_1", 3, T.Q4_1),
        FileType("Q5_0", 8, T.Q5_0),
        FileType("Q5_1", 9, T.Q5_1),
        FileType("Q2_K", 10, T.Q2_K),
        FileType("Q3_K_S", 11, T.Q3_K),
        FileType("Q3_K_M", 12, T.Q3_K),
        FileType("Q3_K_L", 13, T.Q3_K),
        FileType("Q4_K_S", 14, T.Q4_K),
        FileType("Q4_K_M", 15, T.Q4_K),
        FileType("Q5_K_S", 16, T.Q5_K),
        FileType("Q5_K_M", 17, T.Q5_K),
        FileType("Q6_K", 18, T.Q6_K),
        FileType("IQ2_XXS", 19, T.IQ2_XXS, needs_imatrix=True),
        FileType("IQ2_XS", 20, T.IQ2_XS, needs_imatrix=True),
        FileType("IQ2_S", 28, T.IQ2_XS, needs_imatrix=True),
        FileType("IQ2_M", 29, T.IQ2_S, needs_imatrix=True),
        FileType("IQ1_S", 24, T.IQ1_S, needs_imatrix=True),
        FileType("IQ1_M", 31, T.IQ1_M, needs_imatrix=True),
        FileType("IQ3_XXS", 23, T.IQ3_XXS, needs_imatrix=True),
        FileType("IQ3_XS", 22, T.IQ3_S, needs_imatrix=True),
        FileType("IQ3_S", 26, T.IQ3_S),
        FileType("IQ3_M", 27, T.IQ3_S),
        FileType("IQ4_NL", 25, T.IQ4_NL),
        FileType("IQ4_XS", 30, T.IQ4_XS),
        FileType("TQ1_0", 36, T.TQ1_0),
        FileType("TQ2_0", 37, T.TQ2_0),
    )
}
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

QUANTIZATION_VERSION = 2

# Fallbacks for rows that are not a whole number of the chosen type's blocks (see docstring).
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
             T.IQ4_XS: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
             T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL,
             T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0}
_IQ4 = ("IQ4_NL", "IQ4_XS")
# the 1-2 bit i-quant files: their own mix rules (llama.cpp's first branch)
_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")
_IQ2_SM = ("IQ2_S", "IQ2_M")  # within those: IQ3_S where the others take Q2_K
_IQ1 = ("IQ1_S", "IQ1_M")
# the tensor types llama.cpp quantizes only with an importance matrix in a file (but the token
# embeddings and the output: llama-quant's tensor_requires_imatrix)
_TENSOR_NEEDS_IMATRIX = (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS)
# the grid types that make a file type need one (for the message refusing it)
_IMATRIX_GRID = {"IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S",
                 "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ3_XXS": "IQ3_XXS", "IQ3_XS": "IQ3_XXS"}

# Substrings / names of >= 2-D tensors that llama.cpp never quantizes (the llama-family ones and
# a few small tensors of other architectures).
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", "shortconv.conv.weight",
                    "attn_rel_b.weight", "altup", "laurel", "per_layer_model_proj",
                    "time_mix_first.weight", "time_mix_lerp_fused.weight")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")

_LAYER_RE = re.compile(r"^blk\.(\d+)\.")


def resolve_file_type(ftype: str | int | FileType) -> FileType:
    """A :class:`FileType` from its name ("q4_k_m"), an alias ("Q4_K") or its LLAMA_FTYPE id.

    Args:
        ftype: A name, an alias, a LLAMA_FTYPE id or a FileType.

    Returns:
        The file type.

    Raises:
        QuantError: An unknown or unsupported file type.
    """
    if isinstance(ftype, FileType):
        return ftype
    if isinstance(ftype, (int, np.integer)) and not isinstance(ftype, bool):
        for ft in FILE_TYPES.values():
            if ft.ftype == int(ftype):
                return ft
        raise QuantError(f"unknown or unsupported file type id {int(ftype)}")
    if isinstance(ftype, str):
        key = ftype.strip().upper()
        key = _ALIASES.get(key, key)
        if key in FILE_TYPES:
            return FILE_TYPES[key]
        raise QuantError(f"unknown file type {ftype!r} (choose from {', '.join(FILE_TYPES)})")
    raise QuantError(f"file type must be a name or an id, not {type(ftype).__name__}")


@dataclass(frozen=True)
class ModelFacts:
    """What the mix rules need to know about a model."""

    arch: str = "llama"
    n_layer: int = 0
    n_gqa: int = 1  # n_head / n_head_kv
    n_expert: int = 0
    has_output: bool = True

    @property
    def is_70b(self) -> bool:
        # llama.cpp keys this rule on its "70B" model-size class: llama with 80 layers.
        return self.arch == "llama" and self.n_layer == 80

    @classmethod
    def from_reader(cls, reader: ModelFile) -> ModelFacts:
        md = reader.metadata
        arch = str(md.get("general.architecture", "llama"))

        def num(key: str, default: int) -> int:
            v = md.get(f"{arch}.{key}", default)
            if isinstance(v, np.ndarray):  # per-layer arrays: the first layer is representative
                v = int(v.flat[0]) if v.size else default
            return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) \
                else default

        n_head = num("attention.head_count", 1)
        n_head_kv = num("attention.head_count_kv", n_head) or n_head
        layer_ids = [int(m.group(1)) for t in reader.tensors if (m := _LAYER_RE.match(t.name))]
        n_layer = num("block_count", max(layer_ids) + 1 if layer_ids else 0)
        return cls(
            arch=arch,
            n_layer=n_layer,
            n_gqa=max(1, n_head // max(1, n_head_kv)),
            n_expert=num("expert_count", 0),
            has_output=any(t.name == "output.weight" for t in reader.tensors),
        )


def category(name: str) -> str:
    """llama.cpp's broad tensor category, tested in its order: output, token_embd, attn_v (which
    takes fused attn_qkv and MLA attn_kv_b too), attn_k, attn_q, attn_output, ffn_up, ffn_gate,
    ffn_down, other."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def should_quantize(name: str, dims: tuple[int, ...]) -> bool:
    """Whether the quantizer converts this tensor at all (else it is copied unchanged)."""
    if len(dims) < 2 or not name.endswith("weight"):
        return False
    if any(s in name for s in _KEEP_SUBSTRINGS):
        return False
    return name not in _KEEP_NAMES


def _layer_order(name: str) -> tuple[int, str]:
    # llama.cpp walks the tensors sorted by layer number, then name; its per-kind counters
    # (i_attention_wv, i_ffn_down) follow that order.
    m = _LAYER_RE.match(name)
    return (int(m.group(1)) if m else -1, name)


def mix_type(name: str, ft: FileType, facts: ModelFacts, i_layer: int, n_layer: int,
             bulk: GGMLType | None = None, imatrix: bool = False) -> GGMLType:
    """The type llama.cpp's rules give tensor ``name`` before the row-length fallback.

    ``i_layer``/``n_layer`` are the attn_v counter and count for attn_v tensors, the ffn_down
    (ffn_gate, ffn_up) counter and the block count for those tensors (unused for other
    tensors); ``imatrix``
    whether an importance matrix guides the quantization (some rules differ then).
    """
    new = ft.bulk if bulk is None else bulk
    f = ft.name
    falcon = facts.arch == "falcon"
    cat = category(name)
    if cat == "output" or (not facts.has_output and cat == "token_embd"):
        if falcon:
            return T.Q8_0
        if f in _IQ_LOW or f == "IQ3_XXS":
            return T.Q5_K
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        if f in _IQ_LOW:
            return T.IQ3_S if f in _IQ2_SM else T.Q2_K
        if f == "IQ3_XXS":
            return T.IQ3_S
        return T.Q4_K if f in ("TQ1_0", "TQ2_0") else new
    if f in _IQ_LOW:
        low = T.IQ3_S if f in _IQ2_SM else T.Q2_K
        if cat == "attn_v":
            return T.Q4_K if facts.n_gqa >= 4 or facts.n_expert >= 4 else low
        if cat == "attn_k" and facts.n_expert == 8:
            return T.Q4_K
        if cat == "ffn_down":
            return low if i_layer < n_layer // 8 else new
        if cat == "attn_output":
            if facts.n_expert == 8:
                return T.Q5_K
            return T.IQ2_XXS if f in _IQ1 else T.IQ3_S if f in _IQ2_SM else new
        return new
    if cat == "attn_v":
        if f == "Q2_K":
            new = T.Q4_K if facts.n_gqa >= 4 else T.Q3_K
        elif f == "IQ3_XXS":
            new = T.Q4_K if facts.n_gqa >= 4 else T.IQ3_XXS if imatrix else T.IQ3_S
        elif (f in ("IQ3_XS", "IQ3_S") and facts.n_gqa >= 4) or f == "IQ3_M":
            new = T.Q4_K
        elif f == "Q3_K_M":
            new = T.Q5_K if i_layer < 2 else T.Q4_K
        elif f == "Q3_K_L" or (f in _IQ4 and facts.n_gqa >= 4):
            new = T.Q5_K
        elif f in ("Q4_K_M", "Q5_K_M") and _more_bits(i_layer, n_layer):
            new = T.Q6_K
        elif f == "Q4_K_S" and i_layer < 4:
            new = T.Q5_K
        if facts.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if facts.n_expert == 8:
            new = T.Q8_0
        return new
    if cat in ("attn_k", "attn_q"):
        if cat == "attn_k" and facts.n_expert == 8:
            return T.Q8_0
        return {"IQ3_XS": T.IQ3_XXS, "IQ3_XXS": T.IQ2_S}.get(f, new)
    if cat == "ffn_down":
        i, n = i_layer, n_layer
        if f == "Q2_K":
            new = T.Q3_K
        elif f == "IQ3_XXS" and not imatrix:
            new = T.Q4_K if i < n // 8 else T.Q3_K
        elif f == "Q3_K_M":
            if i < n // 16:
                new = T.Q5_K
            elif not falcon or _more_bits(i, n):
                new = T.Q4_K
            else:
                new = T.Q3_K
        elif f == "IQ3_M" and (i < n // 8 or (facts.n_expert == 8 and _more_bits(i, n))):
            new = T.Q4_K
        elif f == "Q3_K_L":
            new = T.Q4_K if falcon else T.Q5_K
        elif f == "Q4_K_M":
            if falcon:
                new = T.Q6_K if i < n // 16 else T.Q5_K if _more_bits(i, n) else T.Q4_K
            elif _more_bits(i, n):
                new = T.Q6_K
        elif f in _IQ4 and i < n // 8 and not imatrix:
            new = T.Q5_K
        elif f == "Q5_K_M" and _more_bits(i, n):
            new = T.Q6_K
        elif f == "Q4_K_S" and not falcon and i < n // 8:
            new = T.Q5_K
        elif f in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            # llama.cpp guards the first ffn_down layers of these with an importance matrix
            new = T.Q4_1 if f == "Q4_0" else T.Q5_1
        return new
    if cat == "attn_output":
        if falcon:
            return T.Q4_K if f == "Q3_K_L" else new
        if facts.n_expert == 8:
            if f in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ3_XXS", "IQ3_XS",
                     "IQ3_S", "IQ3_M", *_IQ4):
                new = T.Q5_K
            return new
        return {"Q2_K": T.Q3_K, "IQ3_XXS": T.IQ3_S, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K,
                "IQ3_M": T.Q4_K}.get(f, new)
    if cat in ("ffn_gate", "ffn_up") and f == "IQ3_XS" and \
            n_layer // 8 <= i_layer < 7 * n_layer // 8:
        return T.IQ3_XXS
    return new


def _fit_row(t: GGMLType, row: int) -> GGMLType:
    """``t``, or its fallback when ``row`` is not a whole number of ``t``'s blocks."""
    if row % TYPE_INFO[t].block_size == 0:
        return t
    t = _FALLBACK.get(t, T.F16)
    return t if row % TYPE_INFO[t].block_size == 0 else T.F16


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dims: tuple[int, ...]  # ggml order
    src_type: GGMLType
    dst_type: GGMLType
    fallback: bool = False  # the mix's type did not fit the row length

    @property
    def convert(self) -> bool:
        return self.src_type != self.dst_type

    @property
    def dst_nbytes(self) -> int:
        info = TYPE_INFO[self.dst_type]
        n = int(np.prod(self.dims, dtype=np.int64))
        return n // info.block_size * info.type_size


def plan_types(reader: ModelFile, ftype: str | int | FileType,
               imatrix: bool = False) -> list[TensorPlan]:
    """The type every tensor of ``reader`` gets in a ``ftype`` file, in the file's order
    (``imatrix``: whether an importance matrix guides the quantization)."""
    ft = resolve_file_type(ftype)
    facts = ModelFacts.from_reader(reader)
    # llama.cpp's per-kind counters: attn_v tensors against their count, the ffn_* ones (those
    # of experts: their layer) against the block count
    counted: dict[str, list[str]] = {"attn_v": [], "ffn_down": [], "ffn_gate": [], "ffn_up": []}
    for t in sorted(reader.tensors, key=lambda t: _layer_order(t.name)):
        cat = category(t.name)
        if cat in counted and should_quantize(t.name, t.dims):
            counted[cat].append(t.name)
    index = {name: (cat, i) for cat, names in counted.items() for i, name in enumerate(names)}
    plans = []
    for t in reader.tensors:
        if not should_quantize(t.name, t.dims):
            plans.append(TensorPlan(t.name, t.dims, t.type, t.type))
            continue
        new = ft.bulk
        if ft.is_mix:
            cat, i = index.get(t.name, ("other", 0))
            n = (len(counted["attn_v"]) if cat == "attn_v"
                 else facts.n_layer if cat in counted else 0)
            if cat in ("ffn_down", "ffn_gate", "ffn_up") and facts.n_expert > 1 and \
                    (m := _LAYER_RE.match(t.name)):
                i = int(m.group(1))  # expert tensors: the layer comes from the name
            new = mix_type(t.name, ft, facts, i, n, imatrix=imatrix)
            cat = category(t.name)
            is_output = cat == "output" or (not facts.has_output and cat == "token_embd")
            if is_output and t.dims[0] % TYPE_INFO[ft.bulk].block_size:
                new = T.Q8_0  # llama.cpp: rows that are not whole blocks of the bulk type
        fitted = _fit_row(new, t.dims[0])
        plans.append(TensorPlan(t.name, t.dims, t.type, fitted, fallback=fitted != new))
    return plans


@dataclass
class QuantizeResult:
    """What :func:`quantize_file` did."""

    src: str
    dst: str
    file_type: FileType
    src_file_bytes: int
    dst_file_bytes: int
    src_tensor_bytes: int
    dst_tensor_bytes: int
    seconds: float
    plans: list[TensorPlan] = field(default_factory=list)
    imatrix_used: list[str] = field(default_factory=list)  # tensors quantized with it
    # tensors the importance matrix has an entry for whose type takes none (Q8_0, TQ1_0, TQ2_0)
    imatrix_unused: list[str] = field(default_factory=list)

    @property
    def n_converted(self) -> int:
        return sum(p.convert for p in self.plans)

    @property
    def n_fallback(self) -> int:
        return sum(p.fallback for p in self.plans)

    def type_counts(self) -> dict[str, int]:
        """How many tensors the output has of each type.

        Returns:
            Type name -> tensor count, sorted by name.
        """
        out: dict[str, int] = {}
        for p in self.plans:
            out[p.dst_type.name] = out.get(p.dst_type.name, 0) + 1
        return dict(sorted(out.items()))


def _to_f32(t: Any) -> np.ndarray:
    """Float32 copy of a tensor's values (numpy shape)."""
    from pyllm.formats import qtypes

    if t.type == T.F32:
        return np.asarray(t.data, dtype=np.float32)
    try:
        return qtypes.dequantize(t.type, t.raw, t.shape)
    except QuantError as e:
        raise QuantError(f"{t.name}: cannot convert from {t.type.name}: {e}") from None


def _convert(t: Any, dst: GGMLType, importance: np.ndarray | None = None) -> np.ndarray:
    from pyllm.formats import qtypes

    values = _to_f32(t)
    if not np.all(np.isfinite(values)):
        raise QuantError(f"{t.name}: the tensor holds NaN or infinite values")
    return qtypes.quantize(dst, values, importance=importance)


def _importance(imatrix: Imatrix | None, plans: list[TensorPlan]
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per converted tensor, the importance of its columns where the importance matrix has an
    entry and the target type has an importance-guided quantizer; and the tensors that have an
    entry but a target type without one (quantized as without an importance matrix)."""
    from pyllm.formats import qtypes

    used: dict[str, np.ndarray] = {}
    unused: list[str] = []
    if imatrix is None:
        return used, unused
    for p in plans:
        w = imatrix.weights(p.name) if p.convert else None
        if w is None:
            if p.convert and (not qtypes.type_info(p.dst_type).can_quantize or (
                    p.dst_type in _TENSOR_NEEDS_IMATRIX
                    and category(p.name) not in ("output", "token_embd"))):
                raise QuantError(f"the importance matrix has no entry for {p.name}, which "
                                 f"{p.dst_type.name} cannot be quantized without")
            continue
        if w.ndim != 1 or w.size != p.dims[0]:
            raise QuantError(f"the importance matrix entry for {p.name} has {w.size} values, the "
                             f"tensor's rows {p.dims[0]}: it was computed for another model")
        if qtypes.type_info(p.dst_type).imatrix_quantize:
            used[p.name] = w
        else:
            unused.append(p.name)
    return used, unused


class _Pipeline:
    """Converts tensors on a thread pool, at most ``window`` ahead of the writer.

    The writer asks for tensor i (in file order) through :meth:`source`; that submits the next
    jobs up to i + window and waits for job i, so memory holds about ``window`` tensors.
    """

    def __init__(self, jobs: list[Callable[[], np.ndarray] | None], threads: int,
                 on_done: Callable[[int], None]) -> None:
        self.jobs = jobs
        self.window = threads + 1
        self.pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyllm-quant")
        self.futures: dict[int, cf.Future[np.ndarray]] = {}
        self.next_submit = 0
        self.on_done = on_done
        self.lock = threading.Lock()

    def _fill(self, upto: int) -> None:
        while self.next_submit < min(upto, len(self.jobs)):
            job = self.jobs[self.next_submit]
            if job is not None:
                self.futures[self.next_submit] = self.pool.submit(job)
            self.next_submit += 1

    def source(self, i: int, copy: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            self._fill(i + self.window)
            fut = self.futures.pop(i, None)
            out = fut.result() if fut is not None else copy()
            self.on_done(i)
            return out

        return produce

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.pool.shutdown(wait=True)


def _progress(total: int, enabled: bool, plans: list[TensorPlan]) -> Callable[[int], None]:
    if not enabled:
        return lambda i: None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, unit="tensor", desc="quantizing", file=sys.stderr)

        def step(i: int) -> None:
            bar.update(1)
            if i + 1 == total:
                bar.close()

        return step

    width = len(str(total))

    def line(i: int) -> None:
        p = plans[i]
        what = f"{p.src_type.name} -> {p.dst_type.name}" if p.convert else p.src_type.name
        print(f"[{i + 1:{width}}/{total}] {p.name:<32} {what}", file=sys.stderr, flush=True)

    return line


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                  ftype: str | int | FileType, threads: int | None = None,
                  allow_requantize: bool = False, progress: bool = True,
                  imatrix: Imatrix | str | os.PathLike[str] | None = None) -> QuantizeResult:
    """Write ``dst``: the model ``src`` with its tensors converted to file type ``ftype``.

    ``imatrix`` (an :class:`~pyllm.formats.imatrix.Imatrix` or the path of a GGUF / .dat
    importance matrix, as ``pyllm imatrix`` or llama.cpp's ``llama-imatrix`` write them) guides
    the rounding of the tensors it has entries for, as llama.cpp's quantizer does, for the types
    with such a quantizer (``qtypes.type_info(t).imatrix_quantize``: every block type but Q8_0
    and the ternary types, which take none, in llama.cpp either, and are listed in
    ``QuantizeResult.imatrix_unused``), changes the mix rules that depend on it and is named in
    the output's ``quantize.imatrix.*`` metadata.

    ``threads`` worker threads convert tensors concurrently (default: the CPU count). Raises
    :class:`~pyllm.errors.QuantError` for an unknown type, a refused requantization, data that
    cannot be converted or a destination that cannot be written (missing or unwritable folder,
    a folder, the input itself: checked before any work); ``dst`` is then left untouched. The
    temp file is removed on errors, Ctrl-C and SIGTERM (:class:`pyllm.atomic.WriteTerminated`,
    a ``SystemExit`` with code 143, where the program has no SIGTERM handler of its own); one
    left by a SIGKILLed run is removed by the next write into the folder.

    Args:
        src: The input GGUF model (any shard of a split model).
        dst: The output file (written atomically).
        ftype: The file type: a name (``q4_k_m``), an alias (``Q4_K``) or a LLAMA_FTYPE id.
        threads: Worker threads (None: the CPUs this process may use).
        allow_requantize: Allow an input that is already quantized.
        progress: Show a progress bar on a terminal.
        imatrix: An importance matrix or its file, or None.

    Returns:
        What was written: the types chosen per tensor and the sizes.
    """
    ft = resolve_file_type(ftype)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads <= 0):
        raise QuantError(f"threads must be a positive integer, got {threads!r}")
    n_threads = min(threads or available_cpus(), available_cpus())
    if os.path.abspath(os.fspath(src)) == os.path.abspath(os.fspath(dst)):
        raise QuantError("the output must be a different file from the input")
    # Before any reading or converting: a missing folder or a folder as the output used to
    # surface as an OSError only when the finished file was renamed into place.
    check_destination(dst, sources=[src], error=QuantError)
    if imatrix is None and ft.needs_imatrix:
        grid = _IMATRIX_GRID[ft.name]
        raise QuantError(f"{ft.name} needs an importance matrix: the grid search of its {grid} "
                         "tensors weights every column by how much it matters, and without one "
                         "the model degrades badly (llama.cpp refuses too). Make one with "
                         "`pyllm imatrix -m MODEL -f TEXT -o imatrix.gguf` and pass --imatrix "
                         "imatrix.gguf")
    imatrix_path = None
    if imatrix is not None and not isinstance(imatrix, Imatrix):
        imatrix_path = os.fspath(imatrix)
        imatrix = read_imatrix(imatrix_path)
    t0 = time.perf_counter()
    reader = open_gguf(src)  # a split model: all its shards (the output is one file)
    try:
        plans = plan_types(reader, ft, imatrix=imatrix is not None)
        importance, unused = _importance(imatrix, plans)
        if not allow_requantize:
            for p in plans:
                if p.convert and TYPE_INFO[p.src_type].block_size > 1:
                    raise QuantError(
                        f"{p.name} is already quantized ({p.src_type.name}); requantizing to "
                        f"{p.dst_type.name} loses precision, allow it with --allow-requantize "
                        "(allow_requantize=True) or start from an F16/F32 file")
        writer = GGUFWriter(dst, alignment=reader.alignment)
        skip = {"general.file_type", "general.quantization_version", "general.alignment"}
        writer.add_metadata({k: v for k, v in reader.metadata.items() if k not in skip},
                            reader.value_types)
        writer.add_kv("general.quantization_version", QUANTIZATION_VERSION, ValueType.UINT32)
        writer.add_kv("general.file_type", ft.ftype, ValueType.UINT32)
        if imatrix is not None:
            _add_imatrix_metadata(writer, imatrix, imatrix_path)
        tensors = {t.name: t for t in reader.tensors}
        jobs: list[Callable[[], np.ndarray] | None] = []
        for p in plans:
            t = tensors[p.name]
            w = importance.get(p.name)
            jobs.append((lambda t=t, d=p.dst_type, w=w: _convert(t, d, w)) if p.convert else None)
        pipe = _Pipeline(jobs, n_threads, _progress(len(plans), progress, plans))
        try:
            for i, p in enumerate(plans):
                t = tensors[p.name]
                writer.add_tensor(p.name, pipe.source(i, lambda t=t: t.raw), p.dst_type, p.dims)
            writer.write()
        finally:
            pipe.close()
        result = QuantizeResult(
            src=os.fspath(src), dst=os.fspath(dst), file_type=ft,
            src_file_bytes=reader.file_size, dst_file_bytes=os.path.getsize(dst),
            src_tensor_bytes=sum(t.nbytes for t in reader.tensors),
            dst_tensor_bytes=sum(p.dst_nbytes for p in plans),
            seconds=time.perf_counter() - t0, plans=plans, imatrix_used=sorted(importance),
            imatrix_unused=unused)
    finally:
        reader.close()
    return result


def _add_imatrix_metadata(writer: GGUFWriter, imatrix: Imatrix, path: str | None) -> None:
    # the keys llama-quantize adds (its strings are cut to 127 bytes)
    if path is not None:
        writer.add_kv("quantize.imatrix.file", path[:127])
    if imatrix.datasets:
        writer.add_kv("quantize.imatrix.dataset", imatrix.datasets[0][:127])
    writer.add_kv("quantize.imatrix.entries_count", len(imatrix.entries), ValueType.UINT32)
    if imatrix.chunk_count > 0:
        writer.add_kv("quantize.imatrix.chunks_count", imatrix.chunk_count, ValueType.UINT32)


__all__ = [
    "FILE_TYPES",
    "FileType",
    "ModelFacts",
    "category",
    "QUANTIZATION_VERSION",
    "QuantizeResult",
    "TensorPlan",
    "mix_type",
    "plan_types",
    "quantize_file",
    "resolve_file_type",
    "should_quantize",
]
