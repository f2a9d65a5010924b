"""Session files on the real llama.cpp backend: round trips, llama-cpp-python interop, damage, crashes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import llama_cpp as lc
import pytest

import llamacompat.sessions.atomic as atomic
from llamacompat import (
    ContextBusyError,
    ContextReleasedError,
    InvalidParamsError,
    SessionError,
    UnsupportedFeatureError,
    init_llama,
)
from llamacompat.sessions import file_crc32, read_header, sidecar_path
from llamacompat.sessions.sidecar import SUFFIX

from .conftest import GREEDY, run_in_background

PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
MORE = " Also, write one about mountains."
PARAMS = {"n_ctx": 512, "n_threads": 2, "flash_attn_type": "off"}  # 'off' matches llama-cpp-python's Llama


@pytest.fixture
def sctx():
    ctx = init_llama(PARAMS)
    yield ctx
    ctx.release()


def evaluate(ctx, prompt: str) -> dict:
    return ctx.completion({"prompt": prompt, "n_predict": 0})


def cached_prefix(ctx, prompt: str) -> int:
    """How many tokens of ``prompt`` the context's KV cache already holds (0-token completion)."""
    return evaluate(ctx, prompt)["timings"]["cache_n"]


def saved_session(ctx, path, prompt: str = PROMPT) -> int:
    evaluate(ctx, prompt)
    return ctx.save_session(str(path))


# -- round trips ---------------------------------------------------------------
def test_round_trip_restores_tokens_and_reuses_them(sctx, tmp_path):
    path = tmp_path / "chat.session"
    first = sctx.completion({"prompt": PROMPT, "n_predict": 12, **GREEDY})
    n = sctx.save_session(str(path))
    assert n == first["tokens_cached"] == len(sctx.tokenize(PROMPT)["tokens"]) + 11
    header = read_header(str(path))
    assert header.n_tokens == n and header.arch == "llama" and header.version == lc.LLAMA_SESSION_VERSION

    follow_up = PROMPT + first["text"] + MORE
    expected = sctx.completion({"prompt": follow_up, "n_predict": 16, **GREEDY})  # the in-memory path

    with init_llama(PARAMS) as other:
        loaded = other.load_session(str(path))
        assert loaded["tokens_loaded"] == n
        assert loaded["prompt"] == PROMPT + sctx.detokenize(sctx.tokenize(first["text"])["tokens"][:11])
        resumed = other.completion({"prompt": follow_up, "n_predict": 16, **GREEDY})
    assert resumed["text"] == expected["text"]
    assert resumed["timings"]["cache_n"] == n
    assert resumed["timings"]["prompt_n"] == resumed["tokens_evaluated"] - n
    assert resumed["timings"]["prompt_n"] < 12


def test_token_size_keeps_only_the_first_tokens(sctx, tmp_path):
    path = tmp_path / "short.session"
    total = saved_session(sctx, path)
    assert sctx.save_session(str(path), 5) == 5
    with init_llama(PARAMS) as other:
        loaded = other.load_session(str(path))
        assert loaded["tokens_loaded"] == 5
        assert loaded["prompt"] == other.detokenize(other.tokenize(PROMPT)["tokens"][:5])
        assert cached_prefix(other, PROMPT) == 5  # the KV cells past the 5 tokens were dropped
    assert total > 5


def test_file_urls_and_user_paths_are_accepted(sctx, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    n = saved_session(sctx, "file://" + str(tmp_path / "a.session"))
    assert sctx.load_session("~/a.session")["tokens_loaded"] == n


def test_empty_cache_saves_zero_tokens(sctx, tmp_path):
    path = tmp_path / "empty.session"
    assert sctx.save_session(str(path)) == 0
    assert sctx.load_session(str(path)) == {"tokens_loaded": 0, "prompt": ""}


def test_sidecar_records_the_model_identity(sctx, tmp_path):
    path = tmp_path / "id.session"
    saved_session(sctx, path)
    doc = json.loads(open(sidecar_path(str(path))).read())
    assert doc["backend"] == "llama_cpp" and doc["layout"] == {"cache_type_k": "f16", "cache_type_v": "f16"}
    assert len(doc["model"]["fingerprint"]) == 64 and doc["file"]["size"] == os.path.getsize(path)
    assert doc["file"] == {"size": os.path.getsize(path), "crc32": file_crc32(str(path))}
    assert "previous" not in doc  # a new path: no file before it
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)  # conversation state stays private


# -- interop with llama-cpp-python's raw API ------------------------------------
@pytest.fixture
def raw_llama(model_path):
    llm = lc.Llama(model_path, n_ctx=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def test_session_written_by_llama_cpp_python_loads(sctx, raw_llama, tmp_path):
    path = tmp_path / "raw.session"
    tokens = raw_llama.tokenize(PROMPT.encode(), add_bos=False, special=True)
    raw_llama.eval(tokens)
    arr = (lc.llama_token * len(tokens))(*tokens)
    assert lc.llama_state_save_file(raw_llama._ctx.ctx, str(path).encode(), arr, len(tokens))

    loaded = sctx.load_session(str(path))
    assert loaded == {"tokens_loaded": len(tokens), "prompt": PROMPT}
    resumed = sctx.completion({"prompt": PROMPT, "n_predict": 10, **GREEDY})
    assert resumed["timings"]["cache_n"] == len(tokens) - 1  # the last prompt token is re-read for its logits
    with init_llama(PARAMS) as fresh:
        assert fresh.completion({"prompt": PROMPT, "n_predict": 10, **GREEDY})["text"] == resumed["text"]


def test_session_written_by_llamacompat_loads_in_llama_cpp_python(sctx, raw_llama, tmp_path):
    path = tmp_path / "ours.session"
    n = saved_session(sctx, path)
    expected = sctx.completion({"prompt": PROMPT + MORE, "n_predict": 8, **GREEDY})["text"]

    buf = (lc.llama_token * 512)()
    count = ctypes.c_size_t(0)
    assert lc.llama_state_load_file(raw_llama._ctx.ctx, str(path).encode(), buf, 512, ctypes.byref(count))
    assert buf[: count.value] == sctx.tokenize(PROMPT)["tokens"] and count.value == n
    raw_llama.n_tokens = n
    raw_llama.input_ids[:n] = buf[:n]
    out = raw_llama.create_completion(PROMPT + MORE, max_tokens=8, temperature=0)
    assert out["choices"][0]["text"] == expected


# -- damaged and foreign files: SessionError, context untouched -----------------
def _prime_state(ctx) -> int:
    """Give ``ctx`` a cached prompt whose survival the damage tests check."""
    evaluate(ctx, PROMPT)
    return len(ctx.tokenize(PROMPT)["tokens"])


def _assert_untouched(ctx, n_prompt: int) -> None:
    assert cached_prefix(ctx, PROMPT) == n_prompt - 1


def _rewrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


DAMAGE = {
    "wrong magic": (lambda p, n: _rewrite(p, 0, b"GGUF"), "not a llama.cpp session file"),
    "unsupported version": (lambda p, n: _rewrite(p, 4, struct.pack("<I", 99)), "session version 99"),
    "too many tokens": (lambda p, n: _rewrite(p, 8, struct.pack("<I", 100_000)), "truncated"),
    "token list cut short": (lambda p, n: os.truncate(p, 12 + 2 * n), "truncated"),
    "state cut short": (lambda p, n: os.truncate(p, os.path.getsize(p) - 1000), "Failed to load session"),
    "token outside the vocabulary": (lambda p, n: _rewrite(p, 12, struct.pack("<i", 10**6)), "outside this model's vocabulary"),
    "other architecture": (lambda p, n: _rewrite(p, 12 + 4 * n + 4, b"gemma"), "saved by a 'gemma' model"),
    "empty file": (lambda p, n: os.truncate(p, 0), "too short"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_file_is_refused_and_the_context_kept(damage, sctx, tmp_path):
    path = tmp_path / "bad.session"
    n = saved_session(sctx, path, PROMPT + MORE)
    os.unlink(sidecar_path(str(path)))  # no identity: only the header and the native loader can tell
    spoil, message = DAMAGE[damage]
    spoil(str(path), n)
    n_prompt = _prime_state(sctx)
    with pytest.raises(SessionError, match=message):
        sctx.load_session(str(path))
    _assert_untouched(sctx, n_prompt)


def test_more_tokens_than_the_context_holds(tmp_path):
    path = tmp_path / "long.session"
    with init_llama(PARAMS) as big:
        saved_session(big, path, PROMPT * 8)
    with init_llama({**PARAMS, "n_ctx": 64}) as small:
        with pytest.raises(SessionError, match=r"create the context with 'n_ctx' >= \d+"):
            small.load_session(str(path))
        assert small.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_flash_attention_mismatch_names_the_setting(sctx, tmp_path):
    path = tmp_path / "fa.session"
    saved_session(sctx, path)
    os.unlink(sidecar_path(str(path)))
    with init_llama({**PARAMS, "flash_attn_type": "on"}) as other:
        n_prompt = _prime_state(other)
        with pytest.raises(SessionError, match="flash_attn_type"):
            other.load_session(str(path))
        _assert_untouched(other, n_prompt)


def test_cache_type_mismatch_is_caught_by_the_sidecar_and_natively(sctx, tmp_path):
    path = tmp_path / "kv.session"
    saved_session(sctx, path)
    with init_llama({**PARAMS, "cache_type_k": "q8_0"}) as other:
        n_prompt = _prime_state(other)
        with pytest.raises(SessionError, match="layout: saved cache_type_k=f16"):
            other.load_session(str(path))
        os.unlink(sidecar_path(str(path)))
        with pytest.raises(SessionError, match="cache_type_k"):
            other.load_session(str(path))
        _assert_untouched(other, n_prompt)


@pytest.fixture(scope="module")
def renamed_model(model_path, tmp_path_factory):
    """The same weights under another name: a different model that llama.cpp cannot tell apart."""
    data = open(model_path, "rb").read()
    name = b"Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert data.count(name) == 1
    path = tmp_path_factory.mktemp("models") / "renamed.gguf"
    path.write_bytes(data.replace(name, b"Another model, same arch......."))
    return str(path)


def test_other_model_is_refused_by_its_sidecar(sctx, tmp_path, renamed_model):
    path = tmp_path / "other.session"
    saved_session(sctx, path)
    with init_llama({**PARAMS, "model": renamed_model}) as other:
        evaluate(other, PROMPT)
        with pytest.raises(SessionError, match="model: saved llama 256M Q4_1 .* this context"):
            other.load_session(str(path))
        assert cached_prefix(other, PROMPT) == len(other.tokenize(PROMPT)["tokens"]) - 1


def test_a_file_rewritten_elsewhere_is_refused_until_its_sidecar_goes(sctx, raw_llama, tmp_path):
    """Another program's rewrite cannot be told from damage: the sidecar's checksum refuses it, and says how to
    load it unchecked."""
    path = tmp_path / "stale.session"
    saved_session(sctx, path)
    tokens = raw_llama.tokenize(b"Hello there", add_bos=False, special=True)
    raw_llama.eval(tokens)
    arr = (lc.llama_token * len(tokens))(*tokens)
    assert lc.llama_state_save_file(raw_llama._ctx.ctx, str(path).encode(), arr, len(tokens))  # rewritten elsewhere
    n_prompt = _prime_state(sctx)
    with pytest.raises(SessionError, match="does not match the checksum .*delete the sidecar to load it unchecked"):
        sctx.load_session(str(path))
    _assert_untouched(sctx, n_prompt)
    os.unlink(sidecar_path(str(path)))
    assert sctx.load_session(str(path)) == {"tokens_loaded": len(tokens), "prompt": "Hello there"}


# -- bad input -----------------------------------------------------------------
def test_bad_paths_and_arguments(sctx, tmp_path):
    for bad in (None, "", 3):
        with pytest.raises(InvalidParamsError, match="path must be a non-empty string"):
            sctx.save_session(bad)
        with pytest.raises(InvalidParamsError, match="path must be a non-empty string"):
            sctx.load_session(bad)
    with pytest.raises(InvalidParamsError, match="token_size must be an int"):
        sctx.save_session(str(tmp_path / "x"), "5")
    with pytest.raises(SessionError, match="no such file"):
        sctx.load_session(str(tmp_path / "missing.session"))
    with pytest.raises(SessionError, match="is a folder"):
        sctx.save_session(str(tmp_path))
    with pytest.raises(SessionError, match="No such file or directory"):
        sctx.save_session(str(tmp_path / "no" / "such" / "folder.session"))
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.session")  # a non-UTF-8 file name
    n = saved_session(sctx, odd)
    assert sctx.load_session(odd)["tokens_loaded"] == n
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(odd), os.path.basename(sidecar_path(odd))])


def test_busy_released_and_vocab_only(tmp_path, model_path):
    path = str(tmp_path / "s.session")
    ctx = init_llama(PARAMS)
    worker, _ = run_in_background(ctx, {"prompt": "Count:", "n_predict": -1, "ignore_eos": True})
    with pytest.raises(ContextBusyError):
        ctx.save_session(path)
    with pytest.raises(ContextBusyError):
        ctx.load_session(path)
    ctx.stop_completion()
    worker.join(10)
    ctx.save_session(path)
    ctx.release()
    with pytest.raises(ContextReleasedError):
        ctx.load_session(path)
    with pytest.raises(ContextReleasedError):
        ctx.save_session(path)
    with init_llama({"model": model_path, "vocab_only": True}) as vocab:
        with pytest.raises(UnsupportedFeatureError, match="vocab_only"):
            vocab.save_session(path)


# -- nothing lost: full disks and crashes --------------------------------------
def test_full_disk_keeps_the_previous_file(sctx, tmp_path, monkeypatch):
    path = tmp_path / "keep.session"
    n = saved_session(sctx, path)
    before = path.read_bytes()
    evaluate(sctx, PROMPT + MORE)

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_fsync", full)
    with pytest.raises(SessionError, match="No space left on device"):
        sctx.save_session(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.session", "keep.session.llamacompat.json"]
    assert sctx.load_session(str(path))["tokens_loaded"] == n


def _child(script: str, *args: str, **kwargs) -> subprocess.Popen:
    code = textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, **kwargs)


_CHILD_SETUP = f"""
    import os, sys, time
    from llamacompat import init_llama
    ctx = init_llama({PARAMS!r})
    ctx.completion({{"prompt": sys.argv[2], "n_predict": 0}})
"""


def test_native_write_failure_keeps_the_previous_file(sctx, tmp_path):
    """A real short write: the child may write only 64 KiB per file (RLIMIT_FSIZE)."""
    path = tmp_path / "limit.session"
    n = saved_session(sctx, path)
    before = path.read_bytes()
    child = _child(_CHILD_SETUP + """
    import resource, signal
    from llamacompat import SessionError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    try:
        ctx.save_session(sys.argv[1])
        print("saved")
    except SessionError as err:
        print("SessionError", err)
    """, str(path), PROMPT * 4)
    out, _ = child.communicate(timeout=120)
    assert out.startswith("SessionError Failed to save session"), out
    assert path.read_bytes() == before
    assert sctx.load_session(str(path))["tokens_loaded"] == n


# A save renames two files: the sidecar listing the new file and the old one, then the session file. Killed
# before either rename, the old file stays whole and the sidecar in place vouches for it.
# (the renamed file's suffix, which of its renames, whether the new session is in place, temporary files then)
KILL_POINTS = {"before the sidecar": (SUFFIX, 1, False, 2), "before the session file": ("", 1, False, 1)}


@pytest.mark.parametrize("point", KILL_POINTS, ids=list(KILL_POINTS))
def test_killed_during_save_keeps_a_whole_checked_file(point, sctx, tmp_path):
    suffix, occurrence, replaced, n_temps = KILL_POINTS[point]
    path = tmp_path / "crash.session"
    n = saved_session(sctx, path)
    before = path.read_bytes()
    child = _child(_CHILD_SETUP + f"""
    import llamacompat.sessions.atomic as atomic
    real, seen = atomic.os.replace, []
    def hang(src, dst):  # the new file is complete and synced; die before it is renamed
        seen.append(dst)
        if dst == sys.argv[1] + {suffix!r} and seen.count(dst) == {occurrence}:
            print("ready", flush=True)
            time.sleep(600)
        real(src, dst)
    atomic.os.replace = hang
    ctx.save_session(sys.argv[1])
    """, str(path), PROMPT * 4)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert len([f for f in os.listdir(tmp_path) if f.endswith(".tmp")]) == n_temps
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    n_now = len(sctx.tokenize(PROMPT * 4)["tokens"]) if replaced else n
    assert (path.read_bytes() != before) == replaced
    assert sctx.load_session(str(path))["tokens_loaded"] == n_now  # its checksum matched
    _rewrite(path, os.path.getsize(path) // 2, b"\xff\x00\xff\x00")
    with pytest.raises(SessionError, match="does not match the checksum"):  # and is still checked
        sctx.load_session(str(path))


def test_a_save_loop_frozen_or_killed_anywhere_leaves_a_whole_file(sctx, tmp_path):
    path = tmp_path / "loop.session"
    n_small = saved_session(sctx, path)
    n_big = len(sctx.tokenize(PROMPT * 6)["tokens"])
    child = _child(_CHILD_SETUP + """
    print("ready", flush=True)
    while True:
        ctx.save_session(sys.argv[1])
    """, str(path), PROMPT * 6)
    try:
        assert child.stdout.readline().strip() == "ready"
        for delay in (0.0, 0.013, 0.029, 0.051, 0.083):
            time.sleep(delay)
            child.send_signal(signal.SIGSTOP)  # freeze it wherever it is: the file must be whole
            assert sctx.load_session(str(path))["tokens_loaded"] in (n_small, n_big)
            child.send_signal(signal.SIGCONT)
        time.sleep(0.037)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    assert sctx.load_session(str(path))["tokens_loaded"] in (n_small, n_big)
