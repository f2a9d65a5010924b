"""AsyncLlamaContext: the same API, awaitable, with the event loop kept free."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llamacompat import ContextBusyError, ContextReleasedError, ParallelModeError, init_llama_async
from llamacompat.errors import RequestCancelledError

from .conftest import GREEDY


def run(coro):
    return asyncio.run(coro)


async def _start_endless(ctx):
    """Start a completion that runs until stopped; return its task once the first token arrived."""
    first = asyncio.Event()
    task = asyncio.create_task(ctx.completion({"prompt": "Count:", "n_predict": -1, "ignore_eos": True},
                                              lambda e: first.set()))
    await first.wait()
    return task


def test_async_completion_stream_and_callbacks():
    async def main():
        progress = []
        async with await init_llama_async({"n_ctx": 512}, on_progress=progress.append) as ctx:
            sync_events, async_events = [], []

            async def on_token(event):
                async_events.append(event)

            result = await ctx.completion({"prompt": "The sky is", "n_predict": 8, **GREEDY}, sync_events.append)
            await ctx.completion({"prompt": "The sky is", "n_predict": 8, **GREEDY}, on_token)
            await asyncio.sleep(0)  # let scheduled coroutine callbacks finish
            stream = ctx.stream({"prompt": "The sky is", "n_predict": 8, **GREEDY})
            streamed = [event async for event in stream]
            assert "".join(e["token"] for e in sync_events) == result["text"]
            assert async_events == sync_events == streamed
            assert stream.result["text"] == result["text"]
            tokens = await ctx.tokenize("hello")
            assert await ctx.detokenize(tokens["tokens"]) == "hello"
            assert ctx.model["n_embd"] == 576
        assert progress[0] == 0 and progress[-1] == 100
        return ctx

    ctx = run(main())
    assert ctx.released


def test_async_stop_from_another_task_and_busy():
    async def main():
        ctx = await init_llama_async({"n_ctx": 512})
        task = await _start_endless(ctx)
        ticks = 0
        for _ in range(5):  # the loop stays responsive while the model generates
            await asyncio.sleep(0.01)
            ticks += 1
        with pytest.raises(ContextBusyError):
            await ctx.completion({"prompt": "Hi"})
        ctx.stop_completion()
        result = await asyncio.wait_for(task, 5)
        assert result["interrupted"] is True and ticks == 5
        await ctx.release()
        with pytest.raises(ContextReleasedError):
            await ctx.completion({"prompt": "Hi"})

    run(main())


def test_cancelling_the_await_stops_generation():
    async def main():
        ctx = await init_llama_async({"n_ctx": 512})
        task = await _start_endless(ctx)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the worker notices the stop flag within a token or two
            try:
                result = await ctx.completion({"prompt": "Hi", "n_predict": 1})
                break
            except ContextBusyError:
                await asyncio.sleep(0.01)
        assert result["tokens_predicted"] == 1
        await ctx.release()

    run(main())


def test_async_stream_aclose_frees_the_context():
    async def main():
        ctx = await init_llama_async({"n_ctx": 512})
        stream = ctx.stream({"prompt": "Count:", "n_predict": -1, "ignore_eos": True})
        await stream.__anext__()
        await stream.aclose()
        assert stream.result["interrupted"] is True
        assert (await ctx.completion({"prompt": "Hi", "n_predict": 1}))["tokens_predicted"] == 1
        await ctx.release()

    run(main())


def test_async_sessions(tmp_path):
    path = str(tmp_path / "a.session")

    async def main():
        async with await init_llama_async({"n_ctx": 512}) as ctx:
            await ctx.completion({"prompt": "Tell me about bees.", "n_predict": 0})
            n = await ctx.save_session(path)
            assert await ctx.load_session(path) == {"tokens_loaded": n, "prompt": "Tell me about bees."}
            task = await _start_endless(ctx)
            with pytest.raises(ContextBusyError):
                await ctx.save_session(path)
            ctx.stop_completion()
            assert (await task)["interrupted"] is True

    run(main())


# -- ctx.parallel ------------------------------------------------------------
def _on_loop_thread(seen: list, loop_thread: int):
    """A callback that records whether it ran on the event loop's thread."""
    return lambda *args: seen.append((threading.get_ident() == loop_thread, args))


def test_async_parallel_requests_await_their_promises_and_call_back_on_the_loop():
    async def main():
        async with await init_llama_async({"n_ctx": 1024, "n_threads": 2, "n_parallel": 2}) as ctx:
            prompts = ["The sky is", "A list of fruit: apple, pear,", "Once upon a time,"]
            requests = [{"prompt": p, "n_predict": 8, "ignore_eos": True, **GREEDY} for p in prompts]
            alone = [(await ctx.completion(r))["text"] for r in requests]
            assert await ctx.parallel.enable({"n_parallel": 2}) is True and ctx.parallel.enabled
            loop_thread = threading.get_ident()
            statuses: list = []
            subscription = await ctx.parallel.subscribe_to_status(_on_loop_thread(statuses, loop_thread))
            sync_events: list = []
            async_events: list = []

            async def on_token(request_id, data):  # a coroutine callback is scheduled on the loop
                async_events.append((threading.get_ident() == loop_thread, request_id, data["token"]))

            handles = [await ctx.parallel.completion(requests[0], _on_loop_thread(sync_events, loop_thread)),
                       await ctx.parallel.completion(requests[1], on_token),
                       await ctx.parallel.completion(requests[2])]
            assert isinstance(handles[0].promise, asyncio.Future)
            assert len({h.request_id for h in handles}) == 3
            status = await ctx.parallel.get_status()
            assert status["n_parallel"] == 2 and {r["request_id"] for r in status["requests"]} <= {
                h.request_id for h in handles}
            results = await asyncio.wait_for(asyncio.gather(*(h.promise for h in handles)), 120)
            await asyncio.sleep(0)  # let the scheduled coroutine callbacks finish
            assert [r["text"] for r in results] == alone
            assert all(on_loop for on_loop, _ in sync_events) and all(e[0] for e in async_events)
            assert "".join(args[1]["token"] for _, args in sync_events) == results[0]["text"]
            assert {args[0] for _, args in sync_events} == {handles[0].request_id}
            assert "".join(e[2] for e in async_events) == results[1]["text"]
            assert statuses and all(on_loop for on_loop, _ in statuses)
            subscription.remove()
            assert await ctx.parallel.disable() is True and not ctx.parallel.enabled
            assert (await ctx.completion(requests[0]))["text"] == alone[0]  # plain mode again

    run(main())


def test_async_parallel_stop_cancel_and_disable_settle_every_promise():
    async def main():
        async with await init_llama_async({"n_ctx": 1024, "n_threads": 2, "n_parallel": 2}) as ctx:
            await ctx.parallel.enable({"n_parallel": 2})
            endless = {"prompt": "Count:", "n_predict": -1, "ignore_eos": True}
            first = asyncio.Event()
            stopped = await ctx.parallel.completion(endless, lambda _rid, _data: first.set())
            await asyncio.wait_for(first.wait(), 60)
            stopped.stop()
            assert (await asyncio.wait_for(stopped.promise, 60))["interrupted"] is True
            # cancelling the await stops the request: the next one gets a slot
            first.clear()
            cancelled = await ctx.parallel.completion(endless, lambda _rid, _data: first.set())
            await asyncio.wait_for(first.wait(), 60)
            cancelled.promise.cancel()
            after = await ctx.parallel.completion({"prompt": "Hi", "n_predict": 2, **GREEDY})
            assert (await asyncio.wait_for(after.promise, 60))["tokens_predicted"] == 2
            # disable: running ones interrupted, queued ones cancelled; every promise settled once it returns
            first.clear()
            running = await ctx.parallel.completion(endless, lambda _rid, _data: first.set())
            queued = [await ctx.parallel.completion(endless), await ctx.parallel.completion(endless),
                      await ctx.parallel.embedding("x")]
            await asyncio.wait_for(first.wait(), 60)
            await asyncio.wait_for(ctx.parallel.disable(), 60)
            assert all(h.promise.done() for h in (running, *queued))
            assert all(h.promise.result()["interrupted"] for h in (running, *queued[:2]))
            assert isinstance(queued[2].promise.exception(), RequestCancelledError)

    run(main())


def test_async_plain_calls_while_parallel_mode_is_on_and_release_settles_everything():
    async def main():
        ctx = await init_llama_async({"n_ctx": 1024, "n_threads": 2, "n_parallel": 2})
        request = {"prompt": "The sky is", "n_predict": 6, **GREEDY}
        alone = (await ctx.completion(request))["text"]
        await ctx.parallel.enable({"n_parallel": 2})
        events: list = []
        # two plain completions wait at once, through the slots, not ContextBusyError
        both = await asyncio.wait_for(asyncio.gather(ctx.completion(request, events.append), ctx.completion(request)),
                                      120)
        assert [r["text"] for r in both] == [alone, alone]
        assert "".join(e["token"] for e in events) == alone
        with pytest.raises(ParallelModeError):
            ctx.stream(request)
        with pytest.raises(ParallelModeError, match="Session save is not supported while parallel mode is enabled"):
            await ctx.save_session("/tmp/never-written.session")
        with pytest.raises(ContextBusyError):
            await ctx.bench(8, 4)
        first = asyncio.Event()
        running = await ctx.parallel.completion({"prompt": "Count:", "n_predict": -1, "ignore_eos": True},
                                                lambda _rid, _data: first.set())
        queued = await ctx.parallel.completion(request)
        await asyncio.wait_for(first.wait(), 60)
        await asyncio.wait_for(ctx.release(), 60)
        for handle in (running, queued):
            result = await asyncio.wait_for(handle.promise, 60)
            assert result["interrupted"] is True and result["context_released"] is True
        with pytest.raises(ContextReleasedError):
            await ctx.parallel.get_status()

    run(main())
