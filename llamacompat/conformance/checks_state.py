"""State checks: busy/released, tokenizer round trip, embeddings, sessions."""

from __future__ import annotations

import math
import os
import struct
import tempfile
from typing import Any, Callable

from ..errors import ContextBusyError, ContextReleasedError, EmbeddingDisabledError, SessionError
from .checks_generation import LONG, PROMPT
from .kit import GREEDY, Kit, check, no_eos, refused, run_in_background

CORPUS = [
    "Hello, world!",
    "Café, naïve façade, Ærøskøbing, São Paulo",
    "日本語のテキストと中文文本",
    "Emoji: 🎉🚀👩‍💻🇫🇷",
    "Digits 0123456789 and 3.14159, 1e-9, -42",
    "Runs   of    spaces\tand\ttabs",
    "Lines\nand\n\nblank lines\r\nCRLF",
    " leading and trailing spaces ",
    "Mixed: ünïcödé + ASCII + 한국어 + עברית + العربية",
]


@check("a second completion is busy; every method after release() is refused; release mid-run is safe")
def check_lifecycle(kit: Kit) -> None:
    ctx = kit.new()
    try:
        worker, box = run_in_background(ctx, {"prompt": LONG, "n_predict": -1, **no_eos(ctx)})
        try:
            ctx.completion({"prompt": PROMPT, "n_predict": 1})
        except ContextBusyError:
            pass
        else:
            raise AssertionError("a second concurrent completion did not raise ContextBusyError")
        ctx.release()  # while generating: interrupts, waits, frees
        worker.join(60)
        assert "error" not in box, f"release() during a completion made it raise {box.get('error')!r}"
        assert box["result"]["interrupted"] is True, "a completion cut by release() must report interrupted"
    finally:
        ctx.release()
    calls: dict[str, Callable[[], Any]] = {
        "completion": lambda: ctx.completion({"prompt": PROMPT}),
        "stream": lambda: ctx.stream({"prompt": PROMPT}),
        "tokenize": lambda: ctx.tokenize("x"),
        "detokenize": lambda: ctx.detokenize([1]),
        "embedding": lambda: ctx.embedding("x"),
        "bench": lambda: ctx.bench(8, 4),
        "stop_completion": ctx.stop_completion,
        "get_formatted_chat": lambda: ctx.get_formatted_chat([{"role": "user", "content": "x"}]),
        "load_session": lambda: ctx.load_session("x.session"),
        "save_session": lambda: ctx.save_session("x.session"),
    }
    for name, call in calls.items():
        try:
            call()
        except ContextReleasedError:
            continue
        raise AssertionError(f"{name}() after release() did not raise ContextReleasedError")
    ctx.release()  # idempotent


@check("tokenize then detokenize gives back ASCII, accents, CJK, emoji, digits, whitespace and newlines")
def check_tokenizer_round_trip(kit: Kit) -> None:
    ctx = kit.context()
    for text in CORPUS:
        result = ctx.tokenize(text)
        tokens = result["tokens"]
        assert tokens and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens), f"bad tokens for {text!r}"
        assert result["has_media"] is False
        back = ctx.detokenize(tokens)
        assert back == text, f"round trip changed {text!r} into {back!r}"
    assert ctx.tokenize("")["tokens"] == [] and ctx.detokenize([]) == ""


@check("embeddings have n_embd dimensions, unit norm, are deterministic, and need embedding: True")
def check_embeddings(kit: Kit) -> None:
    ctx = kit.context()
    try:
        ctx.embedding("no embeddings here")
    except EmbeddingDisabledError:
        pass
    else:
        raise AssertionError("embedding() without 'embedding': True did not raise EmbeddingDisabledError")
    if not kit.supports("embedding", embedding=True):
        refused(kit, "embedding", lambda c: c.embedding("x"))
    with kit.new(embedding=True) as ectx:
        first = ectx.embedding("The cat sat on the mat.")["embedding"]
        again = ectx.embedding("The cat sat on the mat.")["embedding"]
        other = ectx.embedding("Stock markets fell sharply today.")["embedding"]
        n_embd = ectx.model["n_embd"]
    assert len(first) == n_embd, f"embedding has {len(first)} dimensions, the model's n_embd is {n_embd}"
    assert all(isinstance(v, float) for v in first), "embedding values must be floats"
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-4), "default normalisation is not L2"
    assert first == again, "the same text gave two different embeddings"
    assert first != other, "two different texts gave the same embedding"


@check("a saved session loads in a new context, resumes from its cache, and bad files are refused")
def check_sessions(kit: Kit) -> None:
    if not kit.supports("session"):
        with tempfile.TemporaryDirectory() as folder:
            refused(kit, "session", lambda c: c.save_session(os.path.join(folder, "s.session")))
    prompt = LONG + " Once upon a time"
    ctx = kit.context()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "conformance.session")
        evaluated = ctx.completion({"prompt": prompt, "n_predict": 0})["tokens_evaluated"]  # with the BOS, if any
        n_saved = ctx.save_session(path)
        assert n_saved == evaluated, f"save_session returned {n_saved}, the cache held the prompt's {evaluated} tokens"
        follow = {"prompt": prompt + ", there was", "n_predict": 12, **GREEDY}
        expected = ctx.completion(follow)
        with kit.new() as other:
            loaded = other.load_session(path)
            # the prompt is the loaded tokens' text: a vocabulary that adds BOS puts its text in front
            assert loaded["tokens_loaded"] == n_saved and loaded["prompt"].endswith(prompt), f"load_session returned {loaded!r}"
            resumed = other.completion(follow)
            assert resumed["timings"]["cache_n"] == n_saved, "the loaded tokens were not reused"
            assert resumed["timings"]["prompt_n"] < 8 and resumed["tokens_cached"] > n_saved
            assert resumed["text"] == expected["text"], "resuming from the session changed the greedy text"
            _check_bad_session_files(other, path, folder, prompt)


def _check_bad_session_files(ctx: Any, good: str, folder: str, prompt: str) -> None:
    data = open(good, "rb").read()
    bad_files = {
        "corrupt": bytes(b ^ 0xFF for b in data[:64]) + data[64:],
        "truncated": data[: len(data) // 2],
        "foreign": b"PK\x03\x04 this is a zip file, not a session" * 10,
        "empty": b"",
        "bad token count": data[:8] + struct.pack("<I", 0xFFFFFFF0) + data[12:],
    }
    before = ctx.completion({"prompt": prompt, "n_predict": 0})["timings"]
    for name, content in bad_files.items():
        path = os.path.join(folder, name + ".session")
        with open(path, "wb") as f:
            f.write(content)
        try:
            ctx.load_session(path)
        except SessionError:
            pass
        else:
            raise AssertionError(f"a {name} session file did not raise SessionError")
        after = ctx.completion({"prompt": prompt, "n_predict": 0})["timings"]
        assert after["cache_n"] == before["cache_n"] > 0, f"a refused {name} file changed the context's cache"
