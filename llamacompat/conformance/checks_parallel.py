"""Parallel mode checks (``ctx.parallel``): request ids, separate streams, per-request stop, the status,
settling on disable / release, and plain calls while parallel mode is on.

They hold on every backend, whether requests are decoded together (``parallel: native``) or take turns
(``emulated``): nothing here depends on how many run at once. Every wait has a timeout, so a request that
never settles fails the check instead of hanging the suite.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
import threading
from collections import defaultdict
from typing import Any, Callable, Iterator

from ..context import LlamaContext
from ..errors import (
    ContextBusyError,
    ContextReleasedError,
    InvalidParamsError,
    ParallelModeError,
    RequestCancelledError,
)
from ..parallel.pool import ParallelRequest
from ..types import TokenData
from .checks_generation import LONG, PROMPT, assert_result_shape
from .kit import GREEDY, Kit, check, no_eos, refused

SLOTS = 2
FRUIT = "A list of fruit: apple, pear, plum, cherry, banana, mango"
WAIT = 120.0  # seconds a promise (or disable / release) may take before the check calls it hung

# llama.rn's ParallelStatus and ParallelRequestStatus
_STATUS_TYPES: dict[str, type | tuple[type, ...]] = {"n_parallel": int, "active_slots": int, "queued_requests": int,
                                                     "requests": list}
_REQUEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "request_id": int, "type": str, "state": str, "prompt_length": int, "tokens_generated": int,
    "prompt_ms": (int, float), "generation_ms": (int, float), "tokens_per_second": (int, float)}
STATES = {"queued", "processing_prompt", "generating", "done"}
KINDS = {"completion", "embedding", "rerank"}


@contextlib.contextmanager
def _parallel_context(kit: Kit) -> Iterator[LlamaContext]:
    """A private context with room for ``SLOTS`` slots (parallel mode off); or, where the backend lacks parallel
    mode, NotApplicable once its refusal is verified."""
    if not kit.supports("parallel"):
        refused(kit, "parallel", lambda c: c.parallel.enable({"n_parallel": 1}))
    with kit.new(n_parallel=SLOTS) as ctx:
        yield ctx


def _enable(ctx: LlamaContext) -> None:
    assert ctx.parallel.enable({"n_parallel": SLOTS}) is True, "parallel.enable() must return True"


def _settled(request: ParallelRequest, what: str = "") -> Any:
    """The request's result (its error is raised): within ``WAIT`` seconds, or an AssertionError."""
    try:
        return request.promise.result(WAIT)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"request {request.request_id}{what} did not settle within {WAIT:.0f} s") from None


def _first_token(ctx: LlamaContext, params: dict[str, Any]) -> tuple[ParallelRequest, threading.Event]:
    """A parallel completion and an event set at its first token."""
    started = threading.Event()
    return ctx.parallel.completion(params, lambda _rid, _data: started.set()), started


def _endless(ctx: LlamaContext) -> dict[str, Any]:
    """A completion that runs until it is stopped (or its slot is full)."""
    return {"prompt": LONG, "n_predict": -1, **no_eos(ctx)}


def _in_time(call: Callable[[], Any], what: str) -> None:
    """Run ``call`` on a thread; fail if it has not returned within ``WAIT`` seconds (it is left running)."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            call()
        except BaseException as err:  # reported below, not lost on the thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT)
    assert not worker.is_alive(), f"{what} did not return within {WAIT:.0f} s"
    if "error" in box:
        raise AssertionError(f"{what} raised {box['error']!r}") from box["error"]


def _refuses(what: str, error: type[Exception], call: Callable[[], Any]) -> None:
    try:
        call()
    except error:
        return
    except Exception as err:  # the wrong kind of error is a contract violation too
        raise AssertionError(f"{what} raised {err!r}, expected {error.__name__}") from err
    raise AssertionError(f"{what} did not raise {error.__name__}")


def assert_status_shape(status: Any, n_parallel: int, where: str) -> None:
    """llama.rn's ParallelStatus: its keys with their types, request states and kinds llama.rn names, and
    counts that agree with the requests listed."""
    assert isinstance(status, dict), f"{where}: the status is a {type(status).__name__}, not a dict"
    for key, kind in _STATUS_TYPES.items():
        assert key in status, f"{where}: the status lacks '{key}'"
        assert isinstance(status[key], kind) and not isinstance(status[key], bool), f"{where}: '{key}' is {status[key]!r}"
    assert status["n_parallel"] == n_parallel, f"{where}: n_parallel is {status['n_parallel']}, enabled with {n_parallel}"
    assert 0 <= status["active_slots"] <= n_parallel, f"{where}: active_slots {status['active_slots']} of {n_parallel}"
    for request in status["requests"]:
        for key, kind in _REQUEST_TYPES.items():
            assert key in request, f"{where}: a request lacks '{key}': {request!r}"
            value = request[key]
            assert isinstance(value, kind) and not isinstance(value, bool), f"{where}: '{key}' is {value!r}"
            if isinstance(value, (int, float)):
                assert value >= 0, f"{where}: '{key}' is negative in {request!r}"
        assert request["state"] in STATES, f"{where}: state {request['state']!r} is not one of {sorted(STATES)}"
        assert request["type"] in KINDS, f"{where}: type {request['type']!r} is not one of {sorted(KINDS)}"
    states = [r["state"] for r in status["requests"]]
    assert states.count("queued") == status["queued_requests"], f"{where}: queued_requests disagrees with {states}"
    running = len(states) - states.count("queued")
    assert running == status["active_slots"], f"{where}: active_slots {status['active_slots']} but {states}"
    ids = [r["request_id"] for r in status["requests"]]
    assert len(set(ids)) == len(ids), f"{where}: a request is listed twice: {ids}"


@check("parallel requests get distinct ids; each one's events add up to its own text, the text run alone gives")
def check_parallel_requests(kit: Kit) -> None:
    """More requests than slots, with different prompts: the queue and the slots both carry them."""
    with _parallel_context(kit) as ctx:
        requests = [{"prompt": prompt, "n_predict": 12, **no_eos(ctx), **GREEDY} for prompt in (PROMPT, LONG, FRUIT)]
        alone = [ctx.completion(request)["text"] for request in requests]
        assert len(set(alone)) == len(alone), f"the check's prompts gave the same greedy text: {alone!r}"
        for what, error, call in (
                ("parallel.completion() before enable()", ParallelModeError, lambda: ctx.parallel.completion(requests[0])),
                (f"enable() with more slots than init's n_parallel {SLOTS}", InvalidParamsError,
                 lambda: ctx.parallel.enable({"n_parallel": SLOTS + 1}))):
            _refuses(what, error, call)
        _enable(ctx)
        events: dict[int, list[TokenData]] = defaultdict(list)
        lock = threading.Lock()

        def on_token(request_id: int, data: TokenData) -> None:
            with lock:
                events[request_id].append(data)

        handles = [ctx.parallel.completion(request, on_token) for request in requests]
        ids = [h.request_id for h in handles]
        assert all(isinstance(i, int) and not isinstance(i, bool) for i in ids), f"request ids must be ints: {ids!r}"
        assert len(set(ids)) == len(ids), f"two requests got the same id: {ids}"
        results = [_settled(h) for h in handles]
        assert set(events) <= set(ids), f"events came for ids {sorted(set(events) - set(ids))} nobody was given"
        for handle, result, expected in zip(handles, results, alone, strict=True):
            rid = handle.request_id
            assert_result_shape(result)
            assert not result["interrupted"], f"request {rid} was interrupted"
            streamed = "".join(e["token"] for e in events[rid])
            assert streamed == result["text"], (
                f"request {rid}'s events add up to {streamed!r}, its text is {result['text']!r}: streams were mixed")
            if events[rid] and "accumulated_text" in events[rid][-1]:
                assert events[rid][-1]["accumulated_text"] == result["text"], f"request {rid}: accumulated_text"
            assert result["text"] == expected, (
                f"request {rid} gave {result['text']!r} beside the others, {expected!r} alone: the requests interfere")
        ctx.parallel.disable()
        _enable(ctx)  # ids stay unique for the context's whole life
        again = ctx.parallel.completion(requests[0])
        assert again.request_id not in ids, f"id {again.request_id} was given twice (once before disable())"
        assert _settled(again)["text"] == alone[0]


@check("stopping one parallel request ends it interrupted, a queued one never runs; the others finish normally")
def check_parallel_stop(kit: Kit) -> None:
    with _parallel_context(kit) as ctx:
        _enable(ctx)
        endless, started = _first_token(ctx, _endless(ctx))
        others = [ctx.parallel.completion({"prompt": prompt, "n_predict": 8, **no_eos(ctx), **GREEDY})
                  for prompt in (PROMPT, FRUIT)]
        assert started.wait(WAIT), f"request {endless.request_id} gave no token within {WAIT:.0f} s"
        endless.stop()
        stopped = _settled(endless)
        assert stopped["interrupted"] is True and "content" not in stopped, (
            "a stopped request must end with interrupted: True and no content")
        late = ctx.parallel.completion({"prompt": PROMPT, "n_predict": 8, **GREEDY})
        late.stop()  # queued, or just started: either way it ends interrupted
        assert _settled(late)["interrupted"] is True, "a request stopped before it ran did not end interrupted"
        for other in others:
            result = _settled(other)
            assert result["interrupted"] is False, f"stopping request {endless.request_id} interrupted request {other.request_id}"
            assert result["tokens_predicted"] >= 1 and (result["stopped_limit"] or result["stopped_eos"]), (
                f"request {other.request_id} did not finish normally: {result!r}")


@check("get_status() and subscribe_to_status() report llama.rn's ParallelStatus; remove() ends a subscription")
def check_parallel_status(kit: Kit) -> None:
    """Two endless requests fill the slots (or one runs, where they take turns), so the rest surely wait."""
    with _parallel_context(kit) as ctx:
        _enable(ctx)
        snapshots: list[dict[str, Any]] = []
        subscription = ctx.parallel.subscribe_to_status(snapshots.append)
        first, started = _first_token(ctx, _endless(ctx))
        second = ctx.parallel.completion(_endless(ctx))
        short = [ctx.parallel.completion({"prompt": prompt, "n_predict": 4, **GREEDY}) for prompt in (PROMPT, FRUIT)]
        submitted = [first, second, *short]
        assert started.wait(WAIT), f"request {first.request_id} gave no token within {WAIT:.0f} s"
        status = ctx.parallel.get_status()
        assert_status_shape(status, SLOTS, "get_status()")
        listed = {r["request_id"]: r for r in status["requests"]}
        assert set(listed) == {h.request_id for h in submitted}, f"get_status() lists {sorted(listed)}, not every request"
        assert listed[first.request_id]["state"] == "generating", f"a request that gave a token is {listed[first.request_id]}"
        assert listed[first.request_id]["tokens_generated"] >= 1, f"tokens_generated: {listed[first.request_id]}"
        assert status["active_slots"] >= 1 and status["queued_requests"] >= 2, f"two requests must wait: {status}"
        assert all(listed[h.request_id]["state"] == "queued" for h in short), f"the short requests must wait: {status}"
        first.stop()
        second.stop()
        for handle in submitted:
            _settled(handle)
        subscription.remove()
        after = ctx.parallel.completion({"prompt": PROMPT, "n_predict": 2, **GREEDY})
        _settled(after)  # callbacks run in order: what was posted before remove() has been delivered by now
        assert_status_shape(ctx.parallel.get_status(), SLOTS, "get_status() at the end")
    assert snapshots, "subscribe_to_status() never called back"
    for i, snapshot in enumerate(snapshots):
        assert_status_shape(snapshot, SLOTS, f"status callback {i}")
    assert snapshots[0]["requests"] == [], "the first callback (at subscribe time) must show no request yet"
    states = {r["state"] for s in snapshots for r in s["requests"] if r["request_id"] == short[0].request_id}
    assert {"queued", "done"} <= states, f"the callbacks did not follow a request from queued to done: {states}"
    assert not any(r["request_id"] == after.request_id for s in snapshots for r in s["requests"]), (
        "a status callback came after remove()")


@check("disable() and release() settle every promise: running requests interrupted, queued ones cancelled")
def check_parallel_release(kit: Kit) -> None:
    with _parallel_context(kit) as ctx:
        _enable(ctx)
        for end in ("disable", "release"):
            if end == "release":
                _enable(ctx)
            first, started = _first_token(ctx, _endless(ctx))
            completions = [first, ctx.parallel.completion(_endless(ctx)),
                           *(ctx.parallel.completion({"prompt": prompt, "n_predict": 8}) for prompt in (PROMPT, FRUIT))]
            embedding = ctx.parallel.embedding("queued behind the completions")
            assert started.wait(WAIT), f"request {first.request_id} gave no token within {WAIT:.0f} s"
            _in_time(getattr(ctx.parallel, end) if end == "disable" else ctx.release, f"{end}() with requests in flight")
            if end == "disable":  # llama.rn's disable returns once every request has ended
                pending = [h.request_id for h in (*completions, embedding) if not h.promise.done()]
                assert not pending, f"disable() returned with requests {pending} still pending"
            for handle in completions:
                result = _settled(handle, f" (after {end}())")
                assert_result_shape(result)
                assert result["interrupted"] is True, f"request {handle.request_id} was not interrupted by {end}()"
                if end == "release":
                    assert result.get("context_released") is True, f"request {handle.request_id}: context_released"
            try:
                _settled(embedding, f" (after {end}())")
            except RequestCancelledError:
                pass
            else:
                raise AssertionError(f"a queued embedding settled without RequestCancelledError at {end}()")
            if end == "disable":
                after = ctx.completion({"prompt": PROMPT, "n_predict": 2, **GREEDY})
                assert after["tokens_predicted"] >= 1 and not after["interrupted"], "the context is unusable after disable()"
        for name, call in (("get_status", ctx.parallel.get_status), ("enable", ctx.parallel.enable),
                           ("completion", lambda: ctx.parallel.completion({"prompt": PROMPT}))):
            try:
                call()
            except ContextReleasedError:
                continue
            raise AssertionError(f"parallel.{name}() after release() did not raise ContextReleasedError")


@check("while parallel mode is on, a plain completion is queued and works; stream() and sessions raise "
       "ParallelModeError; other model calls are busy")
def check_parallel_plain_calls(kit: Kit) -> None:
    with _parallel_context(kit) as ctx:
        request = {"prompt": PROMPT, "n_predict": 8, **no_eos(ctx), **GREEDY}
        alone = ctx.completion(request)["text"]
        _enable(ctx)
        running, started = _first_token(ctx, {"prompt": LONG, "n_predict": 24, **no_eos(ctx), **GREEDY})
        assert started.wait(WAIT), f"request {running.request_id} gave no token within {WAIT:.0f} s"
        events: list[TokenData] = []
        result = ctx.completion(request, events.append)  # beside (or after) the running request
        assert result["text"] == alone and not result["interrupted"], (
            f"a plain completion in parallel mode gave {result['text']!r}, {alone!r} without it")
        assert "".join(e["token"] for e in events) == result["text"], "the plain completion's callback got other tokens"
        assert not _settled(running)["interrupted"], "the plain completion disturbed the parallel request"
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "parallel.session")
            refusals: list[tuple[str, type[Exception], Callable[[], Any]]] = [
                ("stream()", ParallelModeError, lambda: ctx.stream(request)),
                ("save_session()", ParallelModeError, lambda: ctx.save_session(path)),
                ("load_session()", ParallelModeError, lambda: ctx.load_session(path)),
                ("bench()", ContextBusyError, lambda: ctx.bench(8, 4)),
                ("clear_cache()", ContextBusyError, ctx.clear_cache),
            ]
            for what, error, call in refusals:
                _refuses(f"{what} in parallel mode", error, call)
        box: dict[str, Any] = {}
        begun = threading.Event()

        def endless_plain() -> None:
            try:
                box["result"] = ctx.completion(_endless(ctx), lambda _event: begun.set())
            except BaseException as err:  # reported below, not lost on the thread
                box["error"] = err
            finally:
                begun.set()

        worker = threading.Thread(target=endless_plain, daemon=True)
        worker.start()
        assert begun.wait(WAIT), f"a plain completion in parallel mode gave no token within {WAIT:.0f} s"
        ctx.stop_completion()
        worker.join(WAIT)
        assert not worker.is_alive(), "stop_completion() did not end a plain completion in parallel mode"
        assert "error" not in box, f"the stopped plain completion raised {box.get('error')!r}"
        assert box["result"]["interrupted"] is True, "stop_completion() must end the plain completion interrupted"
        ctx.parallel.disable()
        after = ctx.completion(request)
        assert after["text"] == alone and not after["interrupted"], "a plain completion after disable() differs"
        assert [e["token"] for e in ctx.stream(request)], "stream() after disable() gave nothing"
