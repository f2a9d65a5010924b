"""llama.rn's LoRA calls on llama-server: the adapters it loaded at start, chosen per request.

llama-server loads its adapters once, from its command line (``--lora FILE``,
``--lora-scaled``), lists them at ``GET /lora-adapters`` as ``[{id, path,
scale}]``, and takes ``"lora": [{id, scale}]`` on each completion. A context
keeps its own applied list and sends it with every request, every adapter of
the server named (the ones it did not apply at scale 0), so contexts sharing a
server do not change each other's generations: the global ``POST
/lora-adapters`` would. Naming every adapter also reads the same on every
server version: an unlisted adapter is at scale 0 on all of them, while an
empty list turned every adapter off on older servers and means the global
scales on newer ones.

A llama.rn path is matched to a server adapter by, in order: the same string;
the same file (the server's path absolute, compared normalised, and through
symlinks where both exist here); the same file name, when the two cannot be
told apart here (the server runs on another machine, or was started with a
relative path, or the caller's file is not here) and exactly one adapter has
that name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import GenerationError, InvalidParamsError
from .http import HttpSession

__all__ = ["ServerAdapter", "list_adapters", "match_adapters", "request_field"]


@dataclass(frozen=True)
class ServerAdapter:
    id: int
    path: str
    scale: float  # the server's global scale: what a request without a 'lora' field gets


def list_adapters(session: HttpSession, path: str) -> list[ServerAdapter]:
    """The adapters the server loaded at start (``GET /lora-adapters``)."""
    reply = session.get(path)
    try:
        return [ServerAdapter(int(item["id"]), str(item["path"]), float(item["scale"])) for item in reply]
    except (KeyError, TypeError, ValueError) as err:
        raise GenerationError(f"GET {path}: unexpected reply (want [{{id, path, scale}}]): {str(reply)[:200]}") from err


def _same_file(wanted: str, served: str) -> bool:
    """The same file here: ``wanted`` is the caller's (relative to this directory), ``served`` must be absolute (a
    relative one is relative to the server's directory, which is not known here)."""
    if not os.path.isabs(served):
        return False
    wanted = os.path.abspath(wanted)
    if os.path.normpath(wanted) == os.path.normpath(served):
        return True
    return os.path.exists(wanted) and os.path.exists(served) and os.path.samefile(wanted, served)


def _distinct_here(wanted: str, served: str) -> bool:
    """Both are files here, and (``_same_file`` said) not the same one: a name in common proves nothing."""
    return os.path.isabs(served) and os.path.isfile(wanted) and os.path.isfile(served)


def _match(wanted: str, adapters: list[ServerAdapter], where: str, server: str) -> ServerAdapter:
    for test in (lambda a: a.path == wanted, lambda a: _same_file(wanted, a.path)):
        found = [a for a in adapters if test(a)]
        if found:
            return found[0]
    name = os.path.basename(wanted)
    named = [a for a in adapters if os.path.basename(a.path) == name and not _distinct_here(wanted, a.path)]
    if len(named) == 1:
        return named[0]
    loaded = ", ".join(repr(a.path) for a in adapters) or "none"
    if len(named) > 1:
        raise InvalidParamsError(f"{where}: LoRA adapter {wanted!r} is ambiguous: the server at {server} loaded "
                                 f"several files named {name!r} ({', '.join(repr(a.path) for a in named)}); pass the "
                                 "path it was started with")
    raise InvalidParamsError(f"{where}: the server at {server} did not load the LoRA adapter {wanted!r} (it loaded: "
                             f"{loaded}); llama-server applies only adapters it was started with: start it with "
                             f"--lora {wanted}")


def match_adapters(entries: list[dict[str, Any]], adapters: list[ServerAdapter], where: str,
                   server: str) -> list[dict[str, Any]]:
    """llama.rn's ``[{path, scaled}]`` (``params.lora_entries``) with each entry's server ``id``; every path is
    matched before anything changes. Two paths naming one adapter: the last decides, as for one path twice."""
    by_id: dict[int, dict[str, Any]] = {}
    for entry in entries:
        adapter = _match(entry["path"], adapters, where, server)
        by_id.pop(adapter.id, None)
        by_id[adapter.id] = {**entry, "id": adapter.id}
    return list(by_id.values())


def request_field(applied: list[dict[str, Any]], adapters: list[ServerAdapter]) -> list[dict[str, Any]]:
    """The completion's ``lora`` field: every server adapter, at this context's scale or 0."""
    scales = {entry["id"]: entry["scaled"] for entry in applied}
    return [{"id": a.id, "scale": scales.get(a.id, 0.0)} for a in adapters]
