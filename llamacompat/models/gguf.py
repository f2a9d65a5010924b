"""Read GGUF metadata without loading the model (llama.rn's ``loadLlamaModelInfo``).

Hand-written rather than ``gguf.GGUFReader``: that reader materialises every
tokenizer array (3.2 s on the 98 MB SmolLM2 file); this one skips them by
offset and answers in milliseconds, with no extra dependency.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

from ..errors import ModelLoadError

__all__ = ["load_model_info", "read_metadata", "read_gguf", "meta_value", "SKIPPED_KEYS"]

_MAGIC = b"GGUF"
# type id -> struct format for scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# llama.rn leaves out the tokenizer's big arrays.
SKIPPED_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores"})


class _Cursor:
    def __init__(self, buf: "mmap.mmap | bytes") -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + size]
        if len(raw) != size:
            raise struct.error("string runs past the end of the file")
        self.pos += size
        return bytes(raw).decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, kind: int, keep: bool) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if not keep:  # skip without decoding
                if item_kind in _SCALARS:
                    self.pos += count * struct.calcsize(_SCALARS[item_kind])
                else:
                    for _ in range(count):
                        self.skip_string() if item_kind == _STRING else self.value(item_kind, False)
                return None
            return [self.value(item_kind, True) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {kind}")


def _to_str(value: Any) -> str:
    """Stringify as llama.cpp's gguf_kv_to_str does (bools lower-case, floats %f, arrays bracketed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else _to_str(v) for v in value) + "]"
    return str(value)


def read_metadata(path: str, *, skip: frozenset[str] = SKIPPED_KEYS) -> dict[str, Any]:
    """GGUF header as typed values, plus ``version``, ``alignment`` and ``data_offset``."""
    return read_gguf(path, skip=skip)[0]


def read_gguf(path: str, *, skip: frozenset[str] = SKIPPED_KEYS) -> tuple[dict[str, Any], int]:
    """``read_metadata``'s header and the parameter count (the elements of every tensor)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"Failed to load model info: no such file: {path}")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf)
            if buf[:4] != _MAGIC:
                raise ModelLoadError(f"Failed to load model info: {path} is not a GGUF file (magic {bytes(buf[:4])!r})")
            cur.pos = 4
            version = cur.unpack("<I")
            if version < 2:
                raise ModelLoadError(f"Failed to load model info: GGUF version {version} is too old")
            n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
            info: dict[str, Any] = {"version": version}
            for _ in range(n_kv):
                key = cur.string()
                kind = cur.unpack("<I")
                value = cur.value(kind, key not in skip)
                if key not in skip:
                    info[key] = value
            alignment = int(info.get("general.alignment", 32))
            n_params = 0
            for _ in range(n_tensors):  # walk the tensor table to find where data starts
                cur.skip_string()
                n_dims = cur.unpack("<I")
                n_params += math.prod(struct.unpack_from(f"<{n_dims}Q", buf, cur.pos))
                cur.pos += 8 * n_dims + 4 + 8
            info["alignment"] = alignment
            info["data_offset"] = (cur.pos + alignment - 1) // alignment * alignment
            return info, n_params
    except (struct.error, ValueError, OSError) as err:
        raise ModelLoadError(f"Failed to load model info: {path} is truncated or corrupt ({err})") from err


def load_model_info(path: str) -> dict[str, str]:
    """llama.rn's shape: every key/value as a string, tokenizer arrays left out."""
    return {key: _to_str(value) for key, value in read_metadata(path).items()}


def meta_value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A GGUF metadata scalar as a Python value (``mx.load`` gives numbers and booleans as 0-d arrays)."""
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
