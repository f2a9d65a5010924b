"""The rest of llama.rn's surface: LoRA, rerank, clear_cache, the context limit, native logs, devices, BuildInfo."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

import llamacompat
from llamacompat import (
    ContextBusyError,
    ContextLimitError,
    EmbeddingDisabledError,
    InvalidParamsError,
    ModelLoadError,
    UnsupportedFeatureError,
    add_native_log_listener,
    get_backend_devices_info,
    init_llama,
    init_llama_async,
    set_context_limit,
    toggle_native_log,
)

from .bridge_helpers import Served
from .conftest import GREEDY, run_in_background
from .lora_helpers import write_lora

QUESTION = {"prompt": "The capital of France is", "n_predict": 10, **GREEDY}
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel tower is in Paris."]


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return write_lora(str(folder / "a.gguf"), seed=0), write_lora(str(folder / "b.gguf"), seed=1)


@pytest.fixture(scope="module")
def ranker():
    with init_llama({"n_ctx": 512, "n_threads": 2, "embedding": True, "pooling_type": "rank"}) as context:
        yield context


# -- LoRA -------------------------------------------------------------------------
def test_lora_changes_the_model_and_removing_it_restores_it(fresh_ctx, lora_files):
    a, b = lora_files
    base = fresh_ctx.completion(QUESTION)["text"]
    fresh_ctx.apply_lora_adapters([{"path": a}])
    assert fresh_ctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 1.0}]
    with_a = fresh_ctx.completion(QUESTION)
    assert with_a["text"] != base and with_a["timings"]["cache_n"] == 0  # the cache was computed without it
    fresh_ctx.apply_lora_adapters([{"path": "file://" + a, "scaled": 0.0}])  # scale 0: the base model's answer
    assert fresh_ctx.completion(QUESTION)["text"] == base
    fresh_ctx.apply_lora_adapters([{"path": a, "scaled": 1.0}, {"path": b, "scaled": 0.5}])
    assert [x["path"] for x in fresh_ctx.get_loaded_lora_adapters()] == [a, b]
    assert fresh_ctx.completion(QUESTION)["text"] not in (base, with_a["text"])
    fresh_ctx.remove_lora_adapters()
    assert fresh_ctx.get_loaded_lora_adapters() == [] and fresh_ctx.completion(QUESTION)["text"] == base


def test_a_refused_lora_keeps_the_adapters_that_were_applied(fresh_ctx, lora_files, model_path, tmp_path):
    a, _ = lora_files
    fresh_ctx.apply_lora_adapters([{"path": a}])
    with_a = fresh_ctx.completion(QUESTION)["text"]
    with pytest.raises(ModelLoadError, match="Failed to apply lora adapters: .*expect general.type"):
        fresh_ctx.apply_lora_adapters([{"path": model_path}])  # a model, not an adapter
    with pytest.raises(InvalidParamsError, match="no such LoRA adapter file"):
        fresh_ctx.apply_lora_adapters([{"path": str(tmp_path / "none.gguf")}])
    for bad, message in (("a.gguf", "must be a list"), ([{"scaled": 1}], "non-empty 'path'"),
                         ([{"path": a, "scaled": "x"}], "'scaled' must be a number"),
                         ([{"path": a, "scale": 1}], "unknown parameter 'scale'; did you mean 'scaled'")):
        with pytest.raises(InvalidParamsError, match=message):
            fresh_ctx.apply_lora_adapters(bad)
    assert fresh_ctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 1.0}]
    assert fresh_ctx.completion(QUESTION)["text"] == with_a


def test_init_merges_lora_lora_scaled_and_lora_list_as_llama_rn_does(lora_files):
    a, b = lora_files
    params = {"n_ctx": 512, "n_threads": 2, "lora": a, "lora_scaled": 0.5,
              "lora_list": [{"path": b}, {"path": "file://" + a, "scaled": 0.25}]}
    with init_llama(params) as context:
        assert context.get_loaded_lora_adapters() == [{"path": b, "scaled": 1.0}, {"path": a, "scaled": 0.25}]
    with pytest.raises(InvalidParamsError, match="init_llama: no such LoRA adapter file"):
        init_llama({"n_ctx": 512, "lora": a + ".missing"})


def test_lora_and_cache_calls_refuse_while_busy(fresh_ctx, lora_files):
    worker, box = run_in_background(fresh_ctx, {"prompt": "Tell a long story.", "n_predict": 400, "ignore_eos": True})
    with pytest.raises(ContextBusyError):
        fresh_ctx.apply_lora_adapters([{"path": lora_files[0]}])
    with pytest.raises(ContextBusyError):
        fresh_ctx.clear_cache()
    assert fresh_ctx.get_loaded_lora_adapters() == []  # a read: allowed while busy
    fresh_ctx.stop_completion()
    worker.join(60)
    assert box["result"]["interrupted"]


# -- rerank -------------------------------------------------------------------------
def test_rank_pooling_scores_match_llama_cpp_own_last_token_head(ranker):
    """SmolLM2 has no classifier head, so llama.cpp's rank pooling gives the last token's first hidden value:
    the same number an embedding context with last-token pooling gives for the reranker's input."""
    assert ranker.capabilities["features"]["rerank"] == "native"
    results = ranker.rerank("What is the capital of France?", DOCS, {"normalize": 1})
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert all(r["document"] == DOCS[r["index"]] for r in results)
    adapter = ranker._core.adapter
    query = adapter.tokenize("What is the capital of France?", False)
    with init_llama({"n_ctx": 512, "embedding": True, "pooling_type": "last", "embd_normalize": -1}) as last:
        for r in results:
            formatted = adapter._rerank_input(query, adapter.tokenize(r["document"], False))
            assert last._core.adapter.embedding(formatted)[0] == pytest.approx(r["score"], abs=1e-4)
    assert ranker.rerank("anything", []) == []
    with pytest.raises(UnsupportedFeatureError, match="pooling_type 'rank'"):
        ranker.embedding("a reranker gives scores, not vectors")


def test_an_embedding_model_ranks_by_cosine_similarity():
    with init_llama({"n_ctx": 512, "n_threads": 2, "embedding": True}) as context:
        assert context.capabilities["features"]["rerank"] == "emulated"
        results = context.rerank("What is the capital of France?", DOCS)
        vectors = [np.array(context.embedding(text)["embedding"]) for text in ["What is the capital of France?", *DOCS]]
        for r in results:
            assert r["score"] == pytest.approx(float(vectors[0] @ vectors[r["index"] + 1]), abs=1e-6)
        assert results[0]["index"] == 0  # the sentence about Paris being the capital


def test_rerank_needs_embedding_and_checks_its_input(ctx, ranker):
    with pytest.raises(EmbeddingDisabledError, match="Embedding is not enabled"):
        ctx.rerank("q", DOCS)
    with pytest.raises(InvalidParamsError, match="documents must be a list of strings"):
        ranker.rerank("q", "one document")
    with pytest.raises(InvalidParamsError, match="query must be a string"):
        ranker.rerank(None, DOCS)
    with pytest.raises(InvalidParamsError, match="unknown parameter 'top_n'"):
        ranker.rerank("q", DOCS, {"top_n": 1})
    assert len(ranker.rerank("q", DOCS)) == 3  # still usable


# -- cache, limits, logs, devices -------------------------------------------------
def test_clear_cache_makes_the_next_prompt_evaluate_from_scratch(fresh_ctx):
    first = fresh_ctx.completion(QUESTION)
    assert fresh_ctx.completion(QUESTION)["timings"]["cache_n"] > 0
    fresh_ctx.clear_cache()
    again = fresh_ctx.completion(QUESTION)
    assert again["timings"]["cache_n"] == 0 and again["text"] == first["text"]
    fresh_ctx.clear_cache(True)
    assert fresh_ctx.completion(QUESTION)["timings"]["cache_n"] == 0
    with pytest.raises(InvalidParamsError, match="clear_data must be a bool"):
        fresh_ctx.clear_cache("yes")


def test_context_limit_counts_live_contexts(ctx):
    live = len(llamacompat.context.live._live)
    set_context_limit(live)
    try:
        with pytest.raises(ContextLimitError, match="Context limit reached"):
            init_llama({"n_ctx": 512})
        set_context_limit(live + 1)
        extra = init_llama({"n_ctx": 512})
        with pytest.raises(ContextLimitError):
            asyncio.run(init_llama_async({"n_ctx": 512}))
        extra.release()
        init_llama({"n_ctx": 512}).release()  # the released one's place is free again
    finally:
        set_context_limit(-1)
    with pytest.raises(InvalidParamsError, match=">= -1"):
        set_context_limit(-2)


def test_native_log_reaches_listeners_only_while_switched_on():
    lines: list[tuple[str, str]] = []
    subscription = add_native_log_listener(lambda level, text: lines.append((level, text)))
    try:
        init_llama({"n_ctx": 512, "vocab_only": True}).release()
        assert lines == []  # off by default
        toggle_native_log(True)
        init_llama({"n_ctx": 512, "vocab_only": True}).release()
        assert any(level == "info" and "llama_model_loader" in text for level, text in lines)
        assert {level for level, _ in lines} <= {"debug", "info", "warn", "error"}
        subscription.remove()
        seen = len(lines)
        init_llama({"n_ctx": 512, "vocab_only": True}).release()
        assert len(lines) == seen
    finally:
        subscription.remove()
        toggle_native_log(False)
    with pytest.raises(InvalidParamsError):
        add_native_log_listener("not callable")
    with pytest.raises(InvalidParamsError):
        toggle_native_log(1)


def test_devices_build_info_and_context_attributes(ctx):
    devices = get_backend_devices_info()
    cpu = next(d for d in devices if d["backend"] == "llama_cpp" and d["type"] == "cpu")
    assert cpu["deviceName"] == "CPU" and cpu["maxMemorySize"] > 2**28
    assert any(d["backend"] == "mlx" for d in devices)
    info = llamacompat.BuildInfo
    assert info["number"] == llamacompat.__version__ and info["backends"]["llama_cpp"]
    assert ctx.gpu is False and ctx.reason_no_gpu == "GPU backend is not available" and ctx.devices == ["CPU"]
    model = ctx.model
    assert model["n_embd"] == 576 and model["n_params"] > 10**8 and model["size"] > 0
    assert model["desc"] and model["metadata"]["general.architecture"] == "llama"
    assert model["chat_templates"]["jinja"]["default"] is True and ctx.id >= 1


def test_async_twins(lora_files):
    async def main():
        async with await init_llama_async({"n_ctx": 512, "n_threads": 2, "embedding": True}) as actx:
            await actx.apply_lora_adapters([{"path": lora_files[0]}])
            assert await actx.get_loaded_lora_adapters() == [{"path": lora_files[0], "scaled": 1.0}]
            await actx.remove_lora_adapters()
            await actx.clear_cache()
            ranked = await actx.rerank("capital of France", DOCS)
            return ranked, actx.gpu

    ranked, gpu = asyncio.run(main())
    assert len(ranked) == 3 and gpu is False


# -- the other backends -------------------------------------------------------------
def test_mlx_clears_its_cache_and_ranks_by_similarity():
    with init_llama({"backend": "mlx", "n_ctx": 512, "embedding": True}) as context:
        context.completion(QUESTION)
        assert context.completion(QUESTION)["timings"]["cache_n"] > 0
        context.clear_cache()
        assert context.completion(QUESTION)["timings"]["cache_n"] == 0
        assert context.rerank("What is the capital of France?", DOCS)[0]["index"] == 0
        assert context.devices and context.gpu is False


def test_mlx_applies_the_same_gguf_lora_as_llama_cpp(lora_files, model_path):
    """The same adapter file on both backends: the first token's distribution moves the same way."""
    a, b = lora_files
    first = {"prompt": "The capital of France is", "n_predict": 1, "n_probs": 3, **GREEDY}

    def top(context) -> dict[str, float]:
        return {p["tok_str"]: p["prob"] for p in context.completion(first)["completion_probabilities"][0]["probs"]}

    with init_llama({"backend": "mlx", "n_ctx": 512}) as mlx, \
            init_llama({"n_ctx": 512, "n_threads": 2, "flash_attn_type": "off"}) as cpp:
        assert mlx.capabilities["features"]["lora"] == "emulated"
        base = top(mlx)
        for adapters in ([{"path": a}], [{"path": a, "scaled": 0.5}, {"path": b}]):
            mlx.apply_lora_adapters(adapters)
            cpp.apply_lora_adapters(adapters)
            ours, theirs = top(mlx), top(cpp)
            assert ours != base and next(iter(ours)) == next(iter(theirs))
            # measured: within 0.019 (0.005 without an adapter). llama.cpp rounds activations to 8 bits for its
            # Q4_1 products and MLX does not; this strong random adapter amplifies that difference.
            for token in set(ours) & set(theirs):
                assert ours[token] == pytest.approx(theirs[token], abs=0.03), (adapters, ours, theirs)
        with pytest.raises(ModelLoadError, match="expect general.type 'adapter'"):
            mlx.apply_lora_adapters([{"path": model_path}])
        assert len(mlx.get_loaded_lora_adapters()) == 2 and top(mlx) == ours  # the failed call changed nothing
        mlx.remove_lora_adapters()
        assert top(mlx) == base


def test_the_bridge_forwards_rerank_lora_and_clear_cache(tmp_path, lora_files):
    models = tmp_path / "models"
    models.mkdir()
    inside = str(models / "style.gguf")
    os.link(lora_files[0], inside)
    server = Served(str(tmp_path), "--embedding", "--models-dir", str(models))
    try:
        assert server.started, server.log()
        with init_llama({"backend": "bridge", "socket": server.socket}) as plain:  # as a local context says it
            with pytest.raises(EmbeddingDisabledError, match="rerank needs a context created with 'embedding': True"):
                plain.rerank("capital of France", DOCS)
        with init_llama({"backend": "bridge", "socket": server.socket, "embedding": True}) as remote:
            assert len(remote.rerank("capital of France", DOCS)) == 3
            base = remote.completion(QUESTION)["text"]
            remote.apply_lora_adapters([{"path": inside}])
            assert remote.get_loaded_lora_adapters() == [{"path": inside, "scaled": 1.0}]
            assert remote.completion(QUESTION)["text"] != base
            with pytest.raises(ModelLoadError, match="outside the server's --models-dir"):
                remote.apply_lora_adapters([{"path": lora_files[1]}])
            remote.remove_lora_adapters()
            remote.clear_cache()
            again = remote.completion(QUESTION)
            assert again["text"] == base and again["timings"]["cache_n"] == 0
            assert remote.gpu is False and remote.devices == ["CPU"]
    finally:
        server.stop()


def test_one_table_drives_the_contexts_the_cores_and_the_bridge():
    """context.core.CALLS names every call once; the Core protocol, each core, both contexts and the bridge's
    wire methods follow it, so a call cannot be added to one layer and forgotten in another."""
    import inspect

    from llamacompat import AsyncLlamaContext, LlamaContext
    from llamacompat.bridge.client import BridgeCore
    from llamacompat.bridge.protocol import METHODS
    from llamacompat.context.core import CALLS, Core
    from llamacompat.local import LocalCore
    from llamacompat.openai.core import OpenAICore

    protocol = {name for name, value in vars(Core).items() if inspect.isfunction(value) and not name.startswith("_")}
    protocol -= {"close", "open_slots"}  # not calls of a context: its lifetime, and its parallel mode's slots
    assert protocol == set(CALLS)
    for core in (LocalCore, OpenAICore, BridgeCore):
        assert list(inspect.signature(core.open_slots).parameters)[1:] == ["n_parallel", "n_batch"], core.__name__
    for name, call in CALLS.items():
        expected = [*call.args, *(["stop"] if call.stop else []), *(["strict"] if call.strict else [])]
        for core in (Core, LocalCore, OpenAICore):
            params = list(inspect.signature(getattr(core, name)).parameters)[1:]
            assert params[:len(expected)] == expected, (core.__name__, name, params)
        assert callable(getattr(BridgeCore, name)), name
        assert METHODS[name] == ("queue" if call.runs == "model" else "side"), name
        for context in (LlamaContext, AsyncLlamaContext):
            params = list(inspect.signature(getattr(context, name)).parameters)[1:]
            assert params == list(call.args) or name == "completion", (context.__name__, name, params)
