"""examples/toy_adapter.py, the worked example of docs/writing-an-adapter.md, passes the conformance suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from llamacompat import init_llama
from llamacompat.conformance import run_checks
from llamacompat.errors import ContextFullError, InvalidParamsError, UnsupportedFeatureError
from llamacompat.registry import unregister_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def toy():
    """The example module (importing it registers the backend 'toy')."""
    spec = importlib.util.spec_from_file_location("toy_adapter", os.path.join(EXAMPLES, "toy_adapter.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    unregister_adapter("toy")


@pytest.fixture(scope="module")
def model(toy, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toy") / "dragon.txt"
    path.write_text(toy.CORPUS, encoding="utf-8")
    return str(path)


def test_toy_adapter_passes_every_check(model):
    outcomes = run_checks("toy", {"model": model})
    assert [(o.name, o.detail) for o in outcomes if o.status == "failed"] == []
    # n/a only where the check verified the refusal of a feature the toy declares missing: grammars
    skipped = {o.name: o.detail for o in outcomes if o.status == "n/a"}
    assert set(skipped) == {"grammar", "json_schema"}, skipped
    assert all("toy lacks 'grammar'" in detail for detail in skipped.values())
    with init_llama({"backend": "toy", "model": model}) as ctx:
        assert ctx.capabilities["features"]["grammar"] == "missing"


def test_toy_n_past_leaves_out_the_last_sampled_token(model):
    """llama.rn's rule, which the toy follows: tokens_cached = evaluated + predicted - 1 (the last token is
    sampled, never evaluated), and n_predict 0 leaves exactly the prompt in the cache."""
    with init_llama({"backend": "toy", "model": model}) as ctx:
        result = ctx.completion({"prompt": "The sky is", "n_predict": 5, "ignore_eos": True})
        assert result["tokens_predicted"] == 5
        assert result["tokens_cached"] == result["tokens_evaluated"] + 5 - 1
        zero = ctx.completion({"prompt": "The sky is", "n_predict": 0})
        assert zero["tokens_cached"] == zero["tokens_evaluated"] == len(ctx.tokenize("The sky is")["tokens"]) + 1  # BOS


def test_toy_honours_vocab_only_n_ctx_and_pooling_type(model):
    with init_llama({"backend": "toy", "model": model, "vocab_only": True}) as ctx:
        assert ctx.detokenize(ctx.tokenize("a dragon")["tokens"]) == "a dragon"
        with pytest.raises(UnsupportedFeatureError, match="vocab_only"):
            ctx.completion({"prompt": "a dragon", "n_predict": 1})
    with init_llama({"backend": "toy", "model": model}) as ctx:  # n_ctx 0: the model's training context
        long_prompt = " bread" * 3000  # 3000 tokens: more than a 1024 context holds, less than 4096
        assert len(ctx.tokenize(long_prompt)["tokens"]) == 3000
        assert ctx.completion({"prompt": long_prompt, "n_predict": 1})["tokens_evaluated"] == 3001
    with init_llama({"backend": "toy", "model": model, "n_ctx": 1024}) as ctx, pytest.raises(ContextFullError):
        ctx.completion({"prompt": long_prompt, "n_predict": 1})
    with pytest.raises(InvalidParamsError, match="pools embeddings"):
        init_llama({"backend": "toy", "model": model, "embedding": True, "pooling_type": "rank"})


def test_pytest_plugin_checks_the_toy_adapter(model, tmp_path):
    """The documented pytest command, with the adapter registered by `-p toy_adapter` before it is packaged."""
    cmd = [sys.executable, "-m", "pytest", "-p", "toy_adapter", "--pyargs", "llamacompat.conformance", "-q",
           "-p", "no:cacheprovider", "--llamacompat-backend", "toy", "--llamacompat-param", f"model={model}",
           "-k", "sessions or tokenizer"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, EXAMPLES])})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
