"""Requests that used to abort the process (llama.cpp's grammar sampler) or hold it, run by
``python -m tests.hostile_attacks BACKEND``: one JSON line per attack, then a plain completion.

A child process, so that a regression shows as a failed test (its exit status), not a dead test runner.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from llamacompat import init_llama

CHAIN = "\n".join([f"r{i} ::= r{i + 1}" for i in range(998)] + ['r998 ::= "a"', "root ::= r0"])  # 1000 rules

ATTACKS: dict[str, dict[str, Any]] = {
    # a complete grammar with ignore_eos: the end of generation is banned and nothing else is allowed
    "ignore_eos_schema": {"prompt": "A:", "n_predict": 8, "json_schema": {"type": "boolean"}, "ignore_eos": True},
    "ignore_eos_schema_greedy": {"prompt": "A:", "n_predict": 8, "json_schema": {"type": "boolean"},
                                 "ignore_eos": True, "temperature": 0},
    "ignore_eos_grammar": {"prompt": "Yes or no?", "n_predict": 8, "grammar": 'root ::= "yes" | "no"',
                           "ignore_eos": True, "seed": 3},
    # the bias bans every token the grammar allows, at the first token and after "ab"
    "bias_bans_grammar": {"prompt": "A:", "n_predict": 8, "grammar": 'root ::= "a"', "logit_bias": [["a", False]]},
    # "ac" and "bc" are single tokens too: after one token ("a" or "b") nothing allowed is left
    "bias_bans_midway": {"prompt": "A:", "n_predict": 8, "grammar": 'root ::= [ab] "c"',
                         "logit_bias": [["c", False], ["ac", False], ["bc", False]], "temperature": 0},
    "empty_class": {"prompt": "A:", "n_predict": 8, "grammar": "root ::= [^\\x00-\\U0010FFFF]"},
    "unknown_token_id": {"prompt": "A:", "n_predict": 8, "grammar": "root ::= <[99999999]>"},
    "bans_every_token": {"prompt": "A:", "n_predict": 8, "logit_bias": [[t, False] for t in range(49152)]},
    # at the limits, the engines still run them
    "nested_100": {"prompt": "A:", "n_predict": 8, "grammar": "root ::= " + "(" * 100 + '"a"' + ")" * 100},
    "chain_1000_rules": {"prompt": "A:", "n_predict": 8, "grammar": CHAIN},
    "schema_300_optional_properties": {"prompt": "JSON:", "n_predict": 8, "temperature": 0, "json_schema": {
        "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}, "additionalProperties": False}},
}


def main(backend: str) -> int:
    ctx = init_llama({"backend": backend, "n_ctx": 512, "n_threads": 2})
    assert all(len(ctx.tokenize(text)["tokens"]) == 1 for text in ("c", "ac", "bc"))  # what bias_bans_midway bans
    for name, params in ATTACKS.items():
        streamed: list[str] = []
        try:
            result = ctx.completion(params, lambda event, out=streamed: out.append(event["token"]))
            outcome = {"text": result["text"], "stopped_eos": result["stopped_eos"],
                       "stopped_limit": result["stopped_limit"], "tokens_predicted": result["tokens_predicted"]}
        except Exception as err:  # the outcome under test: its type and message
            outcome = {"error": type(err).__name__, "message": getattr(err, "detail", str(err))}
        print(json.dumps({"name": name, "streamed": "".join(streamed), **outcome}), flush=True)
    after = ctx.completion({"prompt": "The capital of France is", "n_predict": 4, "temperature": 0})
    print(json.dumps({"name": "after", "text": after["text"]}), flush=True)
    ctx.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
