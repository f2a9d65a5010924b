"""Sessions whose cache holds media, on llama_cpp with the random-weight projector (tests/mtmd_fixture.py):
llama.rn's file layout (-1 where media were evaluated) and its ``.meta`` sidecar of bitmap hashes."""

from __future__ import annotations

import os

import pytest

from llamacompat.errors import SessionError
from llamacompat.sessions import meta_path, read_header, read_meta

from .mtmd_fixture import IMAGE_TOKENS, vision_context, vision_media
from .mtmd_fixture import image_chat as chat

GREEDY = {"temperature": 0, "n_predict": 8}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return vision_media(str(tmp_path_factory.mktemp("mtmd-sessions")))


def new_context(media):
    return vision_context(media["mmproj"])


@pytest.fixture(scope="module")
def mm(media):
    ctx = new_context(media)
    yield ctx
    ctx.release()


def image_tokens(ctx, image: str, text: str) -> dict:
    """Where the image sits in the chat's tokens: tokenize's chunk_pos_media and bitmap_hashes."""
    return ctx.tokenize(ctx.get_formatted_chat(chat(image, text))["prompt"], {"media_paths": [image]})


def test_a_session_with_an_image_saves_llama_rns_layout_and_sidecar(mm, media, tmp_path):
    mm.clear_cache()
    first = mm.completion({"messages": chat(media["img"], "What is this?"), "n_predict": 0})
    path = str(tmp_path / "chat.session")
    n_saved = mm.save_session(path)
    assert n_saved == first["tokens_evaluated"]
    placed = image_tokens(mm, media["img"], "What is this?")
    start = placed["chunk_pos_media"][0]
    tokens = read_header(path).tokens
    assert tokens[start:start + IMAGE_TOKENS] == [-1] * IMAGE_TOKENS  # as llama.rn writes media positions
    assert all(t >= 0 for t in tokens[:start] + tokens[start + IMAGE_TOKENS:])
    assert read_meta(path) == placed["bitmap_hashes"]
    assert open(meta_path(path)).read() == f"rnllama-state-meta v1\n1\n{placed['bitmap_hashes'][0]}\n"


def test_a_loaded_session_reuses_its_image_and_resumes_the_same_text(mm, media, tmp_path):
    mm.clear_cache()
    mm.completion({"messages": chat(media["img"], "What is this?"), "n_predict": 0})
    path = str(tmp_path / "chat.session")
    n_saved = mm.save_session(path)
    follow = {"messages": chat(media["img"], "What is this?"), **GREEDY}
    expected = mm.completion(follow)
    other = new_context(media)
    try:
        loaded = other.load_session(path)
        assert loaded["tokens_loaded"] == n_saved
        assert "What is this?" in loaded["prompt"] and "<__media" not in loaded["prompt"]
        resumed = other.completion(follow)
        assert resumed["timings"]["cache_n"] == n_saved - 1, "the image (and the text) were evaluated again"
        assert resumed["text"] == expected["text"]
        # another image at the same place is evaluated, not mistaken for the cached one
        changed = other.completion({"messages": chat(media["other"], "What is this?"), **GREEDY})
        assert changed["timings"]["cache_n"] == image_tokens(other, media["other"], "What is this?")["chunk_pos_media"][0]
    finally:
        other.release()


def test_without_its_sidecar_the_image_is_evaluated_again(mm, media, tmp_path):
    mm.clear_cache()
    mm.completion({"messages": chat(media["img"], "Describe it."), "n_predict": 0})
    path = str(tmp_path / "lost.session")
    mm.save_session(path)
    start = image_tokens(mm, media["img"], "Describe it.")["chunk_pos_media"][0]
    # gone, truncated, foreign, a count that is a digit to str.isdigit but not to int
    for broken in (None, "rnllama-state-meta v1\n2\nabc\n", "something else\n1\nabc\n", "rnllama-state-meta v1\n\u00b2\na\nb\n"):
        if broken is None:
            os.unlink(meta_path(path))
        else:
            with open(meta_path(path), "w") as f:
                f.write(broken)
        other = new_context(media)
        try:
            assert other.load_session(path)["tokens_loaded"] == start  # the text before the image only
            resumed = other.completion({"messages": chat(media["img"], "Describe it."), "n_predict": 1})
            assert resumed["timings"]["cache_n"] == start and resumed["timings"]["prompt_n"] >= IMAGE_TOKENS
        finally:
            other.release()


def test_a_save_that_cuts_the_image_or_has_none_writes_no_sidecar(mm, media, tmp_path):
    mm.clear_cache()
    mm.completion({"messages": chat(media["img"], "What is this?"), "n_predict": 0})
    path = str(tmp_path / "cut.session")
    mm.save_session(path)
    assert os.path.exists(meta_path(path))
    start = image_tokens(mm, media["img"], "What is this?")["chunk_pos_media"][0]
    assert mm.save_session(path, start + 3) == start + 3  # three of the image's positions: no identity to prove
    assert not os.path.exists(meta_path(path)), "a stale sidecar was left beside a file without whole media"
    mm.save_session(path)
    mm.clear_cache()
    mm.completion({"prompt": "Only text now.", "n_predict": 0})
    mm.save_session(path)  # a text-only session at the same path
    assert not os.path.exists(meta_path(path))
    with pytest.raises(SessionError, match=r"\.meta"):
        mm.save_session(str(tmp_path / "x.session.meta"))


def test_the_same_image_twice_is_two_media_and_a_loaded_session_saves_them_again(mm, media, tmp_path):
    twice = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": media["img"]}},
                                          {"type": "text", "text": "and"},
                                          {"type": "image_url", "image_url": {"url": media["img"]}},
                                          {"type": "text", "text": "Are they the same?"}]}]
    mm.clear_cache()
    mm.completion({"messages": twice, "n_predict": 0})
    path = str(tmp_path / "twice.session")
    n_saved = mm.save_session(path)
    hashes = mm.tokenize(mm.get_formatted_chat(twice)["prompt"], {"media_paths": [media["img"]] * 2})["bitmap_hashes"]
    assert len(hashes) == 2 and read_meta(path) == hashes
    other = new_context(media)
    try:
        assert other.load_session(path)["tokens_loaded"] == n_saved
        again = str(tmp_path / "again.session")
        other.save_session(again)  # before any new prompt: the loaded media are still named
        assert read_meta(again) == hashes
        resumed = other.completion({"messages": twice, "n_predict": 1})
        assert resumed["timings"]["cache_n"] == n_saved - 1
    finally:
        other.release()
