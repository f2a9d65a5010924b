"""Session checksums (the sidecar's CRC-32 of the whole file) on every backend that saves through LocalCore:
damaged files are refused before the native loader runs, with the context unchanged; foreign files load
unchecked; a path that would clobber a sidecar is refused. On the real model (llama_cpp and mlx), the rkllm
simulator and a live bridge server."""

from __future__ import annotations

import json
import os
import random

import pytest

from llamacompat import SessionError, init_llama
from llamacompat.sessions import file_crc32, sidecar_path

from .bridge_helpers import Served
from .conftest import GREEDY
from .rkllm_helpers import build_model_folder, build_sim

PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
TRIES = 24


def flip_bytes(path: str, rng: random.Random, count: int = 8) -> list[tuple[int, bytes]]:
    """XOR ``count`` random bytes anywhere in the file with a non-zero mask; what was there, to put it back."""
    size = os.path.getsize(path)
    undo = []
    with open(path, "r+b") as f:
        for offset in rng.sample(range(size), count):
            f.seek(offset)
            old = f.read(1)
            f.seek(offset)
            f.write(bytes([old[0] ^ rng.randrange(1, 256)]))
            undo.append((offset, old))
    return undo


def put_back(path: str, undo: list[tuple[int, bytes]]) -> None:
    with open(path, "r+b") as f:
        for offset, old in undo:
            f.seek(offset)
            f.write(old)


def cache_n(ctx, prompt: str = PROMPT) -> int:
    return ctx.completion({"prompt": prompt, "n_predict": 0})["timings"]["cache_n"]


def assert_flips_are_refused(ctx, path: str, seed: int) -> None:
    """Eight flipped bytes, ``TRIES`` times: each load is refused and the context keeps its cached prompt."""
    rng = random.Random(seed)
    cache_n(ctx)
    primed = cache_n(ctx)  # the prompt is cached now (the first call may have evaluated it)
    assert primed > 0
    for _ in range(TRIES):
        undo = flip_bytes(path, rng)
        with pytest.raises(SessionError, match="does not match the checksum"):
            ctx.load_session(path)
        assert cache_n(ctx) == primed  # untouched: the native loader never ran
        put_back(path, undo)


# -- llama_cpp ----------------------------------------------------------------------
def test_flipped_bytes_anywhere_are_refused_and_the_context_kept(ctx, tmp_path):
    path = str(tmp_path / "flip.session")
    first = ctx.completion({"prompt": PROMPT, "n_predict": 12, **GREEDY})
    n = ctx.save_session(path)
    expected = ctx.completion({"prompt": PROMPT + first["text"] + " And one more.", "n_predict": 12, **GREEDY})["text"]
    assert_flips_are_refused(ctx, path, seed=24)
    assert ctx.load_session(path)["tokens_loaded"] == n  # the whole file, put back, loads as before
    again = ctx.completion({"prompt": PROMPT + first["text"] + " And one more.", "n_predict": 12, **GREEDY})
    assert again["text"] == expected and again["timings"]["cache_n"] == n


def test_truncated_or_extended_files_are_refused(ctx, tmp_path):
    path = str(tmp_path / "cut.session")
    cache_n(ctx)
    ctx.save_session(path)
    whole = open(path, "rb").read()
    for damaged in (whole[:-1], whole[: len(whole) // 2], whole + b"\0"):
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(SessionError, match=f"{len(damaged)} bytes, expected {len(whole)} bytes"):
            ctx.load_session(path)


def test_a_damaged_sidecar_is_refused_and_an_old_one_ignored(ctx, tmp_path):
    path = str(tmp_path / "side.session")
    cache_n(ctx)
    n = ctx.save_session(path)
    side = sidecar_path(path)
    doc = json.loads(open(side).read())
    open(side, "w").write(json.dumps(doc)[:-5])
    with pytest.raises(SessionError, match="sidecar .* is unreadable .*delete it to load"):
        ctx.load_session(path)
    open(side, "w").write(json.dumps({**doc, "file": "x"}))
    with pytest.raises(SessionError, match="not a llamacompat session sidecar of version 2"):
        ctx.load_session(path)
    open(side, "w").write(json.dumps({**doc, "version": 1}))  # written before checksums: loads unchecked
    assert ctx.load_session(path)["tokens_loaded"] == n
    assert ctx.save_session(path) == n  # and a save replaces the bad sidecar with a good one
    assert json.loads(open(side).read())["version"] == 2 and ctx.load_session(path)["tokens_loaded"] == n


def test_a_path_that_would_clobber_a_sidecar_is_refused(ctx, tmp_path):
    path = str(tmp_path / "x.session")
    cache_n(ctx)
    n = ctx.save_session(path)
    side = open(sidecar_path(path), "rb").read()
    for clobber in (sidecar_path(path), str(tmp_path / "x.session.LlamaCompat.JSON"), str(tmp_path / "y.llamacompat.json")):
        with pytest.raises(SessionError, match="the name of a session's sidecar"):
            ctx.save_session(clobber)
    assert open(sidecar_path(path), "rb").read() == side and ctx.load_session(path)["tokens_loaded"] == n
    assert sorted(os.listdir(tmp_path)) == ["x.session", "x.session.llamacompat.json"]


def test_a_foreign_file_loads_unchecked_and_saving_over_it_checks_the_new_one(ctx, tmp_path):
    path = str(tmp_path / "foreign.session")
    cache_n(ctx)
    n = ctx.save_session(path)
    os.unlink(sidecar_path(path))  # as if llama.cpp had written it
    assert ctx.load_session(path)["tokens_loaded"] == n
    foreign = {"size": os.path.getsize(path), "crc32": file_crc32(path)}
    assert ctx.save_session(path) == n
    assert json.loads(open(sidecar_path(path)).read())["previous"] == [{"file": foreign, "unchecked": True}]
    flip_bytes(path, random.Random(2))
    with pytest.raises(SessionError, match="does not match the checksum"):
        ctx.load_session(path)


# -- mlx: the same sidecar over mlx-lm's prompt-cache file ----------------------------
def test_mlx_sessions_are_checked_too(tmp_path):
    path = str(tmp_path / "mlx.session")
    with init_llama({"backend": "mlx", "n_ctx": 1024}) as mctx:
        mctx.completion({"prompt": PROMPT, "n_predict": 4, **GREEDY})
        n = mctx.save_session(path)
        assert json.loads(open(sidecar_path(path)).read())["backend"] == "mlx"
        assert_flips_are_refused(mctx, path, seed=7)
        assert mctx.load_session(path)["tokens_loaded"] == n


# -- rkllm (the simulator): its header's token list was not covered by its own hash --------
def test_rkllm_sessions_are_checked_too(tmp_path, model_path):
    lib = build_sim(tmp_path / "libs", "1.3.0")
    model = build_model_folder(tmp_path / "model", model_path)
    path = str(tmp_path / "rk.session")
    with init_llama({"backend": "rkllm", "model": model, "rkllm_lib": lib, "n_ctx": 1024}) as rk:
        rk.completion({"prompt": PROMPT, "n_predict": 2, **GREEDY})
        n = rk.save_session(path)
        data = open(path, "rb").read()
        header_end = data.index(b"]")  # inside the JSON header: a token id, which its cache_sha256 does not cover
        digit = data.rindex(b"1", 0, header_end)
        undo = [(digit, data[digit:digit + 1])]
        with open(path, "r+b") as f:
            f.seek(digit)
            f.write(b"2")
        with pytest.raises(SessionError, match="does not match the checksum"):
            rk.load_session(path)
        put_back(path, undo)
        assert rk.load_session(path)["tokens_loaded"] == n
        rng = random.Random(3)
        for _ in range(4):
            undo = flip_bytes(path, rng)
            with pytest.raises(SessionError, match="does not match the checksum"):
                rk.load_session(path)
            put_back(path, undo)


# -- the bridge server saves and loads through LocalCore ----------------------------------
def test_the_bridge_server_checks_sessions_too(tmp_path):
    folder = tmp_path / "sessions"
    folder.mkdir()
    server = Served(str(tmp_path), "--sessions-dir", str(folder))
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket}) as bctx:
            path = str(folder / "b.session")
            cache_n(bctx)
            n = bctx.save_session(path)
            with pytest.raises(SessionError, match="the name of a session's sidecar"):
                bctx.save_session(sidecar_path(path))
            undo = flip_bytes(path, random.Random(5))
            with pytest.raises(SessionError, match="does not match the checksum"):
                bctx.load_session(path)
            put_back(path, undo)
            assert bctx.load_session(path)["tokens_loaded"] == n
    finally:
        assert server.stop() == 0, server.log()
