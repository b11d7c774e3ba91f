"""Vocabulary: GGUF ``tokenizer.ggml.*`` metadata turned into a validated, immutable table.

This module owns everything about the *vocabulary* (token texts, scores, types, merges, special
ids and the flags that steer tokenization) and none of the algorithms: ``spm.py`` and ``bpe.py``
read a :class:`Vocab`, they never look at metadata themselves.  Everything a malformed file could
get wrong is checked here once, so the encoders can index without bounds checks.

Semantics follow llama.cpp's vocabulary loader (the reference the vocab suites were made with):
per-model defaults for special ids and flags, then the metadata overrides them; end-of-generation
tokens are also recognised by their text (``<|im_end|>``, ``<|eot_id|>``, ...) because many
converted files do not name them.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from pyllm.errors import TokenizerError
from pyllm.formats.gguf.strings import StringArray
from pyllm.tokenizer.pretokenize import PreTokenizer, get_pretokenizer

KEY = "tokenizer.ggml."


class TokenType(enum.IntEnum):
    """GGUF ``tokenizer.ggml.token_type`` values (same numbering as SentencePiece's pieces)."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts that end a turn or the whole generation, recognised by name because converters rarely
# record them in metadata.  Tokens found this way are forced to CONTROL type (as llama.cpp does),
# so they are only parsed from text with parse_special=True.
EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "<|end_of_text|>",
        "<｜end▁of▁sentence｜>",
    }
)

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>\Z")

# Per-model defaults before metadata overrides them (llama.cpp's choices for "llama"; for "gpt2"
# llama.cpp defaults BOS/EOS to id 11, an artefact of one early model -- we use "none" instead).
_SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unk": 0}

_ID_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "sep": "seperator_token_id",  # sic: the GGUF spec's spelling
    "pad": "padding_token_id",
    "eot": "eot_token_id",
    "eom": "eom_token_id",
    "mask": "mask_token_id",
}


@dataclass(frozen=True)
class Vocab:
    """A validated vocabulary.  Build with :func:`vocab_from_metadata`."""

    model: str  # "llama" (SentencePiece-style) or "gpt2" (byte-level BPE)
    # A GGUF file's StringArray for byte-level BPE (each token read from the file when used: its
    # strings would be megabytes held for the process's life), else a list.
    tokens: Sequence[str]
    scores: list[float]
    types: list[int]  # TokenType values, after llama.cpp's EOG-name fix-up
    # The merges as stored, "left right" in rank order (empty for "llama"): split on first use
    # (:attr:`merges`), since the extension builds the BPE pair table from these texts directly
    # (a GGUF file's StringArray: from the file's bytes, no str made).
    merge_texts: Sequence[str]
    pre: PreTokenizer | None  # None for "llama"
    special_ids: dict[str, int]  # "bos", "eos", "unk", "pad", ... -> id (absent when none)
    eog_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    ignore_merges: bool
    byte_to_id: list[int | None]  # SPM byte fallback: byte value -> <0xNN> token id
    special_tokens: list[int] = field(default_factory=list)  # partition order: longest first
    # Special tokens that swallow the whitespace before (lstrip) / after (rstrip) them when cut
    # out of text.  GGUF has no field for this; llama.cpp sets it for a few models by name.
    lstrip_ids: frozenset[int] = frozenset()
    rstrip_ids: frozenset[int] = frozenset()

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def token_to_id(self) -> dict[str, int]:
        """Token text -> id, built on first use: a byte-level BPE vocabulary encodes without it
        (the extension's merge table), and 100k+ entries are megabytes."""
        return dict(zip(self.tokens, range(self.n_vocab), strict=True))

    @functools.cached_property
    def merges(self) -> list[tuple[str, str]]:
        """(left, right) in rank order; empty for "llama".

        Raises:
            TokenizerError: a merge that is not "left right".
        """
        return _split_merges(self.merge_texts)


def _get_str(md: Mapping[str, Any], key: str, default: str | None = None) -> str | None:
    value = md.get(key, default)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _get_bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TokenizerError(f"{key} must be a bool, got {value!r}")


# struct formats of the reader's typed memoryviews (pyllm.formats.gguf.GGUFReader.fields)
_INT_FORMATS = frozenset("bBhHiIlLqQ?")
_FLOAT_FORMATS = frozenset("fd")


def _number_array(md: Mapping[str, Any], key: str, n: int, kind: type) -> list[Any] | None:
    """A numeric metadata array as a fresh list of ``kind`` (int or float), never a view of
    the file. The reader's memoryviews are read without numpy (a cold start builds the
    tokenizer before anything needs numpy); other sequences are checked with numpy."""
    raw = md.get(key)
    if raw is None:
        return None
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__len__"):
        raise TokenizerError(f"{key} must be an array, got {type(raw).__name__}")
    if len(raw) != n:
        raise TokenizerError(f"{key} has {len(raw)} entries but tokenizer.ggml.tokens has {n}")
    if isinstance(raw, memoryview):
        fmt = raw.format
        if raw.ndim != 1 or fmt not in _INT_FORMATS | _FLOAT_FORMATS or (
                kind is int and fmt in _FLOAT_FORMATS):
            raise TokenizerError(f"{key} must be a flat array of numbers, got format {fmt!r}")
        values = raw.tolist()
        return values if (fmt in _FLOAT_FORMATS) == (kind is float) and fmt != "?" \
            else list(map(kind, values))
    import numpy as np

    arr = np.asarray(raw)
    if (
        arr.ndim != 1
        or arr.dtype.kind not in ("i", "u", "f", "b")
        or (kind is int and arr.dtype.kind == "f")
    ):
        raise TokenizerError(f"{key} must be a flat array of numbers, got {arr.dtype} {arr.shape}")
    return np.array(arr, dtype=np.float64 if kind is float else np.int64).tolist()  # type: ignore[no-any-return]


def _token_list(md: Mapping[str, Any]) -> list[str]:
    raw = md.get(KEY + "tokens")
    if raw is None:
        raise TokenizerError("metadata has no tokenizer.ggml.tokens array")
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise TokenizerError(
            f"tokenizer.ggml.tokens must be an array of strings, got {type(raw).__name__}"
        )
    if len(raw) == 0:
        raise TokenizerError("tokenizer.ggml.tokens is empty")
    # Checks run as C-level passes (map/set/in): vocabularies have up to ~256k entries.
    tokens = list(raw)
    if set(map(type, tokens)) != {str}:
        i = next(i for i, t in enumerate(tokens) if not isinstance(t, str))
        raise TokenizerError(
            f"tokenizer.ggml.tokens[{i}] is {type(tokens[i]).__name__}, not a string"
        )
    if "" in tokens:
        # llama.cpp renames empty tokens rather than failing; an empty key would otherwise make
        # every text match it.
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    return tokens


def _merge_texts(md: Mapping[str, Any]) -> Sequence[str]:
    raw = md.get(KEY + "merges")
    if raw is None:
        raise TokenizerError("BPE vocabulary (model gpt2) has no tokenizer.ggml.merges array")
    if isinstance(raw, StringArray):
        return raw  # strings by construction, kept in the file until read
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise TokenizerError("tokenizer.ggml.merges must be an array of strings")
    raw = list(raw)
    if raw and set(map(type, raw)) != {str}:
        i = next(i for i, m in enumerate(raw) if not isinstance(m, str))
        raise TokenizerError(f"tokenizer.ggml.merges[{i}] is not a string")
    return raw


def _split_merges(texts: Sequence[str]) -> list[tuple[str, str]]:
    raw = list(texts)  # decoded once (a StringArray decodes each time it is read)
    if not raw:
        return []
    # Fast path, all C-level passes: when every merge has exactly one space and no newline
    # (always so for byte-level vocabularies), one join/replace/split yields left, right, left,
    # right, ...  Otherwise split each at its first space after position 0, as llama.cpp does
    # (a left part may itself be a space where spaces are not byte-encoded).
    joined = "\n".join(raw)
    if set(map(str.count, raw, repeat(" "))) == {1} and joined.count("\n") == len(raw) - 1:
        flat = joined.replace(" ", "\n").split("\n")
        lefts, rights = flat[0::2], flat[1::2]
        if "" not in lefts and "" not in rights:
            return list(zip(lefts, rights, strict=True))
    return [_split_merge(i, m) for i, m in enumerate(raw)]


def _split_merge(i: int, merge: str) -> tuple[str, str]:
    pos = merge.find(" ", 1)
    if pos < 0 or pos == len(merge) - 1:
        raise TokenizerError(f"tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
    return merge[:pos], merge[pos + 1 :]


def _special_ids(md: Mapping[str, Any], model: str, n: int) -> dict[str, int]:
    ids: dict[str, int] = dict(_SPM_DEFAULT_IDS) if model == "llama" else {}
    for name, key in _ID_KEYS.items():
        value = md.get(KEY + key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TokenizerError(f"{KEY}{key} must be an integer, got {value!r}")
        # -1 (0xFFFFFFFF read as signed) is how some converters say "none".
        if value in (-1, 0xFFFFFFFF):
            ids.pop(name, None)
            continue
        if not 0 <= value < n:
            raise TokenizerError(f"{KEY}{key} = {value} is out of range for a {n}-token vocabulary")
        ids[name] = value
    # Defaults that do not exist in a small vocabulary are dropped rather than kept dangling.
    return {k: v for k, v in ids.items() if v < n}


def vocab_from_metadata(md: Mapping[str, Any]) -> Vocab:
    """Validate GGUF tokenizer metadata and build a :class:`Vocab`.

    Raises:
        TokenizerError: missing or inconsistent arrays, ids out of range, bad byte tokens,
            an unknown model or pre-tokenizer type.
    """
    model = _get_str(md, KEY + "model")
    if model is None:
        raise TokenizerError("metadata has no tokenizer.ggml.model")
    if model not in ("llama", "gpt2"):
        raise TokenizerError(
            f"unsupported tokenizer model {model!r} (supported: 'llama' SentencePiece, 'gpt2' BPE)"
        )
    raw_tokens = md.get(KEY + "tokens")
    token_to_id: Mapping[str, int]
    tokens: Sequence[str]
    if model == "gpt2" and isinstance(raw_tokens, StringArray) and len(raw_tokens) \
            and raw_tokens.find("") < 0:
        # A byte-level BPE vocabulary encodes and decodes by id (the extension's merge table
        # reads the file's bytes), so it keeps the file's array: checked and looked up in place,
        # with no str made for its 100k+ tokens.
        tokens, token_to_id = raw_tokens, _FileTokens(raw_tokens)
    else:
        tokens = _token_list(md)
        token_to_id = dict(zip(tokens, range(len(tokens)), strict=True))
    n = len(tokens)
    score_list = _number_array(md, KEY + "scores", n, float)
    if score_list is not None and any(x != x for x in score_list):  # NaN: no merge order
        i = next(i for i, x in enumerate(score_list) if x != x)
        raise TokenizerError(f"tokenizer.ggml.scores[{i}] is NaN")
    type_list = _number_array(md, KEY + "token_type", n, int)
    if type_list is not None and not 0 <= min(type_list, default=0) <= max(type_list,
                                                                          default=0) <= 6:
        i = next(i for i, t in enumerate(type_list) if not 0 <= t <= 6)
        raise TokenizerError(
            f"tokenizer.ggml.token_type[{i}] = {type_list[i]} is not a known token type"
        )
    scores: list[float] = score_list if score_list is not None else [0.0] * n
    types: list[int] = type_list if type_list is not None else [int(TokenType.NORMAL)] * n

    if isinstance(tokens, StringArray):
        twice = tokens.first_duplicate()
    else:
        twice = _first_duplicate(tokens) if len(token_to_id) != n else None
    if twice is not None:
        i, j = twice
        raise TokenizerError(
            f"token {tokens[j]!r} appears twice in tokenizer.ggml.tokens (ids {i} and {j})")

    # SentencePiece byte-fallback tokens must spell their byte.  (Byte-level BPE vocabularies
    # do not use BYTE tokens -- they render as nothing there, as in llama.cpp.)
    byte_to_id: list[int | None] = [None] * 256
    byte_type = int(TokenType.BYTE)
    for i in [i for i, t in enumerate(types) if t == byte_type] if model == "llama" else []:
        m = _BYTE_TOKEN.match(tokens[i])
        if m is None:
            raise TokenizerError(f"byte token {i} is {tokens[i]!r}, expected the form <0xNN>")
        byte_to_id[int(m.group(1), 16)] = i

    pre_name = _get_str(md, KEY + "pre")
    merge_texts: Sequence[str] = []
    pre: PreTokenizer | None = None
    if model == "gpt2":
        merge_texts = _merge_texts(md)
        pre = get_pretokenizer(pre_name or "default")
        add_space_prefix, clean_spaces, ignore_merges = False, pre.clean_spaces, pre.ignore_merges
        add_bos, add_eos = pre.add_bos, False
    else:
        add_space_prefix, clean_spaces, ignore_merges = True, False, False
        add_bos, add_eos = True, False

    add_space_prefix = _get_bool(md, KEY + "add_space_prefix", add_space_prefix)
    add_bos = _get_bool(md, KEY + "add_bos_token", add_bos)
    add_eos = _get_bool(md, KEY + "add_eos_token", add_eos)

    special = _special_ids(md, model, n)
    if add_bos and "bos" not in special:
        raise TokenizerError(
            "tokenizer.ggml.add_bos_token is set but the vocabulary has no BOS token"
        )
    if add_eos and "eos" not in special:
        raise TokenizerError(
            "tokenizer.ggml.add_eos_token is set but the vocabulary has no EOS token"
        )

    # End-of-generation set: EOS, named EOT/EOM, and control-looking names (forced to CONTROL).
    eog: set[int] = set()
    for name in EOG_TEXTS:
        tid = token_to_id.get(name)
        if tid is not None:
            eog.add(tid)
            types[tid] = int(TokenType.CONTROL)
    if "eot" not in special:
        for name in (
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<EOT>",
        ):
            if name in token_to_id:
                special["eot"] = token_to_id[name]
                break
    for name in ("eos", "eot", "eom"):
        if name in special:
            eog.add(special[name])

    # Tokens cut out of raw text before the model's own algorithm runs, longest text first so
    # that "<|im_start|>" wins over a shorter token that is its prefix.
    special_types = {int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.UNKNOWN)}
    partition = [i for i, t in enumerate(types) if t in special_types]
    partition.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))

    lstrip, rstrip = _strip_attributes(md, pre_name, token_to_id, partition)

    vocab = Vocab(
        model=model,
        tokens=tokens,
        scores=scores,
        types=types,
        merge_texts=merge_texts,
        pre=pre,
        special_ids=special,
        eog_ids=frozenset(eog),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        clean_spaces=clean_spaces,
        ignore_merges=ignore_merges,
        byte_to_id=byte_to_id,
        special_tokens=partition,
        lstrip_ids=lstrip,
        rstrip_ids=rstrip,
    )
    if model == "llama":  # SentencePiece merges by text: it needs the table, built already
        vocab.__dict__["token_to_id"] = token_to_id
    return vocab


def _first_duplicate(tokens: Sequence[str]) -> tuple[int, int] | None:
    seen: dict[str, int] = {}
    for j, tok in enumerate(tokens):
        i = seen.setdefault(tok, j)
        if i != j:
            return i, j
    return None


class _FileTokens(Mapping[str, int]):
    """A GGUF file's token array as the text -> id lookup that :func:`vocab_from_metadata`
    checks and reads a few names from: searched in the file (StringArray.find), never
    decoded whole."""

    def __init__(self, array: StringArray) -> None:
        self.array = array

    def __getitem__(self, text: str) -> int:
        i = self.array.find(text) if isinstance(text, str) else -1
        if i < 0:
            raise KeyError(text)
        return i

    def __iter__(self) -> Iterator[str]:
        return iter(self.array)

    def __len__(self) -> int:
        return len(self.array)


def _strip_attributes(
    md: Mapping[str, Any], pre_name: str | None, token_to_id: Mapping[str, int],
    partition: list[int]
) -> tuple[frozenset[int], frozenset[int]]:
    """llama.cpp's per-model whitespace-stripping attributes, keyed on names as it does: Phi-3's
    special tokens eat the whitespace after them (its template puts "\n" after "<|user|>" that
    the model never saw), Jina v2's "<mask>" the whitespace before it."""
    name = md.get("general.name")
    name = name.lower() if isinstance(name, str) else ""
    lstrip: set[int] = set()
    rstrip: set[int] = set()
    if pre_name in ("jina-v2-de", "jina-v2-es", "jina-v2-code") and "<mask>" in token_to_id:
        lstrip.add(token_to_id["<mask>"])
    elif "phi-3" in name or "phi3" in name:
        rstrip.update(partition)
        if "</s>" in token_to_id:
            rstrip.add(token_to_id["</s>"])
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            rstrip.discard(token_to_id.get(text, -1))
    return frozenset(lstrip), frozenset(rstrip)
