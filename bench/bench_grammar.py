"""Grammar-constrained vs unconstrained decoding on the same prompt: tokens/s and their ratio.

Each round generates greedily under a grammar (the built-in ``json`` grammar, and a grammar converted
from a nested schema) until the JSON value ends, then generates exactly as many tokens without a grammar
from the same prompt (``ignore_eos``), and compares the decode speed llama.cpp reports for each
(``timings.predicted_per_second``: generation only, prompt evaluation excluded). Alternating in one
process keeps machine noise out of the ratio; we report the best and the median over rounds.

    python bench/bench_grammar.py [--rounds 7] [--threads 2]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    grammars = {"json (built-in)": builtin_grammar("json"), "nested schema": convert_json_schema_to_grammar(NESTED_SCHEMA)}
    ctx = init_llama({"n_ctx": 2048, "n_threads": args.threads})
    print(f"{'grammar':<16} {'tokens':>6} {'constrained tok/s':>18} {'free tok/s':>11} {'ratio best':>10} {'ratio median':>12}")
    for name, grammar in grammars.items():
        constrained, free, ratios, count = [], [], [], 0
        for _ in range(args.rounds):
            bound = ctx.completion({"messages": PROMPT, "grammar": grammar, "n_predict": 400, **SAMPLING})
            count = bound["tokens_predicted"]
            plain = ctx.completion({"messages": PROMPT, "n_predict": count, "ignore_eos": True, **SAMPLING})
            constrained.append(bound["timings"]["predicted_per_second"])
            free.append(plain["timings"]["predicted_per_second"])
            ratios.append(constrained[-1] / free[-1])
        print(f"{name:<16} {count:>6} {max(constrained):>18.1f} {max(free):>11.1f} "
              f"{max(constrained) / max(free):>10.3f} {statistics.median(ratios):>12.3f}")
    ctx.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
