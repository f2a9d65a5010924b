"""llama.rn's media sidecar: ``<session>.meta`` beside a session file whose cache holds media.

A session file's token list holds ``-1`` (llama.cpp's ``LLAMA_TOKEN_NULL``) where media were evaluated: the
same for every medium, so on its own a loaded file cannot prove that its cached image is the one a new prompt
shows. The sidecar lists the media's bitmap hashes (llama.cpp's identity of a medium), in order, in llama.rn's
text format, so files move between llama.rn and llamacompat::

    rnllama-state-meta v1
    <count>
    <hash>            (one line per medium)

As llama.rn does: the sidecar is removed before a session is saved and written after, only when the saved
tokens keep every medium whole (fail closed: no sidecar beats a wrong one); one that is missing, of another
format or truncated counts as absent, and the media it would vouch for are evaluated again.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from ..errors import SessionError, compat_warning
from .atomic import atomic_write_bytes
from .sidecar import save_with_sidecar

__all__ = ["META_SUFFIX", "NULL_TOKEN", "meta_path", "write_meta", "read_meta", "save_with_media", "file_tokens"]

META_SUFFIX = ".meta"
NULL_TOKEN = -1  # LLAMA_TOKEN_NULL: a medium's positions in a session file's token list
_HEADER = "rnllama-state-meta v1"
_MAX_BYTES = 1 << 20  # a hash is a few dozen bytes: far more media than a context holds


def file_tokens(tokens: list[int], is_media: Callable[[int], bool]) -> list[int]:
    """``tokens`` as a session file lists them: a medium's positions as ``NULL_TOKEN``, as llama.rn writes them."""
    return [NULL_TOKEN if is_media(t) else t for t in tokens]


def save_with_media(path: str, write: Callable[[str], int], identity: dict[str, Any],
                    media_hashes: Callable[[], list[str]]) -> int:
    """``sidecar.save_with_sidecar``, with llama.rn's ``.meta`` around it: the old one goes first (a failed save
    then leaves the previous file whole, its media to be evaluated again when it is loaded: no sidecar beats
    a wrong one), the new one after. A sidecar that cannot be written costs a warning, not the saved file."""
    if path.lower().endswith(META_SUFFIX):  # lower: as save_with_sidecar guards its own sidecar's name
        raise SessionError(f"Failed to save session: {path} ends in '{META_SUFFIX}', the name of a session's media "
                           "sidecar (saving there would overwrite another session's); pick another name")
    write_meta(path, [])
    n_tokens = save_with_sidecar(path, write, identity)
    try:
        write_meta(path, media_hashes())
    except OSError as err:
        compat_warning(f"the media sidecar {meta_path(path)} was not written ({err.strerror or err}); the session "
                       "is saved, and its media are evaluated again when it is loaded")
    return n_tokens


def meta_path(session_path: str) -> str:
    return session_path + META_SUFFIX


def write_meta(session_path: str, hashes: list[str]) -> None:
    """The sidecar of ``session_path`` listing ``hashes`` (atomically); none when ``hashes`` is empty."""
    path = meta_path(session_path)
    if not hashes:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    atomic_write_bytes(path, "".join(f"{line}\n" for line in (_HEADER, str(len(hashes)), *hashes)).encode())


def read_meta(session_path: str) -> list[str]:
    """The media hashes the sidecar of ``session_path`` lists; [] when it has none it can vouch for."""
    try:
        with open(meta_path(session_path), "rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError:
        return []
    if len(data) > _MAX_BYTES:
        return []
    lines = data.decode("utf-8", "replace").split("\n")
    if len(lines) < 2 or lines[0] != _HEADER or not (lines[1].isascii() and lines[1].isdigit()):
        return []
    count = int(lines[1])
    hashes = [line for line in lines[2:2 + count] if line]
    return hashes if len(hashes) == count else []  # truncated: absent
