"""The rkllm backend on the simulator library, for every runtime ABI (1.1, 1.2.0, 1.2.1-1.2.3, 1.3.0).

No NPU here: tests/rkllm_sim/ implements the same C ABI (see its README). What
this verifies is our side: struct marshalling, callbacks, threads, abort, error
mapping, sessions; not the behaviour of Rockchip's binary.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from llamacompat import init_llama
from llamacompat.adapters.rkllm.library import candidate_paths
from llamacompat.conformance import CHECKS, Kit, NotApplicable
from llamacompat.errors import (
    BackendUnavailableError,
    GenerationError,
    InvalidParamsError,
    LlamaCompatWarning,
    ModelLoadError,
    UnsupportedFeatureError,
)

from .conftest import GREEDY, run_in_background
from .rkllm_helpers import ABI_BUILDS, build_model_folder, build_sim, sim_record

ABIS = list(ABI_BUILDS)
LONG = "Here is a long story about a dragon who learns to bake bread.\n\nOnce upon a time,"


@pytest.fixture(scope="session")
def build(tmp_path_factory, model_path):
    root = tmp_path_factory.mktemp("rkllm")
    libs = {abi: build_sim(root / "libs", abi) for abi in ABIS}
    return {"root": root, "libs": libs, "model": build_model_folder(root / "model", model_path)}


def params_for(build, abi: str, **extra) -> dict:
    """Init params for ``abi``. Before 1.3 sampling is fixed at init: greedy there, as the checks expect."""
    fixed = {} if abi == "1.3.0" else {"rkllm_sampling": {"temperature": 0}}
    return {"backend": "rkllm", "model": build["model"], "rkllm_lib": build["libs"][abi], "n_ctx": 1024, **fixed,
            **extra}


def record(ctx) -> dict:
    adapter = ctx._core.adapter
    return sim_record(adapter._rt.path, adapter._handle.value)


@pytest.fixture(scope="module", params=ABIS)
def abi(request):
    return request.param


@pytest.fixture(scope="module")
def rk(build, abi):
    context = init_llama(params_for(build, abi))
    yield context
    context.release()


# -- the conformance suite, per ABI ------------------------------------------------
@pytest.fixture(scope="module")
def rkllm_kit(build, abi):
    kit = Kit("rkllm", {k: v for k, v in params_for(build, abi).items() if k != "backend"})
    yield kit
    kit.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance(name, rkllm_kit):
    try:
        CHECKS[name].run(rkllm_kit)
    except NotApplicable:
        assert name in ("grammar", "json_schema"), f"{name} is not applicable on the rkllm backend"


# -- library lookup and ABI choice -----------------------------------------------------
def test_lookup_order_and_the_error_lists_where_it_looked(build, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RKLLM_LIB_PATH", raising=False)
    arch = {"x86_64": "x86_64", "aarch64": "aarch64"}.get(os.uname().machine, os.uname().machine)
    assert candidate_paths("/opt/x.so") == ["/opt/x.so", f"libs/rkllm/{arch}/librkllmrt.so", "/usr/lib/librkllmrt.so",
                                            "/usr/local/lib/librkllmrt.so"]
    with pytest.raises(BackendUnavailableError) as err:
        init_llama({**params_for(build, "1.2.1"), "rkllm_lib": str(tmp_path / "nowhere.so")})
    message = str(err.value)
    for place in (str(tmp_path / "nowhere.so"), f"libs/rkllm/{arch}/librkllmrt.so", "/usr/lib/librkllmrt.so",
                  "/usr/local/lib/librkllmrt.so", "loader's search path", "RKLLM_LIB_PATH"):
        assert place in message
    # $RKLLM_LIB_PATH (a folder or a file) comes next, then ./libs/rkllm/<arch>/
    monkeypatch.setenv("RKLLM_LIB_PATH", os.path.dirname(build["libs"]["1.2.1"]))
    with init_llama({**params_for(build, "1.2.1"), "rkllm_lib": None}) as ctx:
        assert ctx._core.adapter._rt.path == build["libs"]["1.2.1"]
    monkeypatch.delenv("RKLLM_LIB_PATH")
    local = tmp_path / "libs" / "rkllm" / arch
    local.mkdir(parents=True)
    os.symlink(build["libs"]["1.3.0"], local / "librkllmrt.so")
    with init_llama({**params_for(build, "1.3.0"), "rkllm_lib": None}) as ctx:
        assert ctx._core.adapter._abi.name == "1.3.0"
    # backend "auto" picks rkllm for a .rkllm file
    with init_llama({k: v for k, v in params_for(build, "1.3.0").items() if k != "backend"} | {"rkllm_lib": None}) as ctx:
        assert ctx.backend == "rkllm"


def test_the_version_string_in_the_library_decides_the_abi(build):
    with init_llama({**params_for(build, "1.2.1"), "rkllm_version": None}) as ctx:
        adapter = ctx._core.adapter
        assert (adapter._abi.name, adapter._rt.release) == ("1.2.1", "1.2.3")
        assert ctx.model["metadata"]["rkllm.abi"] == "1.2.1-1.2.3"


@pytest.mark.parametrize("abi,version,match", [
    ("1.2.1", "1.3.0", "does not match"),  # a 1.3 binding over a 1.2.3 runtime: crashes in rkllm_run (#509)
    ("1.3.0", "1.2.2", "does not match"),
    ("1.1", "1.2.0", "does not match"),
])
def test_a_wrong_rkllm_version_is_refused_before_any_call(build, abi, version, match):
    with pytest.raises(BackendUnavailableError, match=match) as err:
        init_llama({**params_for(build, abi), "rkllm_version": version})
    assert version in str(err.value)


def test_without_a_version_string_the_symbols_decide_or_the_user_must(build):
    bare = {abi: build_sim(build["root"] / "bare", abi, banner=False) for abi in ABIS}
    for abi in ("1.1", "1.2.0"):  # told apart by their exports
        with init_llama({**params_for(build, abi), "rkllm_lib": bare[abi]}) as ctx:
            assert ctx._core.adapter._abi.name == abi and ctx._core.adapter._rt.release is None
    for abi in ("1.2.1", "1.3.0"):  # same exports: never guessed
        with pytest.raises(BackendUnavailableError, match="Pass 'rkllm_version'"):
            init_llama({**params_for(build, abi), "rkllm_lib": bare[abi]})
    with init_llama({**params_for(build, "1.3.0"), "rkllm_lib": bare["1.3.0"], "rkllm_version": "1.3.0"}) as ctx:
        assert ctx.completion({"prompt": "Hi", "n_predict": 3, **GREEDY})["tokens_predicted"] == 3
    with pytest.raises(BackendUnavailableError, match="exports the functions of an rkllm 1.2.1\\+ runtime"):
        init_llama({**params_for(build, "1.2.1"), "rkllm_lib": bare["1.2.1"], "rkllm_version": "1.1.4"})
    with pytest.raises(InvalidParamsError, match="rkllm_version"):
        init_llama({**params_for(build, "1.2.1"), "rkllm_version": "2.0"})


# -- init ---------------------------------------------------------------------------------
def test_init_failures_are_model_load_errors_that_say_why(build, abi, monkeypatch, tmp_path):
    monkeypatch.setenv("RKLLM_SIM_FAIL_INIT", "1")
    with pytest.raises(ModelLoadError, match="rkllm_init returned -1"):
        init_llama(params_for(build, abi))
    monkeypatch.delenv("RKLLM_SIM_FAIL_INIT")
    with pytest.raises(ModelLoadError, match="max_context"):
        init_llama(params_for(build, abi, n_ctx=8192))  # the simulated model was "converted" for 4096
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "other.rkllm").write_text("not a model")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        init_llama(params_for(build, abi, model=str(folder / "other.rkllm")))
    with pytest.raises(ModelLoadError, match="rkllm_init returned"):  # the runtime refuses the file
        init_llama(params_for(build, abi, model=str(folder / "other.rkllm"),
                              rkllm_tokenizer=os.path.dirname(build["model"])))
    with pytest.raises(ModelLoadError, match="no such file"):
        init_llama(params_for(build, abi, model=str(folder / "missing.rkllm")))


def test_init_params_reach_the_runtime(build, abi, tmp_path):
    lora = tmp_path / "style.rkllm_lora"
    lora.write_bytes(b"lora")
    params = params_for(build, abi, rkllm_platform="rk3588", rkllm_base_domain_id=1,
                        lora_list=[{"path": str(lora), "scaled": 0.5}],
                        rkllm_sampling={"temperature": 0, "top_p": 0.7, "penalty_repeat": 1.3, "mirostat": 2})
    with init_llama(params) as ctx:
        prompt = "The three primary colours are"
        ctx.completion({"prompt": prompt, "n_predict": 2, **GREEDY})
        seen = record(ctx)
        init, run = seen["init"], seen["last_run"]
        assert init["max_context_len"] == 1024 and init["base_domain_id"] == 1
        assert (init["top_k"], init["temperature"]) == (1, 1)  # greedy is top_k 1
        assert init["top_p"] == pytest.approx(0.7) and init["repeat_penalty"] == pytest.approx(1.3)
        assert init["mirostat"] == 2
        assert run["input_type"] == 1 and run["tokens"] == ctx.tokenize(prompt)["tokens"]  # RKLLM_INPUT_TOKEN
        assert seen["lora"] == ["style"] and run["lora"] == "style"
        if abi != "1.1":
            assert (init["enabled_cpus_num"], init["enabled_cpus_mask"]) == (4, 0xF0)  # RK3588's big cores
            assert run["keep_history"] == 0 and seen["kv_clears"] >= 1  # a whole prompt each run
        if abi in ("1.2.1", "1.3.0"):
            assert run["role"] == "user"
    other = tmp_path / "other.rkllm_lora"
    other.write_bytes(b"lora")
    with pytest.raises(InvalidParamsError, match="one LoRA"):
        init_llama(params_for(build, abi, lora_list=[{"path": str(lora)}, {"path": str(other)}]))
    with init_llama(params_for(build, abi)) as ctx:  # applied later, replaced, removed
        ctx.apply_lora_adapters([{"path": str(other), "scaled": 0.5}])
        ctx.completion({"prompt": "Hi", "n_predict": 1, **GREEDY})
        assert record(ctx)["last_run"]["lora"] == "other"
        ctx.apply_lora_adapters([{"path": str(lora)}])
        ctx.completion({"prompt": "Hi", "n_predict": 1, **GREEDY})
        assert record(ctx)["last_run"]["lora"] == "style-1" and record(ctx)["lora"] == ["other", "style-1"]
        assert ctx.get_loaded_lora_adapters() == [{"path": str(lora), "scaled": 1.0}]
        ctx.remove_lora_adapters()
        ctx.completion({"prompt": "Hi", "n_predict": 1, **GREEDY})
        assert record(ctx)["last_run"]["lora"] is None
    with pytest.raises(InvalidParamsError, match="rkllm_sampling: 'top_k'"):
        init_llama(params_for(build, abi, rkllm_sampling={"top_k": -1}))
    if abi != "1.1":
        with init_llama(params_for(build, abi, n_threads=2, rkllm_platform="rk3562")) as ctx:
            assert (record(ctx)["init"]["enabled_cpus_num"], record(ctx)["init"]["enabled_cpus_mask"]) == (2, 0b11)


def test_sampling_is_per_run_on_1_3(build):
    with init_llama(params_for(build, "1.3.0")) as ctx:
        ctx.completion({"prompt": "Hi", "n_predict": 5, "temperature": 0.7, "top_k": 5, "top_p": 0.5,
                        "penalty_repeat": 1.2, "penalty_freq": 0.1, "penalty_present": 0.2})
        run = record(ctx)["last_run"]
        assert run["max_new_tokens"] == 5
        assert run["sampling"] == pytest.approx({"top_k": 5, "top_p": 0.5, "temperature": 0.7, "repeat_penalty": 1.2,
                                                 "frequency_penalty": 0.1, "presence_penalty": 0.2, "mirostat": 0,
                                                 "mirostat_tau": 5, "mirostat_eta": 0.1})
        ctx.completion({"prompt": "Hi", "n_predict": 1, "temperature": 0.7, "top_k": 0})
        assert record(ctx)["last_run"]["sampling"]["top_k"] == ctx._core.n_vocab  # llama.rn's 0 = off


@pytest.mark.parametrize("abi_name", ["1.1", "1.2.1"])
def test_before_1_3_sampling_is_fixed_at_init_and_other_values_warn(build, abi_name):
    with init_llama(params_for(build, abi_name)) as ctx:  # greedy at init
        ctx.completion({"prompt": "Hi", "n_predict": 2, "temperature": 0})  # the same value: silent
        with pytest.warns(LlamaCompatWarning, match="'temperature' is fixed when a rkllm context"):
            result = ctx.completion({"prompt": "Hi", "n_predict": 2, "temperature": 0.5})
        assert result["tokens_predicted"] == 2
        with pytest.warns(LlamaCompatWarning, match="'seed' needs 'seed'"):
            ctx.completion({"prompt": "Hi", "n_predict": 2, "seed": 3})
    with init_llama(params_for(build, abi_name, strict=True)) as ctx:
        with pytest.raises(UnsupportedFeatureError, match="top_k"):
            ctx.completion({"prompt": "Hi", "n_predict": 2, "top_k": 3})


# -- generation -------------------------------------------------------------------------------
def test_an_error_mid_run_raises_and_leaves_the_context_usable(rk, monkeypatch):
    expected = rk.completion({"prompt": LONG, "n_predict": 6, **GREEDY})["text"]
    monkeypatch.setenv("RKLLM_SIM_ERROR_AFTER", "3")
    streamed: list[str] = []
    with pytest.raises(GenerationError, match="ERROR"):
        rk.completion({"prompt": LONG, "n_predict": 6, **GREEDY}, lambda e: streamed.append(e["token"]))
    assert 1 <= len(streamed) <= 3
    monkeypatch.delenv("RKLLM_SIM_ERROR_AFTER")
    assert rk.completion({"prompt": LONG, "n_predict": 6, **GREEDY})["text"] == expected


def test_the_model_ending_its_answer_is_stopped_eos(rk, abi, monkeypatch):
    monkeypatch.setenv("RKLLM_SIM_EOS_AFTER", "4")
    result = rk.completion({"prompt": LONG, "n_predict": 20, **GREEDY})
    assert result["stopped_eos"] and not result["stopped_limit"]
    assert result["tokens_predicted"] == 5  # four tokens and the end, as llama.cpp counts its EOS
    timings = result["timings"]
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0


def test_tokens_cached_leaves_out_the_last_token_as_llama_rn_does(rk, abi, monkeypatch, tmp_path):
    """evaluated + predicted - 1 whether the loop stopped the runtime (n_predict) or the model ended its answer
    (then the end counts as predicted, as an EOS does, and every token before it was evaluated)."""
    limited = rk.completion({"prompt": LONG, "n_predict": 5, **GREEDY})
    assert limited["stopped_limit"]
    assert limited["tokens_cached"] == limited["tokens_evaluated"] + 5 - 1
    assert rk.save_session(str(tmp_path / "limited.session")) == limited["tokens_cached"]
    monkeypatch.setenv("RKLLM_SIM_EOS_AFTER", "4")
    ended = rk.completion({"prompt": LONG, "n_predict": 20, **GREEDY})
    assert ended["stopped_eos"] and ended["tokens_predicted"] == 5
    assert ended["tokens_cached"] == ended["tokens_evaluated"] + 5 - 1


def test_a_run_the_binding_refuses_is_a_generation_error_not_a_hang(rk, monkeypatch):
    """rkllm_run raising on its helper thread (a ctypes ArgumentError, say) sends no callback: the waiting
    side must hear of it rather than wait for tokens that never come."""
    import ctypes

    adapter = rk._core.adapter
    expected = rk.completion({"prompt": LONG, "n_predict": 4, **GREEDY})["text"]

    def refused(*args):
        raise ctypes.ArgumentError("argument 2: TypeError: expected LP_RKLLMInput instance")

    monkeypatch.setattr(adapter._rt, "rkllm_run", refused, raising=False)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=_completion_or_error(rk, LONG)), daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():
        rk.stop_completion()  # frees the shared context for the tests after this one
    assert not worker.is_alive(), "the completion waited for a run that never started"
    box = box["result"]
    error = box.get("error")
    assert isinstance(error, GenerationError) and "rkllm_run raised ArgumentError: argument 2" in str(error), box
    monkeypatch.undo()
    assert rk.completion({"prompt": LONG, "n_predict": 4, **GREEDY})["text"] == expected


def _completion_or_error(ctx, prompt: str) -> dict:
    try:
        return {"result": ctx.completion({"prompt": prompt, "n_predict": 4, **GREEDY})}
    except Exception as err:  # noqa: BLE001 - the test looks at it
        return {"error": err}


def test_stop_completion_aborts_within_a_token_or_two(build, abi, monkeypatch):
    monkeypatch.setenv("RKLLM_SIM_TOKEN_US", "20000")  # 50 tokens/s: 1024 tokens would take 20 s
    with init_llama(params_for(build, abi)) as ctx:
        worker, box = run_in_background(ctx, {"prompt": LONG, "n_predict": -1})
        asked = time.perf_counter()
        ctx.stop_completion()
        worker.join(30)
        latency = box["done"] - asked
        assert box["result"]["interrupted"] and box["result"]["tokens_predicted"] < 50
        assert latency < 1.0, f"stop took {latency:.3f} s at 20 ms per token"
        assert not record(ctx)["n_kv"] > 1024


def test_stop_during_prompt_evaluation(build, abi, monkeypatch):
    monkeypatch.setenv("RKLLM_SIM_TOKEN_US", "200000")  # 50 ms per prompt token: seconds of prefill
    with init_llama(params_for(build, abi)) as ctx:
        timer = threading.Timer(0.2, ctx.stop_completion)
        timer.start()
        started = time.perf_counter()
        result = ctx.completion({"prompt": LONG, "n_predict": 5})
        assert result["interrupted"] and result["tokens_predicted"] == 0
        assert time.perf_counter() - started < 2.0


def test_two_contexts_generate_at_once_without_crossing_streams(build):
    solo = {}
    contexts = {abi: init_llama(params_for(build, abi)) for abi in ("1.2.1", "1.3.0")}
    contexts["1.2.1 again"] = init_llama(params_for(build, "1.2.1"))
    prompts = {"1.2.1": LONG, "1.3.0": "A list of fruit: apple,", "1.2.1 again": "Numbers: one, two,"}
    try:
        for name, ctx in contexts.items():
            solo[name] = ctx.completion({"prompt": prompts[name], "n_predict": 40, **GREEDY})["text"]
        together: dict[str, str] = {}
        threads = [threading.Thread(target=lambda n=name, c=ctx: together.__setitem__(
            n, c.completion({"prompt": prompts[n], "n_predict": 40, **GREEDY})["text"])) for name, ctx in contexts.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert together == solo
        assert len(set(solo.values())) == 3
    finally:
        for ctx in contexts.values():
            ctx.release()


def test_callbacks_arrive_on_a_thread_python_did_not_start(build, abi, monkeypatch):
    from llamacompat.adapters.rkllm import adapter as module

    seen: list[threading.Thread] = []
    real = module._on_result

    def spying(abi):
        inner = real(abi)

        def on_result(*args):
            seen.append(threading.current_thread())
            return inner(*args)
        return on_result

    monkeypatch.setattr(module, "_on_result", spying)
    monkeypatch.setattr(module, "_CALLBACKS", {})  # the callback is bound at rkllm_init: a new context
    with init_llama(params_for(build, abi)) as ctx:
        result = ctx.completion({"prompt": LONG, "n_predict": 4, **GREEDY})
    assert result["tokens_predicted"] == 4 and seen
    # the simulator calls back from its own pthread: Python sees a foreign ("dummy") thread, not ours
    assert all(isinstance(t, threading._DummyThread) for t in seen)
    assert threading.main_thread() not in seen


@pytest.mark.parametrize("raw", ["0", "1"])
def test_utf8_split_across_callbacks_is_joined_and_invalid_bytes_replaced(rk, monkeypatch, raw):
    """raw 0: the runtime holds an open character back (WAITING, no text); raw 1: it passes each token's bytes."""
    pieces = rk._core.adapter._vocab.pieces
    byte = {b: pieces.index(bytes([b])) for b in (0xC3, 0xA9, 0xF0, 0x9F, 0x8E, 0x89)}
    word = pieces.index(b" the")
    script = [byte[0xC3], byte[0xA9], word, byte[0xF0], byte[0x9F], byte[0x8E], byte[0x89], byte[0xC3], word]
    monkeypatch.setenv("RKLLM_SIM_SCRIPT", ",".join(map(str, script)))
    monkeypatch.setenv("RKLLM_SIM_RAW_PIECES", raw)
    events: list[str] = []
    result = rk.completion({"prompt": LONG, "n_predict": len(script), **GREEDY}, lambda e: events.append(e["token"]))
    assert result["text"] == "é the🎉\ufffd the"
    assert result["tokens_predicted"] == len(script)
    assert "".join(events) == result["text"] and all(events)


def test_stop_strings_abort_the_runtime(rk):
    full = rk.completion({"prompt": LONG, "n_predict": 30, **GREEDY})
    word = full["text"].split()[5]
    result = rk.completion({"prompt": LONG, "n_predict": 30, "stop": [word], **GREEDY})
    assert result["stopped_word"] and result["text"] == full["text"][: full["text"].index(word)]
    assert record(rk)["n_kv"] < len(rk.tokenize(LONG)["tokens"]) + 30  # the runtime stopped early


def test_chat_goes_in_as_tokens_rendered_by_our_template(rk):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rk.completion({"messages": messages, "n_predict": 2, **GREEDY})
    formatted = rk.get_formatted_chat(messages)
    assert record(rk)["last_run"]["tokens"] == rk.tokenize(formatted["prompt"])["tokens"]
    assert record(rk)["chat_template"] is None  # the runtime's own template is never used for token input


def test_embedding_pools_the_last_hidden_layer(build, abi):
    with init_llama(params_for(build, abi, embedding=True, pooling_type="last")) as ctx:
        one = ctx.embedding("The cat sat.")["embedding"]
        assert record(ctx)["last_run"]["mode"] == 1  # RKLLM_INFER_GET_LAST_HIDDEN_LAYER
        assert len(one) == 576 and abs(sum(v * v for v in one) - 1) < 1e-6
        after = ctx.completion({"prompt": "Hi", "n_predict": 2, **GREEDY})
        assert after["tokens_predicted"] == 2
    with init_llama(params_for(build, abi, embedding=True)) as ctx:
        assert ctx.embedding("The cat sat.")["embedding"] != one  # mean pooling differs from the last token
    with pytest.raises(InvalidParamsError, match="pools embeddings"):
        init_llama(params_for(build, abi, embedding=True, pooling_type="rank"))


def test_a_session_from_another_abi_is_refused(build, tmp_path):
    from llamacompat.errors import SessionError

    path = str(tmp_path / "s.session")
    with init_llama(params_for(build, "1.2.1")) as ctx:
        ctx.completion({"prompt": LONG, "n_predict": 0})
        ctx.save_session(path)
    with init_llama(params_for(build, "1.3.0")) as ctx:
        with pytest.raises(SessionError, match="layout|abi"):  # the identity sidecar says so first
            ctx.load_session(path)
        os.remove(path + ".llamacompat.json")
        with pytest.raises(SessionError, match="saved by an rkllm 1.2.1 runtime"):  # and the file itself
            ctx.load_session(path)
        assert ctx.completion({"prompt": "Hi", "n_predict": 2, **GREEDY})["tokens_predicted"] == 2


def test_unsupported_features_are_declared(rk, abi):
    features = rk.capabilities["features"]
    assert features["grammar"] == features["n_probs"] == features["seed"] == features["logit_bias"] == "missing"
    per_run = "native" if abi == "1.3.0" else "missing"
    assert features["top_k"] == features["temperature"] == features["penalties"] == per_run
    with pytest.raises(UnsupportedFeatureError, match="grammar"):
        rk.completion({"prompt": "Hi", "grammar": 'root ::= "a"'})
