"""The mlx backend on the packaged SmolLM2 GGUF (MLX's CPU build): vocabulary parity with llama.cpp,
loading, sampling, grammars, prefill interruption, prefix reuse, sessions and embeddings."""

from __future__ import annotations

import json
import math
import threading
import time
import warnings

import jsonschema
import mlx.core as mx
import pytest

from llamacompat import (
    GenerationError,
    GrammarError,
    LlamaCompatWarning,
    ModelLoadError,
    OutOfMemoryError,
    SessionError,
    UnsupportedFeatureError,
    init_llama,
)

from .conftest import GREEDY

MESSAGES = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Which city is the capital of France?"}]

# ASCII, accents, CJK, emoji, digits, code, whitespace runs and special tokens
CORPUS = [
    "Hello world", "  leading spaces", "trailing   ", "café naïve Ærø façade", "Straße, Ωmega, αβγ, ß ø",
    "日本語のテキストと中文", "한국어 문장", "emoji 🎉👍🏽 🇫🇷 done", "12345 3.14159 1e10 -0.5 2026-11-22",
    "def f(x):\n\treturn x**2  # comment\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }", "\n\n\n  \t \n",
    "tab\tsep\r\nCRLF", "I'm you're we'll they'd IT'S", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "a<|endoftext|>b<reponame>c", "x" * 80, "  \u00a0 nbsp and\u2009thin space", "",
]


@pytest.fixture(scope="module")
def mctx():
    context = init_llama({"backend": "mlx", "n_ctx": 1024})
    yield context
    context.release()


@pytest.fixture(scope="module")
def lctx():
    context = init_llama({"backend": "llama_cpp", "vocab_only": True})
    yield context
    context.release()


# -- vocabulary -----------------------------------------------------------------
@pytest.mark.parametrize("text", CORPUS)
def test_tokenize_and_detokenize_match_llama_cpp(mctx, lctx, text):
    tokens = lctx.tokenize(text)["tokens"]
    assert mctx.tokenize(text)["tokens"] == tokens
    assert mctx.detokenize(tokens) == lctx.detokenize(tokens)


def test_every_token_piece_and_end_of_generation_flag_match_llama_cpp(mctx, lctx):
    ours, theirs = mctx._core.adapter, lctx._core.adapter
    assert ours.n_vocab == theirs.n_vocab
    assert [ours.token_to_piece(t) for t in range(ours.n_vocab)] == [theirs.token_to_piece(t) for t in range(theirs.n_vocab)]
    assert [t for t in range(ours.n_vocab) if ours.is_eog(t)] == [t for t in range(theirs.n_vocab) if theirs.is_eog(t)]
    assert (ours.add_bos, ours.bos_text, ours.eos_text) == (theirs.add_bos, theirs.bos_text, theirs.eos_text)


def test_model_description_and_chat_template(mctx, lctx):
    assert mctx.model["n_embd"] == 576 and mctx.model["metadata"]["general.architecture"] == "llama"
    assert mctx.model["chat_templates"]["jinja"]["default"] is True
    assert mctx.get_formatted_chat(MESSAGES)["prompt"] == lctx.get_formatted_chat(MESSAGES)["prompt"]


# -- loading --------------------------------------------------------------------
def _patched_copy(model_path, tmp_path, old: bytes, new: bytes) -> str:
    data = open(model_path, "rb").read()
    assert data.count(old) == 1 and len(old) == len(new)
    path = tmp_path / "patched.gguf"
    path.write_bytes(data.replace(old, new))
    return str(path)


def test_unsupported_architecture_and_tokenizer_name_what_they_are(model_path, tmp_path):
    arch = _patched_copy(model_path, tmp_path, b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llama",
                         b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00qwen3")
    with pytest.raises(ModelLoadError, match="architecture 'llama' only, this file is 'qwen3'"):
        init_llama({"backend": "mlx", "model": arch})
    tok = _patched_copy(model_path, tmp_path, b"tokenizer.ggml.model\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00gpt2",
                        b"tokenizer.ggml.model\x08\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00t5xx")
    with pytest.raises(ModelLoadError, match="this file's is 't5xx'"):
        init_llama({"backend": "mlx", "model": tok})


def test_a_token_type_array_shorter_than_the_vocabulary_is_a_model_load_error(model_path):
    from llamacompat.adapters.mlx.gguf import load_gguf
    from llamacompat.vocab import vocab_from_gguf

    _tensors, meta = load_gguf(model_path)
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"][:-1]
    with pytest.raises(ModelLoadError, match="has 49152 tokens but 49151 token types"):
        vocab_from_gguf(meta, model_path)


def test_bad_files_and_cancelled_loads(tmp_path, model_path):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(ModelLoadError, match="MLX cannot read this GGUF file"):
        init_llama({"backend": "mlx", "model": str(fake)})
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        init_llama({"backend": "mlx", "model": str(tmp_path / "missing.gguf")})
    seen: list[int] = []
    with pytest.raises(ModelLoadError, match="cancelled"):
        init_llama({"backend": "mlx", "model": model_path}, on_progress=lambda p: seen.append(p) or p < 30)
    assert seen[0] == 0 and seen[-1] >= 30
    seen.clear()
    init_llama({"backend": "mlx", "model": model_path}, on_progress=seen.append).release()
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 100 and len(seen) >= 4


def _export_folder(model_path, folder) -> None:
    """The GGUF as an mlx-lm model folder (config.json, safetensors, tokenizer files), as mlx_lm.convert would write it."""
    from mlx.utils import tree_flatten

    from llamacompat.adapters.mlx.gguf import load_gguf, model_from_gguf
    from llamacompat.vocab import vocab_from_gguf

    tensors, meta = load_gguf(model_path)
    model, vocab = model_from_gguf(tensors, meta, model_path), vocab_from_gguf(meta, model_path)
    weights = dict(tree_flatten(model.parameters()))
    config = {**{k: v for k, v in vars(model.args).items() if v is not None}, "architectures": ["LlamaForCausalLM"],
              "quantization": {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}},
              "eos_token_id": vocab.eos, "bos_token_id": vocab.bos}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    vocab.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": vocab.pieces[vocab.bos].decode(), "eos_token": vocab.pieces[vocab.eos].decode(),
        "add_bos_token": False, "chat_template": meta["tokenizer.chat_template"]}))


def test_mlx_lm_folder_gives_what_the_gguf_gives(mctx, model_path, tmp_path):
    _export_folder(model_path, tmp_path)
    with init_llama({"backend": "mlx", "model": str(tmp_path), "n_ctx": 1024}) as folder:
        assert folder.model["desc"] == "llama (mlx folder)"
        for text in CORPUS[:6]:
            assert folder.tokenize(text)["tokens"] == mctx.tokenize(text)["tokens"]
        params = {"messages": MESSAGES, **GREEDY, "n_predict": 8}
        assert folder.completion(params)["text"] == mctx.completion(params)["text"]
    with init_llama({"model": str(tmp_path)}) as auto:  # "auto" takes folders to mlx
        assert auto.backend == "mlx"


# -- sampling -------------------------------------------------------------------
def test_greedy_answer_and_reproducible_seeds(mctx):
    assert mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 8})["text"].startswith("Paris")
    params = {"prompt": "Once upon a time", "n_predict": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0}
    first = mctx.completion({**params, "seed": 7})["text"]
    assert mctx.completion({**params, "seed": 7})["text"] == first
    assert {mctx.completion({**params, "seed": s})["text"] for s in (1, 2, 3)} != {first}


def test_logit_bias_ignore_eos_and_penalties_change_the_draw(mctx):
    base = mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 3, "n_probs": 1})
    first = base["completion_probabilities"][0]["content"]
    token = mctx.tokenize(first)["tokens"][0]
    banned = mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 3, "logit_bias": [[token, False]]})
    assert not banned["text"].startswith(first)
    forced = mctx.completion({"prompt": "Hi", **GREEDY, "n_predict": 3, "logit_bias": [[token, 100.0]]})
    assert forced["text"] == first * 3
    long = mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 40, "ignore_eos": True})
    assert long["tokens_predicted"] == 40 and long["stopped_limit"] and not long["stopped_eos"]
    prompt = {"prompt": "red blue red blue red blue red", **GREEDY, "n_predict": 6}
    assert mctx.completion(prompt)["text"].count("blue") >= 3
    for penalty in ({"penalty_repeat": 3.0}, {"penalty_present": 5.0}, {"penalty_freq": 5.0}):  # the prompt is history
        assert "blue" not in mctx.completion({**prompt, **penalty})["text"], penalty


def test_filters_and_sigma_keep_only_the_best_tokens(mctx):
    params = {"prompt": "The capital of France is", "n_predict": 1, "temperature": 1.5}
    greedy = mctx.completion({**params, **GREEDY})["text"]
    assert {mctx.completion({**params, "top_k": 1, "seed": s})["text"] for s in range(4)} == {greedy}
    assert {mctx.completion({**params, "top_n_sigma": 0.001, "top_k": 0, "seed": s})["text"] for s in range(4)} == {greedy}
    for narrow in ({"top_p": 0.01}, {"min_p": 0.99}):  # only the best token is left to draw
        assert {mctx.completion({**params, **narrow, "top_k": 0, "seed": s})["text"] for s in range(4)} == {greedy}, narrow


@pytest.mark.parametrize("feature, param", [("typical_p", {"typical_p": 0.5}), ("mirostat", {"mirostat": 2}),
                                            ("dry", {"dry_multiplier": 0.8})])
def test_missing_samplers_warn_or_raise_when_strict(mctx, model_path, feature, param):
    assert mctx.capabilities["features"][feature] == "missing"
    with pytest.warns(LlamaCompatWarning, match="does not support"):
        result = mctx.completion({"prompt": "Hi", "n_predict": 2, **param})
    assert result["tokens_predicted"] == 2
    with init_llama({"backend": "mlx", "model": model_path, "strict": True}) as strict:
        with pytest.raises(UnsupportedFeatureError, match="mlx backend does not support"):
            strict.completion({"prompt": "Hi", "n_predict": 2, **param})


def test_probabilities_are_the_raw_distribution(mctx):
    result = mctx.completion({"prompt": "The capital of France is", **GREEDY, "n_predict": 3, "n_probs": 5,
                              "penalty_repeat": 1.3})
    for step in result["completion_probabilities"]:
        probs = [p["prob"] for p in step["probs"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert result["completion_probabilities"][0]["probs"][0]["tok_str"] == result["completion_probabilities"][0]["content"]


# -- grammars -------------------------------------------------------------------
def test_gbnf_and_json_schema_constrain_the_output(mctx):
    yes_no = mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 8, "grammar": 'root ::= "yes" | "no"'})
    assert yes_no["text"] in ("yes", "no") and yes_no["stopped_eos"]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    result = mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 40, "json_schema": schema})
    jsonschema.validate(json.loads(result["text"]), schema)


def test_bad_grammar_is_refused_and_the_context_kept(mctx):
    with pytest.raises(GrammarError):
        mctx.completion({"prompt": "Hi", "n_predict": 2, "grammar": 'root ::= "a'})
    with pytest.raises(GrammarError):
        mctx.completion({"prompt": "Hi", "n_predict": 2, "grammar": "root ::= undefined-rule"})
    assert mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 4})["text"].startswith("Paris")


def test_every_corpus_schema_compiles_for_llguidance(mctx):
    from llamacompat.adapters.mlx.grammar import token_table
    from llamacompat.grammars import convert_json_schema_to_grammar
    from llamacompat.grammars.guidance import Guide

    from .schema_corpus import CORPUS as SCHEMAS

    adapter = mctx._core.adapter
    table = token_table(adapter._vocab, adapter._eog)
    failures = []
    cases = [case for case in SCHEMAS if case.expect != "error"]
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LlamaCompatWarning)  # the corpus's "warn" cases
            gbnf = convert_json_schema_to_grammar(case.schema, prop_order=list(case.prop_order) or None)
        try:
            Guide(table, gbnf, adapter.n_vocab)
        except GrammarError as err:
            failures.append((case.name, str(err)[:300]))
    assert len(cases) > 150 and not failures, failures


# -- prefill interruption, prefix reuse ------------------------------------------
def test_stop_during_a_long_prefill_keeps_what_was_evaluated(model_path):
    with init_llama({"backend": "mlx", "model": model_path, "n_ctx": 1024, "n_batch": 16}) as ctx:
        prompt = "The quick brown fox jumps over the lazy dog. " * 40
        n_prompt = len(ctx.tokenize(prompt)["tokens"])
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(result=ctx.completion({"prompt": prompt, "n_predict": 4})))
        thread.start()
        time.sleep(1.5)  # some chunks in: the prefill runs at about 10 tokens/s on two cores
        ctx.stop_completion()
        thread.join(60)
        result = box["result"]
        assert result["interrupted"] and result["tokens_predicted"] == 0
        assert 0 < result["tokens_cached"] < n_prompt - 1 and result["tokens_cached"] % 16 == 0
        again = ctx.completion({"prompt": prompt, **GREEDY, "n_predict": 1})
        assert again["timings"]["cache_n"] == result["tokens_cached"]


def test_an_extended_prompt_evaluates_only_the_new_tokens(mctx):
    first = mctx.completion({"prompt": "Paris is a city in", **GREEDY, "n_predict": 4})
    extended = "Paris is a city in" + first["text"] + " It is"
    second = mctx.completion({"prompt": extended, **GREEDY, "n_predict": 2})
    n_extended = len(mctx.tokenize(extended)["tokens"])
    assert second["timings"]["cache_n"] >= first["tokens_evaluated"]
    assert second["timings"]["prompt_n"] == n_extended - second["timings"]["cache_n"]


def test_tokens_cached_leaves_out_the_last_sampled_token_as_llama_cpp_does(mctx, model_path, tmp_path):
    """llama.rn's rule, evaluated + predicted - 1: the last token is sampled, not evaluated (mlx pipelines it into
    the cache and takes it out again), and the next completion reuses exactly what tokens_cached says."""
    request = {"prompt": "The sky is", "n_predict": 5, "ignore_eos": True, **GREEDY}
    mctx.clear_cache()
    got = mctx.completion(request)
    with init_llama({"backend": "llama_cpp", "model": model_path, "n_ctx": 1024}) as lc_ctx:
        want = lc_ctx.completion(request)
    assert got["tokens_cached"] == want["tokens_cached"] == 7 == got["tokens_evaluated"] + got["tokens_predicted"] - 1
    path = tmp_path / "sky.session"
    assert mctx.save_session(str(path)) == 7
    follow = {"prompt": "The sky is" + got["text"] + " And", "n_predict": 4, **GREEDY}
    again = mctx.completion(follow)
    assert again["timings"]["cache_n"] == 7  # the whole cache is the new prompt's prefix: nothing stale in it
    with init_llama({"backend": "mlx", "model": model_path, "n_ctx": 1024}) as fresh:
        assert again["text"] == fresh.completion(follow)["text"]
        fresh.load_session(str(path))
        assert fresh.completion(follow)["timings"]["cache_n"] == 7


# -- runtime failures -----------------------------------------------------------
def test_an_mlx_failure_is_a_typed_error_and_the_context_keeps_working(mctx, monkeypatch):
    request = {"prompt": "Once upon a time, a dragon", "n_predict": 8, "ignore_eos": True, **GREEDY}
    expected = mctx.completion(request)["text"]
    calls = {"n": 0}
    real_async_eval, real_eval = mx.async_eval, mx.eval

    def failing_step(*arrays):  # the fourth generation step fails, as a Metal allocation can
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")
        return real_async_eval(*arrays)

    monkeypatch.setattr(mx, "async_eval", failing_step)
    events: list = []
    with pytest.raises(GenerationError, match=r"the mlx backend failed while generating: \[metal::malloc\] Resource") as err:
        mctx.completion(request, events.append)
    assert isinstance(err.value.__cause__, RuntimeError) and len(events) == 3
    monkeypatch.setattr(mx, "async_eval", real_async_eval)

    def no_memory(*arrays):
        raise MemoryError()

    monkeypatch.setattr(mx, "eval", no_memory)
    with pytest.raises(OutOfMemoryError, match="the mlx backend failed while evaluating the prompt: MemoryError"):
        mctx.completion({**request, "prompt": "A different prompt to evaluate"})
    monkeypatch.setattr(mx, "eval", real_eval)
    after = mctx.completion(request)
    assert after["text"] == expected and after["tokens_predicted"] == 8


# -- sessions -------------------------------------------------------------------
def test_session_round_trip_continues_identically(mctx, model_path, tmp_path):
    path = tmp_path / "chat.session"
    mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 4})
    saved = mctx.save_session(str(path))
    assert saved == len(mctx._core.adapter._tokens) > 20
    follow = {"prompt": mctx.detokenize(mctx._core.adapter._tokens) + " More:", **GREEDY, "n_predict": 6}
    expected = mctx.completion(follow)
    with init_llama({"backend": "mlx", "model": model_path, "n_ctx": 1024}) as other:
        loaded = other.load_session(str(path))
        assert loaded["tokens_loaded"] == saved
        got = other.completion(follow)
        assert got["text"] == expected["text"] and got["timings"]["cache_n"] == saved
    assert mctx.save_session(str(path), 5) == 5
    assert mctx.load_session(str(path))["tokens_loaded"] == 5


def test_foreign_or_damaged_sessions_are_refused_and_the_context_kept(mctx, model_path, tmp_path):
    prompt = {"messages": MESSAGES, **GREEDY, "n_predict": 4}
    mctx.completion(prompt)
    path = tmp_path / "good.session"
    mctx.save_session(str(path))
    tokens = list(mctx._core.adapter._tokens)
    damaged = tmp_path / "damaged.session"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with init_llama({"backend": "llama_cpp", "model": model_path, "n_ctx": 1024}) as lc_ctx:
        lc_ctx.completion(prompt)
        foreign = tmp_path / "llama_cpp.session"
        lc_ctx.save_session(str(foreign))
    garbage = tmp_path / "garbage.session"
    garbage.write_bytes(b"\x00" * 100)
    for bad in (damaged, foreign, garbage):
        with pytest.raises(SessionError, match="Failed to load session"):
            mctx.load_session(str(bad))
        assert mctx._core.adapter._tokens == tokens
    assert mctx.completion(prompt)["timings"]["cache_n"] == len(mctx.tokenize(mctx.get_formatted_chat(MESSAGES)["prompt"])["tokens"]) - 1


def test_a_session_from_another_model_is_refused(mctx, model_path, tmp_path):
    mctx.completion({"messages": MESSAGES, **GREEDY, "n_predict": 2})
    path = tmp_path / "other.session"
    mctx.save_session(str(path))
    renamed = _patched_copy(model_path, tmp_path, b"Smollm2 135M 8k Lc100K Mix1 Ep2", b"Another model, same arch.......")
    with init_llama({"backend": "mlx", "model": renamed, "n_ctx": 1024}) as other:
        with pytest.raises(SessionError, match="model"):
            other.load_session(str(path))
        path.with_name(path.name + ".llamacompat.json").unlink()  # without the sidecar, the file's own header refuses it
        with pytest.raises(SessionError, match="saved with another model"):
            other.load_session(str(path))
        assert other._core.adapter.n_past == 0


# -- embeddings -----------------------------------------------------------------
def test_embeddings_match_llama_cpp_mean_pooling(model_path):
    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    with init_llama({"backend": "mlx", "model": model_path, "embedding": True}) as m, \
            init_llama({"backend": "llama_cpp", "model": model_path, "embedding": True}) as lc:
        for text in texts:
            a, b = m.embedding(text)["embedding"], lc.embedding(text)["embedding"]
            assert len(a) == len(b) == 576
            cosine = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            assert cosine > 0.99, cosine
    with init_llama({"backend": "mlx", "model": model_path, "embedding": True, "pooling_type": "last"}) as last:
        assert last.embedding(texts[0])["embedding"] != a

