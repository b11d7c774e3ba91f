"""Tokenizers for LLaMA-family vocabularies (pure Python, exact against llama.cpp).

- ``vocab.py``: GGUF ``tokenizer.ggml.*`` metadata -> validated :class:`Vocab`.
- ``spm.py``: SentencePiece-style BPE (``model == "llama"``).
- ``bpe.py``: byte-level BPE (``model == "gpt2"``); ``pretokenize.py``: its regex splitters.
- ``detok.py``: streaming decoder, decode-time space clean-up.
- ``tokenizer.py``: :class:`Tokenizer`, the public entry point.
- ``convert.py``: ``tokenizer.model`` / ``tokenizer.json`` -> GGUF tokenizer metadata, and a
  GGUF SentencePiece vocabulary -> ``tokenizer.model`` bytes.

Usage::

    tok = pyllm.Tokenizer.from_gguf("model.gguf")      # vocab-only files work too
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    text = tok.decode(ids, skip_special=True)
    stream = tok.decoder()                              # for generated tokens
    for t in ids:
        print(stream.feed(t), end="")                   # never half a UTF-8 character
    print(stream.flush())
"""

from __future__ import annotations

from pyllm.tokenizer.detok import StreamDecoder
from pyllm.tokenizer.pretokenize import get_pretokenizer, pretokenizer_names
from pyllm.tokenizer.tokenizer import Tokenizer
from pyllm.tokenizer.vocab import TokenType, Vocab, vocab_from_metadata

__all__ = [
    "StreamDecoder",
    "TokenType",
    "Tokenizer",
    "Vocab",
    "get_pretokenizer",
    "pretokenizer_names",
    "vocab_from_metadata",
]
