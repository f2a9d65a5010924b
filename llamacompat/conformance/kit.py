"""What every check gets: a context factory for one backend, and the check registry."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ..context import LlamaContext, init_llama
from ..errors import LlamaCompatWarning, UnsupportedFeatureError

__all__ = ["Kit", "Check", "CHECKS", "check", "NotApplicable", "GREEDY", "run_in_background", "refused",
           "assert_refused", "no_warnings", "no_eos"]

GREEDY = {"temperature": 0}


class Kit:
    """Builds contexts of one backend with the adapter author's init params.

    ``context()`` is shared between checks (made again if a check released it);
    ``new(**overrides)`` is a private one, to be used as a context manager.
    """

    def __init__(self, backend: str, params: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.params = {"n_ctx": 1024, **(params or {}), "backend": backend}
        self._shared: LlamaContext | None = None

    def context(self) -> LlamaContext:
        if self._shared is None or self._shared.released:
            self._shared = init_llama(self.params)
        return self._shared

    def new(self, **overrides: Any) -> LlamaContext:
        return init_llama({**self.params, **overrides})

    def supports(self, feature: str, **overrides: Any) -> bool:
        """Whether ``ctx.capabilities`` lists ``feature`` as native or emulated."""
        if not overrides:
            return _supports(self.context(), feature)
        with self.new(**overrides) as ctx:
            return _supports(ctx, feature)

    def close(self) -> None:
        if self._shared is not None:
            self._shared.release()
            self._shared = None


def no_eos(ctx: LlamaContext) -> dict[str, Any]:
    """``ignore_eos`` where the backend has it, so checks that count tokens get them all; else nothing
    (the checks' prompts keep the model writing, and a missing feature must not make them warn)."""
    return {"ignore_eos": True} if _supports(ctx, "ignore_eos") else {}


def _supports(ctx: LlamaContext, feature: str) -> bool:
    return ctx.capabilities["features"].get(feature, "missing") != "missing"


class NotApplicable(Exception):
    """Raised by a check after it verified that a missing feature is refused or warned about."""


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    run: Callable[[Kit], None]


CHECKS: dict[str, Check] = {}


def check(title: str) -> Callable[[Callable[[Kit], None]], Callable[[Kit], None]]:
    """Register a check: a function of a Kit that raises AssertionError on a contract violation."""

    def register(fn: Callable[[Kit], None]) -> Callable[[Kit], None]:
        name = fn.__name__.removeprefix("check_")
        CHECKS[name] = Check(name, title, fn)
        return fn

    return register


def run_in_background(ctx: LlamaContext, params: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a completion on a thread; return once its first token arrived.

    ``box`` gets ``result`` or ``error``, and ``done``: the perf_counter time the call returned.
    """
    started, box = threading.Event(), dict[str, Any]()

    def run() -> None:
        try:
            box["result"] = ctx.completion(params, lambda _event: started.set())
        except BaseException as err:  # reported by the check, not lost on the thread
            box["error"] = err
        finally:
            box["done"] = time.perf_counter()
            started.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert started.wait(60), "no token within 60 s"
    return worker, box


@contextlib.contextmanager
def _catching_warnings() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@contextlib.contextmanager
def no_warnings(what: str) -> Iterator[None]:
    """Fail if the block emits a LlamaCompatWarning (a supported feature must just work)."""
    with _catching_warnings() as caught:
        yield
    ours = [str(w.message) for w in caught if issubclass(w.category, LlamaCompatWarning)]
    assert not ours, f"{what} warned: {ours}"


def refused(kit: Kit, feature: str, use: Callable[[LlamaContext], Any]) -> None:
    """``assert_refused``, then raise NotApplicable: the check's subject is missing on this backend."""
    assert_refused(kit, feature, use)
    raise NotApplicable(f"{kit.backend} lacks '{feature}'; using it is refused as documented")


def assert_refused(kit: Kit, feature: str, use: Callable[[LlamaContext], Any]) -> None:
    """The contract for a feature the backend lacks.

    Without ``strict`` the call must warn (LlamaCompatWarning) or raise
    UnsupportedFeatureError; with ``strict: True`` it must raise.
    """
    with kit.new(strict=False) as ctx:
        with _catching_warnings() as caught:
            try:
                use(ctx)
            except UnsupportedFeatureError:
                pass
            else:
                assert any(issubclass(w.category, LlamaCompatWarning) for w in caught), (
                    f"'{feature}' is missing on {kit.backend} but using it neither warned nor raised"
                )
    with kit.new(strict=True) as ctx:
        try:
            use(ctx)
        except UnsupportedFeatureError:
            pass
        else:
            raise AssertionError(f"'{feature}' is missing on {kit.backend} but strict use did not raise UnsupportedFeatureError")
