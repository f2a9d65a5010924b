"""An asyncio service: one model, several concurrent requests queued on it, each streamed.

A context runs one completion at a time (llama.rn's "Context is busy"), so an app
that serves many callers puts a lock (or a queue) in front of it.
"""

import asyncio

from llamacompat import init_llama_async


async def main() -> None:
    async with await init_llama_async({"model": "smollm2", "n_ctx": 2048}) as ctx:
        lock = asyncio.Lock()

        async def handle(question: str) -> str:
            async with lock:
                pieces = []
                async for event in ctx.stream({"messages": [{"role": "user", "content": question}],
                                               "n_predict": 32, "temperature": 0}):
                    pieces.append(event["token"])
                return "".join(pieces)

        questions = ["Name the capital of France.", "Name the capital of Italy.", "What is 2 + 2?"]
        answers = await asyncio.gather(*(handle(q) for q in questions))
        for question, answer in zip(questions, answers, strict=True):
            print(f"{question} -> {answer.strip()}")


asyncio.run(main())
