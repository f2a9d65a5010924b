"""The sidecar: ``<session>.llamacompat.json`` beside a session file, with its checksum and who wrote it.

Every backend's session file (llama.cpp's ``ggsn``, mlx's safetensors, rkllm's prompt cache) goes
through here, so one sidecar format serves them all. It records:

- the size and CRC-32 of the whole session file, computed over the file the adapter wrote
  (streamed in 1 MiB blocks). A file that does not match is refused before any native loader reads
  it: flipped bytes, a truncated file, or a file another program rewrote without updating the
  sidecar. CRC-32 detects damage (any error burst up to 32 bits, anything else but for 1 in 2**32)
  at several GB/s, about three times the speed of sha256 here; it is no signature, and need not be: who can
  write the file can write its sidecar too;
- the backend, the model's fingerprint and the KV layout (llama.cpp's own header names only the
  architecture, so two models of the same architecture cannot be told apart from it).

A session file without a sidecar (written by llama.cpp or llama-cpp-python) loads unchecked.

A save writes the sidecar before the session file is renamed into place, listing the new file and,
under ``previous``, the one or two files the path held before: whichever file a crash leaves at the
path, the sidecar vouches for it (an old file that is whole keeps loading, with its own identity).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from typing import Any, Callable

from ..errors import SessionError
from .atomic import atomic_write, atomic_write_bytes

__all__ = ["SUFFIX", "sidecar_path", "save_with_sidecar", "read_sidecar", "check_identity", "file_crc32"]

logger = logging.getLogger(__name__)

SUFFIX = ".llamacompat.json"
FORMAT = "llamacompat-session-identity"
VERSION = 2  # 1 recorded only the first 64 KiB's hash, as a staleness hint
_BLOCK = 1 << 20


def sidecar_path(path: str) -> str:
    return path + SUFFIX


def file_crc32(path: str) -> str:
    """The CRC-32 of a file of any size, read in blocks (a big state never sits in memory twice)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _stamp(path: str) -> dict[str, Any]:
    return {"size": os.path.getsize(path), "crc32": file_crc32(path)}


def _encode(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _load(path: str) -> dict[str, Any] | None:
    """The sidecar of ``path`` as written by this version; None if there is none (or an older one)."""
    side = sidecar_path(path)
    try:
        with open(side, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise SessionError(f"Failed to load session: its sidecar {side} is unreadable ({err}); delete it to load "
                           f"{path} unchecked") from err
    if isinstance(doc, dict) and doc.get("format") == FORMAT and doc.get("version") == 1:
        logger.info("%s predates session checksums: %s loads unchecked", side, path)
        return None
    ours = isinstance(doc, dict) and isinstance(doc.get("previous", []), list)
    entries = [doc, *doc.get("previous", [])] if ours else []
    if (not entries or doc.get("format") != FORMAT or doc.get("version") != VERSION
            or not all(isinstance(e, dict) and isinstance(e.get("file"), dict) for e in entries)):
        raise SessionError(f"Failed to load session: {side} is not a llamacompat session sidecar of version {VERSION}; "
                           f"delete it to load {path} unchecked")
    return doc


def save_with_sidecar(path: str, write: Callable[[str], int], identity: dict[str, Any]) -> int:
    """Save a session atomically with ``write(tmp_path) -> n_tokens``, and its sidecar; return n_tokens.

    Raises ``SessionError`` for a path that is a sidecar's name, ``OSError`` (nothing changed) when a
    write fails.
    """
    if path.lower().endswith(SUFFIX):  # lower: a case-insensitive file system would clobber it all the same
        raise SessionError(f"Failed to save session: {path} ends in '{SUFFIX}', the name of a session's sidecar "
                           "(saving there would overwrite the checksum of another session); pick another name")
    side = sidecar_path(path)
    try:
        with open(side, "rb") as f:
            before: bytes | None = f.read()
    except FileNotFoundError:
        before = None
    try:
        old = _load(path)
    except SessionError:
        old = None  # a damaged sidecar vouches for nothing; the new one replaces it
    if not os.path.isfile(path):
        previous = []
    elif old is not None:  # two: after a crash mid-save, the file at the path is the sidecar's previous one
        previous = [{k: v for k, v in old.items() if k != "previous"}, *old.get("previous", [])][:2]
    else:  # a file without our sidecar stays loadable (unchecked) until the rename
        previous = [{"file": _stamp(path), "unchecked": True}]
    written = []

    def write_with_sidecar(tmp: str) -> None:
        n_tokens = write(tmp)
        doc = {"format": FORMAT, "version": VERSION, "n_tokens": n_tokens, "file": _stamp(tmp), **identity}
        atomic_write_bytes(side, _encode({**doc, "previous": previous} if previous else doc))
        written.append(n_tokens)

    try:
        atomic_write(path, write_with_sidecar)
    except BaseException:
        if written:  # the new sidecar is in place but its file is not: put the old sidecar back
            with contextlib.suppress(OSError):
                atomic_write_bytes(side, before) if before is not None else os.unlink(side)
        raise
    return written[0]


def read_sidecar(path: str) -> dict[str, Any] | None:
    """What the sidecar says about the session file at ``path``, checked against the file's size and
    CRC-32: the saver's identity, or None when there is no sidecar (a foreign file: unchecked).

    ``SessionError`` when the file does not match its sidecar or the sidecar is damaged.
    """
    doc = _load(path)
    if doc is None:
        return None
    entries = [doc, *doc.get("previous", [])]
    size = os.path.getsize(path)
    if any(e["file"].get("size") == size for e in entries):  # read only when the size could match
        stamp = {"size": size, "crc32": file_crc32(path)}
        for entry in entries:
            if entry["file"] == stamp:
                return None if entry.get("unchecked") else entry
    expected = " or ".join(dict.fromkeys(f"{e['file'].get('size')} bytes" for e in entries))
    raise SessionError(f"Failed to load session: {path} does not match the checksum in {sidecar_path(path)} "
                       f"({size} bytes, expected {expected} with the recorded CRC-32): the file is damaged, or "
                       "another program rewrote it (delete the sidecar to load it unchecked)")


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """``SessionError`` naming every difference between the saver's identity and this context's."""
    problems = []
    for key in ("backend", "model", "layout"):
        want, have = saved.get(key), current.get(key)
        if want != have:
            problems.append(f"{key}: saved {_describe(want)}, this context {_describe(have)}")
    if problems:
        raise SessionError(f"Failed to load session: {path} was saved by a different setup ({'; '.join(problems)})")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        label = value.get("desc") or value.get("name")
        fingerprint = value.get("fingerprint", "")
        if label or fingerprint:
            return f"{label or '?'} [{fingerprint[:12]}]" if fingerprint else str(label)
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return repr(value)
