"""Grammar-constrained vs unconstrained decoding on the same prompt: tokens/s and their ratio, per backend.

Each round generates greedily under a grammar (the built-in ``json`` grammar, and a grammar converted
from a nested schema) until the JSON value ends, then generates exactly as many tokens without a grammar
from the same prompt (``ignore_eos``), and compares the decode speed each reports
(``timings.predicted_per_second``: generation only, prompt evaluation excluded). Alternating in one
process keeps machine noise out of the ratio; we report the best and the median over rounds. Both backends
constrain with llguidance (a token mask per step; on llama_cpp the masked logits go through llama.cpp's own
sampler chain, and tokens the grammar forces are evaluated in one batch): the table also gives each mask's
time (p50 / p99), the grammar's compile time and how many tokens were forced rather than sampled.
The target is a ratio of at least 0.9 (exit 1 below it on llama_cpp).

    python bench/bench_grammar.py [--rounds 7] [--threads 2] [--mlx-rounds 2]
"""

from __future__ import annotations

import argparse
import statistics

from llamacompat import convert_json_schema_to_grammar, init_llama
from llamacompat.grammars import builtin_grammar

NESTED_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["order_id", "customer", "lines", "status"],
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "email"],
                     "properties": {"name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "format": "email"}}},
        "lines": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "additionalProperties": False, "required": ["sku", "qty", "price"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                           "price": {"type": "number", "minimum": 0, "maximum": 10000}}}},
        "status": {"enum": ["pending", "shipped", "delivered"]},
    },
}
PROMPT = [{"role": "user", "content": "Write an example order for an online shop as JSON with nested objects."}]
SAMPLING = {"temperature": 0, "dry_multiplier": 0.8, "penalty_repeat": 1.1, "penalty_last_n": 64}


def _figures(ctx, grammar: str, rounds: int) -> dict[str, float]:
    constrained, free, ratios, masks, compile_ms, forced, count = [], [], [], [], [], 0, 0
    for _ in range(rounds):
        bound = ctx.completion({"messages": PROMPT, "grammar": grammar, "n_predict": 400, **SAMPLING})
        guide = ctx._core.adapter.last_guide  # the adapter keeps the last completion's guide for these figures
        count, forced = bound["tokens_predicted"], guide.forced_tokens
        masks += guide.mask_times
        compile_ms.append(guide.compile_ms)
        plain = ctx.completion({"messages": PROMPT, "n_predict": count, "ignore_eos": True, **SAMPLING})
        constrained.append(bound["timings"]["predicted_per_second"])
        free.append(plain["timings"]["predicted_per_second"])
        ratios.append(constrained[-1] / free[-1])
    return {"tokens": count, "forced": forced, "constrained": max(constrained), "free": max(free),
            "best": max(constrained) / max(free), "median": statistics.median(ratios),
            "mask_p50": statistics.median(masks) * 1e6, "mask_p99": sorted(masks)[int(0.99 * (len(masks) - 1))] * 1e6,
            "compile": statistics.median(compile_ms)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mlx-rounds", type=int, default=2, help="mlx decodes ~10x slower on a CPU (0 skips it)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    grammars = {"json (built-in)": builtin_grammar("json"), "nested schema": convert_json_schema_to_grammar(NESTED_SCHEMA)}
    print(f"{'backend':<9} {'grammar':<16} {'tokens':>6} {'forced':>6} {'constrained tok/s':>17} {'free tok/s':>10} "
          f"{'ratio best':>10} {'ratio median':>12} {'mask p50 us':>11} {'mask p99 us':>11} {'compile ms':>10}")
    worst = {}
    for backend, rounds in (("llama_cpp", args.rounds), ("mlx", args.mlx_rounds)):
        if rounds <= 0:
            continue
        ctx = init_llama({"backend": backend, "n_ctx": 2048, "n_threads": args.threads})
        ctx.completion({"prompt": "Hi", "n_predict": 1, "grammar": 'root ::= "a"'})  # builds llguidance's table once
        for name, grammar in grammars.items():
            f = _figures(ctx, grammar, rounds)
            worst[backend] = min(worst.get(backend, 9.0), f["median"])
            print(f"{backend:<9} {name:<16} {f['tokens']:>6} {f['forced']:>6} {f['constrained']:>17.1f} {f['free']:>10.1f} "
                  f"{f['best']:>10.3f} {f['median']:>12.3f} {f['mask_p50']:>11.0f} {f['mask_p99']:>11.0f} {f['compile']:>10.1f}")
        ctx.release()
    return 0 if worst.get("llama_cpp", 1.0) >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
