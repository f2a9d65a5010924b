"""llama.cpp through llama-cpp-python's ctypes bindings (``llama_cpp.llama_*``).

We drive llama.h directly rather than the ``Llama`` class: it gives us the load
progress callback, llama.cpp's own sampler chain with every llama.rn setting,
return codes of ``llama_decode`` (abort vs. no KV slot vs. fatal), and no
per-token work beyond decode + sample.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import itertools
import logging
import math
import os
import threading
import warnings
from typing import Any, Callable

import numpy as np

from ..errors import (
    BackendUnavailableError,
    ContextFullError,
    GenerationError,
    GrammarError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    MultimodalNotEnabledError,
    OutOfMemoryError,
    SessionError,
    UnsupportedFeatureError,
    map_exceptions,
)
from ..grammars.guidance import Guide
from ..grammars.lark import NoLarkEquivalent
from ..sessions import NULL_TOKEN, check_header, file_tokens, read_header, read_meta
from . import compute_thread
from .base import (  # default_threads: imported from here before it moved to base
    RUNTIME_FAILURES,
    Adapter,
    Capabilities,
    Interrupted,
    NoTokenAllowed,
    SamplingParams,
    default_threads,
    reusable_prefix,
)
from .llama_cpp_mtmd import MediaTokens, Projector, is_media, media_start, placeholder, token_runs

try:
    import llama_cpp as lc
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise BackendUnavailableError(
        "the llama_cpp backend needs llama-cpp-python: pip install 'llamacompat[llama-cpp]'"
    ) from err

__all__ = ["LlamaCppAdapter"]

logger = logging.getLogger(__name__)

# -- llama.cpp log routing ---------------------------------------------------
# llama.cpp logs through one global callback. We send it to Python logging
# (nothing on stderr) and keep the last warnings/errors so a failure can say why.
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_recent_problems: collections.deque[str] = collections.deque(maxlen=8)
_last_level = [logging.DEBUG]
_native_logger = logging.getLogger("llamacompat.native.llama_cpp")


@lc.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    py_level = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = py_level
    message = text.decode("utf-8", "replace").rstrip("\n")
    if py_level >= logging.WARNING and message:
        _recent_problems.append(message)
    if message and _native_logger.isEnabledFor(py_level):
        _native_logger.log(py_level, "%s", message)


lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
lc.llama_backend_init()


def _native_detail() -> str:
    """The last warnings/errors llama.cpp logged, for an exception message."""
    lines = [line.strip() for line in _recent_problems if line.strip()]
    _recent_problems.clear()
    return "; ".join(lines[-3:])


_CACHE_TYPES = {
    "f32": lc.GGML_TYPE_F32, "f16": lc.GGML_TYPE_F16, "bf16": 30, "q8_0": lc.GGML_TYPE_Q8_0,
    "q4_0": lc.GGML_TYPE_Q4_0, "q4_1": lc.GGML_TYPE_Q4_1, "iq4_nl": lc.GGML_TYPE_IQ4_NL,
    "q5_0": lc.GGML_TYPE_Q5_0, "q5_1": lc.GGML_TYPE_Q5_1,
}
_POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
_NULL_ABORT = lc.ggml_abort_callback()
# llama.cpp's default progress callback prints dots on stderr; this one stays quiet.
_QUIET_PROGRESS = lc.llama_progress_callback(lambda _fraction, _user: True)


# What a native session-load failure usually means, and the fix.
_SESSION_HINTS = {
    "V transposition": " (saved with another flash-attention setting: match 'flash_attn_type'; "
                       "llama-cpp-python's Llama defaults to flash_attn=False, i.e. 'off')",
    "key type": " (saved with another 'cache_type_k')",
    "value type": " (saved with another 'cache_type_v')",
    "row size": " (saved by a model of another shape)",
    "layer count": " (saved by a model with another layer count)",
    "cells": " (the file holds more tokens than this context's n_ctx)",
}


_DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel")


def media_identity(tokens: list[int], hashes: list[str], projector: Projector | None = None) -> list[int]:
    """A session file's tokens with each medium's ``-1`` positions as its placeholder again, from the ``.meta``
    sidecar's ``hashes``; cut before the first medium when they cannot be matched one to one (no sidecar, or
    media side by side, whose runs cannot be told apart): those media are evaluated again, as llama.rn does.

    A medium of several chunks (a sound over 30 s) gets its first chunk's placeholder throughout: a new prompt
    with the same medium reuses that first chunk and evaluates the rest again (the file does not say where
    its chunks end). ``projector`` learns the placeholders back, so a later save can name their media."""
    runs = [i for i, t in enumerate(tokens) if t == NULL_TOKEN and (i == 0 or tokens[i - 1] != NULL_TOKEN)]
    if not runs:
        return tokens
    if len(runs) != len(hashes):
        return tokens[:runs[0]]
    out = list(tokens)
    for start, bitmap_hash in zip(runs, hashes, strict=True):
        end, token = start, placeholder(bitmap_hash)
        while end < len(out) and out[end] == NULL_TOKEN:
            out[end] = token
            end += 1
        if projector is not None:
            projector.remember(token, bitmap_hash, 0, end - start)
    return out


@functools.cache
def _ggml() -> Any:
    """libggml's device-registry functions, bound once; None without them.

    dlsym on libllama's handle finds ggml in libllama's own dependencies. (llama_cpp._ggml opens libggml.so
    by another file name: a second copy of ggml, whose set-up corrupts the first one's.)
    """
    lib = lc.llama_cpp._lib
    if not hasattr(lib, "ggml_backend_dev_count"):
        return None
    dev = ctypes.c_void_p
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [ctypes.c_size_t], dev
    for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [dev], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [dev], ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [dev, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_by_name.argtypes, lib.ggml_backend_dev_by_name.restype = [ctypes.c_char_p], dev
    lib.ggml_backend_dev_by_type.argtypes, lib.ggml_backend_dev_by_type.restype = [ctypes.c_int], dev
    lib.ggml_backend_dev_buffer_type.argtypes, lib.ggml_backend_dev_buffer_type.restype = [dev], ctypes.c_void_p
    return lib


class _BuftOverride(ctypes.Structure):
    """llama_model_tensor_buft_override: tensors whose name matches ``pattern`` go to buffer type ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _device_list(names: list[str]) -> Any:
    """llama_model_params.devices: the named ggml devices, NULL-terminated; an unknown name is bad input."""
    lib = _ggml()
    known = [d["deviceName"] for d in _ggml_devices()]
    handles = []
    for name in names:
        handle = lib.ggml_backend_dev_by_name(name.encode()) if lib is not None else None
        if not handle:
            raise InvalidParamsError(f"init_llama: no backend device named {name!r}; this build has "
                                     f"{', '.join(known) or 'none'} (get_backend_devices_info lists them)")
        handles.append(handle)
    return (ctypes.c_void_p * (len(handles) + 1))(*handles, None)


def _cpu_moe_overrides(n_layers: int) -> Any:
    """llama.rn's n_cpu_moe: the MoE expert tensors of the first ``n_layers`` layers stay in CPU memory."""
    lib = _ggml()
    if lib is None:
        raise UnsupportedFeatureError("init_llama: 'n_cpu_moe' needs ggml's device registry, which this build lacks")
    cpu = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_by_type(0))  # GGML_BACKEND_DEVICE_TYPE_CPU
    rules = [_BuftOverride(f"blk\\.{i}\\.ffn_(up|down|gate)_exps".encode(), cpu) for i in range(n_layers)]
    return (_BuftOverride * (n_layers + 1))(*rules, _BuftOverride(None, None))


def _ggml_devices() -> list[dict[str, Any]]:
    """ggml's device registry (llama.rn's getBackendDevicesInfo): llama-cpp-python binds none of it, so we do."""
    lib = _ggml()
    out: list[dict[str, Any]] = []
    for i in range(lib.ggml_backend_dev_count() if lib is not None else 0):
        handle = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        kind = lib.ggml_backend_dev_type(handle)
        out.append({
            "backend": "llama_cpp", "type": _DEVICE_TYPES[kind] if 0 <= kind < len(_DEVICE_TYPES) else str(kind),
            "deviceName": lib.ggml_backend_dev_name(handle).decode("utf-8", "replace"),
            "maxMemorySize": int(total.value),
            "metadata": {"description": lib.ggml_backend_dev_description(handle).decode("utf-8", "replace"),
                         "freeMemory": int(free.value)},
        })
    return out


class LlamaCppAdapter(Adapter):
    name = "llama_cpp"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return model_path.lower().endswith(".gguf")

    @classmethod
    def backend_devices(cls) -> list[dict[str, Any]]:
        return _ggml_devices()

    @classmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "LlamaCppAdapter":
        path = params["model"]
        if not os.path.isfile(path):
            raise ModelLoadError(f"Failed to load model: no such file: {path}")
        for key in ("cache_type_k", "cache_type_v"):
            if params[key] not in _CACHE_TYPES:
                raise InvalidParamsError(
                    f"init_llama: '{key}' must be one of {', '.join(_CACHE_TYPES)}, got {params[key]!r}"
                )

        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0 if params["no_gpu_devices"] else params["n_gpu_layers"]
        keep: list[Any] = []  # the arrays the load reads, alive until it returns
        if params["devices"]:
            keep.append(_device_list(list(params["devices"])))
            mparams.devices = ctypes.cast(keep[-1], ctypes.c_void_p)
        if params["n_cpu_moe"]:
            keep.append(_cpu_moe_overrides(params["n_cpu_moe"]))
            mparams.tensor_buft_overrides = ctypes.cast(keep[-1], ctypes.c_void_p)
        mparams.vocab_only = params["vocab_only"]
        mparams.use_extra_bufts = not params["no_extra_bufts"]
        mmap, mlock = params["use_mmap"], params["use_mlock"]
        mparams.load_mode = (
            lc.LLAMA_LOAD_MODE_MMAP_MLOCK if mmap and mlock
            else lc.LLAMA_LOAD_MODE_MLOCK if mlock
            else lc.LLAMA_LOAD_MODE_MMAP if mmap
            else lc.LLAMA_LOAD_MODE_NONE
        )
        progress_cb = _QUIET_PROGRESS
        if on_progress is not None:
            def _progress(fraction: float, _user: ctypes.c_void_p) -> bool:
                return bool(on_progress(fraction) is not False)

            progress_cb = lc.llama_progress_callback(_progress)
        mparams.progress_callback = progress_cb

        _recent_problems.clear()
        model = lc.llama_model_load_from_file(os.fsencode(path), mparams)
        if not model:
            detail = _native_detail()
            raise ModelLoadError(f"Failed to load model: {path}" + (f" ({detail})" if detail else ""))
        try:
            return cls(model, params)
        except BaseException:
            lc.llama_model_free(model)
            raise

    def __init__(self, model: Any, params: dict[str, Any]) -> None:
        self._model = model
        self._ctx = None
        self._vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.n_embd = lc.llama_model_n_embd(model)
        n_ctx_train = lc.llama_model_n_ctx_train(model)
        self.n_ctx = self.n_ctx_context = params["n_ctx"] or n_ctx_train  # n_ctx: one sequence's room (below)
        self._n_batch = min(params["n_batch"], self.n_ctx)
        # Pooled embeddings need the whole input in one physical batch (llama.rn does the same).
        n_ubatch = self._n_batch if params["embedding"] else min(params["n_ubatch"], self._n_batch)
        self.n_threads = params["n_threads"] or default_threads()
        self._threads_now = self.n_threads  # a completion's own n_threads changes it for its run (set_threads)
        self.embedding_enabled = params["embedding"]

        cparams = lc.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = n_ubatch
        # Parallel mode's slots are llama.cpp sequences: as many as the most slots asked for (llama.rn's n_parallel).
        # One KV cache shared by them (kv_unified) unless asked otherwise: a plain completion then keeps all n_ctx.
        n_seq = cparams.n_seq_max = params["n_parallel"]
        unified = params["kv_unified"] if params["kv_unified"] is not None else n_seq > 1
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        pooling = params.get("pooling_type")
        # A generative model has no pooling of its own; mean pooling gives a usable sentence vector.
        cparams.pooling_type = _POOLING[pooling] if pooling else (_POOLING["mean"] if self.embedding_enabled else -1)
        cparams.flash_attn_type = _FLASH_ATTN[params["flash_attn_type"]]
        cparams.type_k = _CACHE_TYPES[params["cache_type_k"]]
        cparams.type_v = _CACHE_TYPES[params["cache_type_v"]]
        cparams.rope_freq_base = params["rope_freq_base"]
        cparams.rope_freq_scale = params["rope_freq_scale"]
        cparams.kv_unified = unified
        cparams.swa_full = params["swa_full"]
        cparams.embeddings = False  # switched on only inside embedding()
        cparams.no_perf = True
        self._flash_attn = cparams.flash_attn_type
        self._cache_types = (params["cache_type_k"], params["cache_type_v"])
        offload = 0 if params["no_gpu_devices"] else params["n_gpu_layers"]
        self._n_gpu_layers = offload if lc.llama_supports_gpu_offload() else 0
        found = _ggml_devices()
        if params["devices"]:  # the model uses only the devices it was given
            found = [d for d in found if d["deviceName"] in params["devices"]]
        gpus = [d["deviceName"] for d in found if d["type"] in ("gpu", "igpu")]
        self.gpu = bool(gpus) and self._n_gpu_layers != 0
        self.devices = gpus if self.gpu else [d["deviceName"] for d in found if d["type"] == "cpu"] or ["CPU"]
        self.reason_no_gpu = ("" if self.gpu else "GPU devices disabled by user" if gpus
                              else "GPU backend is not available")
        if not params["vocab_only"]:
            self._ctx = lc.llama_init_from_model(model, cparams)
            if not self._ctx:
                detail = _native_detail()
                err = OutOfMemoryError if "alloc" in detail.lower() or "memory" in detail.lower() else ModelLoadError
                raise err(f"Failed to load model: cannot create a context of {self.n_ctx} tokens" + (f" ({detail})" if detail else ""))
            self._mem = lc.llama_get_memory(self._ctx)
            self.pooling = lc.llama_pooling_type(self._ctx)
            # Without kv_unified each sequence has n_ctx / n_seq_max cells (llama.cpp pads the total to 256)
            share = self.n_ctx if unified else self.n_ctx // n_seq
            self.n_ctx = min(share, int(lc.llama_n_ctx_seq(self._ctx)) or share)

        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        bos, eos = lc.llama_vocab_bos(self._vocab), lc.llama_vocab_eos(self._vocab)
        self.bos_text = self.token_to_piece(bos).decode("utf-8", "replace") if bos >= 0 else ""
        self.eos_text = self.token_to_piece(eos).decode("utf-8", "replace") if eos >= 0 else ""
        self._metadata = self._read_metadata()
        self.chat_template = self._metadata.get("tokenizer.chat_template")
        self._table_lock = threading.Lock()  # the vocabulary scans below run once, even when slots ask at once
        self._eog_ids: list[int] | None = None
        self._tokens: list[int] = []  # what the KV cache holds for sequence 0, in order
        self._table: Any = None  # llguidance's tokenizer (grammar_table)
        self._masker: concurrent.futures.ThreadPoolExecutor | None = None  # computes masks beside llama_decode
        self._gen = _Generation(self, _Solo(self))  # plain completions: sequence 0, evaluated at once
        self._projector: Projector | None = None  # init_multimodal's
        self._loras: dict[str, Any] = {}  # path -> llama_adapter_lora, loaded once, freed with the model
        ranking = self._ctx is not None and self.embedding_enabled and self.pooling == _POOLING["rank"]
        self.capabilities = Capabilities(self.name, {
            "completion": "native", "streaming": "native", "stop": "emulated", "grammar": "native", "lazy_grammar": "emulated",
            "temperature": "native", "top_k": "native", "top_p": "native", "min_p": "native",
            "typical_p": "native", "xtc": "native", "top_n_sigma": "native", "penalties": "native",
            "mirostat": "native", "dry": "native", "seed": "native", "logit_bias": "native",
            "ignore_eos": "native", "n_probs": "native", "tokenize": "native", "detokenize": "native",
            "thinking_budget": "native",
            "embedding": "native" if self.embedding_enabled and not ranking else "missing", "bench": "native",
            "rerank": "native" if ranking else "emulated" if self.embedding_enabled else "missing",
            "lora": "native", "parallel": "native", "multimodal": "native" if self._ctx is not None else "missing",
            **({"completion": "missing", "parallel": "missing", "embedding": "missing", "bench": "missing", "rerank": "missing",
                "lora": "missing"} if self._ctx is None else {}),
            "interrupt_prompt": "native", "chat_template": "emulated",
            "session": "native" if self._ctx is not None else "missing",
            "prefix_cache": "native" if self._ctx is not None else "missing",
        })

    # -- model description -------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1024)
        for i in range(lc.llama_model_meta_count(self._model)):
            values = []
            for fn in (lc.llama_model_meta_key_by_index, lc.llama_model_meta_val_str_by_index):
                n = fn(self._model, i, buf, len(buf))
                if n >= len(buf):  # truncated: grow to fit and read again
                    big = ctypes.create_string_buffer(n + 1)
                    fn(self._model, i, big, len(big))
                    values.append(big.value.decode("utf-8", "replace"))
                else:
                    values.append(buf.value.decode("utf-8", "replace"))
            out[values[0]] = values[1]
        return out

    def model_info(self) -> dict[str, Any]:
        buf = ctypes.create_string_buffer(256)
        lc.llama_model_desc(self._model, buf, len(buf))
        return {
            "desc": buf.value.decode("utf-8", "replace"),
            "size": int(lc.llama_model_size(self._model)),
            "n_embd": self.n_embd,
            "n_params": int(lc.llama_model_n_params(self._model)),
            "n_ctx_train": int(lc.llama_model_n_ctx_train(self._model)),
            "is_recurrent": bool(lc.llama_model_is_recurrent(self._model)),
            "is_hybrid": bool(lc.llama_model_is_hybrid(self._model)),
            "metadata": dict(self._metadata),
        }

    # -- tokens -------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (lc.llama_token * capacity)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (lc.llama_token * capacity)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        return buf[:n]

    def token_to_piece(self, token: int) -> bytes:
        piece = self._pieces[token]
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self._vocab, token, buf, 64, 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, -n, 0, True)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: list[int]) -> str:
        if not tokens:
            return ""
        arr = (lc.llama_token * len(tokens))(*tokens)
        capacity = max(64, len(tokens) * 8)
        buf = ctypes.create_string_buffer(capacity)
        n = lc.llama_detokenize(self._vocab, arr, len(tokens), buf, capacity, False, True)
        if n < 0:
            capacity = -n
            buf = ctypes.create_string_buffer(capacity)
            n = lc.llama_detokenize(self._vocab, arr, len(tokens), buf, capacity, False, True)
        return buf.raw[:n].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    def _eog_mask(self) -> np.ndarray:
        """The end-of-generation tokens as a boolean mask over the vocabulary (for NoTokenAllowed.judge)."""
        mask = np.zeros(self.n_vocab, dtype=np.bool_)
        mask[self._eog_tokens()] = True
        return mask

    def _eog_tokens(self) -> list[int]:
        if self._eog_ids is None:
            with self._table_lock:  # one scan of the vocabulary (~0.1 s), even when parallel slots ask at once
                if self._eog_ids is None:
                    self._eog_ids = [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self._vocab, t)]
        return self._eog_ids

    # -- evaluation ---------------------------------------------------------
    def _decode(self, tokens: list[int], stop: threading.Event | None = None) -> None:
        """Evaluate ``tokens`` after the cached ones, ``n_batch`` at a time; a medium's run of placeholders
        (``llama_cpp_mtmd``) through its projector."""
        for start, end in token_runs(tokens):
            if is_media(tokens[start]):
                self._decode_medium(tokens[start], stop)
                continue
            for at in range(start, end, self._n_batch):
                chunk = tokens[at:min(end, at + self._n_batch)]
                arr = (lc.llama_token * len(chunk))(*chunk)
                # on the compute thread, as every decode: one OpenMP team (compute_thread.py)
                self._check(compute_thread.run(lc.llama_decode, self._ctx, lc.llama_batch_get_one(arr, len(chunk))))
                self._tokens.extend(chunk)

    def _decode_medium(self, token: int, stop: threading.Event | None) -> None:
        if self._projector is None:
            raise MultimodalNotEnabledError()
        n_past = len(self._tokens)
        try:
            n = self._projector.evaluate(self._ctx, token, n_past, self._n_batch, stop)
        except (Interrupted, LlamaError):
            lc.llama_memory_seq_rm(self._mem, -1, n_past, -1)  # a medium is cached whole or not at all
            raise
        self._tokens.extend([token] * n)

    def _check(self, rc: int) -> None:
        if rc == 0:
            return
        # Aborted or failed: llama.cpp keeps some ubatches and drops others (it may drop
        # from the failed batch's start). Trust the cache, not our record: keep what both hold.
        kept = min(len(self._tokens), lc.llama_memory_seq_pos_max(self._mem, 0) + 1)
        del self._tokens[kept:]
        lc.llama_memory_seq_rm(self._mem, -1, kept, -1)
        if rc == 2:
            raise Interrupted()
        detail = _native_detail()
        if rc == 1:
            raise ContextFullError(f"Context is full: no KV cache slot for the batch ({detail or 'n_ctx ' + str(self.n_ctx)})")
        raise GenerationError(f"llama_decode failed with code {rc}" + (f" ({detail})" if detail else ""))

    def _rewind(self, keep: int) -> None:
        """Keep only the first ``keep`` cached tokens."""
        if keep < len(self._tokens):
            if not lc.llama_memory_seq_rm(self._mem, -1, keep, -1):
                lc.llama_memory_clear(self._mem, True)  # recurrent models cannot drop a tail
                keep = 0
            del self._tokens[keep:]

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        # (a vocab_only context lists completion, embedding, bench and session as "missing":
        # LlamaContext refuses those calls before they reach the adapter)
        return self._gen.begin(prompt, sampling, stop)

    def next_token(self) -> int:
        return self._gen.next_token()

    def force_token(self, token: int) -> int:
        return self._gen.force_token(token)

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        return self._gen.top_probs(n)

    def end(self) -> None:
        self._gen.end()

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def last_guide(self) -> Guide | None:
        """The last completion's llguidance guide, for bench/bench_grammar.py's figures."""
        return self._gen.last_guide


    # -- llguidance: the grammar as a mask on the logits, llama.cpp's chain for the rest ---------------------
    def grammar_table(self) -> Any:
        """llguidance's view of this vocabulary (about a second to build: once per context)."""
        eog = self._eog_tokens()
        with self._table_lock:  # parallel slots may ask at once: build it once
            if self._table is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                with warnings.catch_warnings():  # it reads token attributes through a name llama-cpp-python deprecates
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._table = lltokenizer_from_vocab(self._vocab, eos_token=eog)
        return self._table

    def _guide_for(self, s: SamplingParams) -> Guide | None:
        """The llguidance guide of the request's grammar; None for no grammar, or for llama.cpp's own engine
        (asked for, or the only one that takes the grammar: negated token references)."""
        if s.grammar is None or s.grammar_engine == "llama_cpp":
            if s.grammar_lazy:
                raise UnsupportedFeatureError("completion: lazy grammars run on grammar_engine 'llguidance' (or 'auto')")
            return None
        try:
            return Guide(self.grammar_table(), s.grammar, self.n_vocab, lazy=s.grammar_lazy, triggers=s.grammar_triggers,
                         piece=self.token_to_piece, tokenize=self._tokenize_plain)
        except NoLarkEquivalent:
            if s.grammar_engine == "auto" and not s.grammar_lazy:
                return None
            raise

    def _mask_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._masker is None:
            self._masker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamacompat-grammar")
        return self._masker

    def _tokenize_plain(self, text: str) -> list[int]:
        """Tokens of ``text`` with special-token look-alikes as plain text (what a grammar literal matches)."""
        data = text.encode("utf-8")
        buf = (lc.llama_token * (len(data) + 8))()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, False)
        return buf[:n]

    def open_batch(self, n_parallel: int, n_batch: int) -> Any:
        from .llama_cpp_batch import BatchEngine  # parallel mode only

        return BatchEngine(self, n_parallel, n_batch)

    def set_threads(self, n_threads: int) -> int | None:
        previous = self._threads_now
        if n_threads != previous:
            lc.llama_set_n_threads(self._ctx, n_threads, n_threads)
            self._threads_now = n_threads
        return previous

    def system_info(self) -> str:
        return lc.llama_print_system_info().decode("utf-8", "replace")

    # -- sampling -----------------------------------------------------------
    def _build_sampler(self, s: SamplingParams, prompt: list[int]) -> tuple[Any, Any, Any]:
        """llama.cpp's chain in llama.rn's order: (chain, its grammar sampler, chain after the grammar).

        Without a grammar it is one chain (``llama_sampler_sample`` as it is); with one, the chain ends at
        the grammar and the rest is a second chain, so ``_sample_checked`` can look in between.
        """
        chains = [lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())]
        add = lambda smpl: lc.llama_sampler_chain_add(chains[-1], smpl)  # noqa: E731
        grammar = None
        try:
            seed = s.seed if s.seed >= 0 else lc.LLAMA_DEFAULT_SEED
            bias = list(s.logit_bias)
            if s.ignore_eos:
                bias += [(t, -math.inf) for t in self._eog_tokens()]
            if bias:
                arr = (lc.llama_logit_bias * len(bias))()
                for i, (token, value) in enumerate(bias):
                    arr[i] = lc.llama_logit_bias(token, value)
                add(lc.llama_sampler_init_logit_bias(self.n_vocab, len(bias), arr))
            # Windows past n_ctx see no more tokens (no context shift), and llama.cpp allocates the whole window
            # up front: 2**31 - 1 took 16 GB and a minute per request.
            window = lambda n: self.n_ctx if n == -1 else min(n, self.n_ctx)  # noqa: E731
            history = [t for t in prompt if t >= 0] if prompt else []  # media placeholders are no tokens
            history = history[-max(s.penalty_last_n, s.dry_penalty_last_n, 0):]
            if s.penalty_repeat != 1.0 or s.penalty_freq != 0.0 or s.penalty_present != 0.0:
                last_n = window(s.penalty_last_n)
                pen = lc.llama_sampler_init_penalties(self.n_vocab, last_n, s.penalty_repeat, s.penalty_freq, s.penalty_present)
                for token in history[-last_n:] if last_n else ():
                    lc.llama_sampler_accept(pen, token)  # the prompt counts as history, as in llama.cpp's server
                add(pen)
            if s.dry_multiplier > 0:
                breakers = (ctypes.c_char_p * len(s.dry_sequence_breakers))(*(b.encode() for b in s.dry_sequence_breakers))
                last_n = window(s.dry_penalty_last_n)
                dry = lc.llama_sampler_init_dry(self._vocab, s.dry_multiplier, s.dry_base, s.dry_allowed_length,
                                                last_n, breakers, len(s.dry_sequence_breakers))
                add(dry)
            if s.grammar is not None:
                _recent_problems.clear()
                grammar = lc.llama_sampler_init_grammar(self._vocab, s.grammar.encode("utf-8"), b"root")
                if not grammar:
                    detail = _native_detail()
                    raise GrammarError("Failed to initialize sampling: invalid grammar" + (f" ({detail})" if detail else ""))
                add(grammar)
                chains.append(lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params()))
            if s.temperature <= 0:
                add(lc.llama_sampler_init_greedy())
            elif s.mirostat == 1:
                add(lc.llama_sampler_init_temp(s.temperature))
                add(lc.llama_sampler_init_mirostat(self.n_vocab, seed, s.mirostat_tau, s.mirostat_eta, 100))
            elif s.mirostat == 2:
                add(lc.llama_sampler_init_temp(s.temperature))
                add(lc.llama_sampler_init_mirostat_v2(seed, s.mirostat_tau, s.mirostat_eta))
            else:
                if s.top_n_sigma > 0:
                    add(lc.llama_sampler_init_top_n_sigma(s.top_n_sigma))
                if s.top_k > 0:
                    add(lc.llama_sampler_init_top_k(s.top_k))
                if s.typical_p < 1.0:
                    add(lc.llama_sampler_init_typical(s.typical_p, 1))
                if s.top_p < 1.0:
                    add(lc.llama_sampler_init_top_p(s.top_p, 1))
                if s.min_p > 0.0:
                    add(lc.llama_sampler_init_min_p(s.min_p, 1))
                if s.xtc_probability > 0.0:
                    add(lc.llama_sampler_init_xtc(s.xtc_probability, s.xtc_threshold, 1, seed))
                add(lc.llama_sampler_init_temp(s.temperature))
                add(lc.llama_sampler_init_dist(seed))
        except BaseException:
            for chain in chains:
                lc.llama_sampler_free(chain)
            raise
        return chains[0], grammar, chains[1] if len(chains) > 1 else None

    # -- embeddings, rerank and bench ----------------------------------------
    def embedding(self, tokens: list[int]) -> list[float]:
        return self._pooled(tokens, self.n_embd, "embed")

    def rank(self, query: list[int], document: list[int]) -> float:
        return self._pooled(self._rerank_input(query, document), 1, "rerank")[0]

    def _rerank_input(self, query: list[int], document: list[int]) -> list[int]:
        """llama.cpp's reranker input: [BOS] query [EOS] [SEP] document [EOS]."""
        bos, eos, sep = (lc.llama_vocab_bos(self._vocab), lc.llama_vocab_eos(self._vocab),
                         lc.llama_vocab_sep(self._vocab))
        end = eos if eos >= 0 else sep
        tokens = [bos] if self.add_bos and bos >= 0 else []
        tokens += query + ([end] if end >= 0 else [])
        if lc.llama_vocab_get_add_sep(self._vocab) and sep >= 0:
            tokens.append(sep)
        return tokens + document + ([end] if end >= 0 else [])

    def _pooled(self, tokens: list[int], width: int, what: str, seq: int | None = None) -> list[float]:
        """One pooled output of ``tokens`` (``width`` floats: n_embd, or the rank head's score).

        ``seq`` None: the whole cache is cleared before and after (llama.rn clears it too); a sequence number (a
        parallel slot, emptied by the caller): only that sequence is used."""
        if len(tokens) > self._n_batch:
            raise ContextFullError(f"Context is full: {len(tokens)} tokens to {what}, n_batch is {self._n_batch}")
        if seq is None:
            lc.llama_memory_clear(self._mem, True)
            self._tokens.clear()
        lc.llama_set_embeddings(self._ctx, True)
        batch = lc.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = seq or 0
            batch.n_tokens = len(tokens)
            rc = compute_thread.run(lc.llama_decode, self._ctx, batch)
            if rc != 0:
                raise GenerationError(f"llama_decode failed with code {rc} while trying to {what} ({_native_detail()})")
            if self.pooling == _POOLING["none"]:
                data = lc.llama_get_embeddings_ith(self._ctx, -1)
            else:
                data = lc.llama_get_embeddings_seq(self._ctx, seq or 0)
            if not data:
                raise GenerationError("llama.cpp returned no embedding")
            return data[:width]
        finally:
            lc.llama_batch_free(batch)
            lc.llama_set_embeddings(self._ctx, False)
            if seq is None:
                lc.llama_memory_clear(self._mem, True)

    # -- LoRA adapters and the cache ----------------------------------------
    def set_lora(self, adapters: list[tuple[str, float]]) -> None:
        for path, _ in adapters:
            if path not in self._loras:
                _recent_problems.clear()
                loaded = lc.llama_adapter_lora_init(self._model, os.fsencode(path))
                if not loaded:
                    detail = _native_detail()
                    raise ModelLoadError(f"Failed to apply lora adapters: {path}" + (f" ({detail})" if detail else ""))
                self._loras[path] = loaded
        ptrs = (lc.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(*(self._loras[p] for p, _ in adapters))
        scales = (ctypes.c_float * max(1, len(adapters)))(*(scale for _, scale in adapters))
        if lc.llama_set_adapters_lora(self._ctx, ptrs if adapters else None, len(adapters),
                                      scales if adapters else None) != 0:
            raise GenerationError(f"llama_set_adapters_lora refused the adapters ({_native_detail()})")
        self.clear_cache(False)

    def clear_cache(self, clear_data: bool) -> None:
        self._tokens.clear()
        if self._ctx is not None:
            lc.llama_memory_clear(self._mem, clear_data)

    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]:
        def fresh() -> Callable[[list[int]], None]:
            lc.llama_memory_clear(self._mem, True)
            self._tokens.clear()
            return self._decode

        try:
            return self.timed_bench(pp, tg, pl, nr, fresh, {
                "nBatch": self._n_batch, "nUBatch": lc.llama_n_ubatch(self._ctx), "flashAttn": self._flash_attn,
                "isPpShared": 0, "nGpuLayers": self._n_gpu_layers, "nThreads": self.n_threads,
                "nThreadsBatch": self.n_threads,
            }, stop)
        finally:
            lc.llama_memory_clear(self._mem, True)
            self._tokens.clear()

    # -- sessions: llama.cpp's own ggsn files ------------------------------
    def session_identity(self) -> dict[str, Any]:
        identity = super().session_identity()
        identity["layout"] = {"cache_type_k": self._cache_types[0], "cache_type_v": self._cache_types[1]}
        return identity

    def save_session(self, path: str, n_tokens: int) -> int:
        tokens = self._tokens[:n_tokens] if n_tokens > 0 else self._tokens
        # media positions as llama.rn writes them (LLAMA_TOKEN_NULL); their identity goes in the .meta sidecar
        arr = (lc.llama_token * max(1, len(tokens)))(*file_tokens(tokens, is_media))
        # The whole KV state is written even when n_tokens trims the list (llama.rn does the same);
        # load_session drops the cells past the saved tokens.
        expected = 12 + 4 * len(tokens) + lc.llama_state_get_size(self._ctx)
        _recent_problems.clear()
        if not lc.llama_state_save_file(self._ctx, os.fsencode(path), arr, len(tokens)):
            raise SessionError(f"Failed to save session: {_native_detail() or 'llama_state_save_file failed'}")
        written = os.path.getsize(path)
        if written != expected:  # llama.cpp does not check the final flush: a full disk shows up here
            raise SessionError(f"Failed to save session: wrote {written} of {expected} bytes (is the disk full?)")
        return len(tokens)

    def session_media(self, n_tokens: int) -> list[str]:
        n = n_tokens if 0 < n_tokens <= len(self._tokens) else len(self._tokens)
        return self.media_hashes(self._tokens, n)

    def media_hashes(self, tokens: list[int], n: int) -> list[str]:
        """The bitmap hashes of the media in ``tokens[:n]`` (one per medium, as llama.rn lists them: a sound over
        30 s has several chunks); [] when there are none, or ``tokens[n:]`` holds one (cut off: unprovable)."""
        projector = self._projector
        if projector is None or any(is_media(t) for t in tokens[n:]):
            return []
        hashes, i = [], 0
        while i < n:
            if not is_media(tokens[i]):
                i += 1
                continue
            seen = projector.identity(tokens[i])
            if seen is None:
                return []
            bitmap_hash, part, n_chunk = seen
            if part == 0:
                hashes.append(bitmap_hash)
            i += n_chunk
        return hashes

    def load_session(self, path: str) -> list[int]:
        header = read_header(path)
        check_header(header, path, version=lc.LLAMA_SESSION_VERSION, capacity=self.n_ctx, n_vocab=self.n_vocab,
                     arch=self._metadata.get("general.architecture"), media=True)
        snapshot = self._snapshot()
        buf = (lc.llama_token * max(1, header.n_tokens))()
        count = ctypes.c_size_t(0)
        _recent_problems.clear()
        ok = lc.llama_state_load_file(self._ctx, os.fsencode(path), buf, header.n_tokens, ctypes.byref(count))
        tokens = buf[: count.value] if ok else []
        cached = lc.llama_memory_seq_pos_max(self._mem, 0) + 1
        if not ok or cached < len(tokens):
            detail = _native_detail() if not ok else f"its KV state holds {cached} of {len(tokens)} tokens"
            self._restore(snapshot)
            hint = next((h for key, h in _SESSION_HINTS.items() if key in detail), "")
            raise SessionError(f"Failed to load session: {path}: {detail or 'llama_state_load_file failed'}{hint}")
        tokens = media_identity(list(tokens), read_meta(path), self._projector)
        # saved with token_size (or media without identity): keep the listed tokens; a memory that cannot drop
        # a tail (recurrent, hybrid) keeps nothing rather than positions the token list does not name
        if cached > len(tokens) and not lc.llama_memory_seq_rm(self._mem, -1, len(tokens), -1):
            lc.llama_memory_clear(self._mem, True)
            tokens = []
        self._tokens = list(tokens)
        return list(tokens)

    def _snapshot(self) -> tuple[Any, list[int]] | None:
        """The KV state in memory, so a failed load can put it back (None when the cache is empty)."""
        if not self._tokens:
            return None
        size = lc.llama_state_get_size(self._ctx)
        data = (ctypes.c_uint8 * size)()
        lc.llama_state_get_data(self._ctx, data, size)
        return data, list(self._tokens)

    def _restore(self, snapshot: tuple[Any, list[int]] | None) -> None:
        lc.llama_memory_clear(self._mem, True)
        self._tokens = []
        if snapshot is not None:
            data, tokens = snapshot
            if lc.llama_state_set_data(self._ctx, data, len(data)) == len(data):
                self._tokens = tokens

    # -- multimodal (llama_cpp_mtmd) ------------------------------------------
    def init_multimodal(self, path: str, use_gpu: bool, image_min_tokens: int, image_max_tokens: int) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        mtmd.mtmd_log_set(_log_callback, ctypes.c_void_p(0))  # its errors reach _native_detail too
        mtmd.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
        _native_detail()  # only what this load logs
        projector = Projector(self._model, path, use_gpu and self.gpu, self.n_threads, image_min_tokens,
                              image_max_tokens, self.n_embd, _native_detail)
        self.release_multimodal()
        self._projector = projector

    def release_multimodal(self) -> None:
        projector, self._projector = self._projector, None
        if projector is not None:
            # what the cache holds of media can no longer be matched by a new prompt's tokens: drop it
            first = next((i for i, t in enumerate(self._tokens) if is_media(t)), None)
            if first is not None:
                self._rewind(first)
            projector.close()

    @property
    def multimodal_enabled(self) -> bool:
        return self._projector is not None

    def multimodal_support(self) -> dict[str, bool]:
        projector = self._projector
        return {"vision": projector.vision, "audio": projector.audio} if projector else {"vision": False, "audio": False}

    def tokenize_media(self, text: str, media: list[Any], add_special: bool) -> MediaTokens:
        projector = self._projector
        if projector is None:
            raise MultimodalNotEnabledError()
        return projector.tokenize(text, media, add_special)

    def close(self) -> None:
        self.end()
        self.release_multimodal()
        if self._masker is not None:
            self._masker.shutdown(wait=True)
            self._masker = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
        for lora in self._loras.values():
            lc.llama_adapter_lora_free(lora)
        self._loras.clear()
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None


class _Draw:
    """One completion's sampling on one sequence: llama.cpp's chain in llama.rn's order (split after a native
    grammar, see ``sample_checked``), or llguidance's mask ahead of it, and the tokens a grammar forces next.

    It reads one output row (``row``: -1 for the last, or a batch index) of the latest decode; whoever owns the
    sequence makes sure that row is current. With ``n_probs`` it copies the row before anything changes it, so
    ``top_probs`` never reads a row a later decode (another sequence's step) has overwritten.
    """

    def __init__(self, adapter: LlamaCppAdapter, sampling: SamplingParams, prompt: list[int]) -> None:
        self._a = adapter
        self.guide = adapter._guide_for(sampling)  # grammar errors before any work
        native = sampling if self.guide is None else dataclasses.replace(sampling, grammar=None)
        self.chain, self.grammar, self.post = adapter._build_sampler(native, prompt)
        self.usable: np.ndarray | None = None  # tokens sampling may draw (None: all), with a guide
        if self.guide is not None:
            banned = sampling.banned(adapter._eog_tokens())
            if banned:
                self.usable = np.ones(adapter.n_vocab, dtype=np.bool_)
                self.usable[list(banned)] = False
        self.raw = np.empty(adapter.n_vocab, dtype=np.float32) if sampling.n_probs else None  # the model's own logits
        self.forced: list[int] = []  # what the grammar forces next, handed out before any more sampling
        self._candidates: Any = None  # a llama_token_data[n_vocab] buffer and views of it (_fill_candidates)

    def _logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self._a._ctx, row), shape=(self._a.n_vocab,))

    def take_forced(self) -> int | None:
        """The next token the grammar forces (handed out without evaluating the ones before), or None."""
        if not self.forced:
            return None
        token = self.forced.pop(0)
        lc.llama_sampler_accept(self.chain, token)  # penalties and DRY see it as generated
        guide = self.guide
        assert guide is not None, "forced tokens come from a guide"
        guide.accept(token)
        guide.forced_tokens += 1
        return token

    def force(self, token: int, row: int) -> None:
        """A thinking budget hands out ``token`` at ``row`` instead of a draw (without a guide)."""
        if self.post is not None:  # llama.cpp's own grammar aborts the process on a token it refuses
            raise UnsupportedFeatureError("completion: a thinking budget cannot force tokens past grammar_engine "
                                          "'llama_cpp'; use grammar_engine 'auto' (llguidance)")
        if self.raw is not None:
            self.raw[:] = self._logits(row)
        lc.llama_sampler_accept(self.chain, token)

    def sample(self, row: int) -> int:
        """Draw the token at ``row``."""
        ctx = self._a._ctx
        if self.raw is not None and self.guide is None:
            self.raw[:] = self._logits(row)
        if self.guide is not None:
            return self._sample_guided(row)
        if self.post is None:
            return lc.llama_sampler_sample(self.chain, ctx, row)
        return self._sample_checked(row)

    def _sample_guided(self, row: int) -> int:
        """Mask the logits in place with the guide's mask (computed beside the decode), let the chain draw,
        and note what the grammar forces next."""
        guide = self.guide
        assert guide is not None
        logits = self._logits(row)
        if self.raw is not None:
            self.raw[:] = logits  # n_probs reports the model's own distribution
        allowed = guide.apply(logits)
        usable = allowed if self.usable is None else allowed & self.usable
        if not usable.any():
            raise NoTokenAllowed.judge(allowed, self._a._eog_mask())
        token = lc.llama_sampler_sample(self.chain, self._a._ctx, row)
        guide.accept(token)
        if self.raw is None and not guide.stopped:
            forced = guide.forced()
            usable_mask = self.usable
            if usable_mask is not None:  # a banned token is never forced: the next draw finds the dead end
                forced = list(itertools.takewhile(lambda t: bool(usable_mask[t]), forced))
            self.forced = forced
        return token

    def _sample_checked(self, row: int) -> int:
        """llama_sampler_sample for a chain with a grammar, which llama.cpp cannot end safely.

        Sampling a token the grammar refuses aborts the process (GGML_ABORT, or an uncaught "Unexpected empty
        grammar stack"), and that is what llama_sampler_sample does when nothing survives the grammar and the
        bans. So the chain is split after the grammar: the first half runs on the candidates, and only when
        a token survives does the second half draw and both accept it; otherwise NoTokenAllowed says why.
        The extra cost is copying the logits into the candidate array and one argmax, per token.
        """
        view, cur_p = self._fill_candidates(row)
        lc.llama_sampler_apply(self.chain, ctypes.byref(cur_p))  # bias, penalties, dry, grammar: in place
        best = int(np.argmax(view["logit"]))
        if view["logit"][best] == -math.inf:
            view, cur_p = self._fill_candidates(row)  # why no candidate survived: what the grammar alone allows
            lc.llama_sampler_apply(self.grammar, ctypes.byref(cur_p))
            raise NoTokenAllowed.judge(view["logit"] != -math.inf, self._a._eog_mask())
        lc.llama_sampler_apply(self.post, ctypes.byref(cur_p))
        chosen = cur_p.selected
        token = best  # the draw found no finite candidate (NaN weights): take the best allowed one
        if 0 <= chosen < cur_p.size and math.isfinite(cur_p.data[chosen].logit):
            token = cur_p.data[chosen].id
        lc.llama_sampler_accept(self.chain, token)
        lc.llama_sampler_accept(self.post, token)
        return token

    def _fill_candidates(self, row: int) -> tuple[np.ndarray, Any]:
        """The candidate array in token order with the row's logits (the second chain reorders and shortens it):
        its numpy view and the llama_token_data_array over it."""
        n_vocab = self._a.n_vocab
        if self._candidates is None:
            data = (lc.llama_token_data * n_vocab)()
            self._candidates = (np.ctypeslib.as_array(data), np.arange(n_vocab, dtype=np.int32),
                                ctypes.cast(data, lc.llama_token_data_p), lc.llama_token_data_array(), data)
        view, ids, pointer, cur_p, _data = self._candidates
        view["id"] = ids
        view["logit"] = self._logits(row)
        cur_p.data, cur_p.size, cur_p.selected, cur_p.sorted = pointer, n_vocab, -1, False
        return view, cur_p

    def top_probs(self, row: int, n: int) -> list[tuple[int, float]]:
        logits = self.raw if self.raw is not None else self._logits(row)
        n = min(n, self._a.n_vocab)
        top = np.argpartition(logits, -n)[-n:]
        top = top[np.argsort(logits[top])[::-1]]
        shifted = np.exp(logits - logits.max(), dtype=np.float64)
        probs = shifted[top] / shifted.sum()
        return [(int(t), float(p)) for t, p in zip(top, probs, strict=True)]

    def free(self) -> None:
        for chain in (self.chain, self.post):  # the grammar belongs to the first chain
            if chain is not None:
                lc.llama_sampler_free(chain)
        self.chain = self.grammar = self.post = None


class _Solo:
    """Sequence 0 of the context, evaluated at once on the caller's thread: what a plain completion runs on.

    The evaluator protocol ``_Generation`` uses (``llama_cpp_batch._Slot`` is the batched one): ``tokens``
    (what the sequence's KV holds), ``claim``/``release`` around a completion, ``rewind``, ``evaluate`` (decode
    tokens after the cached ones; the output row of the last), ``row_read`` (that row may be overwritten now).
    """

    def __init__(self, adapter: LlamaCppAdapter) -> None:
        self._a = adapter
        self._abort_cb: Any = None  # the ggml_abort_callback installed while a prompt is evaluated (kept alive here)

    @property
    def tokens(self) -> list[int]:
        return self._a._tokens

    def claim(self, prompt: list[int] | None) -> None:
        pass

    def release(self) -> None:
        pass

    def rewind(self, keep: int) -> None:
        self._a._rewind(keep)

    def evaluate(self, tokens: list[int], stop: threading.Event | None = None,
                 beside: Callable[[], Any] | None = None) -> int:
        """Decode ``tokens``; ``stop`` (a prompt's) aborts the decode, ``beside`` runs on the mask thread meanwhile."""
        adapter = self._a
        masked = adapter._mask_thread().submit(beside) if beside is not None else None
        if stop is not None:  # the abort callback runs per graph node with the GIL: only for prompt evaluation
            self._abort_cb = lc.ggml_abort_callback(lambda _data: stop.is_set())
            lc.llama_set_abort_callback(adapter._ctx, self._abort_cb, None)
        try:
            adapter._decode(tokens, stop)
        finally:
            if stop is not None:
                lc.llama_set_abort_callback(adapter._ctx, _NULL_ABORT, None)
            if masked is not None:
                masked.result()
        return -1

    def row_read(self) -> None:
        pass


class _Generation:
    """One sequence's completions: ``Adapter.begin`` / ``next_token`` / ``force_token`` / ``top_probs`` / ``end``
    over an evaluator (``_Solo``, or a slot of ``llama_cpp_batch``), so a plain completion and a parallel one
    run the same steps. A sampled token is evaluated when the next one is asked for; a guide's forced tokens
    wait and are evaluated together, in one decode, before the next draw. Each evaluation's output row is
    read once and then given back (``row_read``): a batch decodes its next step only when every row is read."""

    def __init__(self, adapter: LlamaCppAdapter, evaluator: Any) -> None:
        self._a, self.evaluator = adapter, evaluator
        self._draw: _Draw | None = None
        self._pending: list[int] = []  # handed out but not yet evaluated
        self._row = -1  # the output row of the last evaluation
        self._unread = False  # that row is still to be read
        self.last_guide: Guide | None = None  # the last completion's (bench/bench_grammar.py's figures)

    def _evaluate(self, tokens: list[int], stop: threading.Event | None = None,
                  beside: Callable[[], Any] | None = None) -> None:
        self._row = self.evaluator.evaluate(tokens, stop, beside)
        self._unread = True

    def _read(self) -> None:
        if self._unread:
            self._unread = False
            self.evaluator.row_read()

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        self._draw = _Draw(self._a, sampling, prompt)
        evaluator = self.evaluator
        evaluator.claim(prompt)
        evaluator.rewind(media_start(prompt, reusable_prefix(evaluator.tokens, prompt)))
        cached = len(evaluator.tokens)
        self._pending = []
        try:
            self._evaluate(prompt[cached:], stop)
        except Interrupted as err:
            err.cache_n = cached
            raise
        return cached

    def next_token(self) -> int:
        draw = self._draw
        assert draw is not None, "next_token outside begin/end"
        if draw.guide is None:  # llama.cpp reports by return codes (_check); llguidance raises
            return self._next(draw)
        with map_exceptions(RUNTIME_FAILURES, "the llama_cpp backend failed while generating (llguidance)",
                            reset=self._drop_pending):
            forced = draw.take_forced()
            if forced is not None:
                self._pending.append(forced)
                return forced
            return self._next(draw)

    def _next(self, draw: _Draw) -> int:
        if self._pending:
            # A guide's mask depends only on the tokens accepted so far: llguidance computes it while llama_decode
            # runs (both without the GIL).
            self._evaluate(self._pending, None, draw.guide.compute if draw.guide else None)
        try:
            token = draw.sample(self._row)
        finally:
            self._read()
        self._pending = [token]
        return token

    def force_token(self, token: int) -> int:
        draw = self._draw
        assert draw is not None, "force_token outside begin/end"
        if draw.guide is not None:  # the grammar takes it as it takes its own forced tokens
            draw.forced.insert(0, token)
            return self.next_token()
        if self._pending:
            self._evaluate(self._pending)
        try:
            draw.force(token, self._row)  # penalties and DRY see it as generated
        finally:
            self._read()
        self._pending = [token]
        return token

    def _drop_pending(self) -> None:
        """After a failure amid a guided step: what was decoded is in the cache; the rest is dropped, never
        decoded twice (``end`` would decode what is left pending)."""
        self._pending = []
        if self._draw is not None:
            self._draw.forced = []

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        assert self._draw is not None, "top_probs outside begin/end"
        return self._draw.top_probs(self._row, n)

    def end(self) -> None:
        try:
            self._read()  # a completion that ended before its first draw (n_predict 0, a stop)
            if len(self._pending) > 1:  # forced tokens the completion ended among: all but the last are in the cache
                try:
                    self._evaluate(self._pending[:-1])
                    self._read()
                except (Interrupted, LlamaError):
                    pass  # the cache keeps what it holds; the next prompt re-evaluates the rest
        finally:
            self._pending = []
            draw, self._draw = self._draw, None
            if draw is not None:
                draw.free()
                if draw.guide is not None:
                    self.last_guide = draw.guide
            self.evaluator.release()
