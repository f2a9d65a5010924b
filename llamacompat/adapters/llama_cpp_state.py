"""llama.rn's per-sequence state of a parallel request on llama_cpp: one slot's KV cache in a file.

``load`` fills a slot's sequence from llama.cpp's ``ggsq`` file before its prompt is evaluated, so the prompt's
shared prefix is reused; ``save`` writes one (``llama_state_seq_save_file``) after the prompt or at the end.
Both go through ``BatchEngine.exclusive`` (no decode runs meanwhile) and touch only their own sequence. Files
get the same protection as sessions (``llamacompat.sessions``): a sidecar with the checksum and the saver's
identity, checked with the header before llama.cpp reads the file, and atomic writes (a failed save leaves the
previous file and its sidecar as they were). A load hands llama.cpp the file's bytes
(``llama_state_seq_set_data``), not its path: ``llama_state_seq_load_file`` aborts the process on a file
shorter than its own counts say.

As in llama.rn, the memory written is the whole sequence, and the token list may be shorter (``save_state_size``):
a load keeps the listed tokens (or ``load_state_size`` of them) and drops the rest of the memory.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SessionError, compat_warning
from ..sessions import (
    check_identity,
    check_seq_header,
    file_tokens,
    parse_seq_header,
    read_meta,
    read_sidecar,
    save_with_media,
)
from .llama_cpp import _SESSION_HINTS, _native_detail, _recent_problems, lc, media_identity
from .llama_cpp_mtmd import is_media

if TYPE_CHECKING:
    from .llama_cpp_batch import BatchEngine

__all__ = ["StateFile", "read_checked", "load", "save", "can_cut"]

_SESSION_PREFIX = "Failed to load session: "


def _reworded(err: SessionError, what: str) -> SessionError:
    """A session check's error, said of a state file."""
    return SessionError(f"{what}: {err.message.removeprefix(_SESSION_PREFIX)}")


@dataclass
class StateFile:
    """A checked state file, read: its tokens, and its bytes in ``data`` from ``_HEADROOM`` on (the room before
    them takes the in-memory prefix ``llama_state_seq_set_data`` wants, without copying the file again)."""

    path: str
    tokens: list[int]
    data: bytearray
    offset: int  # where the sequence's memory starts in ``data``


_HEADROOM = 64


def read_checked(engine: "BatchEngine", path: str) -> StateFile:
    """The state file at ``path``, read after every check that runs without the native loader: the sidecar's
    checksum and identity (where it has one), the header's magic, version, token count (against a slot's size)
    and tokens (against the vocabulary). ``SessionError`` says what is wrong."""
    what = f"Failed to load state from: {path}"
    if not os.path.isfile(path):
        raise SessionError(f"{what}: no such file")
    adapter = engine.adapter
    try:
        saved = read_sidecar(path)
        if saved is not None:
            check_identity(saved, adapter.session_identity(), path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(_HEADROOM + size)
            got = f.readinto(memoryview(data)[_HEADROOM:])
        del data[_HEADROOM + got:]  # (a file that shrank while it was read)
    except SessionError as err:
        raise _reworded(err, what) from None
    except OSError as err:
        raise SessionError(f"{what}: cannot read it: {err.strerror or err}") from err
    header = parse_seq_header(memoryview(data)[_HEADROOM:_HEADROOM + got], got, path, what)
    check_seq_header(header, path, what, version=lc.LLAMA_STATE_SEQ_VERSION, capacity=engine.n_ctx_slot,
                     n_vocab=adapter.n_vocab, media=True)
    # media positions (-1) get their identity back from the .meta sidecar, or the tokens stop before them
    return StateFile(path, media_identity(header.tokens, read_meta(path), adapter._projector), data, _HEADROOM + header.state_offset)


def can_cut(engine: "BatchEngine") -> bool:
    """Whether a sequence's memory can drop a tail (not for recurrent or hybrid models, whose state is one)."""
    model = engine.adapter._model
    return not (lc.llama_model_is_recurrent(model) or lc.llama_model_is_hybrid(model))


def _memory_prefix(engine: "BatchEngine", seq: int) -> bytes:
    """What ``llama_state_seq_get_data`` puts before a sequence's memory, which a ``ggsq`` file holds without it
    (this llama.cpp: a magic and the sequence id), found by writing the empty ``seq`` both ways."""
    ctx = engine.adapter._ctx
    size = lc.llama_state_seq_get_size(ctx, seq)
    blob = (ctypes.c_uint8 * max(1, size))()
    got = lc.llama_state_seq_get_data(ctx, blob, size, seq)
    with tempfile.TemporaryDirectory(prefix="llamacompat-state-") as folder:
        probe = os.path.join(folder, "empty.ggsq")
        written = lc.llama_state_seq_save_file(ctx, os.fsencode(probe), seq, (lc.llama_token * 1)(), 0)
        with open(probe, "rb") as f:
            memory = f.read()[12:]
    whole = bytes(blob[:got])
    if not got or not written or not whole.endswith(memory) or len(whole) - len(memory) > _HEADROOM:
        raise SessionError("this llama.cpp writes a sequence's memory differently in files and in memory; "
                           "state files cannot be loaded safely with it")
    return whole[:len(whole) - len(memory)]


def load(engine: "BatchEngine", seq: int, state: StateFile, size: int) -> int:
    """Load the checked ``state`` into sequence ``seq``, keeping ``size`` tokens (<= 0: all); the tokens the slot
    holds now. Runs with the context to itself. On failure the sequence is empty and ``SessionError`` says why.

    The memory goes in through ``llama_state_seq_set_data`` from the bytes read, not ``llama_state_seq_load_file``,
    which aborts the process on a file shorter than its counts say (``GGML_ASSERT(nread <= state_size)``); the
    in-memory reader fails cleanly at the end of its buffer."""
    path, tokens = state.path, state.tokens
    what = f"Failed to load state from: {path}"

    def work() -> int:
        adapter, mem = engine.adapter, engine.adapter._mem
        engine._drop_tail(seq, 0)
        try:
            prefix = _memory_prefix(engine, seq)
            start = state.offset - len(prefix)
            state.data[start:state.offset] = prefix
            n_bytes = len(state.data) - start
            blob = (ctypes.c_uint8 * n_bytes).from_buffer(state.data, start)
            _recent_problems.clear()
            nread = lc.llama_state_seq_set_data(adapter._ctx, blob, n_bytes, seq)
            del blob  # (the bytearray cannot be freed while a ctypes view holds it)
            if not nread:
                detail = _native_detail() or "llama_state_seq_set_data failed"
                hint = next((h for key, h in _SESSION_HINTS.items() if key in detail), "")
                raise SessionError(f"{what}: {detail}{hint}")
            if nread != n_bytes:
                raise SessionError(f"{what}: {n_bytes - nread} bytes follow the sequence's memory (a damaged file)")
            n = len(tokens)
            low, have = lc.llama_memory_seq_pos_min(mem, seq), lc.llama_memory_seq_pos_max(mem, seq) + 1
            if n and (low != 0 or have < n):
                raise SessionError(f"{what}: its memory holds positions {low}..{have - 1}, not the {n} tokens it "
                                   "lists (a damaged or hand-made file)")
            keep = min(size, n) if size > 0 else n
            if have > keep and not lc.llama_memory_seq_rm(mem, seq, keep, -1):
                if have > n:  # a trimmed token list over a memory that cannot be cut: nothing to resume from
                    compat_warning(f"{what}: this model's memory cannot drop the positions past the file's {n} "
                                   "tokens (recurrent or hybrid); the prompt is evaluated from the start")
                    engine._drop_tail(seq, 0)
                    return 0
                compat_warning(f"completion: 'load_state_size' {size} is ignored: this model's memory cannot be "
                               "cut (recurrent or hybrid); all of the file's tokens are kept")
                keep = n
        except BaseException:
            engine._drop_tail(seq, 0)
            raise
        engine.cached[seq][:] = tokens[:keep]
        return keep

    return int(engine.exclusive(work))


def save(engine: "BatchEngine", seq: int, path: str, n_tokens: int, what: str) -> bool:
    """Save sequence ``seq`` with its first ``n_tokens`` cached tokens listed, atomically with its sidecar;
    whether it was saved. A failure leaves the previous file as it was and warns (``what`` names the save):
    the request's text stands, and a missing or older state only costs cache reuse, never changes output."""
    tokens = list(engine.cached[seq][:n_tokens])
    if not tokens:
        compat_warning(f"{what}: the state was not saved to {path} (no evaluated tokens)")
        return False
    adapter = engine.adapter

    def write(tmp: str) -> int:
        # media positions as llama.rn writes them (LLAMA_TOKEN_NULL); their identity goes in the .meta sidecar
        arr = (lc.llama_token * len(tokens))(*file_tokens(tokens, is_media))

        def native() -> tuple[int, str]:
            _recent_problems.clear()
            written = lc.llama_state_seq_save_file(adapter._ctx, os.fsencode(tmp), seq, arr, len(tokens))
            return written, "" if written else _native_detail()

        written, detail = engine.exclusive(native)
        if not written:
            raise OSError(detail or "llama_state_seq_save_file failed")
        on_disk = os.path.getsize(tmp)
        if on_disk != written:  # llama.cpp does not check the final flush: a full disk shows up here
            raise OSError(f"wrote {on_disk} of {written} bytes (is the disk full?)")
        return len(tokens)

    try:
        save_with_media(path, write, adapter.session_identity(), lambda: adapter.media_hashes(engine.cached[seq], len(tokens)))
    except (OSError, SessionError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        compat_warning(f"{what}: the state was not saved to {path} ({reason}); any previous file there is as it was")
        return False
    return True
