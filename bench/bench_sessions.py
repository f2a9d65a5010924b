"""Sessions and prefix reuse on llama.cpp: what resuming saves, in one process.

1. A ~1,000-token prompt evaluated from scratch vs resumed from a session file
   (``load_session`` + the same completion, which then evaluates one token).
2. A 5-turn chat where each turn resends the whole conversation: with prefix
   reuse (the default: only the new turn is evaluated) vs without (the cache
   is emptied before each turn by loading an empty session).

Rounds alternate the two sides; we report the median and best times and the
ratio scratch / resumed. Exit 1 if resuming is not at least ``--min-ratio``
times faster.

    python bench/bench_sessions.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from llamacompat import init_llama

TOPICS = ["the sea", "mountains", "a library", "trains", "bread", "winter", "bees", "a lighthouse", "rivers", "clocks"]
QUESTIONS = ["Name a colour.", "And a fruit?", "Which animal is fast?", "Name a planet.", "What is 2 + 2?"]


def long_prompt(ctx, n_tokens: int) -> tuple[str, int]:
    text = " ".join(f"Paragraph {i}: a few plain words about {TOPICS[i % len(TOPICS)]}, written for a test."
                    for i in range(400))
    tokens = ctx.tokenize(text)["tokens"][:n_tokens]
    prompt = ctx.detokenize(tokens)
    return prompt, len(ctx.tokenize(prompt)["tokens"])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--min-ratio", type=float, default=10.0, help="exit 1 if resume is not this many times faster")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="llamacompat-bench-")
    empty, saved = os.path.join(folder, "empty.session"), os.path.join(folder, "long.session")
    ctx = init_llama({"model": args.model, "n_ctx": 4096, "n_threads": args.threads})
    ctx.save_session(empty)  # loading it empties the cache: "from scratch" through the public API only

    prompt, n = long_prompt(ctx, args.tokens)
    evaluate = lambda: ctx.completion({"prompt": prompt, "n_predict": 0})  # noqa: E731
    evaluate()
    session_tokens = ctx.save_session(saved)
    size = os.path.getsize(saved)

    scratch, resumed = [], []
    for _ in range(args.rounds):
        ctx.load_session(empty)
        scratch.append(timed(evaluate))
        ctx.load_session(empty)
        resumed.append(timed(lambda: (ctx.load_session(saved), evaluate())))
    check = ctx.completion({"prompt": prompt, "n_predict": 0})
    assert check["timings"]["prompt_n"] == 1, check["timings"]

    def chat(reuse: bool) -> float:
        messages, total = [], 0.0
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            if not reuse:
                ctx.load_session(empty)
            start = time.perf_counter()
            result = ctx.completion({"messages": messages, "n_predict": 24, "temperature": 0})
            total += time.perf_counter() - start
            messages.append({"role": "assistant", "content": result["text"]})
        return total

    with_reuse, without = [], []
    for _ in range(args.rounds):
        without.append(chat(False))
        with_reuse.append(chat(True))
    ctx.release()
    for path in (empty, saved):
        for leftover in (path, path + ".llamacompat.json"):
            os.unlink(leftover)
    os.rmdir(folder)

    def line(label: str, slow: list[float], fast: list[float], slow_name: str, fast_name: str) -> float:
        ratio = statistics.median(slow) / statistics.median(fast)
        print(f"{label}: {slow_name} median {statistics.median(slow) * 1000:.1f} ms (best {min(slow) * 1000:.1f}), "
              f"{fast_name} median {statistics.median(fast) * 1000:.1f} ms (best {min(fast) * 1000:.1f}) "
              f"-> {ratio:.1f}x")
        return ratio

    print(f"prompt {n} tokens; session file {session_tokens} tokens, {size / 1e6:.1f} MB; "
          f"{args.rounds} rounds, {args.threads} threads")
    ratio = line("resume", scratch, resumed, "from scratch", "load_session + completion")
    line("5-turn chat", without, with_reuse, "no reuse", "prefix reuse")
    if ratio < args.min_ratio:
        print(f"FAIL: resuming is {ratio:.1f}x faster, below {args.min_ratio}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
