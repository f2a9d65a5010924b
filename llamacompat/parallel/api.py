"""``ctx.parallel``: llama.rn's parallel namespace (enable, disable, configure, completion, embedding, rerank,
get_status, subscribe_to_status).

While parallel mode is on, the pool holds the context's model claim: a plain ``completion``, ``embedding`` or
``rerank`` is queued as a parallel request and waited for (``LlamaContext`` routes it here), session load and
save raise llama.rn's ``ParallelModeError``, and the other calls that need the model (bench, LoRA,
clear_cache) raise ``ContextBusyError`` until ``disable()``.
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import InvalidParamsError, ParallelModeError
from ..types import TokenData
from .pool import ParallelRequest, Pool, Subscription

if TYPE_CHECKING:
    from ..context.sync import LlamaContext

__all__ = ["Parallel", "DEFAULT_SLOTS", "DEFAULT_BATCH"]

#: llama.rn's defaults for ``enable()`` without a config
DEFAULT_SLOTS, DEFAULT_BATCH = 2, 512


def _config(config: Mapping[str, Any] | None, where: str) -> tuple[int, int]:
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise InvalidParamsError(f"parallel.{where}: config must be a dict with n_parallel and n_batch, "
                                 f"got {type(config).__name__}")
    unknown = sorted(set(config) - {"n_parallel", "n_batch"})
    if unknown:
        raise InvalidParamsError(f"parallel.{where}: unknown keys {unknown}; it takes n_parallel and n_batch")
    values = []
    for key, default in (("n_parallel", DEFAULT_SLOTS), ("n_batch", DEFAULT_BATCH)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidParamsError(f"parallel.{where}: '{key}' must be an int >= 1, got {value!r}")
        values.append(value)
    return values[0], values[1]


class Parallel:
    """llama.rn's ``context.parallel`` for one context."""

    def __init__(self, context: "LlamaContext") -> None:
        self._ctx = context
        self._pool: Pool | None = None
        self._lock = threading.Lock()  # enable / disable / release, one at a time
        self._ids = itertools.count(1).__next__  # request ids stay unique across enable / disable

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def enable(self, config: Mapping[str, Any] | None = None) -> bool:
        """Turn parallel mode on with ``n_parallel`` slots (default 2) and ``n_batch`` tokens per step (512).

        Each slot gets ``n_ctx / n_parallel`` tokens. On a context already in parallel mode this reconfigures
        it: requests in flight are stopped and queued ones cancelled first, as by ``disable``.
        """
        n_parallel, n_batch = _config(config, "enable")
        limit = self._ctx.n_parallel_max
        if n_parallel > limit:
            raise InvalidParamsError(
                f"Failed to enable parallel mode with {n_parallel} slots. Context n_seq_max ({limit}) is less than "
                f"requested. Context was initialized with n_parallel={limit}. To use {n_parallel} parallel slots, "
                f"reinitialize the context with n_parallel >= {n_parallel}")
        with self._lock:
            if self._pool is not None:
                self._close("cancelled: parallel mode was reconfigured")
            self._ctx.claim()  # busy (a plain call runs) or released raise here
            try:
                slots = self._ctx.open_slots(n_parallel, n_batch)
                self._pool = Pool(slots, self._ctx.strict, self._ids)
            except BaseException:
                self._ctx.unclaim()
                raise
        return True

    def configure(self, config: Mapping[str, Any] | None = None) -> bool:
        """``enable`` with a new config (llama.rn's configure)."""
        return self.enable(config)

    def disable(self) -> bool:
        """Turn parallel mode off: running requests end ``interrupted``, queued ones are cancelled; every promise
        settles before this returns (unless called from an ``on_token`` callback, which cannot wait for itself)."""
        with self._lock:
            if self._pool is not None:
                self._close("cancelled: parallel mode was disabled")
        return True

    def _close(self, why: str, released: bool = False) -> None:
        pool, self._pool = self._pool, None
        assert pool is not None
        pool.released = released
        try:
            pool.close(why)
        finally:
            self._ctx.unclaim()

    def release(self) -> None:
        """The context is being released: settle everything, with ``context_released`` on the results."""
        with self._lock:
            if self._pool is not None:
                self._close("cancelled: the context was released", released=True)

    # -- requests -------------------------------------------------------------
    def _running(self) -> Pool:
        pool = self._pool
        if pool is None:
            self._ctx.check_alive()
            raise ParallelModeError("Parallel mode not enabled; call ctx.parallel.enable() first")
        return pool

    def completion(self, params: Mapping[str, Any] | None = None,
                   on_token: Callable[[int, TokenData], Any] | None = None) -> ParallelRequest:
        """Queue a completion; returns at once. ``promise`` resolves to the same result as ``completion``;
        ``on_token(request_id, data)`` gets each TokenData (on the pool's callback thread)."""
        if on_token is not None and not callable(on_token):
            raise InvalidParamsError("parallel.completion: on_token must be callable")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidParamsError(f"parallel.completion: params must be a dict, got {type(params).__name__}")
        return self._running().submit("completion", (params,), on_token)

    def embedding(self, text: str, params: Mapping[str, Any] | None = None) -> ParallelRequest:
        """Queue an embedding; ``promise`` resolves to ``{"embedding": [...]}``."""
        return self._running().submit("embedding", (text, params))

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None = None) -> ParallelRequest:
        """Queue a rerank; ``promise`` resolves to ``[{score, index, document}]``, best first."""
        return self._running().submit("rerank", (query, documents, params))

    def get_status(self) -> dict[str, Any]:
        """llama.rn's ParallelStatus: ``n_parallel``, ``active_slots``, ``queued_requests``, ``requests``."""
        return self._running().status()

    def subscribe_to_status(self, callback: Callable[[dict[str, Any]], Any]) -> Subscription:
        """Call ``callback(status)`` now and whenever a request is queued, starts, starts generating or ends;
        ``remove()`` on the returned object stops it. Calls run on the pool's callback thread."""
        if not callable(callback):
            raise InvalidParamsError("parallel.subscribe_to_status: callback must be callable")
        return self._running().subscribe(callback)
