"""Save the KV cache after a long prompt; a new context loads it and skips re-evaluating that prompt."""

import os
import tempfile

from llamacompat import init_llama

DOCUMENT = "Notes: " + " ".join(f"Item {i} costs {i * 3} euros." for i in range(40))
QUESTION = {"prompt": DOCUMENT + "\nQuestion: what does item 7 cost?\nAnswer:", "n_predict": 12, "temperature": 0}

path = os.path.join(tempfile.mkdtemp(), "notes.session")
with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:
    ctx.completion({"prompt": DOCUMENT, "n_predict": 0})  # evaluate the document only
    print("saved", ctx.save_session(path), "tokens to", path)

with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:  # e.g. after a restart
    print("loaded", ctx.load_session(path)["tokens_loaded"], "tokens")
    result = ctx.completion(QUESTION)
    timings = result["timings"]
    print(f"reused {timings['cache_n']} cached tokens, evaluated {timings['prompt_n']}:", result["text"].strip())
    assert timings["cache_n"] > 0
