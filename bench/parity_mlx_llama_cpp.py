"""Cross-backend parity: the same GGUF, the same prompts, greedy, through llama_cpp and mlx.

For each prompt both backends generate N tokens greedily with their top-5
probabilities. Identical texts are counted; for the others, the first
position where the tokens differ is reported with both backends' top-5 there
(the prefix before it is the same, so the two distributions are comparable).
A divergence is a near tie when each backend's choice was within ``--tie``
probability of the other's under both distributions; anything else is a
confident disagreement, i.e. a bug to find.

    python bench/parity_mlx_llama_cpp.py [--tokens 32] [--tie 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llamacompat import init_llama

PROMPTS = [
    "Which city is the capital of France?", "Name the capital of France.", "What is 2 + 2?",
    "Write a haiku about the sea.", "List three primary colours.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?", "Give me a synonym for happy.",
    "What is the largest planet in the solar system?", "Explain photosynthesis in one sentence.",
    "Write a Python function that adds two numbers.", "What day comes after Monday?",
    "How many legs does a spider have?", "Suggest a name for a pet cat.", "What is the opposite of cold?",
    "Describe a rainbow.", "What colour is the sky on a clear day?", "Count from one to five.",
    "Why do we need sleep?", "What is the chemical symbol for gold?", "Tell me a fun fact about octopuses.",
]


def run(backend: str, tokens: int) -> list[dict[str, Any]]:
    ctx = init_llama({"backend": backend, "n_ctx": 1024})
    try:
        return [ctx.completion({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                                "n_predict": tokens, "n_probs": 5})
                for prompt in PROMPTS]
    finally:
        ctx.release()


def top5(step: dict[str, Any]) -> list[tuple[str, float]]:
    return [(p["tok_str"], round(p["prob"], 4)) for p in step["probs"]]


def compare(ours: dict[str, Any], theirs: dict[str, Any], tie: float) -> dict[str, Any]:
    """Where two greedy runs part, and whether it was a near tie."""
    a, b = ours["completion_probabilities"], theirs["completion_probabilities"]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x["content"] != y["content"]:
            probs_a, probs_b = dict(top5(x)), dict(top5(y))
            gap_a = probs_a.get(x["content"], 0) - probs_a.get(y["content"], 0)
            gap_b = probs_b.get(y["content"], 0) - probs_b.get(x["content"], 0)
            return {"position": i, "llama_cpp": top5(x), "mlx": top5(y), "gaps": (round(gap_a, 4), round(gap_b, 4)),
                    "near_tie": gap_a <= tie and gap_b <= tie}
    return {"position": None, "near_tie": True}


def parity(tokens: int = 32, tie: float = 0.25) -> dict[str, Any]:
    llama_cpp, mlx = run("llama_cpp", tokens), run("mlx", tokens)
    rows = []
    for prompt, x, y in zip(PROMPTS, llama_cpp, mlx, strict=True):
        row = {"prompt": prompt, "identical": x["text"] == y["text"], "llama_cpp": x["text"], "mlx": y["text"]}
        if not row["identical"]:
            row["divergence"] = compare(x, y, tie)
        rows.append(row)
    return {"prompts": len(rows), "identical": sum(r["identical"] for r in rows), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--tie", type=float, default=0.25)
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args()
    report = parity(args.tokens, args.tie)
    print(f"identical texts: {report['identical']} of {report['prompts']}")
    confident = 0
    for row in report["rows"]:
        if row["identical"]:
            continue
        d = row["divergence"]
        confident += not d["near_tie"]
        print(f"- {row['prompt']!r}: token {d['position']}, gaps {d.get('gaps')}, near tie: {d['near_tie']}")
        print(f"    llama_cpp {d.get('llama_cpp')}\n    mlx       {d.get('mlx')}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=1, ensure_ascii=False)
    return 1 if confident else 0


if __name__ == "__main__":
    sys.exit(main())
