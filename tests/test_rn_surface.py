"""llama.rn's surface as a ported app meets it (issue 28): its error texts, its keys, ``now``, and the
context's and get_formatted_chat's extra fields; on the real model, and through a live bridge server."""

from __future__ import annotations

import pickle

import pytest

from llamacompat import init_llama, set_context_limit
from llamacompat.cli import main
from llamacompat.errors import (
    ContextFullError,
    ContextLimitError,
    EmbeddingDisabledError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    error_from_code,
)

from .bridge_helpers import Served

LONG = "The quick brown fox jumps over the lazy dog. " * 40  # about 400 tokens


# -- item 4: llama.rn's error texts ------------------------------------------------------------------------
def _caught(call) -> LlamaError:
    with pytest.raises(LlamaError) as info:
        call()
    return info.value


def test_errors_say_llama_rn_text_and_keep_the_detail(ctx, tmp_path):
    small = init_llama({"n_ctx": 64, "n_threads": 2})
    try:
        full = _caught(lambda: small.completion({"prompt": LONG, "n_predict": 2}))
    finally:
        small.release()
    assert isinstance(full, ContextFullError) and str(full) == "Context is full"
    assert "n_ctx is 64" in full.detail and full.detail in repr(full) and full.message == full.detail
    assert full.code == "context_full"
    empty = _caught(lambda: ctx.completion({"prompt": ""}))
    assert isinstance(empty, InvalidParamsError) and str(empty) == "Prompt is required" and "'messages'" in empty.detail
    disabled = _caught(lambda: ctx.embedding("hi"))
    assert isinstance(disabled, EmbeddingDisabledError) and str(disabled) == "Embedding is not enabled"
    assert "'embedding': True" in disabled.detail
    missing = _caught(lambda: init_llama({"model": str(tmp_path / "none.gguf")}))
    assert isinstance(missing, ModelLoadError) and str(missing) == "Failed to load model" and "none.gguf" in missing.detail
    grammar = _caught(lambda: ctx.completion({"prompt": "Hi", "grammar": 'root ::= "a'}))
    assert str(grammar) == "Failed to initialize sampling" and "line 1" in grammar.detail
    set_context_limit(1)
    try:
        limit = _caught(lambda: init_llama({"n_ctx": 64, "n_threads": 2}))
    finally:
        set_context_limit(-1)
    assert isinstance(limit, ContextLimitError) and str(limit) == "Context limit reached"
    # a message of ours with no llama.rn text is its own str; one that merely starts like a text is not cut
    bad = _caught(lambda: ctx.completion({"prompt": "Hi", "top_p": 2}))
    assert str(bad) == bad.detail and "top_p" in str(bad)
    assert str(ModelLoadError("Failed to load modelling kit")) == "Failed to load modelling kit"
    # the wire format (code, full message) and pickling give the same str and detail back
    for err in (full, empty, grammar):
        again = error_from_code(err.code, err.message)
        assert isinstance(err, type(again)) and (again.code, str(again), again.detail) == (err.code, str(err), err.detail)
    for err in (full, empty):
        copy = pickle.loads(pickle.dumps(err))
        assert (str(copy), copy.detail) == (str(err), err.detail)


def test_a_bridge_client_gets_the_same_text_and_detail(tmp_path):
    server = Served(str(tmp_path))
    try:
        assert server.started, server.log()
        with init_llama({"backend": "bridge", "socket": server.socket}) as remote:
            err = _caught(lambda: remote.completion({"prompt": ""}))
            assert str(err) == "Prompt is required" and "'messages'" in err.detail
            err = _caught(lambda: remote.embedding("hi"))
            assert isinstance(err, EmbeddingDisabledError) and str(err) == "Embedding is not enabled"
            assert "'embedding': True" in err.detail
    finally:
        server.stop()


def test_the_cli_prints_the_detail(capsys, tmp_path):
    assert main(["complete", "x", "--model", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err
    assert "llamacompat: error [model_load_error]: Failed to load model" in err and "none.gguf" in err
