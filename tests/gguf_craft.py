"""Byte-level GGUF builder for tests: assembles files field by field, including invalid ones."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


def gstr(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def kv_str(key: str, value: str) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def kv_raw(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


@dataclass
class TInfo:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int

    def encode(self) -> bytes:
        return (gstr(self.name) + struct.pack("<I", len(self.dims))
                + b"".join(struct.pack("<Q", d) for d in self.dims)
                + struct.pack("<IQ", self.ggml_type, self.offset))


@dataclass
class Crafted:
    magic: bytes = b"GGUF"
    version: int = 3
    kvs: list[bytes] = field(default_factory=list)
    tensors: list[TInfo] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    n_kv: int | None = None  # override the counts to lie about them
    n_tensors: int | None = None

    def build(self) -> bytes:
        head = self.magic + struct.pack(
            "<IQQ", self.version,
            len(self.tensors) if self.n_tensors is None else self.n_tensors,
            len(self.kvs) if self.n_kv is None else self.n_kv)
        body = head + b"".join(self.kvs) + b"".join(t.encode() for t in self.tensors)
        body += b"\0" * (-len(body) % self.alignment)
        return body + self.data


def f32_tensor_file(n: int = 8) -> Crafted:
    """A valid file with one F32 vector of n elements."""
    import numpy as np

    return Crafted(kvs=[kv_str("general.architecture", "llama")],
                   tensors=[TInfo("w", [n], 0, 0)],
                   data=np.arange(n, dtype=np.float32).tobytes())
