"""Audio input on llama_cpp: the packaged SmolLM2 with a random-weight ``ultravox`` projector (tests/mtmd_fixture.py).

The encoder's weights are noise, so these tests check the plumbing (decoding WAV/MP3, token counts, positions,
hashes, prefix reuse, errors), never what the model makes of a sound."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from llamacompat import RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER as MARKER
from llamacompat import init_llama
from llamacompat.errors import MediaError, UnsupportedFeatureError

from .mtmd_fixture import (
    AUDIO_TOKENS,
    AUDIO_WINDOW_S,
    IMAGE_TOKENS,
    build_audio_mmproj,
    build_mmproj,
    flac_bytes,
    mp3_bytes,
    png_bytes,
    tone,
    wav_bytes,
    wav_of,
    write_png,
)

GREEDY = {"temperature": 0, "n_predict": 4}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mtmd_audio")
    wav, other = folder / "tone.wav", folder / "other.wav"
    wav.write_bytes(wav_bytes())
    other.write_bytes(wav_bytes(freq=880.0))
    return {"mmproj": build_audio_mmproj(str(folder)), "wav": str(wav), "other": str(other),
            "img": write_png(str(folder), "a.png", seed=1), "folder": str(folder)}


@pytest.fixture(scope="module")
def mm(media):
    ctx = init_llama({"n_ctx": 1024, "n_threads": 2})
    assert ctx.init_multimodal({"path": media["mmproj"], "use_gpu": False}) is True
    yield ctx
    ctx.release()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat(data: bytes, fmt: str = "wav", text: str = "What is this sound?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}},
                                         {"type": "text", "text": text}]}]


def test_the_projector_loads_and_reports_audio_only(mm):
    assert mm.is_multimodal_enabled() is True
    assert mm.get_multimodal_support() == {"vision": False, "audio": True}


def test_tokenize_places_one_sound_as_its_tokens(mm, media):
    result = mm.tokenize(f"Hear: {MARKER} ok", {"media_paths": [media["wav"]]})
    assert result["has_media"] is True
    assert len(result["bitmap_hashes"]) == 1 and len(result["bitmap_hashes"][0]) == 64
    start = result["chunk_pos_media"][0]
    assert result["chunk_pos"] == [0, start, start + AUDIO_TOKENS]
    assert len(result["tokens"]) == len(mm.tokenize("Hear:  ok")["tokens"]) + AUDIO_TOKENS
    assert all(t < 0 for t in result["tokens"][start:start + AUDIO_TOKENS])
    again = mm.tokenize(MARKER, {"media_paths": ["file://" + media["wav"]]})
    other = mm.tokenize(MARKER, {"media_paths": [media["other"]]})
    data = mm.tokenize(MARKER, {"media_paths": ["data:audio/wav;base64," + b64(wav_bytes())]})
    assert again["bitmap_hashes"] == data["bitmap_hashes"] == result["bitmap_hashes"]  # identity by content
    assert other["bitmap_hashes"] != result["bitmap_hashes"]


def test_the_token_count_is_what_mtmd_reports(mm, media):
    """llamacompat's count against llama.cpp's own: mtmd_helper_get_n_tokens over the chunks mtmd_tokenize made."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd

    projector = mm._core.adapter._projector  # the loaded mtmd context, read-only here
    with open(media["wav"], "rb") as f:
        raw = f.read()
    buf = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
    bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(projector._ctx, buf, len(raw), False)
    assert bitmap and mtmd.mtmd_bitmap_is_audio(bitmap)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        text = f"Hear: {MARKER} ok".encode()
        inp = mtmd.mtmd_input_text(text, len(text), True, True)
        arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(projector._ctx, chunks, ctypes.byref(inp), arr, 1) == 0
        n_native = mtmd.mtmd_helper_get_n_tokens(chunks)
        each = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        assert [mtmd.mtmd_input_chunk_get_n_tokens(c) for c in each if mtmd.mtmd_input_chunk_get_type(c) != 0] \
            == [AUDIO_TOKENS]  # the one audio chunk's own count
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    assert len(mm.tokenize(f"Hear: {MARKER} ok", {"media_paths": [media["wav"]]})["tokens"]) == n_native


def test_a_chat_with_a_sound_counts_its_tokens_and_reuses_it_next_turn(mm, media):
    formatted = mm.get_formatted_chat(chat(wav_bytes()))
    assert formatted["has_media"] is True and formatted["prompt"].count(MARKER) == 1
    assert formatted["media_paths"] == ["data:audio/wav;base64," + b64(wav_bytes())]
    mm.clear_cache()
    first = mm.completion({"messages": chat(wav_bytes()), **GREEDY})
    text_only = len(mm.tokenize(formatted["prompt"].replace(MARKER, ""))["tokens"])
    assert first["tokens_evaluated"] == text_only + AUDIO_TOKENS
    assert first["timings"]["cache_n"] == 0 and first["timings"]["prompt_n"] == first["tokens_evaluated"]
    assert first["tokens_predicted"] >= 1
    turn = chat(wav_bytes()) + [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": "And?"}]
    second = mm.completion({"messages": turn, **GREEDY})
    start = mm.tokenize(formatted["prompt"], {"media_paths": formatted["media_paths"]})["chunk_pos_media"][0]
    assert second["timings"]["cache_n"] > start + AUDIO_TOKENS  # the sound was not encoded again
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - second["timings"]["cache_n"]
    third = mm.completion({"messages": chat(wav_bytes(freq=880.0)), **GREEDY})
    assert third["timings"]["cache_n"] == start  # another sound at the same place: up to it, not into it


def test_a_raw_prompt_takes_a_wav_in_media_paths(mm, media):
    prompt = f"Sound: {MARKER}\nIt is"
    result = mm.completion({"prompt": prompt, "media_paths": [media["wav"]], **GREEDY})
    assert result["tokens_evaluated"] == len(mm.tokenize("Sound: \nIt is")["tokens"]) + AUDIO_TOKENS
    assert result["tokens_predicted"] >= 1


def test_mp3_and_flac_are_decoded_to_their_length(mm, tmp_path):
    """A silent MP3 made without an encoder (frames that code no samples) and a FLAC of verbatim frames: llama.cpp's
    miniaudio decodes both, and 31 s of either is two 30 s windows (its samples were read, not just its header)."""
    mp3, flac = tmp_path / "silence.mp3", tmp_path / "tone.flac"
    mp3.write_bytes(mp3_bytes())
    flac.write_bytes(flac_bytes())
    assert len(mm.tokenize(MARKER, {"media_paths": [str(mp3)]})["tokens"]) == AUDIO_TOKENS
    assert len(mm.tokenize(MARKER, {"media_paths": [str(flac)]})["tokens"]) == AUDIO_TOKENS
    long_mp3 = mp3_bytes(frames=int((AUDIO_WINDOW_S + 1) * 44100 / 1152))
    for long in ("data:audio/mp3;base64," + b64(long_mp3), "data:audio/flac;base64," + b64(flac_bytes(AUDIO_WINDOW_S + 1))):
        assert len(mm.tokenize(MARKER, {"media_paths": [long]})["tokens"]) == 2 * AUDIO_TOKENS
    result = mm.completion({"messages": chat(mp3_bytes(), "mp3"), **GREEDY})
    assert result["tokens_evaluated"] > AUDIO_TOKENS and result["tokens_predicted"] >= 1


def test_a_sound_over_30_s_takes_a_window_each_and_each_window_is_its_own(mm):
    """llama.cpp encodes a sound in 30 s windows, one media chunk each, all with the sound's one bitmap hash:
    each window gets its own placeholder (else the second would be evaluated as the first again), and the
    hash is listed once, as llama.rn lists one per medium."""
    # the same first window (its last frame reaches 12.5 ms past 30 s; llama.cpp scales the mel by the whole
    # sound's peak, which the louder first tone sets), quieter different tones in the second
    head = tone(AUDIO_WINDOW_S + 0.1)
    a = wav_of(np.concatenate([head, tone(1.0, freq=880.0, amplitude=0.1)]))
    b = wav_of(np.concatenate([head, tone(1.0, freq=220.0, amplitude=0.1)]))
    prompt = f"Hear: {MARKER} ok"
    result = mm.tokenize(prompt, {"media_paths": ["data:audio/wav;base64," + b64(a)]})
    first, second = result["chunk_pos_media"]
    assert second == first + AUDIO_TOKENS and result["chunk_pos"] == [0, first, second, second + AUDIO_TOKENS]
    assert len(result["bitmap_hashes"]) == 1
    tokens = result["tokens"]
    assert set(tokens[first:second]) == {tokens[first]} and set(tokens[second:second + AUDIO_TOKENS]) == {tokens[second]}
    assert tokens[first] != tokens[second] < 0
    probs = []
    for sound in (a, b):
        mm.clear_cache()
        done = mm.completion({"prompt": prompt, "media_paths": ["data:audio/wav;base64," + b64(sound)],
                              "n_probs": 5, **GREEDY})
        assert done["tokens_evaluated"] == len(tokens)
        probs.append(done["completion_probabilities"][0]["probs"])
    assert probs[0] != probs[1]  # the second windows differ, so the model saw them


def test_a_sound_is_resampled_to_the_encoder_s_16_khz(mm):
    """31 s at 8 kHz is 31 s, two windows, once miniaudio resamples it (read as 16 kHz samples it would be one)."""
    slow = wav_of(tone(AUDIO_WINDOW_S + 1.0, rate=8000), rate=8000)
    assert len(mm.tokenize(MARKER, {"media_paths": ["data:audio/wav;base64," + b64(slow)]})["tokens"]) == 2 * AUDIO_TOKENS


def test_bad_sounds_raise_typed_errors_that_say_what_is_wrong(mm, media, tmp_path):
    with pytest.raises(UnsupportedFeatureError, match="^Unsupported audio format: ogg$"):
        mm.completion({"messages": chat(wav_bytes(), "ogg"), **GREEDY})
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(wav_bytes()[:12] + b"\x00garbage" * 8)  # a RIFF/WAVE header, then no fmt chunk
    with pytest.raises(MediaError, match="cannot decode it as an audio"):
        mm.tokenize(MARKER, {"media_paths": [str(corrupt)]})
    with pytest.raises(MediaError, match="cannot decode it as an audio"):
        mm.completion({"messages": chat(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk"), **GREEDY})
    with pytest.raises(MediaError, match="is an image, and this projector takes audio only"):
        mm.tokenize(MARKER, {"media_paths": [media["img"]]})
    with pytest.raises(MediaError, match="is an image"):
        mm.completion({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png_bytes())}}]}], **GREEDY})
    with pytest.raises(MediaError, match="2 media markers"):
        mm.tokenize(MARKER * 2, {"media_paths": [media["wav"]]})
    with pytest.raises(MediaError, match="ends with a medium"):  # no logits after a sound: was a process abort
        mm.completion({"prompt": f"Hear: {MARKER}", "media_paths": [media["wav"]], **GREEDY})


def test_a_webp_is_not_taken_for_a_wav(mm):
    """Both are RIFF files; only RIFF....WAVE is sound (llama.cpp's test), so a WebP gets the image message."""
    webp = b"RIFF\x1a\x00\x00\x00WEBPVP8 " + bytes(14)
    with pytest.raises(MediaError, match="is an image"):
        mm.tokenize(MARKER, {"media_paths": ["data:image/webp;base64," + b64(webp)]})


def test_one_projector_with_both_encoders_takes_an_image_and_a_sound(tmp_path):
    both = build_mmproj(str(tmp_path), name="mmproj-both.gguf", kind="both")
    ctx = init_llama({"n_ctx": 512, "n_threads": 2})
    try:
        assert ctx.init_multimodal({"path": both, "use_gpu": False}) is True
        assert ctx.get_multimodal_support() == {"vision": True, "audio": True}
        image = "data:image/png;base64," + b64(png_bytes())
        sound = "data:audio/wav;base64," + b64(wav_bytes())
        prompt = f"See {MARKER} and hear {MARKER}:"
        result = ctx.tokenize(prompt, {"media_paths": [image, sound]})
        image_at, sound_at = result["chunk_pos_media"]
        assert sound_at - image_at == IMAGE_TOKENS + len(ctx.tokenize(" and hear ")["tokens"])
        assert result["chunk_pos"][-1] == sound_at + AUDIO_TOKENS  # the text after the sound
        assert sum(t < 0 for t in result["tokens"]) == IMAGE_TOKENS + AUDIO_TOKENS
        done = ctx.completion({"prompt": prompt, "media_paths": [image, sound], **GREEDY})
        assert done["tokens_evaluated"] == len(result["tokens"])
    finally:
        ctx.release()


def test_a_sound_for_a_vision_only_projector_is_refused(tmp_path):
    ctx = init_llama({"n_ctx": 256, "n_threads": 2})
    try:
        ctx.init_multimodal({"path": build_mmproj(str(tmp_path)), "use_gpu": False})
        with pytest.raises(MediaError, match="is audio, and this projector takes images only"):
            ctx.tokenize(MARKER, {"media_paths": ["data:audio/mp3;base64," + b64(mp3_bytes())]})
    finally:
        ctx.release()


def test_an_audio_projector_for_another_model_is_refused(tmp_path):
    from llamacompat.errors import ModelLoadError

    wrong = build_audio_mmproj(str(tmp_path), n_embd=512, name="wrong-audio.gguf")
    ctx = init_llama({"n_ctx": 256, "n_threads": 2})
    try:
        with pytest.raises(ModelLoadError, match="n_embd"):
            ctx.init_multimodal({"path": wrong, "use_gpu": False})
    finally:
        ctx.release()


def test_the_bridge_carries_sounds_as_bytes(media, tmp_path):
    """A client's WAV path travels as a data: URL (its bytes), and the server still sees audio in it."""
    from .bridge_helpers import Served

    server = Served(str(tmp_path), "--models-dir", media["folder"])
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket}) as ctx:
            assert ctx.init_multimodal({"path": media["mmproj"], "use_gpu": False}) is True
            assert ctx.get_multimodal_support() == {"vision": False, "audio": True}
            remote = ctx.tokenize(f"Hear: {MARKER} ok", {"media_paths": [media["wav"]]})
            assert remote["chunk_pos_media"] and len(remote["tokens"]) == len(ctx.tokenize("Hear:  ok")["tokens"]) \
                + AUDIO_TOKENS
            done = ctx.completion({"messages": chat(wav_bytes()), **GREEDY})
            assert done["tokens_evaluated"] > AUDIO_TOKENS and done["tokens_predicted"] >= 1
    finally:
        assert server.stop() == 0, server.log()
