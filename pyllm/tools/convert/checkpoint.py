"""Checkpoint weight files behind one ``name -> float32 array`` interface.

Owns: finding a Hugging Face folder's weight files (``model.safetensors.index.json`` or
``pytorch_model.bin.index.json`` shards, else ``model*.safetensors`` / ``pytorch_model*.bin``),
opening them safely and loading one tensor at a time. Safetensors go through the
``safetensors`` library (bf16, which numpy lacks, is read from the file's bounds-checked
header); ``.bin`` files only through ``torch.load(weights_only=True)``, which refuses pickles
that reference anything but tensors and plain containers. torch is optional.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pyllm.errors import ConvertError


class _Shard:
    """One weight file: names, shapes, and loading one tensor as float32."""

    path: Path

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def load(self, name: str) -> np.ndarray:
        raise NotImplementedError


class _SafetensorsShard(_Shard):
    def __init__(self, path: Path) -> None:
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConvertError("reading .safetensors needs the safetensors package "
                               "(pip install 'pyllm[convert]')") from None
        self.path = path
        try:
            self._f = safe_open(str(path), framework="numpy")
            self._names = list(self._f.keys())
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ConvertError(f"{path.name}: not a valid safetensors file: {e}") from None
        self._header: dict[str, Any] | None = None

    def names(self) -> list[str]:
        return self._names

    def _slice(self, name: str) -> Any:
        try:
            return self._f.get_slice(name)
        except Exception as e:
            raise ConvertError(f"{self.path.name}: {name}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._slice(name).get_shape())

    def load(self, name: str) -> np.ndarray:
        dtype = self._slice(name).get_dtype()
        if dtype == "BF16":  # numpy has no bfloat16: read the raw 16-bit words ourselves
            return _bf16_to_f32(self._raw(name, 2).view("<u2")).reshape(self.shape(name))
        if dtype not in ("F32", "F16", "F64"):
            raise ConvertError(f"{self.path.name}: {name}: unsupported dtype {dtype}")
        try:
            arr = self._f.get_tensor(name)
        except Exception as e:
            raise ConvertError(f"{self.path.name}: {name}: {e}") from None
        return np.asarray(arr, dtype=np.float32)

    def _raw(self, name: str, itemsize: int) -> np.ndarray:
        """The bytes of one tensor, located through the file's JSON header (bounds-checked)."""
        size = self.path.stat().st_size
        if self._header is None:
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ConvertError(f"{self.path.name}: header length {n} exceeds the file")
                try:
                    self._header = json.loads(fh.read(n))
                except ValueError as e:
                    raise ConvertError(f"{self.path.name}: bad header: {e}") from None
            self._data_start = 8 + n
        entry = self._header.get(name) if isinstance(self._header, dict) else None
        try:
            begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
            count = int(np.prod(entry["shape"], dtype=np.int64))  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            raise ConvertError(f"{self.path.name}: {name}: bad header entry") from None
        if not 0 <= begin <= end <= size - self._data_start or end - begin != count * itemsize:
            raise ConvertError(f"{self.path.name}: {name}: data offsets out of range")
        return np.fromfile(self.path, dtype=np.uint8, count=end - begin,
                           offset=self._data_start + begin)


class _TorchBinShard(_Shard):
    """``pytorch_model*.bin`` via ``torch.load(weights_only=True)``: pickles that reference
    anything but tensors and plain containers (e.g. ``os.system``) are refused."""

    def __init__(self, path: Path) -> None:
        try:
            import torch
        except ImportError:
            raise ConvertError(
                f"{path.name}: reading PyTorch .bin checkpoints needs torch (pip install torch), "
                "or convert the folder to safetensors first") from None
        self.path = path
        self._torch = torch
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True,
                            mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            # torch's text suggests weights_only=False, which is exactly what must not happen;
            # keep only the line naming what the pickle tried to reach
            why = next((ln.strip() for ln in str(e).splitlines()
                        if "GLOBAL" in ln or "Unsupported" in ln), "not a weights-only pickle")
            raise ConvertError(f"{path.name}: refused: the pickle references something other "
                               f"than tensors ({why})") from None
        except Exception as e:  # RuntimeError/EOFError/... for junk
            raise ConvertError(f"{path.name}: unreadable checkpoint: {e}") from None
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]  # LLaMA2-Accessory's save_checkpoint: {"model": state dict}
        if not isinstance(sd, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise ConvertError(f"{path.name}: expected a dict of name -> tensor (or "
                               "{'model': that dict})")
        self._sd: dict[str, Any] = sd

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._sd[name].shape)

    def load(self, name: str) -> np.ndarray:
        t = self._sd[name]
        if not t.dtype.is_floating_point:
            raise ConvertError(f"{self.path.name}: {name}: unsupported dtype {t.dtype}")
        return t.detach().to(self._torch.float32).contiguous().numpy()


TorchBinShard = _TorchBinShard  # public name: the Meta converter opens its shards with it
SafetensorsShard = _SafetensorsShard  # and the LoRA converter an adapter's one file


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _shard_files(src: Path) -> list[Path]:
    """The weight files of a folder, preferring safetensors (as transformers does)."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConvertError(f"{index_name}: malformed index: {e}") from None
            out = []
            for f in files:
                # an index naming files outside the folder is refused
                if not isinstance(f, str) or Path(f).name != f or f in (".", ".."):
                    raise ConvertError(f"{index_name}: bad shard file name {f!r}")
                if not (src / f).is_file():
                    raise ConvertError(f"{index_name}: shard {f} is missing")
                out.append(src / f)
            return out
        found = sorted(src.glob("model*" + pattern[1:])) if pattern == "*.safetensors" \
            else sorted(src.glob(pattern))
        if not found and pattern == "*.safetensors":
            found = sorted(p for p in src.glob(pattern) if p.name != "consolidated.safetensors")
        if found:
            return found
    raise ConvertError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


class Checkpoint:
    """All shards of a folder behind one name -> tensor interface."""

    def __init__(self, src: Path) -> None:
        self.files = _shard_files(src)
        self._where: dict[str, _Shard] = {}
        for path in self.files:
            shard: _Shard = _SafetensorsShard(path) if path.suffix == ".safetensors" \
                else _TorchBinShard(path)
            for name in shard.names():
                if name in self._where:
                    raise ConvertError(f"tensor {name} appears in two shards")
                self._where[name] = shard
        self._last: tuple[str, np.ndarray] | None = None

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def load(self, name: str) -> np.ndarray:
        # one-entry cache: a fused tensor split into several GGUF tensors is read once
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        arr = self._where[name].load(name)
        self._last = (name, arr)
        return arr

    def forget(self) -> None:
        self._last = None
