"""Pre-tokenizers for byte-level BPE: ``tokenizer.ggml.pre`` -> the regexes that split text.

A BPE vocabulary never merges across pre-token boundaries, so the split decides a lot of the
output.  Each pre-tokenizer is an ordered list of regexes, applied the way llama.cpp applies them:
the first regex cuts the text into its matches *and* the unmatched gaps between them, the next
regex cuts each of those pieces again, and so on.  The patterns are the ones the models'
``tokenizer.json`` files use (with llama.cpp's case-insensitivity rewrite of ``(?i:'s|...)``),
run with the ``regex`` module because they need Unicode classes such as ``\\p{L}``.

Each spec also carries the per-model flags llama.cpp ties to the pre-tokenizer name:
``clean_spaces`` (decode-time " ," -> "," clean-up), ``ignore_merges`` (a pre-token that is
already a whole token is emitted without running merges) and the default of ``add_bos``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyllm.errors import TokenizerError

if TYPE_CHECKING:
    import regex

# GPT-2's split.  The trailing "|\s+" of the original is what makes every character part of some
# match; llama.cpp drops it and keeps unmatched gaps instead, which yields the same pieces (a gap
# can only be one whitespace character before a non-space), so we keep it and split gap-free.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Llama 3's split, with (?i:...) spelled out per letter as llama.cpp does.
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2 / StableLM2: Llama 3's split with single digits.
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CJK = r"[一-龥ࠀ-一가-퟿]+"

# DeepSeek LLM's letter class (an explicit list of cased-letter ranges from its tokenizer.json).
_DEEPSEEK_LETTERS = (
    "\\s?["
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
    "]+"
)

_DEEPSEEK3 = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"

# name -> (patterns, clean_spaces, ignore_merges, add_bos)
_SPECS: dict[str, tuple[tuple[str, ...], bool, bool, bool]] = {
    "default": (
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
        True,
        False,
        False,
    ),
    "llama3": ((_LLAMA3,), True, True, True),
    "dbrx": ((_LLAMA3,), True, False, False),
    "chatglm-bpe": ((_LLAMA3,), True, False, False),
    "qwen2": ((_QWEN2,), False, False, False),
    "stablelm2": ((_QWEN2,), True, False, False),
    "gpt-2": ((_GPT2,), True, False, False),
    "starcoder": ((r"\p{N}", _GPT2), True, False, False),
    "smollm": ((r"\p{N}", _GPT2), False, False, False),
    "command-r": ((r"\p{N}", _GPT2), False, False, False),
    "falcon": ((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"), True, False, False),
    "deepseek-llm": (
        (
            r"[\r\n]",
            _DEEPSEEK_LETTERS,
            r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
            r"\s+\Z",
            _CJK,
            r"\p{N}+",
        ),
        False,
        False,
        False,
    ),
    "deepseek-coder": (
        (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
        False,
        False,
        False,
    ),
    "deepseek-v3": ((r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3), False, False, False),
    "tekken": ((_TEKKEN,), False, True, True),
    "bloom": ((_BLOOM,), True, False, False),
    "poro-chat": ((_BLOOM,), False, False, False),
    "viking": ((_BLOOM, r"\p{N}"), False, False, False),
}

# Other names llama.cpp accepts for the same behaviour.
_ALIASES = {
    "llama-bpe": "llama3",
    "llama-v3": "llama3",
    "falcon3": "llama3",
    "smaug-bpe": "dbrx",
    "megrez": "qwen2",
    "refact": "starcoder",
    "codeshell": "starcoder",
    "exaone": "starcoder",
    "minerva-7b": "starcoder",
    "mpt": "gpt-2",
    "olmo": "gpt-2",
    "jais": "gpt-2",
    "phi-2": "gpt-2",
    "jina-es": "gpt-2",
    "jina-de": "gpt-2",
    "jina-v1-en": "gpt-2",
    "jina-v2-es": "gpt-2",
    "jina-v2-de": "gpt-2",
    "jina-v2-code": "gpt-2",
    "gigachat": "gpt-2",
    "roberta-bpe": "gpt-2",
    "gpt3-finnish": "bloom",
}

# Patterns under which every character belongs to some match, so findall() alone splits.
_GAP_FREE = {_GPT2, _LLAMA3, _QWEN2}


@dataclass(frozen=True)
class PreTokenizer:
    """A named pre-tokenizer: ordered regexes plus the flags tied to its name."""

    name: str
    patterns: tuple[regex.Pattern[str], ...]
    gap_free: tuple[bool, ...]
    clean_spaces: bool
    ignore_merges: bool
    add_bos: bool

    def split(self, text: str) -> list[str]:
        """Cut ``text`` into pre-tokens (each non-empty; their concatenation is ``text``)."""
        pieces = [text]
        for pattern, gap_free in zip(self.patterns, self.gap_free, strict=True):
            out: list[str] = []
            for piece in pieces:
                if gap_free:
                    out.extend(pattern.findall(piece))
                    continue
                pos = 0
                for m in pattern.finditer(piece):
                    start, end = m.span()
                    if start == end:
                        continue
                    if start > pos:
                        out.append(piece[pos:start])
                    out.append(piece[start:end])
                    pos = end
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces


_CACHE: dict[str, PreTokenizer] = {}


def pretokenizer_names() -> list[str]:
    """Every ``tokenizer.ggml.pre`` value this module understands."""
    return sorted([*_SPECS, *_ALIASES])


def get_pretokenizer(name: str) -> PreTokenizer:
    """The pre-tokenizer for a ``tokenizer.ggml.pre`` value.

    Raises:
        TokenizerError: the name is unknown (as llama.cpp, we refuse rather than guess: a wrong
            split silently changes every encoding).
    """
    canonical = _ALIASES.get(name, name)
    cached = _CACHE.get(canonical)
    if cached is not None:
        return cached
    spec = _SPECS.get(canonical)
    if spec is None:
        raise TokenizerError(
            f"unknown pre-tokenizer {name!r} (tokenizer.ggml.pre); "
            f"known: {', '.join(pretokenizer_names())}"
        )
    patterns, clean_spaces, ignore_merges, add_bos = spec
    import regex  # imported here so that `import pyllm` works even where only SPM is used

    pre = PreTokenizer(
        name=canonical,
        patterns=tuple(regex.compile(p) for p in patterns),
        gap_free=tuple(p in _GAP_FREE for p in patterns),
        clean_spaces=clean_spaces,
        ignore_merges=ignore_merges,
        add_bos=add_bos,
    )
    _CACHE[canonical] = pre
    return pre
