"""One OS thread for a llama.cpp context's graph computations (decode, media encoding).

llama.cpp's CPU backend, as llama-cpp-python builds it, runs each graph on an OpenMP team, and libgomp keeps one
team per calling thread. Once two threads have decoded, their teams together outnumber the cores and throttle
each other: measured on the packaged model (2 threads, 2 cores), 64 greedy tokens took 352 ms on the thread that
decoded first and 711-734 ms on any other thread afterwards, parallel mode's included. So every computation of
every llama_cpp context goes through one thread of the process (``shared()``), whichever thread asks (a plain
completion, a parallel slot, an async executor, a bridge client): one team, and contexts decode one graph at a
time, which on the CPU is what their threads allow anyway. The hand-off costs a few microseconds a call.
Other code of the process that computes with llama.cpp (llama-cpp-python's ``Llama``, as the benches do)
should run there too: ``run(fn, *args)``.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, TypeVar

__all__ = ["ComputeThread", "shared", "run"]

T = TypeVar("T")


class ComputeThread:
    """Runs ``run(fn, *args)`` on its own thread and hands back the result (or raises the exception)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], threading.Event, list[Any]]]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:  # a computation that asks for another (nested): at once
            return fn(*args)
        done, box = threading.Event(), list[Any]()
        self._jobs.put((fn, args, done, box))
        try:
            done.wait()
        except BaseException:  # Ctrl-C: the computation runs on, and its caller's record must not drift from it
            done.wait()
            raise
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    def _serve(self) -> None:
        while True:
            fn, args, done, box = self._jobs.get()
            try:
                box.append((True, fn(*args)))
            except BaseException as err:  # handed to the caller's thread
                box.append((False, err))
            done.set()


_shared: ComputeThread | None = None
_shared_lock = threading.Lock()


def _forget_in_child() -> None:  # a forked child has no thread behind the parent's queue: it starts its own
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def shared() -> ComputeThread:
    """The process's one compute thread for llama.cpp (started at the first call; a daemon: it never blocks exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ComputeThread("llamacompat-llama-cpp-compute")
        return _shared


def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the process's compute thread."""
    return shared().run(fn, *args)
