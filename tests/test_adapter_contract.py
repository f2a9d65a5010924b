"""The adapter contract of adapters/base.py: the feature catalogue, n_past, errors at the adapter boundary."""

from __future__ import annotations

import pytest

from llamacompat.adapters.base import FEATURES, SUPPORT, Capabilities
from llamacompat.openai.dialects import DIALECTS
from llamacompat.params import FEATURE_PARAMS


def test_capabilities_refuse_a_feature_outside_the_catalogue():
    with pytest.raises(ValueError, match=r"unknown features \['ignore_eso'\].*adapters\.base\.Feature"):
        Capabilities("toy", {"completion": "native", "ignore_eso": "native"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"support values \{'seed': 'yes'\}.*'emulated', 'missing', 'native'"):
        Capabilities("toy", {"seed": "yes"})  # type: ignore[dict-item]
    assert Capabilities("toy", {"seed": "emulated"}).supports("seed")
    assert not Capabilities("toy", {}).supports("seed")


def test_request_features_and_every_openai_dialect_use_catalogue_names():
    assert set(FEATURE_PARAMS) <= FEATURES
    for dialect in DIALECTS.values():
        features = dialect.features()
        assert set(features) <= FEATURES, dialect.name
        assert set(features.values()) <= SUPPORT, dialect.name


def test_every_local_adapter_lists_catalogue_names(ctx, model_path):
    """llama_cpp (full and vocab_only) and mlx; rkllm's table is checked by its conformance run (tests/test_rkllm.py)."""
    from llamacompat import init_llama

    tables = [ctx.capabilities["features"]]
    with init_llama({"model": model_path, "vocab_only": True}) as vocab_only:
        tables.append(vocab_only.capabilities["features"])
    with init_llama({"model": model_path, "backend": "mlx", "n_ctx": 256, "embedding": True}) as mlx:
        tables.append(mlx.capabilities["features"])
    for features in tables:
        assert set(features) <= FEATURES and set(features.values()) <= SUPPORT
    assert set().union(*tables) >= set(FEATURE_PARAMS)  # every request feature is declared one way or the other


@pytest.mark.parametrize("backend", ["llama_cpp", "mlx"])
def test_tokenize_and_detokenize_run_beside_a_generation(model_path, backend):
    """Adapter's thread contract: tokenize / detokenize may run on another thread while a generation runs."""
    from llamacompat import init_llama
    from llamacompat.conformance.kit import run_in_background

    texts = ["Hello, world!", "Café naïve 日本語 🎉", "def f(x):\n\treturn x ** 2\n", "<|im_start|>user\nHi<|im_end|>"]
    with init_llama({"model": model_path, "backend": backend, "n_ctx": 512}) as ctx:
        expected = {text: ctx.tokenize(text)["tokens"] for text in texts}
        worker, box = run_in_background(ctx, {"prompt": "Once upon a time,", "n_predict": 48, "ignore_eos": True,
                                              "temperature": 0})
        rounds = 0
        while worker.is_alive() and rounds < 2000:
            for text, tokens in expected.items():
                assert ctx.tokenize(text)["tokens"] == tokens
                assert ctx.detokenize(tokens) == text
            rounds += 1
        worker.join(60)
        assert "error" not in box, box.get("error")
        assert box["result"]["tokens_predicted"] == 48 and rounds > 0


def test_an_llguidance_failure_on_llama_cpp_is_a_generation_error_and_nothing_is_decoded_twice(ctx, monkeypatch):
    """The mask computed beside llama_decode fails (as a Rust panic would) right after the grammar forced a run
    of tokens: a typed error, and those tokens are in the cache once (``end`` must not decode them again)."""
    import threading

    from llamacompat.adapters.llama_cpp import lc
    from llamacompat.errors import GenerationError
    from llamacompat.grammars.guidance import Guide

    request = {"prompt": "Name a fruit.", "grammar": 'root ::= "Fruits: apple, pear, plum, and " [a-z]+',
               "n_predict": 24, "temperature": 0}
    expected = ctx.completion(request)
    real = Guide.compute

    def failing(self):
        if threading.current_thread().name.startswith("llamacompat-grammar"):  # the first mask beside a decode
            raise RuntimeError("llguidance: internal error")
        return real(self)

    adapter = ctx._core.adapter
    handed: list[int] = []
    next_token = adapter.next_token
    monkeypatch.setattr(adapter, "next_token", lambda: handed.append(next_token()) or handed[-1])
    monkeypatch.setattr(Guide, "compute", failing)
    with pytest.raises(GenerationError, match=r"llama_cpp backend failed while generating \(llguidance\): llguidance"):
        ctx.completion(request)
    monkeypatch.undo()
    n_prompt = len(ctx.tokenize("Name a fruit.")["tokens"]) + adapter.add_bos
    assert len(handed) > 2  # the grammar forced several tokens, decoded together at the failing step
    assert adapter.n_past <= n_prompt + len(handed)  # each evaluated once
    assert lc.llama_memory_seq_pos_max(adapter._mem, 0) + 1 == adapter.n_past  # the record and the KV cache agree
    assert ctx.completion(request)["text"] == expected["text"]
