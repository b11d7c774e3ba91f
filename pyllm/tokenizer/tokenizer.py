"""The public :class:`Tokenizer`: special tokens, BOS/EOS, and dispatch to SPM or BPE.

Encoding follows llama.cpp's ``llama_vocab::tokenize``: first the text is partitioned around
special tokens (user-defined tokens always; control and unknown tokens only with
``parse_special=True``), longest token text first; each remaining raw-text fragment is encoded by
the vocabulary's algorithm.  For SentencePiece vocabularies a fragment at the start of the text or
right after a special token gets the leading space (``add_space_prefix``).

Decoding renders each id's piece (control tokens as their text unless skipped, byte tokens as
their byte, "▁" as a space, byte-level BPE characters as their bytes) and joins the bytes.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

from pyllm.errors import ContextError, TokenizerError
from pyllm.tokenizer.bpe import BpeModel, token_text_to_bytes
from pyllm.tokenizer.detok import StreamDecoder, clean_up_spaces
from pyllm.tokenizer.spm import SPACE, SpmModel
from pyllm.tokenizer.vocab import TokenType, Vocab, vocab_from_metadata

_SPECIAL_TYPES = (TokenType.CONTROL, TokenType.UNKNOWN)
_C_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips next to special tokens


class Tokenizer:
    """Exact llama.cpp-compatible tokenizer for SentencePiece (``llama``) and byte-level BPE
    (``gpt2``) vocabularies stored as GGUF ``tokenizer.ggml.*`` metadata.

    Build with :meth:`from_gguf`, :meth:`from_metadata`, :meth:`from_sentencepiece_model` or
    :meth:`from_hf_json`.

    Args:
        vocab: The parsed vocabulary (what the ``from_*`` constructors build).
    """

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab
        self._model: SpmModel | BpeModel = (
            SpmModel(vocab) if vocab.model == "llama" else BpeModel(vocab)
        )
        # Pieces are computed on first use and kept by id: building 128k of them up front (or
        # a list with a slot for each) costs more than most programs will ever decode.
        self._pieces: dict[int, bytes] = {}  # control tokens rendered
        self._pieces_plain: dict[int, bytes] = {}  # control tokens rendered as ""
        self._max_token_bytes: int | None = None
        # (id, text) of the tokens cut out of raw text, in partition order, looked up once (a
        # byte-level vocabulary reads each token from its file when asked)
        self._special_texts = [(tid, vocab.tokens[tid]) for tid in vocab.special_tokens]

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From a GGUF metadata mapping (``tokenizer.ggml.*`` keys).

        Args:
            metadata: GGUF metadata (``reader.metadata``).

        Returns:
            The tokenizer.
        """
        return cls(vocab_from_metadata(metadata))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a GGUF file (a full model, any shard of a split one, or a vocab-only file;
        tensor data is never read). A byte-level BPE tokenizer reads its tokens from the file
        when it needs them, so it keeps the file mapped (not resident) while it lives.

        Args:
            path: The GGUF file.

        Returns:
            The tokenizer.
        """
        from pyllm.formats.gguf.split import open_gguf

        reader = open_gguf(path)
        try:
            # the parsed fields: no numpy, and the merges are read from the file's bytes
            return cls.from_metadata(reader.fields)
        finally:
            reader.close()

    @classmethod
    def from_sentencepiece_model(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """From a SentencePiece ``tokenizer.model`` file (see :func:`sentencepiece_metadata`).

        Args:
            path: The ``tokenizer.model`` file.

        Returns:
            The tokenizer.
        """
        from pyllm.tools.convert.tokenizer_files import sentencepiece_metadata

        return cls.from_metadata(sentencepiece_metadata(path))

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike[str], pre: str | None = None) -> Tokenizer:
        """From a Hugging Face ``tokenizer.json`` (see :func:`hf_tokenizer_metadata`).

        Args:
            path: The ``tokenizer.json`` file.
            pre: The pre-tokenizer name when the split pattern is not recognised.

        Returns:
            The tokenizer.
        """
        from pyllm.tools.convert.tokenizer_files import hf_tokenizer_metadata

        return cls.from_metadata(hf_tokenizer_metadata(path, pre=pre))

    # ---- properties ----------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """``"llama"`` (SentencePiece-style) or ``"gpt2"`` (byte-level BPE)."""
        return self.vocab.model

    @property
    def pre(self) -> str | None:
        """Canonical pre-tokenizer name for BPE vocabularies, else None."""
        return self.vocab.pre.name if self.vocab.pre is not None else None

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.vocab.special_ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self.vocab.special_ids.get("eos")

    @property
    def unk_id(self) -> int | None:
        return self.vocab.special_ids.get("unk")

    @property
    def pad_id(self) -> int | None:
        return self.vocab.special_ids.get("pad")

    @property
    def eot_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, EOT/EOM and end-of-turn control tokens such as
        ``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``<end_of_turn>`` (sorted)."""
        return tuple(sorted(self.vocab.eog_ids))

    @property
    def add_bos(self) -> bool:
        return self.vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self.vocab.add_eos

    @property
    def max_token_bytes(self) -> int:
        """Bytes of text the longest token stands for (its piece as decoded, control tokens by
        their text; at least 1).  No encoding of ``B`` bytes of text has fewer than
        ``B / max_token_bytes`` tokens, which lets :meth:`encode` refuse text too long for a
        context before spending time on it."""
        if self._max_token_bytes is None:
            # Every token covers its piece's bytes of the text (a SentencePiece leading space
            # is one more byte to cover, so it only adds tokens); hand-made BPE vocabularies
            # that lack part of the byte alphabet can drop bytes, the one exception.
            self._max_token_bytes = max(1, max(map(len, self.token_pieces(True))))
        return self._max_token_bytes

    def is_eog(self, token_id: int) -> bool:
        """Whether a token ends generation (EOS, EOT and the other end-of-generation ids).

        Args:
            token_id: A token id.

        Returns:
            True for an end-of-generation token.
        """
        return token_id in self.vocab.eog_ids

    def is_control(self, token_id: int) -> bool:
        """Whether a token is a control token (BOS, EOS, ``<|im_start|>``, ...).

        Args:
            token_id: A token id.

        Returns:
            True for a control token.
        """
        return self.vocab.types[self._check_id(token_id)] == TokenType.CONTROL

    def token_type(self, token_id: int) -> TokenType:
        """A token's type as the GGUF vocabulary stores it.

        Args:
            token_id: A token id.

        Returns:
            Its type (normal, control, user-defined, byte, unknown, unused).
        """
        return TokenType(self.vocab.types[self._check_id(token_id)])

    def id_to_token(self, token_id: int) -> str:
        """The token's stored text (e.g. ``"▁Hello"`` or ``"ĠHello"``).

        Args:
            token_id: A token id.

        Returns:
            Its stored text.
        """
        return self.vocab.tokens[self._check_id(token_id)]

    def token_to_id(self, text: str) -> int | None:
        """The id whose stored text is exactly ``text``, or None.

        Args:
            text: A token's stored text.

        Returns:
            Its id, or None.
        """
        return self.vocab.token_to_id.get(text)

    # ---- encoding ------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        add_special: bool = True,
        parse_special: bool = False,
        *,
        max_tokens: int | None = None,
    ) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: the text.
            add_special: add BOS/EOS where the vocabulary asks for them (``add_bos_token`` /
                ``add_eos_token``).
            parse_special: recognise control tokens written in the text (``"<|im_start|>"``
                becomes one token).  User-defined tokens are always recognised.
            max_tokens: the room left in the context.  When the text's UTF-8 length alone proves
                it needs more tokens than this (more than ``max_tokens * max_token_bytes``
                bytes, counting the BOS/EOS this call adds), :class:`ContextError` is raised
                before any tokenizing.  Text that passes can still come out longer than
                ``max_tokens``; the caller checks the result.

        Returns:
            The token ids.

        Raises:
            ContextError: the text cannot fit in ``max_tokens`` tokens.
            TokenizerError: ``text`` is not a valid string, ``max_tokens`` is not a count.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        try:
            n_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizerError(
                f"text is not valid Unicode (lone surrogate at {e.start})"
            ) from None
        vocab = self.vocab
        if max_tokens is not None:
            self._check_fits(text, n_bytes, add_special, max_tokens)
        out: list[int] = []
        if add_special and vocab.add_bos:
            out.append(vocab.special_ids["bos"])
        fragments = self._partition(text, parse_special) if text else []
        if isinstance(self._model, SpmModel):
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if vocab.add_space_prefix and prev_special:
                    frag = " " + frag
                self._model.encode(frag.replace(" ", SPACE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._model.encode(frag, out)
        if add_special and vocab.add_eos:
            out.append(vocab.special_ids["eos"])
        return out

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of ``text`` as it continues earlier text: no BOS/EOS, no SentencePiece
        dummy-prefix space, control tokens not parsed (what a grammar engine needs to tokenize
        the text a grammar forces in the middle of an output).

        Args:
            text: The text.

        Returns:
            Its token ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode_continuation() takes a str, got {type(text).__name__}")
        out: list[int] = []
        for frag in self._partition(text, False) if text else []:
            if isinstance(frag, int):
                out.append(frag)
            elif isinstance(self._model, SpmModel):
                self._model.encode(frag.replace(" ", SPACE), out)
            else:
                self._model.encode(frag, out)
        return out

    def _check_fits(self, text: str, n_bytes: int, add_special: bool, max_tokens: int) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise TokenizerError(f"max_tokens must be a count of tokens, got {max_tokens!r}")
        vocab = self.vocab
        added = int(add_special and vocab.add_bos) + int(add_special and vocab.add_eos)
        if vocab.lstrip_ids or vocab.rstrip_ids:
            # Special tokens that swallow whitespace leave it without a token: count only the
            # rest, so that the bound stays a proof.
            n_bytes = len(text.encode("utf-8")) - sum(map(text.count, _C_SPACE))
        if n_bytes <= max_tokens - added:
            # fits whatever the longest token (at least 1 byte): the bound, a pass over the
            # whole vocabulary, is only worked out for texts that could be too long
            return
        room = (max_tokens - added) * self.max_token_bytes
        if n_bytes > room:
            need = -(-n_bytes // self.max_token_bytes) + added
            raise ContextError(
                f"input too long for the context: {n_bytes} bytes of text need at least "
                f"{need} tokens, but only {max_tokens} fit"
            )

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of ``text``: a list of raw-text fragments and token ids."""
        vocab = self.vocab
        types = vocab.types
        fragments: list[str | int] = [text]
        for tid, tok in self._special_texts:
            if not parse_special and types[tid] in _SPECIAL_TYPES:
                continue
            if tok not in text:  # cheap C-level scan that rejects almost every token
                continue
            lstrip, rstrip = tid in vocab.lstrip_ids, tid in vocab.rstrip_ids
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or tok not in frag:
                    split.append(frag)
                    continue
                parts = frag.split(tok)
                last = len(parts) - 1
                for i, part in enumerate(parts):
                    if i:
                        split.append(tid)
                        if rstrip:
                            part = part.lstrip(_C_SPACE)
                    if lstrip and i < last:
                        part = part.rstrip(_C_SPACE)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    # ---- decoding ------------------------------------------------------------------------------

    def _check_id(self, token_id: Any) -> int:
        try:
            tid = operator.index(token_id)
        except TypeError:
            raise TokenizerError(
                f"token id must be an integer, got {type(token_id).__name__}"
            ) from None
        if not 0 <= tid < self.vocab.n_vocab:
            raise TokenizerError(
                f"token id {tid} is out of range for a {self.vocab.n_vocab}-token vocabulary"
            )
        return tid

    def _make_piece(self, tid: int, special: bool) -> bytes:
        return self._piece_of(self.vocab.tokens[tid], self.vocab.types[tid], special)

    def _piece_of(self, text: str, ttype: int, special: bool) -> bytes:
        vocab = self.vocab
        if ttype in _SPECIAL_TYPES:
            return text.encode("utf-8") if special else b""
        if ttype == TokenType.USER_DEFINED:
            return text.encode("utf-8")
        if ttype == TokenType.NORMAL:
            if vocab.model == "llama":
                return text.replace(SPACE, " ").encode("utf-8")
            return token_text_to_bytes(text)
        if ttype == TokenType.BYTE and vocab.model == "llama":
            return bytes([int(text[3:5], 16)])  # validated as <0xNN> when the vocab was built
        # Unused/undefined tokens (and byte tokens in a BPE vocabulary) render as nothing.
        return b""

    def token_pieces(self, special: bool = True) -> list[bytes]:
        """:meth:`token_to_bytes` of every id, in id order (one pass over the vocabulary; not
        kept: the caller holds what it needs).

        Args:
            special: Give control tokens their text.

        Returns:
            The bytes of each token.
        """
        vocab = self.vocab
        return [self._piece_of(text, ttype, special)
                for text, ttype in zip(list(vocab.tokens), vocab.types, strict=True)]

    def token_to_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes ``token_id`` contributes to decoded text (control tokens: their text when
        ``special``, else nothing).

        Args:
            token_id: A token id.
            special: Give control tokens their text.

        Returns:
            The bytes.
        """
        tid = self._check_id(token_id)
        cache = self._pieces if special else self._pieces_plain
        piece = cache.get(tid)
        if piece is None:
            piece = cache[tid] = self._make_piece(tid, special)
        return piece

    def token_to_piece(self, token_id: int, special: bool = True) -> str:
        """:meth:`token_to_bytes` as text (an incomplete UTF-8 sequence becomes U+FFFD).

        Args:
            token_id: A token id.
            special: Give control tokens their text.

        Returns:
            The text.
        """
        return self.token_to_bytes(token_id, special).decode("utf-8", errors="replace")

    def decode(
        self,
        ids: Iterable[int],
        skip_special: bool = False,
        clean_spaces: bool | None = None,
        strip_leading_space: bool | None = None,
    ) -> str:
        """Text of ``ids``.

        Args:
            ids: the token ids.
            skip_special: drop control and unknown tokens (BOS, EOS, ``<|im_end|>``, ...).
            clean_spaces: apply the " ," -> "," clean-up; default: the vocabulary's setting
                (on for GPT-2/Llama 3-style BPE, off for SentencePiece, SmolLM, Qwen2).
            strip_leading_space: drop one leading space of the first token, undoing the space
                SentencePiece adds when encoding; default: the vocabulary's ``add_space_prefix``.
                Pass False when decoding a continuation of earlier text.

        Returns:
            The text.
        """
        special = not skip_special
        cache = self._pieces if special else self._pieces_plain
        chunks: list[bytes] = []
        for token_id in ids:
            tid = self._check_id(token_id)
            piece = cache.get(tid)
            if piece is None:
                piece = cache[tid] = self._make_piece(tid, special)
            if piece or not skip_special:
                chunks.append(piece)
        if strip_leading_space is None:
            strip_leading_space = self.vocab.add_space_prefix
        # As llama.cpp: the strip applies to the first token only (skipped tokens do not count).
        if strip_leading_space and chunks and chunks[0][:1] == b" ":
            chunks[0] = chunks[0][1:]
        text = b"".join(chunks).decode("utf-8", errors="replace")
        if clean_spaces if clean_spaces is not None else self.vocab.clean_spaces:
            text = clean_up_spaces(text)
        return text

    def decoder(
        self, skip_special: bool = True, strip_leading_space: bool = False
    ) -> StreamDecoder:
        """An incremental decoder for streaming generated tokens (``feed(id) -> str``,
        ``flush() -> str``).  It never returns part of a UTF-8 character.

        ``strip_leading_space=True`` drops the SentencePiece leading space of the first non-empty
        piece (for decoding a text from its start); the default keeps it, which is right for
        tokens generated after a prompt.

        Args:
            skip_special: Drop control and unknown tokens.
            strip_leading_space: Drop the first piece's SentencePiece leading space.

        Returns:
            A new stream decoder.
        """
        return StreamDecoder(
            lambda t: self.token_to_bytes(t, not skip_special), strip_leading_space
        )

    def __repr__(self) -> str:
        kind = "SentencePiece" if self.model == "llama" else f"BPE/{self.pre}"
        return f"Tokenizer({kind}, n_vocab={self.n_vocab}, bos={self.bos_id}, eos={self.eos_id})"
