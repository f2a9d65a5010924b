"""The identity sidecar: ``<session>.llamacompat.json`` beside a session file.

llama.cpp's session header names only the model architecture, so two models of
the same architecture cannot be told apart from it. The sidecar records which
backend and model wrote the file (plus the KV layout), so loading a session into
a different model is refused with a clear message. The sidecar also records
the session file's size and a hash of its first bytes: a sidecar that no longer
matches its file (the file was rewritten by another program) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from ..errors import SessionError
from .atomic import atomic_write_bytes

__all__ = ["SUFFIX", "sidecar_path", "write_sidecar", "read_sidecar", "check_identity"]

logger = logging.getLogger(__name__)

SUFFIX = ".llamacompat.json"
FORMAT = "llamacompat-session-identity"
_HEAD_BYTES = 1 << 16


def sidecar_path(path: str) -> str:
    return path + SUFFIX


def _file_stamp(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(_HEAD_BYTES)
        return {"size": os.fstat(f.fileno()).st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def write_sidecar(path: str, identity: dict[str, Any], n_tokens: int) -> None:
    """Record ``identity`` beside the session file at ``path`` (atomically)."""
    doc = {"format": FORMAT, "version": 1, "n_tokens": n_tokens, "file": _file_stamp(path), **identity}
    atomic_write_bytes(sidecar_path(path), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def read_sidecar(path: str) -> dict[str, Any] | None:
    """The identity recorded for the session file at ``path``; None if absent, unreadable or stale."""
    try:
        with open(sidecar_path(path), "rb") as f:
            doc = json.loads(f.read())
        stamp = _file_stamp(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable session sidecar %s: %s", sidecar_path(path), err)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        logger.warning("ignoring %s: not a llamacompat session sidecar", sidecar_path(path))
        return None
    if doc.get("file") != stamp:
        logger.info("ignoring stale sidecar %s: the session file was rewritten since", sidecar_path(path))
        return None
    return doc


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
