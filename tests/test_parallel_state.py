"""llama.rn's per-sequence state of parallel requests (``load_state_path``, ``save_state_path``,
``save_prompt_state_path``, ``load_state_size``, ``save_state_size``) on llama_cpp's slots, on the packaged model:
llama.cpp's ``ggsq`` files, written atomically with the session sidecar and checked as sessions are."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest

from llamacompat import init_llama
from llamacompat.adapters.llama_cpp import lc
from llamacompat.errors import InvalidParamsError, LlamaCompatWarning, SessionError, UnsupportedFeatureError
from llamacompat.sessions import read_seq_header, read_sidecar, sidecar_path

from .bridge_helpers import Served

PROMPT = "The capital of France is"
OTHER = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def sctx():
    """Two slots of 1024 tokens; parallel mode off between tests."""
    context = init_llama({"model": "smollm2", "n_ctx": 2048, "n_parallel": 2, "n_threads": 2})
    yield context
    context.release()


@pytest.fixture
def par(sctx):
    sctx.parallel.enable({"n_parallel": 2})
    yield sctx
    if sctx.parallel.enabled:
        sctx.parallel.disable()


def greedy(prompt: str, n: int, **extra) -> dict:
    return {"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True, **extra}


def run(ctx, params: dict) -> dict:
    return ctx.parallel.completion(params).promise.result(300)


def saved_tokens(path) -> list[int]:
    return read_seq_header(str(path), "test").tokens


def engine(ctx):
    return ctx.parallel._pool.slots.batch


def cells(path) -> int:
    """The KV cells a ggsq file holds (a unified cache writes one stream: u32 n_stream, u32 cell_count, ...)."""
    data = open(path, "rb").read()
    n_tokens = struct.unpack_from("<I", data, 8)[0]
    n_stream, n_cells = struct.unpack_from("<II", data, 12 + 4 * n_tokens)
    assert n_stream == 1
    return n_cells


def assert_records_match_memory(ctx) -> None:
    """Every slot's record of its cache is what llama.cpp's memory holds for that sequence (nothing half-loaded)."""
    batch = engine(ctx)
    mem = batch.adapter._mem
    for seq, tokens in enumerate(batch.cached):
        assert lc.llama_memory_seq_pos_max(mem, seq) + 1 == len(tokens), seq


def wait_generating(ctx, request_id: int, tokens: int = 1) -> None:
    deadline = time.monotonic() + 120
    while not any(r["request_id"] == request_id and r["tokens_generated"] >= tokens
                  for r in ctx.parallel.get_status()["requests"]):
        assert time.monotonic() < deadline, "the request never generated"
        time.sleep(0.01)


def extended(ctx, tokens: list[int], tail: str) -> str:
    """A prompt whose tokens start with ``tokens`` (checked: the test relies on it)."""
    prompt = ctx.detokenize(tokens) + tail
    assert ctx.tokenize(prompt)["tokens"][:len(tokens)] == tokens
    return prompt


def test_a_saved_state_loads_in_a_later_request_and_its_prefix_is_reused(sctx, tmp_path):
    path = tmp_path / "chat.state"
    sctx.parallel.enable({"n_parallel": 2})
    first = run(sctx, greedy(PROMPT, 6, save_state_path=f"file://{path}"))  # llama.rn's file:// is stripped
    sctx.parallel.disable()
    tokens = saved_tokens(path)
    prompt_tokens = sctx.tokenize(PROMPT)["tokens"]
    # the prompt and every generated token but the last, which was never evaluated
    assert len(tokens) == len(prompt_tokens) + first["tokens_predicted"] - 1 and tokens[:len(prompt_tokens)] == prompt_tokens
    assert read_sidecar(str(path))["n_tokens"] == len(tokens)

    follow_up = extended(sctx, tokens, " The city")
    sctx.clear_cache()
    fresh = sctx.completion(greedy(follow_up, 8))
    assert fresh["timings"]["cache_n"] == 0
    sctx.completion(greedy(OTHER, 1))  # no slot holds the saved tokens any more: only the file has them
    sctx.parallel.enable({"n_parallel": 2})
    try:
        loaded = run(sctx, greedy(follow_up, 8, load_state_path=str(path)))
        assert_records_match_memory(sctx)
    finally:
        sctx.parallel.disable()
    assert loaded["timings"]["cache_n"] == len(tokens)
    assert loaded["text"] == fresh["text"]


def test_the_prompt_state_holds_the_prompt_only(par, tmp_path):
    prompt_path, final_path = tmp_path / "prompt.state", tmp_path / "final.state"
    result = run(par, greedy(PROMPT, 5, save_prompt_state_path=str(prompt_path), save_state_path=str(final_path)))
    prompt_tokens = par.tokenize(PROMPT)["tokens"]
    assert saved_tokens(prompt_path) == prompt_tokens
    assert cells(prompt_path) == len(prompt_tokens)  # saved before any generated token was evaluated
    assert len(saved_tokens(final_path)) == cells(final_path) == len(prompt_tokens) + result["tokens_predicted"] - 1

    reused = run(par, greedy(extended(par, prompt_tokens, " a city"), 2, load_state_path=str(prompt_path)))
    assert reused["timings"]["cache_n"] == len(prompt_tokens)


def test_state_sizes_are_honoured(par, tmp_path):
    full, short = tmp_path / "full.state", tmp_path / "short.state"
    run(par, greedy(OTHER, 4, save_state_path=str(full)))
    run(par, greedy(OTHER, 4, save_state_path=str(short), save_state_size=3))
    tokens = saved_tokens(full)
    assert saved_tokens(short) == tokens[:3]
    assert cells(short) == len(tokens)  # as llama.rn: the whole sequence, with fewer tokens listed

    follow_up = extended(par, tokens, " there")
    par.parallel.disable()  # empty slots: what is reused comes from the files
    par.clear_cache()
    par.parallel.enable({"n_parallel": 2})
    assert run(par, greedy(follow_up, 1, load_state_path=str(full), load_state_size=5))["timings"]["cache_n"] == 5
    assert run(par, greedy(follow_up, 1, load_state_path=str(short)))["timings"]["cache_n"] == 3
    assert_records_match_memory(par)  # the cells past the listed tokens were dropped
    assert run(par, greedy(follow_up, 1, load_state_path=str(full), load_state_size=0))["timings"]["cache_n"] == len(tokens)


def test_a_stopped_request_saves_its_prompt_state_but_no_final_state(par, tmp_path):
    prompt_path, final_path = tmp_path / "prompt.state", tmp_path / "final.state"
    request = par.parallel.completion(greedy(OTHER, 400, save_prompt_state_path=str(prompt_path),
                                             save_state_path=str(final_path)))
    wait_generating(par, request.request_id, 2)
    request.stop()
    assert request.promise.result(60)["interrupted"]
    assert saved_tokens(prompt_path) == par.tokenize(OTHER)["tokens"]
    assert not final_path.exists()  # llama.rn saves a request's state when it ends on its own, not when stopped


@pytest.fixture(scope="module")
def renamed_model(model_path, tmp_path_factory):
    """The same weights under another name: a different model that llama.cpp cannot tell apart."""
    data = open(model_path, "rb").read()
    name = b"Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert data.count(name) == 1
    path = tmp_path_factory.mktemp("models") / "renamed.gguf"
    path.write_bytes(data.replace(name, b"Another model, same arch......."))
    return str(path)


@pytest.fixture(scope="module")
def good_file(sctx, tmp_path_factory):
    path = tmp_path_factory.mktemp("state") / "good.state"
    sctx.parallel.enable({"n_parallel": 2})
    try:
        run(sctx, greedy(PROMPT, 4, save_state_path=str(path)))
    finally:
        sctx.parallel.disable()
    return path


def _flipped(good, path):
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    path.with_name(path.name + ".llamacompat.json").write_bytes(open(sidecar_path(str(good)), "rb").read())


def _cut_in_memory(good, path):  # no sidecar: only the native loader can tell
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])


def _cut_in_tokens(good, path):
    path.write_bytes(good.read_bytes()[:16])


def _extended(good, path):  # no sidecar: only the native loader can tell
    path.write_bytes(good.read_bytes() + bytes(16))


def _foreign_token(good, path):
    data = bytearray(good.read_bytes())
    struct.pack_into("<i", data, 12, 999_999)
    path.write_bytes(bytes(data))


def _foreign_model(good, path, renamed_model):
    with init_llama({"model": renamed_model, "n_ctx": 1024, "n_parallel": 2, "n_threads": 2}) as other:
        other.parallel.enable({"n_parallel": 2})
        run(other, greedy(PROMPT, 2, save_state_path=str(path)))


def _session_file(good, path, sctx):
    sctx.completion(greedy(PROMPT, 1))
    sctx.save_session(str(path))


BAD_FILES = {
    "flipped": (_flipped, "does not match the checksum", False),
    "cut in its memory": (_cut_in_memory, "Failed to load state from: .*failed to restore", True),
    "extended": (_extended, "16 bytes follow the sequence's memory", True),
    "cut in its tokens": (_cut_in_tokens, "is truncated", False),
    "foreign token": (_foreign_token, "outside this model's vocabulary", False),
    "foreign model": (_foreign_model, "saved by a different setup .*model: saved", False),
    "session file": (_session_file, "whole-context session file", False),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_state_file_fails_only_its_request(sctx, tmp_path, good_file, renamed_model, kind):
    make, message, reaches_native = BAD_FILES[kind]
    path = tmp_path / "bad.state"
    make(good_file, path, *{"foreign model": (renamed_model,), "session file": (sctx,)}.get(kind, ()))
    prompt_tokens = sctx.tokenize(PROMPT)["tokens"]
    sctx.parallel.enable({"n_parallel": 2})
    try:
        busy = sctx.parallel.completion(greedy(OTHER, 40))
        wait_generating(sctx, busy.request_id)
        run(sctx, greedy(PROMPT, 2))  # the other slot: it holds this prompt now
        batch = engine(sctx)
        other = next(seq for seq, tokens in enumerate(batch.cached) if tokens[:len(prompt_tokens)] == prompt_tokens)
        before = list(batch.cached[other])
        with pytest.raises(SessionError, match=message):
            run(sctx, greedy(PROMPT, 4, load_state_path=str(path)))
        # the request beside it ends as it would have: all its tokens, its slot holding its prompt and text (its
        # greedy text is not compared with a run alone: a step shared with other slots can flip a near tie)
        result = busy.promise.result(300)
        assert result["tokens_predicted"] == 40 and not result["interrupted"]
        busy_prompt = sctx.tokenize(OTHER)["tokens"]
        mine = next(tokens for tokens in batch.cached if tokens[:len(busy_prompt)] == busy_prompt)
        assert len(mine) == len(busy_prompt) + 39  # every generated token but the last was evaluated
        assert result["text"].startswith(sctx.detokenize(mine[len(busy_prompt):]))
        # a file that fails its checks never reaches a slot; one the native loader refuses leaves its slot empty
        assert batch.cached[other] == ([] if reaches_native else before)
        assert_records_match_memory(sctx)
    finally:
        sctx.parallel.disable()


def test_a_missing_state_file_fails_its_request(par, tmp_path):
    with pytest.raises(SessionError, match="Failed to load state from: .*missing.state: no such file"):
        run(par, greedy(PROMPT, 2, load_state_path=str(tmp_path / "missing.state")))


@pytest.mark.parametrize("key", ["load_state_path", "save_state_path", "save_prompt_state_path"])
def test_bad_state_params_are_refused_before_any_work(par, tmp_path, key):
    with pytest.raises(InvalidParamsError, match="NUL byte"):
        run(par, greedy(PROMPT, 2, **{key: str(tmp_path / "a\0b")}))
    with pytest.raises(InvalidParamsError, match=f"'{key}' must be string"):
        run(par, greedy(PROMPT, 2, **{key: 7}))
    if key != "load_state_path":
        with pytest.raises(SessionError, match="is a folder"):
            run(par, greedy(PROMPT, 2, **{key: str(tmp_path)}))
        with pytest.raises(SessionError, match="does not exist"):
            run(par, greedy(PROMPT, 2, **{key: str(tmp_path / "no" / "such.state")}))
        with pytest.raises(SessionError, match="sidecar"):
            run(par, greedy(PROMPT, 2, **{key: str(tmp_path / "x.llamacompat.json")}))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidParamsError, match="'save_state_size' must be int"):
        run(par, greedy(PROMPT, 2, save_state_size="all"))


def test_a_plain_completion_warns_that_the_state_params_need_parallel_mode(sctx, tmp_path, model_path):
    path = tmp_path / "never.state"
    with pytest.warns(LlamaCompatWarning, match="'save_state_path', 'save_state_size' .* work in ctx.parallel.completion only"):
        result = sctx.completion(greedy(PROMPT, 2, save_state_path=str(path), save_state_size=4))
    assert result["tokens_predicted"] == 2 and not path.exists()
    with init_llama({"model": model_path, "n_ctx": 256, "n_threads": 2, "strict": True}) as strict:
        with pytest.raises(UnsupportedFeatureError, match="'load_state_path', 'load_state_size'"):
            strict.completion(greedy(PROMPT, 2, load_state_path=str(path), load_state_size=3))


def test_on_emulated_slots_the_state_params_warn(tmp_path):
    path = tmp_path / "never.state"
    with init_llama({"backend": "mlx", "n_ctx": 512}) as mlx:
        mlx.parallel.enable({"n_parallel": 2})
        with pytest.warns(LlamaCompatWarning, match="on a llama_cpp context"):
            assert run(mlx, greedy(PROMPT, 2, save_state_path=str(path)))["tokens_predicted"] == 2
    assert not path.exists()


def test_a_failed_save_leaves_the_previous_file_and_the_request_stands(par, tmp_path, monkeypatch):
    path = tmp_path / "kept.state"
    run(par, greedy(PROMPT, 3, save_state_path=str(path)))
    old, old_sidecar = path.read_bytes(), open(sidecar_path(str(path)), "rb").read()
    real = lc.llama_state_seq_save_file

    def short_write(ctx, tmp, seq, tokens, n):  # as a full disk that shows only when the file is flushed
        written = real(ctx, tmp, seq, tokens, n)
        os.truncate(tmp, written // 2)
        return written

    monkeypatch.setattr(lc, "llama_state_seq_save_file", short_write)
    with pytest.warns(LlamaCompatWarning, match="the state was not saved to .*kept.state \\(wrote .* bytes"):
        result = run(par, greedy(OTHER, 3, save_state_path=str(path)))
    monkeypatch.undo()
    assert result["tokens_predicted"] == 3 and not result["interrupted"]
    assert path.read_bytes() == old and open(sidecar_path(str(path)), "rb").read() == old_sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.state", "kept.state.llamacompat.json"]  # no temp left
    tokens = saved_tokens(path)
    reused = run(par, greedy(extended(par, tokens, " Paris"), 1, load_state_path=str(path)))
    assert reused["timings"]["cache_n"] == len(tokens)


def test_the_bridge_server_loads_and_saves_state_under_its_sessions_dir(tmp_path):
    sessions = tmp_path / "sessions"
    sessions.mkdir()
    server = Served(str(tmp_path), "--parallel", "2", "--sessions-dir", str(sessions))
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket, "n_parallel": 2}) as remote:
            remote.parallel.enable({"n_parallel": 2})
            path = sessions / "remote.state"
            run(remote, greedy(PROMPT, 3, save_state_path=str(path)))
            tokens = saved_tokens(path)
            assert json.loads(open(sidecar_path(str(path))).read())["n_tokens"] == len(tokens)
            follow_up = extended(remote, tokens, " Paris")
            assert run(remote, greedy(follow_up, 1, load_state_path=str(path)))["timings"]["cache_n"] == len(tokens)
            with pytest.raises(SessionError, match="outside the server's --sessions-dir"):
                run(remote, greedy(PROMPT, 1, save_state_path=str(tmp_path / "outside.state")))
    finally:
        assert server.stop() == 0, server.log()
