"""llama.cpp's per-sequence state file (``ggsq``, ``llama_state_seq_save_file``): read and check the header in Python.

Layout, little-endian: u32 magic 0x67677371, u32 version, u32 n_tokens, n_tokens x i32 tokens, then one
sequence's memory (its KV cells; no architecture name, unlike a ``ggsn`` session file). The memory may hold
more positions than the token list (llama.rn trims the list, not the memory); the loader drops the rest.
We check the header before the native loader runs, so a wrong file is refused with a message that says what
is wrong, and no slot is touched.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import SessionError
from .ggsn import MAGIC as SESSION_MAGIC

__all__ = ["SEQ_MAGIC", "SeqStateHeader", "read_seq_header", "parse_seq_header", "check_seq_header"]

SEQ_MAGIC = 0x67677371  # "ggsq"
_HEAD = struct.Struct("<III")
_MIN_STATE = 4  # the memory's own count (u32) at least


@dataclass(frozen=True)
class SeqStateHeader:
    """What a ``ggsq`` file says about itself."""

    version: int
    tokens: list[int]
    file_size: int

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def state_offset(self) -> int:
        """Where the sequence's memory starts in the file."""
        return _HEAD.size + 4 * self.n_tokens


def read_seq_header(path: str, what: str) -> SeqStateHeader:
    """Parse the header of the sequence state file at ``path``; ``SessionError`` (starting with ``what``) if it is
    not one."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEAD.size)
            n_tokens = _HEAD.unpack(head)[2] if len(head) == _HEAD.size else 0
            return parse_seq_header(head + f.read(4 * n_tokens), size, path, what)
    except OSError as err:
        if isinstance(err, SessionError):
            raise
        raise SessionError(f"{what}: cannot read {path}: {err.strerror or err}") from err


def parse_seq_header(data: bytes | bytearray | memoryview, size: int, path: str, what: str) -> SeqStateHeader:
    """The header at the start of ``data`` (at least the header and its tokens) of a ``size``-byte file."""
    if size < _HEAD.size or len(data) < _HEAD.size:
        raise SessionError(f"{what}: {path} is {size} bytes, too short for a llama.cpp sequence state file")
    magic, version, n_tokens = _HEAD.unpack_from(data)
    if magic != SEQ_MAGIC:
        hint = (" (it is a whole-context session file: load it with load_session, outside parallel mode)"
                if magic == SESSION_MAGIC else "")
        raise SessionError(f"{what}: {path} is not a llama.cpp sequence state file (magic {magic:#010x}, "
                           f"expected {SEQ_MAGIC:#010x}){hint}")
    if size < _HEAD.size + 4 * n_tokens + _MIN_STATE or len(data) < _HEAD.size + 4 * n_tokens:
        raise SessionError(f"{what}: {path} is truncated: its header lists {n_tokens} tokens but the file "
                           f"has only {size} bytes")
    tokens = np.frombuffer(data, dtype="<i4", count=n_tokens, offset=_HEAD.size).tolist()
    return SeqStateHeader(version, tokens, size)


def check_seq_header(header: SeqStateHeader, path: str, what: str, *, version: int, capacity: int,
                     n_vocab: int, media: bool = False) -> None:
    """Refuse a file this slot cannot take, naming the problem and the fix."""
    if header.version != version:
        raise SessionError(f"{what}: {path} has sequence state version {header.version}; this llama.cpp reads "
                           f"version {version} (state files are not portable across llama.cpp versions: re-create it)")
    if header.n_tokens > capacity:
        raise SessionError(f"{what}: {path} holds {header.n_tokens} tokens but a slot holds {capacity} "
                           "(n_ctx / n_parallel): use fewer slots or a larger n_ctx")
    bad = next((t for t in header.tokens if not 0 <= t < n_vocab and not (media and t == -1)), None)
    if bad is not None:
        hint = " (-1 marks media, which need multimodal support)" if bad == -1 else " (another model's file?)"
        raise SessionError(f"{what}: {path} holds token {bad}, outside this model's vocabulary "
                           f"(0..{n_vocab - 1}){hint}")
