"""llamacompat's mlx backend vs ``mlx_lm.stream_generate`` on the same model object, and MLX vs llama.cpp.

Both MLX sides run the very same loaded model (the packaged GGUF mapped onto
mlx-lm's llama), greedy, N tokens from the same prompt, alternating in one
process; each round times one full call from a fresh cache (prefill + decode).
We report tokens/s (best and median) and the ratio llamacompat / raw. Then the
llama_cpp backend runs the same completion on the same file, for scale.

    python bench/bench_mlx.py [--tokens 128] [--rounds 3] [--min-ratio 0.95]
    python bench/bench_mlx.py --parallel 8 [--tokens 32]

``--parallel N`` instead runs N greedy requests three ways on one model: one after another, through
``ctx.parallel`` (rows of mlx-lm's BatchGenerator), and straight through ``BatchGenerator``; it reports aggregate
tokens/s and the ratios, and checks that the parallel texts equal the one-by-one ones.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time

from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
from transformers import PreTrainedTokenizerFast

from llamacompat import init_llama

PROMPT = "Once upon a time, in a small village by the sea, there lived"
PROMPTS = ["The capital of France is", "List three colours:", "Once upon a time", "2 + 2 =", "My favourite food is",
           "Water boils at", "The quick brown fox", "In 1492, Columbus"]


def parallel(n_requests: int, n: int) -> int:
    """Aggregate decode of ``n_requests`` greedy requests: in turn, through ctx.parallel, and raw BatchGenerator."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    ctx = init_llama({"backend": "mlx", "n_ctx": max(2048, n_requests * 256), "n_parallel": n_requests})
    params = [{"prompt": p, "temperature": 0, "n_predict": n, "ignore_eos": True} for p in prompts]
    start = time.perf_counter()
    alone = [ctx.completion(p)["text"] for p in params]
    sequential = n_requests * n / (time.perf_counter() - start)
    ctx.parallel.enable({"n_parallel": n_requests})
    start = time.perf_counter()
    together = [h.promise.result() for h in [ctx.parallel.completion(p) for p in params]]
    ours = n_requests * n / (time.perf_counter() - start)
    ctx.parallel.disable()
    generator = importlib.import_module("mlx_lm.generate").BatchGenerator(
        ctx._core.adapter._model, max_tokens=n, completion_batch_size=n_requests, prefill_batch_size=n_requests)
    start = time.perf_counter()
    generator.insert([ctx.tokenize(p)["tokens"] for p in prompts])
    while generator.next_generated():
        pass
    raw = n_requests * n / (time.perf_counter() - start)
    generator.close()
    ctx.release()
    same = sum(r["text"] == a for r, a in zip(together, alone, strict=True))
    print(f"{n_requests} greedy requests x {n} tokens, aggregate tokens/s (prefill included)")
    print(f"  one after another       {sequential:7.2f}")
    print(f"  ctx.parallel            {ours:7.2f}  ({ours / sequential:.2f}x in turn, {ours / raw:.2f}x raw)")
    print(f"  raw BatchGenerator      {raw:7.2f}")
    print(f"  texts equal to one-by-one: {same}/{n_requests}")
    return 0 if same == n_requests else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-ratio", type=float, default=0.95, help="exit 1 below this ratio")
    parser.add_argument("--parallel", type=int, default=0, help="N requests at once instead (see above)")
    args = parser.parse_args()
    if args.parallel:
        return parallel(args.parallel, args.tokens)
    n = args.tokens

    ours = init_llama({"backend": "mlx", "n_ctx": 2048})
    adapter = ours._core.adapter
    model, vocab = adapter._model, adapter._vocab
    prompt_tokens = ours.tokenize(PROMPT)["tokens"]
    greedy = make_sampler(temp=0.0)

    # The raw side streams text the way mlx-lm does for byte-level BPE; no EOS, so both run all n tokens.
    raw_tokenizer = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=vocab.tokenizer),
                                     detokenizer_class=BPEStreamingDetokenizer)

    def run_raw() -> str:
        tokens = [r.token for r in stream_generate(model, raw_tokenizer, prompt_tokens, max_tokens=n, sampler=greedy)]
        assert len(tokens) == n, len(tokens)
        return vocab.decode(tokens)

    def run_ours() -> str:
        adapter._rewind(0)  # a fresh cache, as the raw side starts from
        result = ours.completion({"prompt": PROMPT, "temperature": 0, "n_predict": n, "ignore_eos": True})
        assert result["tokens_predicted"] == n, result["tokens_predicted"]
        return result["text"]

    assert run_raw() == run_ours(), "the two MLX runs disagree"
    times: dict[str, list[float]] = {"raw": [], "ours": []}
    for _ in range(args.rounds):
        for name, run in (("raw", run_raw), ("ours", run_ours)):
            start = time.perf_counter()
            run()
            times[name].append(n / (time.perf_counter() - start))
    ours.release()

    with init_llama({"backend": "llama_cpp", "n_ctx": 2048, "n_threads": 2}) as lctx:
        lctx.completion({"prompt": PROMPT, "temperature": 0, "n_predict": 8})
        llama_cpp = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            lctx.completion({"prompt": PROMPT, "temperature": 0, "n_predict": n, "ignore_eos": True})
            lctx._core.adapter._rewind(0)
            llama_cpp.append(n / (time.perf_counter() - start))

    best = {k: max(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio_best, ratio_median = best["ours"] / best["raw"], median["ours"] / median["raw"]
    print(f"{n} greedy tokens, {args.rounds} alternating rounds, tokens/s (prefill included)")
    print(f"  mlx_lm.stream_generate  best {best['raw']:7.2f}  median {median['raw']:7.2f}")
    print(f"  llamacompat mlx         best {best['ours']:7.2f}  median {median['ours']:7.2f}")
    print(f"  ratio                   best {ratio_best:7.3f}  median {ratio_median:7.3f}")
    print(f"  llamacompat llama_cpp   best {max(llama_cpp):7.2f}  median {statistics.median(llama_cpp):7.2f}"
          f"  ({statistics.median(llama_cpp) / median['ours']:.1f}x mlx)")
    return 0 if ratio_median >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
