"""What the rkllm backend costs per token, against a bare ctypes loop, on the simulator library.

No NPU here, so both sides drive the test simulator (tests/rkllm_sim, ABI 1.3.0)
with the same tokens and greedy settings, alternating in one process:

- raw: rkllm_run with a callback that appends the token to a list (what
  Rockchip's demo does, minus its polling);
- llamacompat: ``ctx.completion`` (helper thread, queue, engine, streaming).

At 0 µs per simulated token the difference is our overhead per token; at
1000 µs (an NPU-like 1000 tokens/s; real boards run 15-45 tokens/s for 0.5-1.5B
models) it shows what that overhead means. Exits 1 if the overhead is above
100 µs per token.
"""

from __future__ import annotations

import ctypes as C
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamacompat import init_llama  # noqa: E402
from llamacompat.adapters.rkllm.abi import ABIS  # noqa: E402
from llamacompat.models import default_model_path  # noqa: E402
from tests.rkllm_helpers import build_model_folder, build_sim  # noqa: E402

N_TOKENS = 256
ROUNDS = 5
PROMPT = "Here is a long story about a dragon who learns to bake bread.\n\nOnce upon a time,"


def raw_runner(lib_path: str, model: str, n_ctx: int):
    abi = ABIS["1.3.0"]
    lib = C.CDLL(lib_path)
    for name, (restype, argtypes) in abi.functions.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    tokens: list[int] = []

    def on_result(result, _userdata, state):
        if state in (0, 1) and result.contents.token_id >= 0:
            tokens.append(result.contents.token_id)
        return 0

    callback = abi.result_callback(on_result)
    callbacks = abi.Callback(result_callback=callback)
    param = lib.rkllm_createDefaultParam()
    path = model.encode()
    param.model_path, param.max_context_len, param.max_new_tokens = path, n_ctx, n_ctx
    handle = C.c_void_p()
    assert lib.rkllm_init(C.byref(handle), C.byref(param), C.byref(callbacks)) == 0

    def run(prompt: list[int]) -> float:
        tokens.clear()
        ids = (C.c_int32 * len(prompt))(*prompt)
        run_input = abi.Input(input_type=1)
        run_input.token_input.input_ids, run_input.token_input.n_tokens = ids, len(prompt)
        sampling = abi.SamplingParam(top_k=1, temperature=1.0, top_p=0.95, repeat_penalty=1.0)
        infer = abi.InferParam(mode=0, sampling_params=C.pointer(sampling), max_new_tokens=N_TOKENS)
        start = time.perf_counter()
        lib.rkllm_run(handle, C.byref(run_input), C.byref(infer), None)
        elapsed = time.perf_counter() - start
        assert len(tokens) == N_TOKENS, len(tokens)
        return elapsed

    return run, (lambda: (lib.rkllm_destroy(handle), callback))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-rkllm-"))
    lib = build_sim(work, "1.3.0")
    model = build_model_folder(work / "model", default_model_path())
    n_ctx = 1024
    worst = 0.0
    for token_us in (0, 1000):
        os.environ["RKLLM_SIM_TOKEN_US"] = str(token_us)
        ctx = init_llama({"backend": "rkllm", "model": model, "rkllm_lib": lib, "n_ctx": n_ctx})
        prompt = ctx.tokenize(PROMPT)["tokens"]
        raw, close = raw_runner(lib, model, n_ctx)
        ours_s, raw_s = [], []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            result = ctx.completion({"prompt": PROMPT, "n_predict": N_TOKENS, "temperature": 0})
            ours_s.append(time.perf_counter() - start)
            assert result["tokens_predicted"] == N_TOKENS
            raw_s.append(raw(prompt))
        ctx.release()
        close()
        ours, bare = statistics.median(ours_s), statistics.median(raw_s)
        overhead_us = (ours - bare) / N_TOKENS * 1e6
        worst = max(worst, overhead_us)
        print(f"{token_us:>5} µs/token simulated: raw {N_TOKENS / bare:8.0f} tok/s   llamacompat "
              f"{N_TOKENS / ours:8.0f} tok/s   ratio {bare / ours:.3f}   overhead {overhead_us:6.1f} µs/token")
    return 1 if worst > 100 else 0


if __name__ == "__main__":
    sys.exit(main())
