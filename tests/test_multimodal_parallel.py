"""Media in parallel mode on llama_cpp, with the random-weight projector (tests/mtmd_fixture.py): a slot's
media are evaluated through the projector into its own sequence, between the shared batch steps, so requests
with images run beside text requests and each gets what it gets alone."""

from __future__ import annotations

import threading

import pytest

from llamacompat.errors import ParallelModeError
from llamacompat.sessions import meta_path, read_meta, read_seq_header

from .mtmd_fixture import IMAGE_TOKENS, vision_context, vision_media, write_png
from .mtmd_fixture import image_chat as chat

GREEDY = {"temperature": 0, "n_predict": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return vision_media(str(tmp_path_factory.mktemp("mtmd-parallel")))


@pytest.fixture(scope="module")
def mctx(media):
    ctx = vision_context(media["mmproj"], n_ctx=2048, n_parallel=2)
    yield ctx
    ctx.release()


@pytest.fixture
def par(mctx):
    mctx.parallel.enable({"n_parallel": 2})
    yield mctx
    if mctx.parallel.enabled:
        mctx.parallel.disable()


def alone(ctx, params: dict) -> str:
    """The greedy text of ``params`` on the context itself (parallel mode off), from an empty cache."""
    ctx.clear_cache()
    return ctx.completion(params)["text"]


def test_image_requests_run_beside_a_text_request_and_read_as_alone(mctx, media):
    requests = [{"messages": chat(media["img"], "What is this?"), **GREEDY},
                {"messages": chat(media["other"], "Describe it."), **GREEDY},
                {"prompt": "The capital of France is", **GREEDY}]
    expected = [alone(mctx, params) for params in requests]
    mctx.parallel.enable({"n_parallel": 2})
    try:
        handles = [mctx.parallel.completion(params) for params in requests]
        results = [h.promise.result(300) for h in handles]
    finally:
        mctx.parallel.disable()
    assert [r["text"] for r in results] == expected
    assert all(r["tokens_predicted"] == GREEDY["n_predict"] for r in results)
    assert results[0]["tokens_evaluated"] > IMAGE_TOKENS and results[1]["tokens_evaluated"] > IMAGE_TOKENS


def test_a_slot_reuses_its_image_next_turn(par, tmp_path):
    image = write_png(str(tmp_path), "new.png", seed=5)  # one no earlier request sent
    first = par.parallel.completion({"messages": chat(image, "What is this?"), **GREEDY}).promise.result(300)
    again = par.parallel.completion({"messages": chat(image, "What is it?"), **GREEDY}).promise.result(300)
    assert first["timings"]["prompt_n"] >= IMAGE_TOKENS
    assert again["timings"]["cache_n"] >= IMAGE_TOKENS, f"the image was evaluated again: {again['timings']}"


def test_a_request_stopped_while_its_image_encodes_leaves_the_others_and_its_slot_clean(par, mctx, media,
                                                                                         monkeypatch):
    from llamacompat.adapters.llama_cpp_mtmd import Projector

    expected = None
    original = Projector.evaluate
    hit = threading.Event()

    def stop_on_first(self, lctx, token, n_past, n_batch, stop, *rest):
        if not hit.is_set() and stop is not None:
            hit.set()
            stop.set()  # the request's stop arrives while its image is being encoded
        return original(self, lctx, token, n_past, n_batch, stop, *rest)

    monkeypatch.setattr(Projector, "evaluate", stop_on_first)
    stopped = par.parallel.completion({"messages": chat(media["other"], "What is this?"), **GREEDY})
    text = par.parallel.completion({"prompt": "Once upon a time", **GREEDY})
    result = stopped.promise.result(300)
    assert hit.is_set() and result["interrupted"] is True and result["tokens_predicted"] == 0
    assert text.promise.result(300)["tokens_predicted"] == GREEDY["n_predict"]
    monkeypatch.undo()
    # both slots again: whichever took the stopped request holds no half image (the text is what it is alone)
    again = [par.parallel.completion({"messages": chat(media["other"], "What is this?"), **GREEDY})
             for _ in range(2)]
    texts = {r.promise.result(300)["text"] for r in again}
    par.parallel.disable()
    expected = alone(mctx, {"messages": chat(media["other"], "What is this?"), **GREEDY})
    assert texts == {expected}


def test_a_state_file_with_an_image_keeps_its_identity_and_resumes(par, media, tmp_path):
    path = str(tmp_path / "slot.ggsq")
    params = {"messages": chat(media["img"], "What is this?"), **GREEDY}
    first = par.parallel.completion({**params, "save_prompt_state_path": path}).promise.result(300)
    tokens = read_seq_header(path, "test").tokens
    assert -1 in tokens and all(t >= 0 or t == -1 for t in tokens)  # llama.rn's layout
    assert len(read_meta(path)) == 1 and open(meta_path(path)).read().startswith("rnllama-state-meta v1\n1\n")
    par.parallel.disable()
    par.parallel.enable({"n_parallel": 2})  # empty slots
    resumed = par.parallel.completion({**params, "load_state_path": path}).promise.result(300)
    assert resumed["timings"]["cache_n"] >= len(tokens) - 1, f"the state's image was not reused: {resumed['timings']}"
    assert resumed["text"] == first["text"]


def test_release_multimodal_is_refused_in_parallel_mode(par):
    with pytest.raises(ParallelModeError):
        par.release_multimodal()
