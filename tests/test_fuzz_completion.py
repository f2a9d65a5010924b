"""Fuzzing ``ctx.completion`` in process (issue 24, item 10): random params drawn from COMPLETION_FIELDS.

Every params dict either gives a CompletionResult with the documented keys, within its n_predict, or raises a
LlamaError subclass (never another exception type), and the context stays usable: a plain greedy completion
afterwards gives the text it gave before the fuzzing.
"""

from __future__ import annotations

import warnings

import pytest
from hypothesis import example, given

from llamacompat import init_llama
from llamacompat.errors import LlamaCompatWarning, LlamaError
from llamacompat.types import CompletionResult, Timings

from .fuzz_strategies import MAX_PREDICT, completion_params, fuzz_settings, stable_codes

CODES = stable_codes()
PLAIN = {"prompt": "The capital of France is", "n_predict": 8, "temperature": 0}
RESULT_KEYS = CompletionResult.__required_keys__
OPTIONAL_KEYS = CompletionResult.__optional_keys__
PEAK_MB = 2048  # the test process holds the model and a 1024-token context in a few hundred MB


@pytest.fixture(scope="module")
def fuzz_ctx():
    """conftest's ctx settings on one thread: with two, ggml's threads wait on each other, and a neighbour process on
    the other core made a token take seconds."""
    context = init_llama({"model": "smollm2", "n_ctx": 1024, "n_threads": 1})
    yield context
    context.release()


def _reset_peak() -> bool:
    """Start this process's peak-memory count afresh (Linux); False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))


def check_result(result: dict, params: dict) -> None:
    assert RESULT_KEYS <= result.keys() <= RESULT_KEYS | OPTIONAL_KEYS, sorted(result)
    assert isinstance(result["text"], str)
    assert result["timings"].keys() == Timings.__required_keys__
    assert 0 <= result["tokens_predicted"] <= min(params["n_predict"], MAX_PREDICT), result
    assert isinstance(result["completion_probabilities"], list)
    for flag in ("truncated", "context_full", "interrupted", "stopped_eos", "stopped_word", "stopped_limit"):
        assert isinstance(result[flag], bool), (flag, result)


def test_random_completion_params(fuzz_ctx):
    before = fuzz_ctx.completion(PLAIN)["text"]
    peak = _reset_peak()
    outcomes: dict[str, int] = {}

    @fuzz_settings(400)
    @given(completion_params())
    @example({"prompt": "\ud800", "n_predict": 0})  # a lone surrogate reached the tokenizer: UnicodeEncodeError
    @example({"prompt": "Hi", "n_predict": 1, "grammar": 'root ::= "\ud800"'})
    @example({"prompt": "Hi", "n_predict": 1, "dry_multiplier": 1.75, "dry_sequence_breakers": ["\udfff"]})
    @example({"prompt": "Hi", "n_predict": 1, "logit_bias": [["\ud800", -1.0]]})
    @example({"prompt": "Hi", "n_predict": 1, "chat_template": "{{ '\\ud800' }}", "messages": [{"role": "user", "content": "x"}]})
    # 16 GB and over a minute for one token: llama.cpp allocated the whole penalty window up front
    @example({"prompt": "Hi", "n_predict": 1, "dry_multiplier": 1.75, "dry_penalty_last_n": 2**31 - 1})
    @example({"prompt": "Hi", "n_predict": 1, "penalty_repeat": 1.5, "penalty_last_n": 2**31 - 1})
    def run(params):
        tokens: list[dict] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LlamaCompatWarning)  # ignored params are warned about, not refused
                result = fuzz_ctx.completion(params, tokens.append)
        except LlamaError as err:
            assert err.code in CODES and err.message, err
            outcomes[err.code] = outcomes.get(err.code, 0) + 1
        else:
            check_result(result, params)
            assert len(tokens) <= MAX_PREDICT
            outcomes["result"] = outcomes.get("result", 0) + 1

    run()
    if peak:
        assert _peak_mb() < PEAK_MB, f"peak memory during the fuzzing: {_peak_mb():.0f} MB"
    assert outcomes.get("result", 0) >= 15, outcomes  # the fuzzing reached generation, not only validation
    assert fuzz_ctx.completion(PLAIN)["text"] == before
    assert fuzz_ctx.tokenize("Hello")["tokens"] == fuzz_ctx.tokenize("Hello")["tokens"] != []
