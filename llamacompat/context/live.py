"""The live contexts of this process: their ids, llama.rn's context limit, ``release_all_llama``."""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Iterator, Protocol

from ..errors import ContextLimitError, InvalidParamsError

__all__ = ["register", "unregister", "context_slot", "set_context_limit", "release_all_llama"]


class _Context(Protocol):  # a LlamaContext, as far as this module needs one
    def release(self) -> None: ...


_ids = itertools.count(1)
_live: "weakref.WeakValueDictionary[int, _Context]" = weakref.WeakValueDictionary()
_limit = {"contexts": -1, "loading": 0}
_limit_lock = threading.Lock()


def register(ctx: _Context) -> int:
    """A new context's id; it counts against the limit until ``unregister``."""
    ctx_id = next(_ids)
    _live[ctx_id] = ctx
    return ctx_id


def unregister(ctx_id: int) -> None:
    _live.pop(ctx_id, None)


def set_context_limit(limit: int) -> None:
    """Allow at most ``limit`` live contexts (-1: no limit, the default); ``init_llama`` beyond it raises
    ``ContextLimitError`` ("Context limit reached")."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
        raise InvalidParamsError(f"set_context_limit: limit must be an int >= -1 (-1 = no limit), got {limit!r}")
    _limit["contexts"] = limit


@contextlib.contextmanager
def context_slot() -> Iterator[None]:
    """Hold a place under the context limit while a context loads (two loads cannot both take the last one)."""
    with _limit_lock:
        if _limit["contexts"] >= 0 and len(_live) + _limit["loading"] >= _limit["contexts"]:
            raise ContextLimitError(f"Context limit reached: {_limit['contexts']} contexts are allowed "
                                    "(set_context_limit); release one first")
        _limit["loading"] += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit["loading"] -= 1


def release_all_llama() -> None:
    """Release every live context (llama.rn's ``releaseAllLlama``)."""
    for ctx in list(_live.values()):
        ctx.release()
