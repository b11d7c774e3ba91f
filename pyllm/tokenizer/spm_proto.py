"""SentencePiece ``ModelProto`` files in the protobuf wire format, without a protobuf package.

The runtime writes one from a GGUF SentencePiece-style vocabulary to run the ``sentencepiece``
library where it is exact (:func:`sentencepiece_model_from_vocab`); the converter reads a
checkpoint's ``tokenizer.model`` with :func:`fields` (``sentencepiece`` itself exposes neither
user-defined piece types nor ``add_dummy_prefix``).
"""

from __future__ import annotations

import struct

from pyllm.errors import TokenizerError
from pyllm.tokenizer.vocab import TokenType, Vocab


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise TokenizerError("truncated varint in SentencePiece model")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TokenizerError("varint longer than 10 bytes in SentencePiece model")


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into (field number, value) pairs: varints and fixed32 as int
    (fixed32 kept raw for floats), length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
            out.append((field, value))
        elif wire == 1:
            if pos + 8 > len(buf):
                raise TokenizerError("truncated fixed64 in SentencePiece model")
            out.append((field, buf[pos : pos + 8]))
            pos += 8
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            if pos + length > len(buf):
                raise TokenizerError("truncated field in SentencePiece model")
            out.append((field, buf[pos : pos + length]))
            pos += length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise TokenizerError("truncated fixed32 in SentencePiece model")
            out.append((field, buf[pos : pos + 4]))
            pos += 4
        else:
            raise TokenizerError(f"unsupported protobuf wire type {wire} in SentencePiece model")
    return out


def as_int32(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise TokenizerError("SentencePiece model: expected an integer field")
    value &= 0xFFFFFFFF  # negative int32s are sign-extended to 64 bits on the wire
    return value - (1 << 32) if value >= 1 << 31 else value


def _put_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s go on the wire sign-extended to 64 bits
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _put(number: int, value: int | float | bytes) -> bytes:
    if isinstance(value, bytes):
        return _put_varint(number << 3 | 2) + _put_varint(len(value)) + value
    if isinstance(value, float):
        return _put_varint(number << 3 | 5) + struct.pack("<f", value)
    return _put_varint(number << 3) + _put_varint(value)


def sentencepiece_model_from_vocab(vocab: Vocab, add_dummy_prefix: bool | None = None) -> bytes:
    """A SentencePiece ``ModelProto`` (BPE, byte fallback, no normalization) for a GGUF
    SentencePiece-style vocabulary: the inverse of
    :func:`pyllm.tools.convert.tokenizer_files.sentencepiece_metadata`, used to run
    the ``sentencepiece`` library on a GGUF vocabulary."""
    if vocab.model != "llama":
        raise TokenizerError("only SentencePiece-style (model 'llama') vocabularies convert")
    # The pieces, written inline (this runs at every load of such a model: the generic _put
    # took ~0.35 s for 32,000 pieces). Tags: piece 1 (bytes), score 2 (float), type 3 (varint).
    small = [bytes((i,)) for i in range(0x80)]  # one-byte varints

    def varint(n: int) -> bytes:
        return small[n] if 0 <= n < 0x80 else _put_varint(n)

    pack_score = struct.Struct("<f").pack
    unused = int(TokenType.UNUSED)
    parts = []
    for text, score, ttype in zip(vocab.tokens, vocab.scores, vocab.types, strict=True):
        # SentencePiece has no UNDEFINED type; such pieces are kept out of its merges as UNUSED.
        ptype = int(ttype) if ttype != TokenType.UNDEFINED else unused
        raw = text.encode("utf-8")
        piece = (b"\x0a" + varint(len(raw)) + raw + b"\x15" + pack_score(score)
                 + b"\x18" + varint(ptype))
        parts.append(b"\x0a" + varint(len(piece)) + piece)
    out = b"".join(parts)
    ids = vocab.special_ids
    trainer = _put(3, 2) + _put(35, 1)  # model_type = BPE, byte_fallback
    for field, name in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad")):
        trainer += _put(field, ids.get(name, -1))
    prefix = vocab.add_space_prefix if add_dummy_prefix is None else add_dummy_prefix
    # name = identity, add_dummy_prefix, remove_extra_whitespaces = false, escape_whitespaces
    normalizer = _put(1, b"identity") + _put(3, int(prefix)) + _put(4, 0) + _put(5, 1)
    return out + _put(2, trainer) + _put(3, normalizer)
