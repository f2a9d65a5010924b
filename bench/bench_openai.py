"""The openai backend's cost: llamacompat against a raw httpx2 SSE client, on the same server, in one process.

Both sides stream the same /v1/completions request (greedy, N tokens, same body
that llamacompat builds) from llama-cpp-python's OpenAI-compatible server
(``python -m llama_cpp.server``, the packaged model, a separate process), in
alternating rounds. The raw side only parses each SSE chunk's JSON; llamacompat
also builds TokenData, watches stop strings and its stop flag on a helper
thread, and counts the prompt's tokens when the server sends no usage (one
/extras/tokenize request). Overhead per token = (llamacompat - raw) / N.

    python bench/bench_openai.py [--tokens 128] [--rounds 7] [--max-overhead-ms 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import httpx2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from llamacompat import init_llama  # noqa: E402
from llamacompat.openai.request import plan_completion  # noqa: E402
from tests.openai_helpers import LlamaCppPythonServer  # noqa: E402

PROMPT = "Here is a long story about a dragon who learns to bake bread.\n\nOnce upon a time,"


def raw_stream(client: httpx2.Client, url: str, body: dict) -> tuple[str, int]:
    text, chunks = [], 0
    with client.sse(url, method="POST", json=body) as events:
        for event in events:
            if event.data.strip() == "[DONE]":
                break
            choice = json.loads(event.data)["choices"][0]
            if choice.get("text"):
                text.append(choice["text"])
                chunks += 1
    return "".join(text), chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-overhead-ms", type=float, default=1.0)
    args = parser.parse_args()

    server = LlamaCppPythonServer(n_ctx=2048)
    try:
        ctx = init_llama(server.params())
        request = {"prompt": PROMPT, "n_predict": args.tokens, "temperature": 0}
        body = plan_completion(request, ctx._core.facts, False, None).body
        client = httpx2.Client(headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120)
        url = server.base_url + "/completions"

        def ours() -> tuple[float, str]:
            events: list = []
            start = time.perf_counter()
            result = ctx.completion(request, events.append)
            assert result["tokens_predicted"] == args.tokens, result["tokens_predicted"]
            return time.perf_counter() - start, result["text"]

        def raw() -> tuple[float, str]:
            start = time.perf_counter()
            text, chunks = raw_stream(client, url, body)
            assert chunks == args.tokens, chunks
            return time.perf_counter() - start, text

        # Texts are not compared: the server reuses its cached prefix, and that changes near ties in the last bits.
        ours(), raw()  # warm-up
        walls: dict[str, list[float]] = {"raw": [], "llamacompat": []}
        for _ in range(args.rounds):
            walls["raw"].append(raw()[0])
            walls["llamacompat"].append(ours()[0])
        raw_s, ours_s = statistics.median(walls["raw"]), statistics.median(walls["llamacompat"])
        n = args.tokens
        overhead = (ours_s - raw_s) / n * 1000.0
        print(f"{n} tokens, {args.rounds} alternating rounds, llama-cpp-python server on loopback")
        print(f"  raw httpx2 SSE : {n / raw_s:7.1f} tokens/s (median {raw_s * 1000:.0f} ms)")
        print(f"  llamacompat    : {n / ours_s:7.1f} tokens/s (median {ours_s * 1000:.0f} ms)")
        print(f"  ratio {raw_s / ours_s:.3f}; overhead {overhead:.3f} ms/token "
              f"(best rounds {(min(walls['llamacompat']) - min(walls['raw'])) / n * 1000.0:.3f})")
        ctx.release()
        client.close()
        if overhead > args.max_overhead_ms:
            raise SystemExit(f"FAIL: overhead {overhead:.3f} ms/token > {args.max_overhead_ms}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
