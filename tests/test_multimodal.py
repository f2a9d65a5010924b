"""Multimodal input on llama_cpp: the packaged SmolLM2 with a random-weight projector (tests/mtmd_fixture.py).

The projector's weights are noise, so these tests check the plumbing (token counts, positions, hashes, prefix
reuse, errors), never what the model says about an image."""

from __future__ import annotations

import base64
import json

import pytest

from llamacompat import RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER as MARKER
from llamacompat import init_llama
from llamacompat.errors import (
    MediaError,
    ModelLoadError,
    MultimodalNotEnabledError,
    UnsupportedFeatureError,
)

from .mtmd_fixture import IMAGE_TOKENS, build_mmproj, png_bytes, vision_context, vision_media, wav_bytes
from .mtmd_fixture import image_chat as chat

GREEDY = {"temperature": 0, "n_predict": 4}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return vision_media(str(tmp_path_factory.mktemp("mtmd")))


@pytest.fixture(scope="module")
def mm(media):
    ctx = vision_context(media["mmproj"])
    yield ctx
    ctx.release()


def test_the_projector_loads_and_reports_vision_only(mm):
    assert MARKER == "<__media__>"
    assert mm.is_multimodal_enabled() is True
    assert mm.get_multimodal_support() == {"vision": True, "audio": False}
    assert mm.capabilities["features"]["multimodal"] == "native"


def test_tokenize_places_one_image_as_its_tokens(mm, media):
    plain = mm.tokenize("Look: ok")
    assert plain["has_media"] is False and plain["bitmap_hashes"] == []
    result = mm.tokenize(f"Look: {MARKER} ok", {"media_paths": [media["img"]]})
    assert result["has_media"] is True
    assert len(result["bitmap_hashes"]) == 1 and len(result["bitmap_hashes"][0]) == 64
    start = result["chunk_pos_media"][0]
    assert result["chunk_pos"] == [0, start, start + IMAGE_TOKENS]
    assert len(result["tokens"]) == len(mm.tokenize("Look:  ok")["tokens"]) + IMAGE_TOKENS
    again = mm.tokenize(f"{MARKER}", {"media_paths": "file://" + media["img"]})
    other = mm.tokenize(f"{MARKER}", {"media_paths": [media["other"]]})
    assert again["bitmap_hashes"] == result["bitmap_hashes"]  # identity by content, not by path
    assert other["bitmap_hashes"] != result["bitmap_hashes"]


def test_a_data_url_is_the_same_image_as_its_file(mm, media):
    data = "data:image/png;base64," + base64.b64encode(png_bytes(seed=1)).decode()
    assert (mm.tokenize(MARKER, {"media_paths": [data]})["bitmap_hashes"]
            == mm.tokenize(MARKER, {"media_paths": [media["img"]]})["bitmap_hashes"])


def test_formatted_chat_puts_a_marker_where_the_image_was(mm, media):
    result = mm.get_formatted_chat(chat(media["img"]))
    assert result["has_media"] is True and result["media_paths"] == [media["img"]]
    assert result["prompt"].count(MARKER) == 1


def test_a_chat_with_an_image_counts_its_tokens_and_reuses_it_next_turn(mm, media):
    mm.clear_cache()
    first = mm.completion({"messages": chat(media["img"]), **GREEDY})
    text_only = len(mm.tokenize(mm.get_formatted_chat(chat(media["img"]))["prompt"].replace(MARKER, ""))["tokens"])
    assert first["tokens_evaluated"] == text_only + IMAGE_TOKENS
    assert first["timings"]["cache_n"] == 0 and first["timings"]["prompt_n"] == first["tokens_evaluated"]
    turn = chat(media["img"]) + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And?"}]
    second = mm.completion({"messages": turn, **GREEDY})
    assert second["timings"]["cache_n"] > IMAGE_TOKENS  # the image was not evaluated again
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - second["timings"]["cache_n"]


def test_another_image_at_the_same_place_is_evaluated_again(mm, media):
    mm.clear_cache()
    first = mm.completion({"messages": chat(media["img"]), **GREEDY})
    start = mm.tokenize(mm.get_formatted_chat(chat(media["img"]))["prompt"],
                        {"media_paths": [media["img"]]})["chunk_pos_media"][0]
    second = mm.completion({"messages": chat(media["other"]), **GREEDY})
    assert second["timings"]["cache_n"] == start  # up to the image, not into it
    assert first["tokens_evaluated"] == second["tokens_evaluated"]


@pytest.mark.parametrize("when", ["before the encoder", "while it encodes"])
def test_stop_during_image_encoding_leaves_no_half_medium_cached(mm, media, monkeypatch, when):
    """stop_completion while the projector works: the encoder itself cannot be interrupted, so the stop is
    taken before it, or right after it and before the embeddings are decoded. Simulated by calling stop from
    inside the projector's evaluation, so the test does not race a timer."""
    from llamacompat.adapters.llama_cpp_mtmd import Projector

    mm.clear_cache()
    expected = mm.completion({"messages": chat(media["img"]), **GREEDY})["text"]
    mm.clear_cache()
    original = Projector.evaluate
    calls = []

    class StopWhileEncoding:  # the projector checks the flag before and after its encoder: the stop comes between
        def __init__(self, real):
            self.real, self.checks = real, 0

        def is_set(self):
            self.checks += 1
            if self.checks == 2:
                mm.stop_completion()
            return self.real.is_set()

    def stopped(self, lctx, token, n_past, n_batch, stop, *rest):
        calls.append(n_past)
        if when == "before the encoder":
            mm.stop_completion()
            return original(self, lctx, token, n_past, n_batch, stop, *rest)
        return original(self, lctx, token, n_past, n_batch, StopWhileEncoding(stop), *rest)

    monkeypatch.setattr(Projector, "evaluate", stopped)
    result = mm.completion({"messages": chat(media["img"]), **GREEDY})
    monkeypatch.undo()
    assert calls and result["interrupted"] is True and result["tokens_predicted"] == 0
    assert result["tokens_cached"] <= calls[0], "part of the interrupted image stayed in the cache"
    again = mm.completion({"messages": chat(media["img"]), **GREEDY})
    assert again["timings"]["prompt_n"] >= IMAGE_TOKENS and again["tokens_predicted"] == GREEDY["n_predict"]
    assert again["text"] == expected, "what the interrupted encoding left in the KV cache changed the text"


def test_a_raw_prompt_takes_media_paths(mm, media):
    prompt = f"Image: {MARKER}\nIt shows"
    result = mm.completion({"prompt": prompt, "media_paths": [media["img"]], **GREEDY})
    tokens = mm.tokenize(prompt, {"media_paths": [media["img"]]})["tokens"]  # SmolLM2 adds no BOS
    assert result["tokens_evaluated"] == len(tokens) == len(mm.tokenize("Image: \nIt shows")["tokens"]) + IMAGE_TOKENS


def test_media_without_a_projector_is_llama_rn_s_error(ctx, media):
    with pytest.raises(MultimodalNotEnabledError, match="Multimodal support not enabled. Call initMultimodal first."):
        ctx.completion({"messages": chat(media["img"]), **GREEDY})
    with pytest.raises(MultimodalNotEnabledError):
        ctx.tokenize(MARKER, {"media_paths": [media["img"]]})
    assert ctx.is_multimodal_enabled() is False
    assert ctx.get_multimodal_support() == {"vision": False, "audio": False}


def test_bad_media_raise_typed_errors_that_say_what_is_wrong(mm, media, tmp_path):
    with pytest.raises(UnsupportedFeatureError, match="never downloads"):
        mm.completion({"messages": chat("https://example.com/cat.png"), **GREEDY})
    with pytest.raises(MediaError, match="cannot read"):
        mm.completion({"messages": chat(str(tmp_path / "missing.png")), **GREEDY})
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png_bytes()[:40])
    with pytest.raises(MediaError, match="cannot decode"):
        mm.tokenize(MARKER, {"media_paths": [str(corrupt)]})
    with pytest.raises(MediaError, match="base64"):
        mm.tokenize(MARKER, {"media_paths": ["data:image/png;base64,@@@"]})
    with pytest.raises(MediaError, match="2 media markers"):
        mm.tokenize(MARKER * 2, {"media_paths": [media["img"]]})
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(wav_bytes()).decode(), "format": "wav"}}]}]
    with pytest.raises(MediaError, match="images only"):
        mm.completion({"messages": audio, **GREEDY})
    audio[0]["content"][0]["input_audio"]["format"] = "ogg"
    with pytest.raises(UnsupportedFeatureError, match="^Unsupported audio format: ogg$"):
        mm.completion({"messages": audio, **GREEDY})


def test_a_prompt_that_ends_with_a_medium_is_refused_and_the_process_lives(mm, media):
    """llama.cpp computes no logits on a medium's positions: sampling after one aborted the process."""
    for prompt in (f"Look: {MARKER}", MARKER):
        with pytest.raises(MediaError, match="ends with a medium"):
            mm.completion({"prompt": prompt, "media_paths": [media["img"]], **GREEDY})
    assert mm.completion({"prompt": f"{MARKER} ok", "media_paths": [media["img"]], **GREEDY})["tokens_predicted"] >= 1


def test_more_media_chunks_than_are_kept_are_refused(mm, media, monkeypatch):
    import llamacompat.adapters.llama_cpp_mtmd as M

    monkeypatch.setattr(M, "_KEEP_CHUNKS", 1)  # 64 in truth: a 32-minute sound; one here, and two images
    with pytest.raises(MediaError, match="more than the 1 kept"):
        mm.tokenize(f"{MARKER} and {MARKER} ok", {"media_paths": [media["img"], media["other"]]})


def test_oversized_media_are_refused_before_reading(mm, tmp_path, monkeypatch):
    import llamacompat.media as M

    monkeypatch.setattr(M, "MAX_MEDIA_BYTES", 100)
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(64, 64))
    with pytest.raises(MediaError, match="over the"):
        mm.tokenize(MARKER, {"media_paths": [str(big)]})


def test_a_projector_for_another_model_is_refused(tmp_path):
    wrong = build_mmproj(str(tmp_path), n_embd=512, name="wrong.gguf")
    ctx = init_llama({"n_ctx": 256, "n_threads": 2})
    try:
        with pytest.raises(ModelLoadError, match="n_embd"):
            ctx.init_multimodal({"path": wrong, "use_gpu": False})
        with pytest.raises(ModelLoadError, match="does not exist"):
            ctx.init_multimodal({"path": str(tmp_path / "none.gguf")})
        assert ctx.is_multimodal_enabled() is False
    finally:
        ctx.release()


def test_release_multimodal_turns_it_off_and_drops_cached_media(media):
    ctx = init_llama({"n_ctx": 512, "n_threads": 2})
    try:
        ctx.init_multimodal({"path": media["mmproj"], "use_gpu": False})
        ctx.completion({"messages": chat(media["img"]), **GREEDY})
        ctx.release_multimodal()
        assert ctx.is_multimodal_enabled() is False
        with pytest.raises(MultimodalNotEnabledError):
            ctx.completion({"messages": chat(media["img"]), **GREEDY})
    finally:
        ctx.release()


def test_the_chat_repl_attaches_an_image_to_the_next_message(mm, media):
    import io

    from llamacompat.cli.repl import Repl

    lines = iter([f"/image {media['img']}", "What is it?"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    repl = Repl(mm, dict(GREEDY), None, read=read, out=out)
    assert repl.run() == 0
    assert "image attached" in out.getvalue()
    user = repl.messages[0]["content"]
    assert user[0] == {"type": "image_url", "image_url": {"url": media["img"]}} and repl.images == []
    assert repl.messages[1]["role"] == "assistant"


def test_complete_takes_images_with_mmproj(media, capsys):
    from llamacompat.cli.main import main

    code = main(["complete", "It shows", "--mmproj", media["mmproj"], "--image", media["img"], "--n-predict", "2",
                 "--n-ctx", "256", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["tokens_evaluated"] > IMAGE_TOKENS  # the image's tokens and the text's


def test_the_bridge_forwards_multimodal_calls_and_media_bytes_but_reads_no_client_named_file(media, tmp_path):
    """The client sends media as bytes (its paths inlined as data: URLs); the server loads projectors from its
    --models-dir only and reads no media file a client names."""
    from llamacompat.errors import ModelLoadError

    from .bridge_helpers import Raw, Served

    server = Served(str(tmp_path), "--models-dir", media["folder"])
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket}) as ctx:
            with pytest.raises(MultimodalNotEnabledError):
                ctx.tokenize(MARKER, {"media_paths": [media["img"]]})
            with pytest.raises(ModelLoadError, match="outside the server's --models-dir"):
                ctx.init_multimodal({"path": str(tmp_path / "elsewhere.gguf")})
            assert ctx.init_multimodal({"path": media["mmproj"], "use_gpu": False}) is True
            assert ctx.get_multimodal_support() == {"vision": True, "audio": False}
            data = "data:image/png;base64," + base64.b64encode(png_bytes(seed=1)).decode()  # bytes in the request
            inline = ctx.completion({"messages": chat(data), **GREEDY})
            assert inline["tokens_evaluated"] > IMAGE_TOKENS
            by_path = ctx.completion({"messages": chat(media["img"]), **GREEDY})  # the client reads it, sends bytes
            assert by_path["text"] == inline["text"] and by_path["timings"]["cache_n"] >= IMAGE_TOKENS
            local = ctx.tokenize(MARKER, {"media_paths": [media["img"]]})
            assert local["has_media"] and local["bitmap_hashes"]
            with pytest.raises(MediaError, match="base64"):
                ctx.tokenize(MARKER, {"media_paths": ["data:image/png;base64,@@"]})
            raw = Raw(server.socket)  # a client that names a file of the server's: refused, the server goes on
            try:
                reply = raw.ask({"id": 1, "method": "tokenize",
                                 "params": {"text": MARKER, "params": {"media_paths": [media["img"]]}}})
                assert "reads no media files" in reply["error"]["message"], reply
            finally:
                raw.close()
            ctx.release_multimodal()
            assert ctx.is_multimodal_enabled() is False
    finally:
        assert server.stop() == 0, server.log()
