"""Turning token ids back into text: streaming decoder and llama.cpp's space clean-up.

A token's piece is a byte string, and one UTF-8 character may be split across several tokens
(byte-fallback ``<0xE2><0x96><0x81>``, or byte-level BPE pieces of an emoji), so a streaming
decoder must hold back an incomplete character until the rest arrives and never print half of
it.  :class:`StreamDecoder` does that with Python's incremental UTF-8 decoder; invalid sequences
become U+FFFD instead of raising, as a model can emit any byte sequence.

SentencePiece's leading-space quirk: its pieces carry the space *before* a word ("▁Hello"), and
encoding adds one such space at the start of the text.  Decoding a whole text from its start
therefore drops one leading space; decoding a continuation (generated tokens after a prompt)
must keep it, or words run together ("Paris" instead of " Paris").  Both decoders take a flag.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable

_SPACE_BEFORE_PUNCT = re.compile(r" ([?!.,])")
_LONE_APOSTROPHE = re.compile(r" ' ")
_CONTRACTION = re.compile(r" '(?=[sm]|re|ve)")


def clean_up_spaces(text: str) -> str:
    """llama.cpp's ``clean_spaces`` post-processing (HF's ``clean_up_tokenization_spaces``):
    " ?" " !" " ." " ," lose the space, a lone " ' " becomes "'", and " 's" " 'm" " 're" " 've"
    lose the space.  The three passes run in this order, each over the previous one's output."""
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _LONE_APOSTROPHE.sub("'", text)
    return _CONTRACTION.sub("'", text)


class StreamDecoder:
    """Incremental detokenizer: ``feed(id)`` returns the text that became complete, ``flush()``
    the rest.  Concatenating every return value equals the one-shot decode of the same ids
    (without the clean-up pass, which needs look-ahead a stream does not have).

    Create it with :meth:`pyllm.Tokenizer.decoder`.
    """

    def __init__(self, piece: Callable[[int], bytes], strip_leading_space: bool) -> None:
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading_space

    def feed(self, token_id: int) -> str:
        data = self._piece(token_id)
        if not data:
            return ""
        if self._strip:
            self._strip = False
            if data[:1] == b" ":
                data = data[1:]
        return self._utf8.decode(data)

    def feed_many(self, token_ids: list[int]) -> str:
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Return what is still held back (an incomplete character becomes U+FFFD) and reset."""
        return self._utf8.decode(b"", final=True)
