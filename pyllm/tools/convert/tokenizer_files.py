"""Tokenizer files of checkpoints -> GGUF ``tokenizer.ggml.*`` metadata (for the converter).

- :func:`sentencepiece_metadata`: a SentencePiece ``tokenizer.model`` (a protobuf ``ModelProto``,
  decoded with :mod:`pyllm.tokenizer.spm_proto`).
- :func:`hf_tokenizer_metadata`: a Hugging Face ``tokenizer.json`` (BPE models), plus the
  neighbouring ``tokenizer_config.json`` when present for BOS/EOS and their add flags.

Both return a plain dict (numeric arrays as numpy arrays with the GGUF element type) that
``GGUFWriter.add_kv`` can write as is and :meth:`pyllm.Tokenizer.from_metadata` can load.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.errors import TokenizerError
from pyllm.tokenizer.spm_proto import as_int32, fields
from pyllm.tokenizer.vocab import TokenType

# ---- SentencePiece tokenizer.model ------------------------------------------------------------

def sentencepiece_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """GGUF tokenizer metadata for a SentencePiece ``tokenizer.model``.

    Piece types map one to one (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE share their
    numbers with GGUF); ``add_dummy_prefix`` becomes ``add_space_prefix``; BOS is added by
    default, EOS not (LLaMA's convention).
    """
    try:
        buf = Path(path).read_bytes()
    except OSError as e:
        raise TokenizerError(
            f"{path}: cannot read SentencePiece model: {e.strerror or e}"
        ) from None
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    ids = {"unk": 0, "bos": 1, "eos": 2, "pad": -1}  # TrainerSpec defaults
    add_dummy_prefix = True
    for field, value in fields(buf):
        if field == 1 and isinstance(value, bytes):  # SentencePiece piece
            piece, score, ptype = None, 0.0, int(TokenType.NORMAL)
            for f, v in fields(value):
                if f == 1 and isinstance(v, bytes):
                    try:
                        piece = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise TokenizerError(f"{path}: piece {len(tokens)} is not UTF-8") from None
                elif f == 2 and isinstance(v, bytes) and len(v) == 4:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and isinstance(v, int):
                    ptype = v
            if piece is None:
                raise TokenizerError(f"{path}: piece {len(tokens)} has no text")
            if not 1 <= ptype <= 6:
                raise TokenizerError(f"{path}: piece {len(tokens)} has unknown type {ptype}")
            tokens.append(piece)
            scores.append(score)
            types.append(ptype)
        elif field == 2 and isinstance(value, bytes):  # TrainerSpec
            names = {40: "unk", 41: "bos", 42: "eos", 43: "pad"}
            for f, v in fields(value):
                if f in names:
                    ids[names[f]] = as_int32(v)
        elif field == 3 and isinstance(value, bytes):  # NormalizerSpec
            for f, v in fields(value):
                if f == 3 and isinstance(v, int):
                    add_dummy_prefix = bool(v)
    if not tokens:
        raise TokenizerError(f"{path}: no pieces found (not a SentencePiece model?)")
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.add_space_prefix": add_dummy_prefix,
        "tokenizer.ggml.add_bos_token": ids["bos"] >= 0,
        "tokenizer.ggml.add_eos_token": False,
    }
    keys = {
        "unk": "unknown_token_id",
        "bos": "bos_token_id",
        "eos": "eos_token_id",
        "pad": "padding_token_id",
    }
    for name, key in keys.items():
        if 0 <= ids[name] < len(tokens):
            md["tokenizer.ggml." + key] = ids[name]
    return md


# ---- Hugging Face tokenizer.json -----------------------------------------------------------

# Split regexes as they appear in tokenizer.json files -> the GGUF pre-tokenizer name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_HF_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

_LOOKS_SPECIAL = re.compile(r"<\|.*\|>|<[^<>\s]+>|\[[A-Z_]+\]")


def _walk(node: Any) -> list[dict[str, Any]]:
    """Flatten a (possibly nested ``Sequence``) normalizer/pre-tokenizer/decoder into steps."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        steps: list[dict[str, Any]] = []
        for key in ("pretokenizers", "normalizers", "decoders", "processors"):
            for child in node.get(key) or []:
                steps.extend(_walk(child))
        return steps
    return [node]


def _infer_pre(pre_tokenizer: Any) -> str | None:
    steps = _walk(pre_tokenizer)
    kinds = [s.get("type") for s in steps]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    uses_regex = any(s.get("use_regex", True) for s in byte_level)
    if len(splits) == 1 and splits[0] in _HF_SPLITS and not uses_regex:
        return _HF_SPLITS[splits[0]]
    if not splits and byte_level and uses_regex:
        digits = [s for s in steps if s.get("type") == "Digits"]
        if not digits and kinds == ["ByteLevel"]:
            return "gpt-2"
        if digits and all(d.get("individual_digits") for d in digits) and len(kinds) == 2:
            return "smollm"  # same split as starcoder; differs only in decode-time clean-up
    return None


def _content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from None


def _folder_metadata(folder: Path, pre: str | None) -> dict[str, Any]:
    """A checkpoint folder: ``tokenizer.model`` for SentencePiece vocabularies (exact scores),
    else ``tokenizer.json``."""
    tj, tm = folder / "tokenizer.json", folder / "tokenizer.model"
    if tm.is_file():
        byte_level = False
        if tj.is_file():
            data = _read_json(tj)
            steps = (
                _walk(data.get("pre_tokenizer")) + _walk(data.get("decoder"))
                if isinstance(data, dict)
                else []
            )
            byte_level = any(s.get("type") == "ByteLevel" for s in steps)
        if not byte_level:
            md = sentencepiece_metadata(tm)
            _apply_tokenizer_config(
                md, folder / "tokenizer_config.json", md["tokenizer.ggml.tokens"]
            )
            return md
    if tj.is_file():
        return hf_tokenizer_metadata(tj, pre)
    raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model")


def hf_tokenizer_metadata(path: str | os.PathLike[str], pre: str | None = None) -> dict[str, Any]:
    """GGUF tokenizer metadata for a Hugging Face ``tokenizer.json`` with a BPE model, or for a
    checkpoint folder (its ``tokenizer.model`` when the vocabulary is SentencePiece-style, else
    its ``tokenizer.json``).

    Byte-level BPE (a ``ByteLevel`` pre-tokenizer or decoder) becomes ``model = "gpt2"`` with the
    pre-tokenizer recognised from the split regex (``pre`` overrides it, and is required when the
    split is not one we recognise); SentencePiece-style BPE (``▁`` for spaces, byte fallback)
    becomes ``model = "llama"`` with scores derived from the merge ranks (same merge priority).
    Added tokens become CONTROL when marked special or shaped like ``<|...|>``, else
    USER_DEFINED.  BOS/EOS and their add flags come from ``tokenizer_config.json`` next to the
    file when it exists.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_metadata(path, pre)
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(
            f"{path}: only BPE tokenizer.json files are supported (model type {kind!r})"
        )
    vocab = model["vocab"]
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{path}: model.vocab must be an object")
    added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise TokenizerError(f"{path}: bad id {tid!r} for token {text!r}")
        by_id[tid] = text
    special_added: dict[int, bool] = {}
    for t in added:
        tid, text = t.get("id"), t.get("content")
        if not isinstance(tid, int) or tid < 0 or not isinstance(text, str):
            raise TokenizerError(f"{path}: malformed added token {t!r}")
        by_id[tid] = text
        special_added[tid] = bool(t.get("special")) or bool(_LOOKS_SPECIAL.fullmatch(text))
    n = max(by_id) + 1 if by_id else 0
    if n == 0:
        raise TokenizerError(f"{path}: empty vocabulary")

    steps = _walk(data.get("pre_tokenizer")) + _walk(data.get("decoder"))
    byte_level = any(s.get("type") == "ByteLevel" for s in steps)
    unk_text = model.get("unk_token")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        text = by_id.get(i)
        if text is None:  # holes in the id space become unused padding tokens
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif text == unk_text:
            tokens.append(text)
            types.append(int(TokenType.UNKNOWN))
        elif i in special_added:
            if special_added[i]:
                tokens.append(text)
                types.append(int(TokenType.CONTROL))
            else:
                tokens.append(text.replace("\u2581", " ") if not byte_level else text)
                types.append(int(TokenType.USER_DEFINED))
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            tokens.append(text)
            types.append(int(TokenType.BYTE))
        else:
            tokens.append(text)
            types.append(int(TokenType.NORMAL))

    md: dict[str, Any] = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
    }
    merges: list[str] = []
    for m in model.get("merges") or []:
        if isinstance(m, str) and " " in m[1:]:
            merges.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            merges.append(f"{m[0]} {m[1]}")
        else:
            raise TokenizerError(f"{path}: malformed merge {m!r}")
    if byte_level:
        name = pre or _infer_pre(data.get("pre_tokenizer"))
        if name is None:
            raise TokenizerError(
                f"{path}: unrecognised pre-tokenizer "
                f"{json.dumps(data.get('pre_tokenizer'))[:200]}; "
                "pass pre=<tokenizer.ggml.pre name>"
            )
        md.update(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": name,
                "tokenizer.ggml.merges": merges,
            }
        )
    else:
        norm = _walk(data.get("normalizer")) + _walk(data.get("pre_tokenizer"))
        prefix = any(
            s.get("type") == "Prepend" and s.get("prepend") == "\u2581" for s in norm
        ) or any(
            s.get("type") == "Metaspace"
            and s.get("prepend_scheme", "always") != "never"
            and s.get("add_prefix_space", True)
            for s in norm
        )
        # SentencePiece-style merging goes by the score of the merged token.  The merge list is
        # ordered by that score, so a token's score is minus the rank of its first merge;
        # tokens no merge produces get a very low score (single characters never need one).
        first_rank: dict[str, int] = {}
        for rank, m in enumerate(merges):
            pos = m.find(" ", 1)
            first_rank.setdefault(m[:pos] + m[pos + 1 :], rank)
        scores = [
            -float(first_rank.get(text, 1e9)) if ttype == TokenType.NORMAL else 0.0
            for text, ttype in zip(tokens, types, strict=True)
        ]
        md.update(
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.pre": "default",
                "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
                "tokenizer.ggml.add_space_prefix": prefix,
            }
        )
        if isinstance(unk_text, str) and unk_text in tokens:
            md["tokenizer.ggml.unknown_token_id"] = tokens.index(unk_text)

    _apply_post_processor(md, data.get("post_processor"), tokens)
    _apply_tokenizer_config(md, path.parent / "tokenizer_config.json", tokens)
    # A byte-level vocabulary whose files name no BOS token cannot add one, whatever the
    # pre-tokenizer's default says.
    if byte_level and "tokenizer.ggml.bos_token_id" not in md:
        md["tokenizer.ggml.add_bos_token"] = False
    return md


def _apply_post_processor(md: dict[str, Any], post: Any, tokens: list[str]) -> None:
    """A ``TemplateProcessing`` post-processor names the tokens put around a single text."""
    index = {t: i for i, t in enumerate(tokens)}
    for step in _walk(post):
        single = step.get("single")
        if step.get("type") != "TemplateProcessing" or not isinstance(single, list) or not single:
            continue
        first, last = (_template_special(item, index) for item in (single[0], single[-1]))
        md["tokenizer.ggml.add_bos_token"] = first is not None
        md["tokenizer.ggml.add_eos_token"] = last is not None and len(single) > 1
        if first is not None:
            md["tokenizer.ggml.bos_token_id"] = first
        if last is not None and len(single) > 1:
            md["tokenizer.ggml.eos_token_id"] = last


def _template_special(item: Any, index: dict[str, int]) -> int | None:
    special = item.get("SpecialToken") if isinstance(item, dict) else None
    name = special.get("id") if isinstance(special, dict) else None
    return index.get(name) if isinstance(name, str) else None


def _apply_tokenizer_config(md: dict[str, Any], cfg_path: Path, tokens: list[str]) -> None:
    if not cfg_path.is_file():
        return
    cfg = _read_json(cfg_path)
    if not isinstance(cfg, dict):
        return
    index = {t: i for i, t in enumerate(tokens)}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        text = _content(cfg.get(name))
        if text is not None and text in index:
            md["tokenizer.ggml." + key] = index[text]
    for name in ("add_bos_token", "add_eos_token"):
        if isinstance(cfg.get(name), bool):
            md["tokenizer.ggml." + name] = cfg[name]
    if isinstance(cfg.get("chat_template"), str):
        md["tokenizer.chat_template"] = cfg["chat_template"]
