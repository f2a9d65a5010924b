"""The request queue of parallel mode: FIFO order, ``Slots.concurrency`` workers, callbacks on their own thread.

``Pool.submit`` returns at once with a ``ParallelRequest`` (``request_id``, ``promise``, ``stop``). Requests
wait in FIFO order until a worker is free; the worker runs the request on the core's ``Slots``. What user
code sees runs on one *delivery* thread, in order: each request's ``on_token`` calls, then its promise
settling, and the status subscribers. So a slow or failing callback never holds a slot (its request is
stopped and its promise gets the callback's exception), and a request's events always come before its
result. ``close`` settles every promise: running requests are stopped (an ``interrupted`` result), queued
ones cancelled (a completion gets an ``interrupted`` result, an embedding or rerank ``RequestCancelledError``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import threading
from typing import Any, Callable

from ..errors import ContextBusyError, RequestCancelledError, warnings_to
from ..text_stream import stopped_before_prompt
from ..types import TokenData
from .slots import Progress, RequestKind, Slots

__all__ = ["Pool", "ParallelRequest", "Subscription", "MAX_QUEUED"]

logger = logging.getLogger(__name__)

#: Requests that may wait for a slot; beyond this, ``submit`` refuses (a client cannot fill memory with them)
MAX_QUEUED = 1024

TokenSink = Callable[[int, TokenData], Any]


class ParallelRequest:
    """llama.rn's ``{requestId, promise, stop}`` of ``ctx.parallel.completion`` (and of embedding / rerank)."""

    __slots__ = ("request_id", "promise", "_stop")

    def __init__(self, request_id: int, promise: "concurrent.futures.Future[Any]", stop: Callable[[], None]) -> None:
        self.request_id, self.promise, self._stop = request_id, promise, stop

    def stop(self) -> None:
        """Stop this request: a queued one never runs, a running one ends with ``interrupted: True``."""
        self._stop()

    def __repr__(self) -> str:
        state = "done" if self.promise.done() else "pending"
        return f"<ParallelRequest {self.request_id} {state}>"


class Subscription:
    """What ``subscribe_to_status`` returns: ``remove()`` ends the calls."""

    __slots__ = ("_remove",)

    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove = remove

    def remove(self) -> None:
        self._remove()


class _Request:
    __slots__ = ("kind", "args", "on_token", "strict", "warn", "stop", "future", "progress", "callback_error")

    def __init__(self, kind: RequestKind, args: tuple[Any, ...], on_token: TokenSink | None, strict: bool,
                 warn: Callable[[str], None] | None, progress: Progress) -> None:
        self.kind, self.args, self.on_token, self.progress = kind, args, on_token, progress
        self.strict, self.warn = strict, warn
        self.stop = threading.Event()
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.callback_error: BaseException | None = None


class Pool:
    """Parallel requests over one core's ``Slots``."""

    def __init__(self, slots: Slots, strict: bool, first_id: Callable[[], int] | None = None) -> None:
        self.slots, self._strict = slots, strict
        self._ids = first_id or itertools.count(1).__next__
        self._lock = threading.Condition()
        self._queued: collections.deque[_Request] = collections.deque()
        self._running: set[_Request] = set()
        self._closing = False
        self.released = False  # set by the context's release: results say context_released
        self._subscribers: dict[int, Callable[[dict[str, Any]], Any]] = {}
        self._subscriber_ids = itertools.count(1)
        self._deliveries: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._delivery = threading.Thread(target=self._deliver, name="llamacompat-parallel-callbacks", daemon=True)
        self._delivery.start()
        self._workers = [threading.Thread(target=self._work, name=f"llamacompat-slot-{i}", daemon=True)
                         for i in range(slots.concurrency)]
        for worker in self._workers:
            worker.start()

    # -- requests -------------------------------------------------------------
    def submit(self, kind: RequestKind, args: tuple[Any, ...], on_token: TokenSink | None = None, *,
               strict: bool | None = None, warn: Callable[[str], None] | None = None) -> ParallelRequest:
        """Queue a request. ``strict`` (default: the pool's) and ``warn`` (where its compat warnings go, default:
        the usual warnings) are the request's own: a bridge server's clients each bring theirs."""
        with self._lock:
            if self._closing:
                raise ContextBusyError("Parallel mode is being disabled; enable it again for new requests")
            if len(self._queued) >= MAX_QUEUED:
                raise ContextBusyError(f"the parallel queue is full ({MAX_QUEUED} requests wait for a slot); "
                                       "wait for some to finish")
            request = _Request(kind, args, on_token, self._strict if strict is None else strict, warn,
                               Progress(self._ids(), kind, on_change=self._changed))
            self._queued.append(request)
            self._lock.notify()
        self._changed()
        return ParallelRequest(request.progress.request_id, request.future, lambda: self._stop(request))

    def _stop(self, request: _Request) -> None:
        request.stop.set()
        with self._lock:
            if request not in self._queued:
                return  # running: its slot sees the flag; done: nothing to do
            self._queued.remove(request)
        self._cancel(request, "stopped")

    def _cancel(self, request: _Request, why: str) -> None:
        """Settle a request that never ran."""
        request.progress.done()
        if request.kind == "completion":
            result = stopped_before_prompt(0)
            if self.released:
                result["context_released"] = True
            self._settle(request, result, None)
        else:
            self._settle(request, None, RequestCancelledError(f"the {request.kind} request {request.progress.request_id} "
                                                              f"was {why} before it ran"))

    # -- workers --------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._closing:
                    self._lock.wait()
                if not self._queued:
                    return
                request = self._queued.popleft()
                self._running.add(request)
            try:
                self._run(request)
            finally:
                with self._lock:
                    self._running.discard(request)
                    self._lock.notify_all()

    def _run(self, request: _Request) -> None:
        progress, slots = request.progress, self.slots
        progress.start()
        result: Any = None
        error: BaseException | None = None
        # the whole request runs on this worker, so the warning sink (a context variable) holds throughout
        sink = warnings_to(request.warn) if request.warn is not None else contextlib.nullcontext()
        try:
            with sink:
                if request.kind == "completion":
                    result = self._complete(request)
                elif request.kind == "embedding":
                    text, params = request.args
                    result = slots.embedding(text, params, progress)
                else:
                    query, documents, params = request.args
                    result = slots.rerank(query, documents, params, progress)
        except BaseException as err:  # settles the promise; the pool and the other requests go on
            error = err
        finally:
            progress.done(result if isinstance(result, dict) else None)
            self._settle(request, result, error)

    def _complete(self, request: _Request) -> Any:
        (params,) = request.args
        generation = self.slots.completion(params, request.stop, request.strict, request.progress)
        post, on_token, rid, event_seen = self._deliveries.put, request.on_token, request.progress.request_id, \
            request.progress.event
        try:
            while True:
                event = next(generation)
                event_seen()
                if on_token is not None:
                    post(functools.partial(self._token, request, on_token, rid, event))
        except StopIteration as done:
            result = done.value
        finally:
            generation.close()
        if self.released:
            result["context_released"] = True
        return result

    # -- what user code sees: one thread, in order ----------------------------
    def _token(self, request: _Request, on_token: TokenSink, rid: int, event: TokenData) -> None:
        if request.callback_error is not None:
            return
        try:
            on_token(rid, event)
        except BaseException as err:  # the callback's failure ends its request, as in a plain completion
            request.callback_error = err
            request.stop.set()

    def _settle(self, request: _Request, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            failure = request.callback_error or error
            if failure is not None:
                request.future.set_exception(failure)
            else:
                request.future.set_result(result)

        self._deliveries.put(settle)
        self._changed()

    def _deliver(self) -> None:
        while True:
            item = self._deliveries.get()
            if item is None:
                return
            try:
                item()
            except BaseException:  # a status subscriber's failure: logged, the others go on
                logger.exception("a parallel status subscriber failed")

    # -- status ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """llama.rn's ParallelStatus: the slots, and each request waiting or running."""
        with self._lock:
            running, queued = list(self._running), list(self._queued)
        return {"n_parallel": self.slots.n_parallel, "active_slots": len(running), "queued_requests": len(queued),
                "requests": [r.progress.as_dict() for r in sorted(running, key=lambda r: r.progress.request_id)]
                + [r.progress.as_dict() for r in queued]}

    def subscribe(self, callback: Callable[[dict[str, Any]], Any]) -> Subscription:
        key = next(self._subscriber_ids)
        self._subscribers[key] = callback
        snapshot = self.status()
        self._deliveries.put(lambda: callback(snapshot))
        return Subscription(functools.partial(self._unsubscribe, key))

    def _unsubscribe(self, key: int) -> None:
        self._subscribers.pop(key, None)

    def _changed(self) -> None:
        if not self._subscribers:
            return
        snapshot = self.status()
        for callback in list(self._subscribers.values()):
            self._deliveries.put(functools.partial(callback, snapshot))

    # -- lifetime -------------------------------------------------------------
    def close(self, why: str = "cancelled") -> None:
        """Stop what runs, cancel what waits, wait for the workers; every promise settles. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            queued, self._queued = list(self._queued), collections.deque()
            for request in self._running:
                request.stop.set()
            self._lock.notify_all()
        for request in queued:
            request.stop.set()
            self._cancel(request, why)
        for worker in self._workers:
            worker.join()
        try:
            self.slots.close()
        finally:
            self._deliveries.put(None)
            if threading.current_thread() is not self._delivery:  # disable() called from an on_token callback
                self._delivery.join()
