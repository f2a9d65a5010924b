"""Media through the openai backend to a real llama-server started with the random-weight projector
(tests/mtmd_fixture.py): image_url / input_audio parts and a raw prompt's media_paths travel as bytes, and the
server's counts match the local llama_cpp backend's on the same model and projector.

The projector's weights are noise: these tests check the plumbing, never what the model says about an image."""

from __future__ import annotations

import base64

import pytest

from llamacompat import RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER as MARKER
from llamacompat import init_llama
from llamacompat.errors import MediaError, MultimodalNotEnabledError, UnsupportedFeatureError

from .mtmd_fixture import IMAGE_TOKENS, flac_bytes, png_bytes, vision_context, vision_media, wav_bytes, write_png
from .mtmd_fixture import image_chat as chat
from .openai_helpers import LlamaServer

GREEDY = {"temperature": 0, "n_predict": 6}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return vision_media(str(tmp_path_factory.mktemp("server-mtmd")))


@pytest.fixture(scope="module")
def server(media):
    started = LlamaServer(parallel=1, n_ctx=2048, embeddings=False, mmproj=media["mmproj"])  # one slot: cache reuse
    yield started
    started.stop()


@pytest.fixture(scope="module")
def ctx(server):
    context = init_llama(server.params())
    yield context
    context.release()


@pytest.fixture(scope="module")
def local(media):
    context = vision_context(media["mmproj"], n_ctx=2048)
    yield context
    context.release()


def test_the_servers_projector_is_reported(ctx):
    assert ctx.capabilities["features"]["multimodal"] == "native"
    assert ctx.is_multimodal_enabled() is True
    assert ctx.get_multimodal_support() == {"vision": True, "audio": False}  # the fixture is vision-only
    assert ctx.init_multimodal({"path": "/not/loaded/here.gguf"}) is True  # the server's own projector serves


def test_a_chat_image_is_evaluated_as_its_tokens(ctx, media):
    served = ctx.completion({"messages": chat(media["img"]), **GREEDY})
    text_only = ctx.completion({"messages": [{"role": "user", "content": "What is this?"}], "n_predict": 0})
    # 16 image tokens in place of the marker (llama-server joins a message's parts without the newline
    # llama.cpp's string-only template path puts between them, so its count is not the local backend's)
    assert served["tokens_evaluated"] >= text_only["tokens_evaluated"] + IMAGE_TOKENS - 1
    assert served["tokens_predicted"] == GREEDY["n_predict"]


def test_a_path_a_file_url_and_a_data_url_are_the_same_image(ctx, media):
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(seed=1)).decode()
    texts = {ref: ctx.completion({"messages": chat(ref), **GREEDY})["text"]
             for ref in (media["img"], "file://" + media["img"], data_url)}
    assert len(set(texts.values())) == 1, texts
    other = ctx.completion({"messages": chat(media["other"]), **GREEDY})
    assert other["tokens_evaluated"] == ctx.completion({"messages": chat(media["img"]), **GREEDY})["tokens_evaluated"]


def test_a_repeated_image_is_reused_from_the_servers_cache(ctx, tmp_path):
    image = write_png(str(tmp_path), "new.png", seed=7)  # one no earlier test sent
    first = ctx.completion({"messages": chat(image, "Describe it."), **GREEDY})
    again = ctx.completion({"messages": chat(image, "Describe it in one word."), **GREEDY})
    assert first["timings"]["prompt_n"] >= IMAGE_TOKENS, f"a new image was not evaluated: {first['timings']}"
    assert again["timings"]["cache_n"] >= IMAGE_TOKENS, f"the image was evaluated again: {again['timings']}"
    assert again["timings"]["prompt_n"] < IMAGE_TOKENS


def test_a_raw_prompt_takes_media_paths(ctx, local, media):
    params = {"prompt": f"Look: {MARKER} It shows", "media_paths": [media["img"]], **GREEDY}
    served, here = ctx.completion(params), local.completion(params)
    assert served["tokens_evaluated"] == here["tokens_evaluated"] >= IMAGE_TOKENS
    assert served["text"] == here["text"]
    with pytest.raises(MediaError, match="2 media markers"):
        ctx.completion({**params, "prompt": f"{MARKER}{MARKER}"})


def test_the_formatted_chat_has_the_media(ctx, media):
    formatted = ctx.get_formatted_chat(chat(media["img"]))
    assert formatted["has_media"] is True and formatted["media_paths"] == [media["img"]]
    assert formatted["prompt"].count(MARKER) == 1  # llama.rn's marker, not the server's own random one
    # the formatted prompt and the media give the chat's completion, as a raw prompt
    raw = ctx.completion({"prompt": formatted["prompt"], "media_paths": formatted["media_paths"], **GREEDY})
    assert raw["text"] == ctx.completion({"messages": chat(media["img"]), **GREEDY})["text"]


def test_media_the_projector_does_not_take_are_refused_before_sending(ctx, media):
    sound = {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(wav_bytes()).decode(), "format": "wav"}}]}
    with pytest.raises(MediaError, match="takes images only"):
        ctx.completion({"messages": [sound], **GREEDY})
    with pytest.raises(UnsupportedFeatureError, match="Unsupported audio format: ogg"):
        ctx.completion({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "ogg"}}]}], **GREEDY})
    with pytest.raises(UnsupportedFeatureError, match="never downloads"):
        ctx.completion({"messages": chat("https://example.com/cat.png"), **GREEDY})
    with pytest.raises(MediaError, match="cannot read"):
        ctx.completion({"messages": chat("/no/such/image.png"), **GREEDY})
    assert ctx.completion({"messages": chat(media["img"]), **GREEDY})["tokens_predicted"] == GREEDY["n_predict"]


def test_what_llama_server_does_not_take_is_refused_before_sending(ctx, media, tmp_path):
    flac = {"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(flac_bytes()).decode(), "format": "wav"}}, {"type": "text", "text": "Hi"}]}
    with pytest.raises(MediaError, match="takes WAV or MP3"):
        ctx.completion({"messages": [flac], **GREEDY})
    with pytest.raises(MediaError, match="ends with a medium"):
        ctx.completion({"prompt": f"Look: {MARKER}", "media_paths": [media["img"]], **GREEDY})
    # llama-server refuses slot save/restore while a projector is loaded: sessions are missing, and say why
    assert ctx.capabilities["features"]["session"] == "missing"
    with pytest.raises(UnsupportedFeatureError, match="--mmproj"):
        ctx.save_session(str(tmp_path / "s.session"))
    assert not list(tmp_path.iterdir())


def test_release_turns_this_contexts_media_off_and_init_back_on(server, media):
    with init_llama(server.params()) as own:
        own.release_multimodal()
        assert own.is_multimodal_enabled() is False
        assert own.get_multimodal_support() == {"vision": False, "audio": False}
        with pytest.raises(MultimodalNotEnabledError):
            own.completion({"messages": chat(media["img"]), **GREEDY})
        assert own.init_multimodal({"path": media["mmproj"]}) is True
        assert own.completion({"messages": chat(media["img"]), **GREEDY})["tokens_predicted"] == GREEDY["n_predict"]


def test_a_server_without_a_projector_names_the_flag(media):
    plain = LlamaServer(parallel=1, n_ctx=1024, embeddings=False)
    try:
        with init_llama(plain.params()) as own:
            assert own.capabilities["features"]["multimodal"] == "missing"
            assert own.is_multimodal_enabled() is False
            with pytest.raises(MultimodalNotEnabledError) as refused:
                own.completion({"messages": chat(media["img"]), **GREEDY})
            assert str(refused.value) == "Multimodal support not enabled. Call initMultimodal first."
            assert "--mmproj" in refused.value.detail
            with pytest.raises(UnsupportedFeatureError, match="--mmproj"):
                own.init_multimodal({"path": media["mmproj"]})
            assert own.completion({"prompt": "The sky is", "n_predict": 2})["tokens_predicted"] == 2
    finally:
        plain.stop()
