"""Rockchip's RKLLM NPU runtime (librkllmrt.so) through ctypes.

The runtime samples by itself and streams by callback: ``rkllm_run`` blocks while
callbacks deliver one token each, on a thread of the runtime's choosing. So a
completion runs ``rkllm_run`` on a helper thread, the callback queues what it is
given, and ``next_token`` hands the queue to the generation loop; the loop stops
the runtime through ``rkllm_abort`` (stop strings, n_predict, stop_completion).

Every callback reaches its run through ``userdata`` (a pointer to a Python
object that the run keeps alive), so any number of contexts coexist; the ctypes
callback objects are made once per ABI and never freed.

The runtime has no tokenizer API and no metadata API, so the Hugging Face
tokenizer files next to the ``.rkllm`` file are required: prompts (chat
templates rendered by our chat package) go in as tokens, and the runtime's
template is switched off for them.
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import hashlib
import json
import logging
import os
import queue
import shutil
import struct
import tempfile
import threading
from typing import Any, Callable

import numpy as np

from ...errors import GenerationError, InvalidParamsError, ModelLoadError, SessionError, UnsupportedFeatureError
from ...params import COMPLETION_FIELDS, Field, validate
from ..base import END_OF_RUN, Adapter, Capabilities, Interrupted, SamplingParams, Support, reusable_prefix
from .abi import Abi, abi_for
from .abi.common import INFER_GENERATE, INFER_GET_LAST_HIDDEN_LAYER, INPUT_TOKEN, RUN_ERROR, RUN_FINISH
from .library import Runtime, candidate_paths, open_runtime
from .platforms import PLATFORMS, cpu_settings, detect_platform

__all__ = ["RkllmAdapter"]

MULTIMODAL_MISSING = ("RKLLM takes image embeddings that an app computes with its own vision encoder on the NPU "
                      "(rknn); it loads no projector itself")

logger = logging.getLogger(__name__)

SESSION_MAGIC = b"LCRKLLM\x01"
SESSION_FORMAT = "llamacompat-rkllm-session/1"
_POLL_S = 0.02  # how often a wait looks at the stop flag
_DEFAULT_N_CTX = 4096  # the toolkit's default max_context; the runtime has no way to ask the file
# The sampling the runtime has (llama.rn names); before 1.3 it is fixed at init (``rkllm_sampling``).
SAMPLING_NAMES = ("temperature", "top_k", "top_p", "penalty_repeat", "penalty_freq", "penalty_present", "mirostat",
                  "mirostat_tau", "mirostat_eta")
_SAMPLING_FIELDS = {name: COMPLETION_FIELDS[name] for name in SAMPLING_NAMES}
_POOLING = ("mean", "last", "cls")


def _release(value: str) -> bool:
    return abi_for(value) is not None


class _Run:
    """One rkllm_run in flight on its own thread: what its callback has delivered, in order."""

    __slots__ = ("events", "keep", "ref", "thread")

    def __init__(self, keep: list[Any], call: Callable[["_Run"], None]) -> None:
        self.events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.keep = keep  # ctypes buffers the runtime reads during the run
        self.ref = C.py_object(self)  # userdata points here; the run owns it, so it lives as long as the run
        self.thread = threading.Thread(target=call, args=(self,), name="rkllm_run", daemon=True)

    @property
    def userdata(self) -> C.c_void_p:
        return C.cast(C.pointer(self.ref), C.c_void_p)


_CALLBACKS: dict[str, Any] = {}  # ABI name -> its C callback, made once and never freed


def _callback(abi: Abi) -> Any:
    """The one C callback of ``abi``: it finds its run through userdata, so it has no state of its own."""
    if abi.name not in _CALLBACKS:
        _CALLBACKS[abi.name] = abi.result_callback(_on_result(abi))
    return _CALLBACKS[abi.name]


def _on_result(abi: Abi) -> Callable[[Any, int, int], int | None]:
    returns_int = abi.result_callback._restype_ is not None  # void before 1.2.1, int (0 = continue) since

    def on_result(result_p: Any, userdata: int, state: int) -> int | None:
        run: _Run = C.cast(userdata, C.POINTER(C.py_object)).contents.value
        result = result_p.contents if result_p else None
        if state == RUN_FINISH:
            perf = result.perf if result is not None and abi.perf else None
            measured = None
            if perf is not None and perf.prefill_time_ms > 0 and perf.generate_time_ms > 0:
                measured = (perf.prefill_time_ms, perf.generate_time_ms)
            run.events.put(("finish", measured))
        elif state == RUN_ERROR:
            run.events.put(("error", None))
        elif result is not None and state == abi.hidden_layer_state and result.last_hidden_layer.hidden_states:
            layer = result.last_hidden_layer  # valid only inside this call: copied
            shape = (layer.num_tokens, layer.embd_size)
            run.events.put(("hidden", np.ctypeslib.as_array(layer.hidden_states, shape=shape).copy()))
        elif result is not None and result.token_id >= 0:
            # NORMAL or WAITING (the token ended inside a UTF-8 character: text is NULL or the partial bytes)
            run.events.put(("token", result.token_id, result.text or b""))
        return 0 if returns_int else None

    return on_result


class RkllmAdapter(Adapter):
    name = "rkllm"
    context_fields = {
        "rkllm_lib": Field((str,), None, nullable=True),
        "rkllm_version": Field((str,), None, _release, "a runtime release such as '1.2.3' (1.1.x, 1.2.0, 1.2.1-1.2.3 "
                               "or 1.3.0)", nullable=True),
        "rkllm_platform": Field((str,), None, lambda v: v in PLATFORMS, f"one of {', '.join(PLATFORMS)}",
                                nullable=True),
        "rkllm_base_domain_id": Field((int,), 0, lambda v: v >= 0, ">= 0 (one per model in a process)"),
        "rkllm_sampling": Field((dict,), None, nullable=True),
        "rkllm_tokenizer": Field((str,), None, nullable=True),
    }

    @classmethod
    def runtime_found(cls) -> bool:
        return any(os.path.isfile(path) for path in candidate_paths(None)) or bool(C.util.find_library("rkllmrt"))

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return model_path.lower().endswith(".rkllm")

    @classmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "RkllmAdapter":
        path = params["model"]
        if not os.path.isfile(path):
            raise ModelLoadError(f"Failed to load model: no such file: {path}")
        if on_progress is not None and on_progress(0.0) is False:
            raise ModelLoadError(f"Failed to load model: {path}: loading was cancelled by on_progress")
        return cls(open_runtime(params["rkllm_lib"], params["rkllm_version"]), params)

    def __init__(self, runtime: Runtime, params: dict[str, Any]) -> None:
        from ...vocab import read_tokenizer_files  # needs the tokenizers package (the rkllm extra)

        self._rt, self._abi = runtime, runtime.abi
        self._path = params["model"]
        folder = params["rkllm_tokenizer"] or os.path.dirname(os.path.abspath(self._path))
        try:
            files = read_tokenizer_files(folder)
        except ModelLoadError as err:
            raise ModelLoadError(
                f"Failed to load model: {self._path}: {err.message.removeprefix('Failed to load model: ')}. The RKLLM "
                "runtime cannot tokenize for us: put the model's Hugging Face tokenizer.json and tokenizer_config.json "
                "next to the .rkllm file, or pass their folder as 'rkllm_tokenizer'"
            ) from err
        self._vocab, self._config = files.vocab, files.config
        self.chat_template = params["chat_template"] or files.chat_template
        self.n_vocab = self._vocab.size
        self.n_embd = int(self._config.get("hidden_size") or 0)  # corrected by the first embedding
        self.n_ctx = params["n_ctx"] or _DEFAULT_N_CTX
        self.add_bos = self._vocab.add_bos
        pieces = self._vocab.pieces
        self.bos_text = pieces[self._vocab.bos].decode("utf-8", "replace") if self._vocab.bos is not None else ""
        self.eos_text = pieces[self._vocab.eos].decode("utf-8", "replace") if self._vocab.eos is not None else ""
        self.embedding_enabled = params["embedding"]
        self._pooling = params.get("pooling_type") or "mean"
        if self._pooling not in _POOLING:
            raise InvalidParamsError(f"init_llama: the rkllm backend pools embeddings as {', '.join(_POOLING)}; "
                                     f"got {self._pooling!r}")
        sampling = validate(params["rkllm_sampling"], _SAMPLING_FIELDS, "init_llama: rkllm_sampling")
        self.fixed_sampling = {} if self._abi.per_run_sampling else sampling
        self.devices = ["NPU"]  # the runtime places the model itself; there is no GPU path
        self._handle = C.c_void_p()
        self._callbacks: Any = None
        self._run: _Run | None = None
        self._piece = b""  # the runtime's text for the token next_token just gave (self._last)
        self._last: int | None = None
        self._held: int | None = None  # that token, in the cache (n_past) once the runtime goes on past it
        self._pending: tuple | None = None  # the event begin waited for, for next_token
        self._stop = threading.Event()
        self._cache_files = 0
        self._tokens: list[int] = []  # what the KV cache holds, in order
        self._session: list[int] = []  # the tokens of the loaded prompt cache
        self._timings: tuple[float, float] | None = None
        self._tmp: str | None = None  # private folder for prompt-cache files
        self._lora: C.Structure | None = None  # the adapter each run applies
        self._lora_names: dict[tuple[str, float], bytes] = {}  # (path, scale) -> name the runtime loaded it under
        self._keep_alive: list[bytes] = []
        self._init_runtime(params, sampling)
        per_run: Support = "native" if self._abi.per_run_sampling else "missing"
        self.capabilities = Capabilities(self.name, {
            "completion": "native", "streaming": "native", "stop": "emulated", "grammar": "missing",
            "temperature": per_run, "top_k": per_run, "top_p": per_run, "penalties": per_run, "mirostat": per_run,
            "min_p": "missing", "typical_p": "missing", "xtc": "missing", "top_n_sigma": "missing", "dry": "missing",
            "seed": "missing", "logit_bias": "missing", "ignore_eos": "missing", "n_probs": "missing",
            "tokenize": "emulated", "detokenize": "emulated", "chat_template": "emulated",
            "embedding": "native" if self.embedding_enabled else "missing", "bench": "missing",
            "interrupt_prompt": "native", "session": "native", "prefix_cache": "missing",
            "lora": "native", "rerank": "emulated" if self.embedding_enabled else "missing",
            "parallel": "emulated",  # the runtime runs one sequence: parallel requests take turns
            "multimodal": "missing",  # MULTIMODAL_MISSING says why
        })

    def init_multimodal(self, path: str, use_gpu: bool, image_min_tokens: int, image_max_tokens: int) -> None:
        raise UnsupportedFeatureError(f"multimodal input is not supported by the {self.name} backend: {MULTIMODAL_MISSING}")

    # -- runtime set-up ---------------------------------------------------------
    def _init_runtime(self, params: dict[str, Any], sampling: dict[str, Any]) -> None:
        rt, abi = self._rt, self._abi
        # kept for the life of the handle: whether the runtime copies what it is given is undocumented
        self._param = param = rt.rkllm_createDefaultParam()
        self._model_path = os.fsencode(os.path.abspath(self._path))
        param.model_path = self._model_path
        param.max_context_len = self.n_ctx
        param.max_new_tokens = self.n_ctx  # the loop enforces n_predict and stops the runtime with rkllm_abort
        _fill_sampling(param, sampling, self.n_vocab)
        param.skip_special_token = True
        param.is_async = False
        param.extend_param.base_domain_id = params["rkllm_base_domain_id"]
        if hasattr(param.extend_param, "enabled_cpus_mask"):
            platform = params["rkllm_platform"] or detect_platform()
            cpus = cpu_settings(platform, params["n_threads"])
            if cpus is not None:
                param.extend_param.enabled_cpus_num, param.extend_param.enabled_cpus_mask = cpus
        elif params["rkllm_platform"] or params["n_threads"]:
            logger.info("rkllm %s has no CPU mask: rkllm_platform and n_threads are ignored", abi.covers)
        callback = _callback(abi)
        if abi.callback_struct:
            self._callbacks = abi.Callback(result_callback=callback)
            third = C.byref(self._callbacks)
        else:
            third = callback
        rc = rt.rkllm_init(C.byref(self._handle), C.byref(param), third)
        if rc != 0 or not self._handle:
            self._handle = C.c_void_p()
            raise ModelLoadError(
                f"Failed to load model: {self._path}: rkllm_init returned {rc} (runtime {rt.release or abi.covers} at "
                f"{rt.path}). Check that the file was converted for this chip and runtime version, that n_ctx "
                f"({self.n_ctx}) is within the max_context it was converted with, and the runtime's log on stderr"
            )

    # -- LoRA and the cache --------------------------------------------------------
    def set_lora(self, adapters: list[tuple[str, float]]) -> None:
        if len(adapters) > 1:
            raise InvalidParamsError(f"the RKLLM runtime applies one LoRA adapter per run; got {len(adapters)}")
        lora = None
        for path, scale in adapters:
            name = self._lora_names.get((path, scale))  # the runtime takes the scale when it loads an adapter
            if name is None:
                stem = os.path.splitext(os.path.basename(path))[0]
                name = (stem if len(self._lora_names) == 0 else f"{stem}-{len(self._lora_names)}").encode()
                encoded = os.fsencode(path)
                adapter = self._abi.structs["RKLLMLoraAdapter"](encoded, name, float(scale))
                if self._rt.rkllm_load_lora(self._handle, C.byref(adapter)) != 0:
                    raise ModelLoadError(f"Failed to apply lora adapters: rkllm_load_lora refused {path}")
                self._lora_names[(path, scale)] = name
                self._keep_alive += [encoded, name]  # whether the runtime copies the strings is undocumented
            lora = self._abi.structs["RKLLMLoraParam"](name)
        self._lora = lora
        self.clear_cache(False)

    def clear_cache(self, clear_data: bool) -> None:
        self._finish_run()
        self._tokens, self._session = [], []  # every run clears the runtime's KV cache and sends its whole prompt

    # -- model description -------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        metadata = {"general.name": os.path.splitext(os.path.basename(self._path))[0],
                    "rkllm.abi": self._abi.covers, "rkllm.runtime": self._rt.release or ""}
        metadata.update({f"config.{k}": v if isinstance(v, str) else json.dumps(v)
                         for k, v in sorted(self._config.items())})
        return {"desc": f"rkllm {metadata['general.name']} (runtime ABI {self._abi.covers})",
                "size": os.path.getsize(self._path), "n_embd": self.n_embd, "n_params": 0,
                "n_ctx_train": self.n_ctx, "metadata": metadata}

    # -- tokens --------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._vocab.encode(text, add_special)

    def token_to_piece(self, token: int) -> bytes:
        if token == self._last:  # the token just streamed: the runtime's own text for it (b"" while WAITING)
            self._last = None
            return self._piece
        return self._vocab.pieces[token]

    def detokenize(self, tokens: list[int]) -> str:
        return self._vocab.decode(tokens)

    def is_eog(self, token: int) -> bool:
        return token == END_OF_RUN or token in self._vocab.eog

    # -- generation ----------------------------------------------------------------
    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        """Start ``rkllm_run`` on the whole prompt and return once the first token (or the end) is there:
        the prompt is evaluated then, so the loop's prompt time is the runtime's."""
        self._stop = stop
        self._timings = None
        cache_n = max(0, reusable_prefix(self._session, prompt))
        infer, keep = self._infer(INFER_GENERATE, sampling)
        self._start(prompt, infer, keep)
        self._tokens = list(prompt)
        self._pending = self._wait(interruptible=True, cache_n=cache_n)
        return cache_n

    def next_token(self) -> int:
        event, self._pending = self._pending or self._wait(interruptible=True), None
        if self._held is not None:  # the runtime went on past the last token: it evaluated it (llama.rn's n_past)
            self._tokens.append(self._held)
            self._held = None
        kind = event[0]
        if kind == "token":
            _, token, self._piece = event
            self._last = self._held = token
            return token
        if kind == "error":
            raise GenerationError("the RKLLM runtime reported an error (LLMCallState ERROR); see its log on stderr")
        if kind == "finish":
            self._timings = event[1]
        elif event[1]:  # "done": rkllm_run returned without FINISH
            raise GenerationError(f"rkllm_run returned {event[1]} (see the runtime's log on stderr)")
        return END_OF_RUN

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        raise UnsupportedFeatureError("n_probs is not supported by the rkllm backend (the runtime samples inside)")

    def end(self) -> None:
        self._pending = None
        self._finish_run()

    def runtime_timings(self) -> tuple[float, float] | None:
        return self._timings

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    def _infer(self, mode: int, sampling: SamplingParams | None,
               cache_path: bytes | None = None) -> tuple[C.Structure, list[Any]]:
        """RKLLMInferParam for one run, and the buffers it points to (kept alive for the run)."""
        abi = self._abi
        infer = abi.InferParam(mode=mode)
        keep: list[Any] = [infer]
        if self._lora is not None:
            infer.lora_params = C.pointer(self._lora)
        if cache_path is not None:
            cache = abi.PromptCacheParam(1, cache_path)
            infer.prompt_cache_params = C.pointer(cache)
            keep += [cache, cache_path]
        if abi.keep_history:
            infer.keep_history = 0  # every run sends its whole prompt
        if abi.per_run_sampling and sampling is not None:
            per_run = abi.SamplingParam()
            _fill_sampling(per_run, {name: getattr(sampling, name) for name in SAMPLING_NAMES}, self.n_vocab)
            infer.sampling_params = C.pointer(per_run)
            infer.max_new_tokens = sampling.n_predict if sampling.n_predict > 0 else 0
            keep.append(per_run)
        return infer, keep

    def _start(self, tokens: list[int], infer: C.Structure, keep: list[Any]) -> None:
        """Clear the KV cache and start ``rkllm_run`` on ``tokens`` on a helper thread."""
        abi, rt = self._abi, self._rt
        self._finish_run()
        if abi.clear_kv_args == 1:
            rt.rkllm_clear_kv_cache(self._handle, 0)
        elif abi.clear_kv_args == 3:
            rt.rkllm_clear_kv_cache(self._handle, 0, None, None)
        ids = (C.c_int32 * len(tokens))(*tokens)
        run_input = abi.Input(input_type=INPUT_TOKEN)
        run_input.token_input.input_ids = ids
        run_input.token_input.n_tokens = len(tokens)
        if abi.roles:
            run_input.role = b"user"
        handle = self._handle

        def call(run: _Run) -> None:
            try:
                rc = rt.rkllm_run(handle, C.byref(run_input), C.byref(infer), run.userdata)
            except Exception as err:  # the binding refused the call: told to the waiting side, which raises it
                run.events.put(("raised", err))
                return
            run.events.put(("done", rc))

        self._run = _Run([*keep, ids, run_input], call)
        self._run.thread.start()

    def _wait(self, interruptible: bool, cache_n: int = 0) -> tuple:
        """The run's next event; with ``interruptible``, ``Interrupted`` once the stop flag is set."""
        run = self._run
        assert run is not None, "no rkllm run in flight"
        while True:
            try:
                event = run.events.get(timeout=_POLL_S)
            except queue.Empty:
                if interruptible and self._stop.is_set():
                    self._finish_run()
                    raise Interrupted(cache_n) from None
                continue
            if event[0] == "raised":  # rkllm_run never ran: no callback comes, the thread has ended
                err = event[1]
                raise GenerationError(f"the rkllm backend failed: rkllm_run raised {type(err).__name__}: {err}") from err
            return event

    def _finish_run(self) -> None:
        """Abort the run in flight (if any) and wait until ``rkllm_run`` returned: nothing then touches its buffers."""
        run, self._run = self._run, None
        self._held = None  # a token handed out last is not evaluated now: out of n_past, as llama.cpp's pending one
        if run is None:
            return
        if run.thread.is_alive():
            self._rt.rkllm_abort(self._handle)
            run.thread.join()

    # -- embeddings --------------------------------------------------------------------
    def embedding(self, tokens: list[int]) -> list[float]:
        if not tokens:
            raise InvalidParamsError("embedding: the text has no tokens")
        infer, keep = self._infer(INFER_GET_LAST_HIDDEN_LAYER, None)
        self._start(tokens, infer, keep)
        self._tokens = list(tokens)
        states = None
        try:
            while True:
                kind, value = self._wait(interruptible=False)[:2]
                if kind == "hidden":
                    states = value
                elif kind == "error":
                    raise GenerationError("the RKLLM runtime reported an error while computing hidden states")
                elif kind in ("finish", "done"):
                    break
        finally:
            self._finish_run()
        if states is None or states.size == 0:
            raise GenerationError("the RKLLM runtime returned no hidden states (RKLLM_INFER_GET_LAST_HIDDEN_LAYER)")
        self.n_embd = int(states.shape[1])
        pooled = {"mean": lambda s: s.mean(axis=0), "last": lambda s: s[-1], "cls": lambda s: s[0]}[self._pooling]
        return pooled(states.astype(np.float64)).tolist()

    # -- sessions: the runtime's prompt-cache file behind our header -------------------
    def save_session(self, path: str, n_tokens: int) -> int:
        tokens = self._tokens[:n_tokens] if n_tokens > 0 else list(self._tokens)
        blob = self._prompt_cache_of(tokens) if tokens else b""
        header = json.dumps({"format": SESSION_FORMAT, "abi": self._abi.name, "tokens": tokens,
                             "cache_sha256": hashlib.sha256(blob).hexdigest()}).encode()
        with open(path, "wb") as handle:
            handle.write(SESSION_MAGIC + struct.pack("<I", len(header)) + header + blob)
        return len(tokens)

    def _prompt_cache_of(self, tokens: list[int]) -> bytes:
        """Evaluate ``tokens`` with ``save_prompt_cache`` on and read the file the runtime wrote."""
        cache_file = os.path.join(self._private_dir(), "save.cache")
        if os.path.exists(cache_file):
            os.remove(cache_file)
        one = SamplingParams(n_predict=1)
        infer, keep = self._infer(INFER_GENERATE, one, cache_path=cache_file.encode())
        self._start(tokens, infer, keep)
        try:
            kind = self._wait(interruptible=False)[0]  # the prompt is evaluated once anything arrives
        finally:
            self._finish_run()
        self._tokens = list(tokens)
        if kind == "error" or not os.path.isfile(cache_file):
            raise SessionError("Failed to save session: the RKLLM runtime wrote no prompt cache")
        with open(cache_file, "rb") as handle:
            return handle.read()

    def load_session(self, path: str) -> list[int]:
        tokens, blob = _read_session(path, self._abi.name, self.n_vocab, self.n_ctx)
        self._finish_run()
        if tokens:
            # a new file per load, kept while it is loaded: the runtime may read it after this call
            self._cache_files += 1
            cache_file = os.path.join(self._private_dir(), f"session-{self._cache_files}.cache")
            with open(cache_file, "wb") as handle:
                handle.write(blob)
            if self._rt.rkllm_load_prompt_cache(self._handle, cache_file.encode()) != 0:
                os.remove(cache_file)
                raise SessionError(f"Failed to load session: the RKLLM runtime refused the prompt cache in {path}")
            previous = os.path.join(self._private_dir(), f"session-{self._cache_files - 1}.cache")
            if os.path.exists(previous):
                os.remove(previous)
        else:
            self._rt.rkllm_release_prompt_cache(self._handle)
        self._session = list(tokens)
        self._tokens = list(tokens)
        return tokens

    def _private_dir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="llamacompat-rkllm-")
        return self._tmp

    def session_identity(self) -> dict[str, Any]:
        identity = super().session_identity()
        identity["layout"] = {"abi": self._abi.name, "n_ctx": self.n_ctx}
        return identity

    def close(self) -> None:
        if self._handle:
            self._finish_run()
            self._rt.rkllm_destroy(self._handle)
            self._handle = C.c_void_p()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _fill_sampling(target: C.Structure, sampling: dict[str, Any], n_vocab: int) -> None:
    """llama.rn's sampling names onto RKLLMParam or RKLLMSamplingParam. Greedy is top_k 1 at temperature 1
    (the runtime's behaviour at temperature 0 is undocumented); llama.rn's top_k 0 (off) is the whole vocabulary."""
    temperature, top_k = sampling["temperature"], sampling["top_k"]
    if temperature <= 0:
        temperature, top_k = 1.0, 1
    target.temperature = temperature
    target.top_k = top_k if top_k > 0 else n_vocab
    target.top_p = sampling["top_p"]
    target.repeat_penalty = sampling["penalty_repeat"]
    target.frequency_penalty = sampling["penalty_freq"]
    target.presence_penalty = sampling["penalty_present"]
    target.mirostat = sampling["mirostat"]
    target.mirostat_tau = sampling["mirostat_tau"]
    target.mirostat_eta = sampling["mirostat_eta"]


def _read_session(path: str, abi: str, n_vocab: int, n_ctx: int) -> tuple[list[int], bytes]:
    """Tokens and prompt-cache bytes of one of our session files; ``SessionError`` saying what is wrong."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise SessionError(f"Failed to load session: {path}: {err.strerror or err}") from err
    if not data.startswith(SESSION_MAGIC) or len(data) < len(SESSION_MAGIC) + 4:
        raise SessionError(f"Failed to load session: {path} is not an rkllm session file of llamacompat")
    size = struct.unpack_from("<I", data, len(SESSION_MAGIC))[0]
    start = len(SESSION_MAGIC) + 4
    try:
        header = json.loads(data[start:start + size])
    except ValueError as err:
        raise SessionError(f"Failed to load session: {path}: its header is damaged ({err})") from err
    if not isinstance(header, dict) or header.get("format") != SESSION_FORMAT:
        raise SessionError(f"Failed to load session: {path}: unknown format {header.get('format')!r}"
                           if isinstance(header, dict) else f"Failed to load session: {path}: its header is damaged")
    if header.get("abi") != abi:
        raise SessionError(f"Failed to load session: {path} was saved by an rkllm {header.get('abi')} runtime, this "
                           f"context runs {abi}; prompt caches do not move between runtime versions")
    tokens = header.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < n_vocab for t in tokens):
        raise SessionError(f"Failed to load session: {path}: its token list is damaged")
    if len(tokens) >= n_ctx:
        raise SessionError(f"Failed to load session: {path} holds {len(tokens)} tokens, more than n_ctx {n_ctx} allows")
    blob = data[start + size:]
    if hashlib.sha256(blob).hexdigest() != header.get("cache_sha256"):
        raise SessionError(f"Failed to load session: {path}: its prompt cache is truncated or damaged")
    return tokens, blob
