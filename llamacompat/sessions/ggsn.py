"""llama.cpp's session file (``ggsn``): read and check the header in Python.

Layout, little-endian: u32 magic 0x6767736e, u32 version, u32 n_tokens,
n_tokens x i32 tokens, then the state stream, which starts with the model's
architecture name (u32 length + bytes) followed by the KV cache. We check all
of that before the native loader runs, so a wrong file is refused with a
message that says what is wrong, and the context is never touched.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import SessionError

__all__ = ["MAGIC", "SessionHeader", "read_header", "check_header"]

MAGIC = 0x6767736E  # "ggsn"
_HEAD = struct.Struct("<III")
_MAX_ARCH = 256  # architecture names are short; a larger length means a foreign file


@dataclass(frozen=True)
class SessionHeader:
    """What a ``ggsn`` file says about itself."""

    version: int
    tokens: list[int]
    arch: str
    file_size: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def state_size(self) -> int:
        """Bytes of state after the token list (architecture name included)."""
        return self.file_size - _HEAD.size - 4 * self.n_tokens


def read_header(path: str) -> SessionHeader:
    """Parse the header of the session file at ``path``; ``SessionError`` if it is not one."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size:
                raise SessionError(f"Failed to load session: {path} is {size} bytes, too short for a session file")
            magic, version, n_tokens = _HEAD.unpack(head)
            if magic != MAGIC:
                raise SessionError(
                    f"Failed to load session: {path} is not a llama.cpp session file (magic {magic:#010x}, expected {MAGIC:#010x})"
                )
            need = _HEAD.size + 4 * n_tokens + 4
            if size < need:
                raise SessionError(
                    f"Failed to load session: {path} is truncated: its header lists {n_tokens} tokens "
                    f"but the file has only {size} bytes"
                )
            tokens = np.frombuffer(f.read(4 * n_tokens), dtype="<i4").tolist()
            (arch_len,) = struct.unpack("<I", f.read(4))
            if arch_len > _MAX_ARCH or size < need + arch_len:
                raise SessionError(f"Failed to load session: {path} is truncated or corrupt (bad architecture name)")
            arch = f.read(arch_len).decode("utf-8", "replace")
    except OSError as err:
        if isinstance(err, SessionError):
            raise
        raise SessionError(f"Failed to load session: cannot read {path}: {err.strerror or err}") from err
    return SessionHeader(version, tokens, arch, size)


def check_header(header: SessionHeader, path: str, *, version: int, capacity: int, n_vocab: int, arch: str | None,
                 media: bool = False) -> None:
    """Refuse a file this context cannot load, naming the problem and the fix (``media``: -1, a medium's
    positions as llama.rn saves them, is taken)."""
    if header.version != version:
        raise SessionError(
            f"Failed to load session: {path} has session version {header.version}; this llama.cpp reads version {version} "
            "(session files are not portable across llama.cpp versions: re-create it)"
        )
    if header.n_tokens > capacity:
        raise SessionError(
            f"Failed to load session: {path} holds {header.n_tokens} tokens but the context has n_ctx {capacity}: "
            f"create the context with 'n_ctx' >= {header.n_tokens}"
        )
    bad = next((t for t in header.tokens if not 0 <= t < n_vocab and not (media and t == -1)), None)
    if bad is not None:
        hint = " (-1 marks media, which need multimodal support)" if bad == -1 else ""
        raise SessionError(
            f"Failed to load session: {path} holds token {bad}, outside this model's vocabulary (0..{n_vocab - 1}){hint}"
        )
    if arch is not None and header.arch != arch:
        raise SessionError(
            f"Failed to load session: {path} was saved by a '{header.arch}' model; this context runs a '{arch}' model"
        )
