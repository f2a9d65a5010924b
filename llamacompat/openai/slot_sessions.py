"""Sessions over llama-server's slot save/restore: the KV stays on the server, the client keeps a descriptor.

llama-server started with ``--slot-save-path DIR`` saves one slot's KV cache to a file in DIR
(``POST /slots/{id}?action=save``, body ``{"filename"}``) and restores it into a slot (``action=restore``).
The server answers with counts only: OpenAI-style replies do not say which slot served a request, and the
file stays on the server. So:

- **Home slots.** Each context of a server with slot saving pins its completions to one slot
  (``id_slot``), claimed the first time it needs one: the least claimed slot among this process's
  contexts on that server (``SlotClaims``), so up to ``-np`` contexts get a slot each and more take
  turns on shared ones. Its cache is then in a known slot, which ``save_session`` saves and
  ``load_session`` restores into. Parallel mode stays unpinned (the server spreads its requests).
- **The descriptor** at the caller's path is what the app keeps (llama.rn's session file): magic,
  version, the token count, a JSON body (the server-side file name, the model id, the server it was
  saved on, the text of the saved tokens) and a SHA-256 over all of it. Anything else (damaged,
  truncated, foreign, empty, a patched count) is refused before the server is asked.
- **Server-side names** are never the caller's path: ``llamacompat-<random 128-bit stem>-<0|1>.bin``.
  A save to a path that holds a valid descriptor keeps its stem and writes the other generation, so a
  failed save never touches the file the existing descriptor names, and a path costs at most two
  files on the server (the server has no delete; DIR is its operator's to clean).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import (
    GenerationError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    SessionError,
    UnsupportedFeatureError,
)
from ..models import local_path
from .http import HttpSession

__all__ = ["Descriptor", "SlotClaims", "CLAIMS", "encode", "decode", "read_descriptor", "probe_slot_saving", "slot_action",
           "new_stem", "server_file_name", "client_path", "NO_SLOT_SAVE"]

MAGIC = b"lcsv"  # llamacompat slot KV descriptor; the layout of llama.cpp's ggsn header (n_tokens at 8..12)
VERSION = 1
_HEAD = struct.Struct("<4sIII")  # magic, version, n_tokens, body length
_DIGEST = 32  # SHA-256 over the header and the body
_MAX_BODY = 64 << 20  # the body holds text, never a KV cache
_SERVER_FILE = re.compile(r"llamacompat-[0-9a-f]{32}-[01]\.bin")
NO_SLOT_SAVE = ("llama-server was started without slot saving: start it with --slot-save-path DIR (a folder "
                "on the server for the saved KV caches) to use save_session / load_session")


@dataclass(frozen=True)
class Descriptor:
    """What a descriptor file says: the server file holding ``n_tokens`` tokens of KV cache, and their text."""

    stem: str
    generation: int
    n_tokens: int
    model: str
    server: str  # the server's URL at save time (for messages: another server's DIR lacks the file)
    text: str

    @property
    def server_file(self) -> str:
        return server_file_name(self.stem, self.generation)


def client_path(path: Any, where: str) -> str:
    """A session path as apps pass it (``file://`` stripped, ``~`` expanded), if the OS can name a file so."""
    if not isinstance(path, str) or not path:
        raise InvalidParamsError(f"{where}: path must be a non-empty string, got {path!r}")
    try:
        if "\0" in path:
            raise ValueError("a NUL byte")
        os.fsencode(path)
    except (ValueError, UnicodeEncodeError) as err:
        raise InvalidParamsError(f"{where}: no file can be named {path!r} ({err})") from None
    return local_path(path)


def new_stem() -> str:
    return secrets.token_hex(16)


def server_file_name(stem: str, generation: int) -> str:
    return f"llamacompat-{stem}-{generation}.bin"


def encode(d: Descriptor) -> bytes:
    body = json.dumps({"stem": d.stem, "generation": d.generation, "model": d.model, "server": d.server,
                       "text": d.text}, ensure_ascii=False, sort_keys=True).encode()
    data = _HEAD.pack(MAGIC, VERSION, d.n_tokens, len(body)) + body
    return data + hashlib.sha256(data).digest()


def decode(data: bytes, path: str) -> Descriptor:
    """The descriptor in ``data`` (the file at ``path``); ``SessionError`` saying what is wrong otherwise."""
    what = f"Failed to load session: {path}"
    if len(data) < _HEAD.size + _DIGEST:
        raise SessionError(f"{what} is {len(data)} bytes, too short for a llamacompat llama-server session "
                           "descriptor")
    magic, version, n_tokens, n_body = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise SessionError(f"{what} is not a llamacompat llama-server session descriptor (it starts with "
                           f"{data[:4]!r}); sessions of the openai backend are saved by its save_session")
    if version != VERSION:
        raise SessionError(f"{what} has descriptor version {version}; this llamacompat reads version {VERSION}")
    if len(data) != _HEAD.size + n_body + _DIGEST or n_body > _MAX_BODY:
        raise SessionError(f"{what} is truncated or damaged ({len(data)} bytes; its header says "
                           f"{_HEAD.size + n_body + _DIGEST})")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise SessionError(f"{what} does not match its checksum: the file is damaged or was edited")
    try:
        body = json.loads(data[_HEAD.size:-_DIGEST].decode())
        d = Descriptor(body["stem"], body["generation"], n_tokens, body["model"], body["server"], body["text"])
    except (ValueError, KeyError, TypeError) as err:
        raise SessionError(f"{what} has an unreadable body ({err})") from None
    if not (isinstance(d.model, str) and isinstance(d.server, str) and isinstance(d.text, str)
            and isinstance(d.generation, int) and isinstance(d.stem, str)
            and _SERVER_FILE.fullmatch(server_file_name(d.stem, d.generation))):
        raise SessionError(f"{what} names no server-side file of llamacompat's")
    return d


def read_descriptor(path: str) -> Descriptor:
    try:
        with open(path, "rb") as f:
            data = f.read(_HEAD.size + _MAX_BODY + _DIGEST + 1)
    except OSError as err:
        raise SessionError(f"Failed to load session: cannot read {path}: {err.strerror or err}") from err
    return decode(data, path)


def probe_slot_saving(session: HttpSession) -> tuple[int | None, str | None]:
    """``(total_slots, None)`` when llama-server saves slots, ``(None, why not)`` otherwise.

    A save with an empty file name changes nothing: a server without ``--slot-save-path`` refuses
    every slot action first (501), one with it refuses the name (400, "Invalid filename").
    """
    try:
        session.post("/slots/0?action=save", {"filename": ""})
    except UnsupportedFeatureError:
        return None, NO_SLOT_SAVE
    except InvalidParamsError as err:
        if "filename" not in err.detail.lower():
            return None, f"llama-server refused a slot action ({err.detail})"
    except (GenerationError, ModelLoadError) as err:
        return None, f"llama-server's slot actions do not answer as expected ({err.detail})"
    else:
        return None, "llama-server accepted an empty slot file name; its slot saving is not the one llamacompat knows"
    props = session.try_get("/props")
    n_slots = props.get("total_slots") if isinstance(props, dict) else None
    if not isinstance(n_slots, int) or n_slots < 1:
        return None, f"llama-server does not say how many slots it has (GET /props total_slots: {n_slots!r})"
    return n_slots, None


class SlotClaims:
    """Which slots this process's contexts have claimed on each server, and who used each slot last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, Counter[int]] = {}
        self._last: dict[tuple[str, int], object] = {}

    def claim(self, server: str, n_slots: int) -> int:
        """The least claimed slot (the lowest of those), now claimed once more."""
        with self._lock:
            counts = self._claims.setdefault(server, Counter())
            slot = min(range(n_slots), key=lambda s: (counts[s], s))
            counts[slot] += 1
            return slot

    def release(self, server: str, slot: int, owner: object) -> None:
        with self._lock:
            counts = self._claims.get(server)
            if counts is not None and counts[slot] > 0:
                counts[slot] -= 1
            if self._last.get((server, slot)) is owner:
                del self._last[(server, slot)]

    def used(self, server: str, slot: int, owner: object) -> None:
        """``owner``'s request is about to change the slot's cache."""
        with self._lock:
            self._last[(server, slot)] = owner

    def last_user(self, server: str, slot: int) -> object | None:
        with self._lock:
            return self._last.get((server, slot))


CLAIMS = SlotClaims()


def slot_action(session: HttpSession, slot: int, action: str, filename: str, what: str) -> dict[str, Any]:
    """POST a slot action; the server's refusals as ``SessionError`` (naming the fix)."""
    try:
        reply = session.post(f"/slots/{slot}?action={action}", {"filename": filename})
    except UnsupportedFeatureError as err:
        why = (NO_SLOT_SAVE if "multimodal" not in err.detail.lower() else
               "llama-server saves and restores no slot while a projector (--mmproj) is loaded")
        raise UnsupportedFeatureError(f"{what}: {why} ({err.detail})") from None
    except (InvalidParamsError, GenerationError) as err:
        raise SessionError(f"{what}: llama-server could not {action} slot {slot} as {filename}: {err.detail}") from None
    except LlamaError:
        raise
    if not isinstance(reply, dict):
        raise SessionError(f"{what}: llama-server answered the slot {action} with {reply!r}")
    return reply
