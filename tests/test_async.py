"""AsyncLlamaContext: the same API, awaitable, with the event loop kept free."""

from __future__ import annotations

import asyncio

import pytest

from llamacompat import ContextBusyError, ContextReleasedError, init_llama_async

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
