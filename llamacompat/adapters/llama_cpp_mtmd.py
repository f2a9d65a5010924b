"""llama.cpp's multimodal library (mtmd) for the llama_cpp adapter: a projector, media → chunks, their evaluation.

A prompt with media is one token list: text tokens as they are, and each media chunk's positions filled with
one negative placeholder id derived from its bitmap hash (llama.cpp's identity of a medium) and its place among
that medium's chunks (a sound over 30 s is one chunk per 30 s window, a sliced image one per slice, all with
the medium's one hash). So the prefix reuse that compares token lists compares media by hash too, session
files and penalties see ordinary lists, and the evaluation looks a chunk up by its placeholder.

Only projectors whose media take one position per token are taken (LLaVA-style and most others); M-RoPE
projectors (Qwen2-VL family), where an image spans fewer positions than tokens, are refused at tokenize time.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import llama_cpp as lc
import llama_cpp.mtmd_cpp as mtmd

from ..errors import GenerationError, MediaError, ModelLoadError, UnsupportedFeatureError
from ..media import MEDIA_MARKER, Media, check_media
from . import compute_thread
from .base import Interrupted

__all__ = ["Projector", "MediaTokens", "is_media", "media_start", "placeholder", "token_runs"]

_CHUNK_TEXT = 0
_KEEP_CHUNKS = 64  # media chunks kept for evaluation (the prompts in flight, and then some)
_KEEP_IDS = 65536  # placeholder -> (hash, part, n_tokens) of chunks seen: a few MB at most, for session sidecars


def is_media(token: int) -> bool:
    return token < 0


def placeholder(bitmap_hash: str, part: int = 0) -> int:
    """The placeholder id of chunk ``part`` of a medium: negative, and the same for the same bitmap hash and part."""
    key = bitmap_hash if part == 0 else hashlib.sha256(f"{bitmap_hash}#{part}".encode()).hexdigest()
    return -1 - int(key[:7] or "0", 16)


def token_runs(tokens: list[int]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of text tokens and of each media chunk (a run of one placeholder: a chunk's
    placeholder differs from its neighbours', ``Projector._walk``), in order."""
    start = 0
    while start < len(tokens):
        end, first = start + 1, tokens[start]
        while end < len(tokens) and (tokens[end] == first if is_media(first) else not is_media(tokens[end])):
            end += 1
        yield start, end
        start = end


def media_start(tokens: list[int], keep: int) -> int:
    """``keep`` moved back to the start of the medium it would cut in two (a medium is evaluated whole)."""
    while 0 < keep < len(tokens) and is_media(tokens[keep]) and tokens[keep - 1] == tokens[keep]:
        keep -= 1
    return keep


@dataclass(frozen=True)
class MediaTokens:
    """A prompt with media as one token list, and llama.rn's tokenize fields."""

    tokens: list[int]
    bitmap_hashes: list[str]  # one per medium, as llama.rn lists them
    chunk_pos: list[int]  # where each chunk (text or media) starts in ``tokens``
    chunk_pos_media: list[int]  # where each media chunk starts (a medium may have several)


class Projector:
    """One loaded mmproj file over the adapter's model."""

    def __init__(self, model: Any, path: str, use_gpu: bool, n_threads: int, image_min_tokens: int,
                 image_max_tokens: int, n_embd: int, detail: Callable[[], str]) -> None:
        if not os.path.isfile(path):
            raise ModelLoadError(f"init_multimodal: the projector file {path!r} does not exist")
        cparams = mtmd.mtmd_context_params_default()
        cparams.use_gpu = use_gpu
        cparams.n_threads = n_threads
        cparams.warmup = False  # the first image pays the graph build; loading stays fast
        cparams.print_timings = False
        cparams.media_marker = MEDIA_MARKER.encode()
        cparams.image_min_tokens, cparams.image_max_tokens = image_min_tokens, image_max_tokens
        self._ctx = mtmd.mtmd_init_from_file(path.encode(), model, cparams)
        if not self._ctx:
            why = detail()
            if "n_embd" in why or "mismatch" in why:
                raise ModelLoadError(f"init_multimodal: the projector {os.path.basename(path)} does not fit this model "
                                     f"(its output size is not the model's n_embd {n_embd}: {why}); use the mmproj "
                                     "file made for this model")
            raise ModelLoadError(f"init_multimodal: llama.cpp could not load the projector {path}"
                                 + (f" ({why})" if why else ""))
        self.vision = bool(mtmd.mtmd_support_vision(self._ctx))
        self.audio = bool(mtmd.mtmd_support_audio(self._ctx))
        self._lock = threading.Lock()
        self._chunks: collections.OrderedDict[int, Any] = collections.OrderedDict()  # placeholder -> owned chunk
        self._ids: collections.OrderedDict[int, tuple[str, int, int]] = collections.OrderedDict()  # hash, part, n

    def close(self) -> None:
        with self._lock:
            for chunk in self._chunks.values():
                mtmd.mtmd_input_chunk_free(chunk)
            self._chunks.clear()
            if self._ctx:
                mtmd.mtmd_free(self._ctx)
                self._ctx = None

    def _bitmap(self, medium: Media, i: int) -> Any:
        kind = "audio" if medium.is_audio else "image"
        buf = (ctypes.c_uint8 * len(medium.data)).from_buffer_copy(medium.data)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(medium.data), False)
        if not bitmap:
            raise MediaError(f"media {i} ({medium.source[:60]}): cannot decode it as an {kind} (is the file corrupt, "
                             "or of a format llama.cpp does not read? images: PNG, JPEG, BMP, GIF; audio: WAV, MP3)")
        return bitmap

    def tokenize(self, text: str, media: list[Media], add_special: bool) -> MediaTokens:
        check_media(media, {"vision": self.vision, "audio": self.audio}, text)
        bitmaps: list[Any] = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for i, medium in enumerate(media):
                bitmaps.append(self._bitmap(medium, i))
            raw = text.encode("utf-8")
            inp = mtmd.mtmd_input_text(raw, len(raw), add_special, True)
            arr = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if rc != 0:
                raise MediaError(f"llama.cpp could not prepare the media (mtmd_tokenize returned {rc})")
            hashes = [(mtmd.mtmd_bitmap_get_id(bitmap) or b"").decode() for bitmap in bitmaps]
            return self._walk(chunks, hashes)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
            mtmd.mtmd_input_chunks_free(chunks)

    def _walk(self, chunks: Any, hashes: list[str]) -> MediaTokens:
        tokens: list[int] = []
        pos: list[int] = []
        pos_media: list[int] = []
        run: tuple[str, int] = ("", -1)  # the hash of the media chunks since the last text chunk, and their count
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            pos.append(len(tokens))
            if mtmd.mtmd_input_chunk_get_type(chunk) == _CHUNK_TEXT:
                run = ("", -1)
                n = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ptr[j] for j in range(n.value))
                continue
            n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if mtmd.mtmd_input_chunk_get_n_pos(chunk) != n_tokens:
                raise UnsupportedFeatureError("this projector places media on fewer positions than tokens (M-RoPE, "
                                              "as Qwen2-VL does); llamacompat does not evaluate such projectors yet")
            bitmap_hash = (mtmd.mtmd_input_chunk_get_id(chunk) or b"").decode()
            # a medium's chunks are numbered within it: a text chunk or another hash starts the next medium (the
            # same image again later in the prompt is part 0 again, so a session lists it as a medium of its own)
            run = (bitmap_hash, run[1] + 1 if run[0] == bitmap_hash else 0)
            part = run[1]
            token = placeholder(bitmap_hash, part)
            self._keep(token, chunk, bitmap_hash, part, n_tokens)
            pos_media.append(len(tokens))
            tokens.extend([token] * n_tokens)
        if len(pos_media) > _KEEP_CHUNKS:
            raise MediaError(f"the prompt's media make {len(pos_media)} chunks, more than the {_KEEP_CHUNKS} kept for "
                             "evaluation (a sound is one chunk per 30 s): send shorter or fewer media")
        return MediaTokens(tokens, hashes, pos, pos_media)

    def _keep(self, token: int, chunk: Any, bitmap_hash: str, part: int, n_tokens: int) -> None:
        self.remember(token, bitmap_hash, part, n_tokens)
        with self._lock:
            if token in self._chunks:
                self._chunks.move_to_end(token)
                return
            self._chunks[token] = mtmd.mtmd_input_chunk_copy(chunk)
            while len(self._chunks) > _KEEP_CHUNKS:
                mtmd.mtmd_input_chunk_free(self._chunks.popitem(last=False)[1])

    def remember(self, token: int, bitmap_hash: str, part: int, n_tokens: int) -> None:
        """A placeholder a loaded session brings back (no chunk to evaluate: its KV is cached), so a later save
        can name its medium again."""
        with self._lock:
            self._ids[token] = (bitmap_hash, part, n_tokens)
            self._ids.move_to_end(token)
            if len(self._ids) > _KEEP_IDS:
                self._ids.popitem(last=False)

    def identity(self, token: int) -> tuple[str, int, int] | None:
        """The bitmap hash, the part (chunk) of its medium and the token count of the placeholder ``token``, if seen."""
        with self._lock:
            return self._ids.get(token)

    def evaluate(self, lctx: Any, token: int, n_past: int, n_batch: int, stop: Any, seq: int = 0) -> int:
        """Encode the medium ``token`` stands for and decode its embeddings at ``n_past`` of sequence ``seq`` (on
        the compute thread, as every decode); its token count."""
        with self._lock:
            chunk = self._chunks.get(token)
            if chunk is not None:
                self._chunks.move_to_end(token)
        if chunk is None:
            raise GenerationError("a medium of this prompt is no longer at hand (tokenized too long ago); send the "
                                  "prompt again")
        if stop is not None and stop.is_set():  # before the encoder, which cannot be interrupted
            raise Interrupted()
        new_n_past = lc.llama_pos(0)
        rc = compute_thread.run(mtmd.mtmd_helper_eval_chunk_single, self._ctx, lctx, chunk, n_past, seq, n_batch,
                                True, ctypes.byref(new_n_past))
        if stop is not None and stop.is_set():
            raise Interrupted()
        if rc != 0:
            raise GenerationError(f"llama.cpp failed to evaluate a medium (mtmd_helper_eval_chunk_single returned {rc})")
        return int(new_n_past.value) - n_past
