"""``LocalCore``: a model loaded in this process, behind the context's state machine.

A context (``LlamaContext``) owns what every backend shares: the busy/released
state, streams, the async twin. Its *core* does the work (``context.core.CALLS``
lists the calls). This one validates each call, turns llama.rn requests into
engine requests (chat templates, grammars, logit bias) and runs them on one
adapter. The bridge server drives a ``LocalCore`` directly, with its own queue.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Generator, Literal, Mapping

from . import params as P
from .adapters.base import Adapter, SamplingParams
from .chat import ChatOptions, FormattedChat, ReplyParser, TemplateTokens, format_chat
from .chat.formats import CONTENT
from .chat.template import RenderStopped, render_stop, template_caps
from .embeddings import cosine_scores, normalize_embedding, ranked
from .engine import CompletionRequest, ThinkingBudget, generate
from .errors import (
    InvalidParamsError,
    MultimodalNotEnabledError,
    SessionError,
    TemplateError,
    UnsupportedFeatureError,
    unsupported,
)
from .grammars.builtin import checked_grammar
from .grammars.gbnf import check_tokens, parse_gbnf
from .grammars.schema import convert_json_schema_to_grammar
from .grammars.triggers import parse_triggers
from .media import final_medium_error, load_media, media_paths_param
from .models import local_path
from .parallel.slots import Progress, Slots
from .sessions import META_SUFFIX, check_identity, read_sidecar, save_with_media
from .sessions.sidecar import SUFFIX as SIDECAR_SUFFIX
from .text_stream import Parse, stopped_before_prompt
from .types import (
    CompletionResult,
    EmbeddingResult,
    LoraAdapter,
    RerankResult,
    SessionLoadResult,
    TokenData,
    TokenizeResult,
)

__all__ = ["LocalCore", "LocalSlots", "StateFiles", "take_state", "session_path", "file_name"]


def _caps(source: str | None) -> dict[str, bool] | None:
    """llama.rn's ``defaultCaps`` / ``toolUseCaps`` of a template of the model (snake_case), probed as llama.cpp does."""
    if not source:
        return None
    try:
        caps = template_caps(source)
    except TemplateError:  # a broken template fails when it is used, with its line
        return None
    return {"tools": caps.tools, "tool_calls": caps.tool_calls, "parallel_tool_calls": caps.parallel_tool_calls,
            "system_role": caps.system_role}


def chat_templates(default: str | None, tool_use: str | None) -> dict[str, Any]:
    """llama.rn's ``model.chatTemplates`` (snake_case): the model's template, and its separate tool-use template
    (GGUF's ``tokenizer.chat_template.tool_use``, as llama.cpp reads it) where it has one."""
    jinja: dict[str, Any] = {"default": bool(default), "default_caps": _caps(default), "tool_use": bool(tool_use)}
    if tool_use:
        jinja["tool_use_caps"] = _caps(tool_use)
    return {"llama_chat": bool(default), "jinja": jinja}


def session_path(path: Any, where: str) -> str:
    """A session path as apps pass it; llama.rn strips ``file://`` on load only, we accept it on both."""
    if not isinstance(path, str) or not path:
        raise InvalidParamsError(f"{where}: path must be a non-empty string, got {path!r}")
    return local_path(file_name(path, where))


def file_name(path: str, what: str) -> str:
    """``path`` if the OS can take it as a file name: no NUL byte, nothing ``os.fsencode`` refuses (a lone surrogate)."""
    if "\0" in path:
        raise InvalidParamsError(f"{what}: the path {path!r} contains a NUL byte, which no file name can hold")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidParamsError(f"{what}: the path {path!r} holds a lone surrogate, which no file name can hold "
                                 "(this file system takes UTF-8 names)") from None
    return path


@dataclass(frozen=True)
class StateFiles:
    """llama.rn's per-sequence state params of one parallel request, checked: the paths as the OS takes them
    (``file://`` stripped), None where none is named; sizes <= 0 mean every token."""

    load_path: str | None = None
    save_path: str | None = None
    save_prompt_path: str | None = None
    load_size: int = -1
    save_size: int = -1


def take_state(params: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, StateFiles | None]:
    """Split llama.rn's state params (``params.STATE_FIELDS``) off a parallel request's ``params``: the rest, and
    the checked state files (None when no path is named). Bad values raise ``InvalidParamsError``; a save target
    that cannot be written (a folder, a missing folder, a sidecar's name) raises ``SessionError`` now, before any
    work is done."""
    if not isinstance(params, Mapping) or not any(key in params for key in P.STATE_FIELDS):
        return params, None  # (a params that is no dict is the core's to refuse)
    p = P.validate({key: params[key] for key in P.STATE_FIELDS if key in params}, P.STATE_FIELDS, "completion")
    rest = {key: value for key, value in params.items() if key not in P.STATE_FIELDS}
    paths: dict[str, str | None] = {}
    for key in ("load_state_path", "save_state_path", "save_prompt_state_path"):
        value = p[key]
        paths[key] = session_path(value, f"completion: '{key}'") if value else None  # "" names none (llama.rn)
        if value and key != "load_state_path":
            _check_save_target(paths[key] or "", key)
    if not any(paths.values()):
        return rest, None
    return rest, StateFiles(paths["load_state_path"], paths["save_state_path"], paths["save_prompt_state_path"],
                            p["load_state_size"], p["save_state_size"])


def _check_save_target(path: str, key: str) -> None:
    where = f"completion: '{key}'"
    for suffix in (SIDECAR_SUFFIX, META_SUFFIX):
        if path.lower().endswith(suffix):
            raise SessionError(f"{where}: {path} ends in '{suffix}', the name of a state file's sidecar; "
                               "pick another name")
    if os.path.isdir(path):
        raise SessionError(f"{where}: {path} is a folder; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SessionError(f"{where}: the folder {folder} does not exist; create it first")


class LocalCore:
    """One adapter plus the request building every backend shares. Calls are not serialised here."""

    def __init__(self, adapter: Adapter, params: dict[str, Any]) -> None:
        self.adapter = adapter
        self.params = params
        self.media_files = True  # media paths are read here; a bridge server sets False (data: URLs only)
        self.backend = adapter.name
        self.n_vocab = adapter.n_vocab
        self.gpu, self.reason_no_gpu, self.devices = adapter.gpu, adapter.reason_no_gpu, list(adapter.devices)
        self._lora: list[dict[str, Any]] = []
        self.system_info, self.android_lib = adapter.system_info(), None
        info = adapter.model_info()
        tool_use = self._tool_use_template = (info.get("metadata") or {}).get("tokenizer.chat_template.tool_use")
        self.model = {**info, "chat_templates": chat_templates(adapter.chat_template, tool_use),
                      "is_chat_template_supported": bool(adapter.chat_template)}

    @property
    def capabilities(self) -> dict[str, Any]:
        return self.adapter.capabilities.as_dict()

    def require(self, feature: str, what: str) -> None:
        if not self.adapter.capabilities.supports(feature):
            hint = (" (it was created with vocab_only=True)" if self.params["vocab_only"]
                    else " (it was created with pooling_type 'rank', for rerank)"
                    if feature == "embedding" and self.params.get("pooling_type") == "rank" else "")
            raise UnsupportedFeatureError(f"{what} is not available on this {self.backend} context{hint}")

    # -- completion ----------------------------------------------------------
    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event,
                   strict: bool) -> Generator[TokenData, None, CompletionResult]:
        """Validate ``params`` (at the first ``next``), then yield TokenData and return the result."""
        return self.completion_on(self.adapter, params, stop, strict)

    def completion_on(self, adapter: Adapter, params: Mapping[str, Any] | None, stop: threading.Event,
                      strict: bool, progress: Progress | None = None) -> Generator[TokenData, None, CompletionResult]:
        """``completion`` generated on ``adapter``: the context's own, or one sequence of its parallel batch."""
        self.require("completion", "completion")
        try:
            with render_stop(stop):  # stop_completion also ends a long chat template render
                request, n_threads = self._request(params, strict)
        except RenderStopped:
            return stopped_before_prompt(adapter.n_past)
        if request.prompt_tokens and request.prompt_tokens[-1] < 0:  # llama.cpp would abort the process
            raise final_medium_error()
        if progress is not None:
            progress.prompt(len(request.prompt_tokens))
        restore = self._use_threads(adapter, n_threads, strict)
        try:
            return (yield from generate(adapter, request, stop))
        finally:
            if restore is not None:
                adapter.set_threads(restore)

    def open_slots(self, n_parallel: int, n_batch: int) -> Slots:
        """Parallel mode: the runtime's own batch where the adapter has one, else requests take turns on it."""
        self.require("parallel", "parallel mode")
        return LocalSlots(self, n_parallel, self.adapter.open_batch(n_parallel, n_batch))

    def _use_threads(self, adapter: Adapter, n_threads: int, strict: bool) -> int | None:
        """A completion's own ``n_threads`` (0: the context's): the count to restore afterwards, or None."""
        if not n_threads:
            return None
        previous = adapter.set_threads(n_threads)
        if previous is None:
            unsupported(strict, f"completion: 'n_threads' is fixed when a {self.backend} context is created, and "
                                "shared by every slot in parallel mode (ignored)")
        return previous

    def _request(self, params: Mapping[str, Any] | None, strict: bool) -> tuple[CompletionRequest, int]:
        p = P.completion_params(params, strict)
        schema = p["json_schema"]
        # Checked here, so a bad grammar or schema fails the same way on every backend.
        if p["grammar"] is not None:
            p["grammar"] = checked_grammar(p["grammar"])
            if "<" in p["grammar"]:  # token references: no engine can match a token the vocabulary lacks
                check_tokens(parse_gbnf(p["grammar"]), self.n_vocab, lambda text: len(self.adapter.tokenize(text, False)) == 1)
        elif schema is not None:
            p["grammar"] = convert_json_schema_to_grammar(schema, strict=strict)
        text, stops, chat_format, parse, chat = self._prompt(p)
        p["grammar_triggers"] = parse_triggers(p["grammar_triggers"], self.n_vocab)
        logit_bias = self._resolve_logit_bias(p["logit_bias"])  # a bad token id is bad input on every backend
        self._check_features(p, strict)  # resets what the backend lacks (logit_bias included)
        text = P.check_unicode(text, "completion: the prompt") if p["messages"] else text
        refs = chat.media_paths if chat is not None else media_paths_param(p["media_paths"], "completion")
        tokens = self._tokens_with_media(text, refs, True, "completion")
        sampling = SamplingParams.from_params(p, logit_bias if p["logit_bias"] else ())
        self._check_bans(sampling)
        # prefill_text: the reply already began with it (llama.rn): parsed and accumulated with it, not in ``text``
        request = CompletionRequest(tokens, sampling, p["n_predict"], tuple(stops), p["n_probs"], parse, chat_format,
                                    p["prefill_text"] or "", self._thinking_budget(p, chat, strict))
        return request, p["n_threads"]

    def _chat(self, messages: Any, template: str | None, p: dict[str, Any], has_grammar: bool) -> FormattedChat:
        adapter = self.adapter
        # llama.cpp renders a chat with tools with the model's tool-use template, where it has one
        own = self._tool_use_template if p.get("tools") and self._tool_use_template else adapter.chat_template
        source = template or self.params["chat_template"] or own or "chatml"
        tokens = TemplateTokens(adapter.bos_text, adapter.eos_text, adapter.add_bos)
        return format_chat(source, messages, tokens, ChatOptions.from_params(p), has_grammar=has_grammar)

    def _prompt(self, p: dict[str, Any]) -> tuple[str, list[str], int, Parse | None, FormattedChat | None]:
        """Prompt text, stop strings, chat format, reply parser and the chat (None for a raw prompt); a chat's
        tool grammar goes into ``p``."""
        if p["messages"] is None:  # completion_params checked that it is one or the other
            parse = ReplyParser(CONTENT, p["reasoning_format"]) if p["reasoning_format"] != "none" else None
            return p["prompt"], p["stop"], 0, parse, None
        chat = self._chat(p["messages"], p["chat_template"], p, has_grammar=p["grammar"] is not None)
        if chat.grammar:
            p["grammar"] = chat.grammar
            if chat.grammar_lazy:  # tools in auto mode: free text, or a schema-valid call once one starts
                p["grammar_lazy"], p["grammar_triggers"] = True, list(chat.grammar_triggers)
        return chat.prompt, p["stop"] + chat.additional_stops, chat.chat_format, chat.parser(), chat

    def _thinking_budget(self, p: dict[str, Any], chat: FormattedChat | None, strict: bool) -> ThinkingBudget | None:
        """llama.rn's thinking_budget_tokens, as token sequences of the chat template's thinking tags."""
        if p["thinking_budget_tokens"] < 0:
            return None
        if chat is None:
            unsupported(strict, "completion: 'thinking_budget_tokens' needs 'messages' (the chat template names the "
                                "thinking tags; ignored)")
            return None
        start, end = chat.think
        tokenize = self.adapter.tokenize
        return ThinkingBudget(tuple(tokenize(start, False)), tuple(tokenize(end, False)),
                              tuple(tokenize((p["thinking_budget_message"] or "") + end, False)),
                              p["thinking_budget_tokens"], chat.thinking_forced_open)

    def _check_features(self, p: dict[str, Any], strict: bool) -> None:
        """Refuse or warn about what the backend lacks, and reset those params so it never sees them."""
        caps, fixed = self.adapter.capabilities, self.adapter.fixed_sampling
        for feature, name in P.features_used(p):
            names = P.FEATURE_PARAMS[feature]
            if caps.supports(feature) or (fixed and all(n in fixed and p[n] == fixed[n] for n in names)):
                continue
            if fixed and all(n in fixed for n in names):
                name = next(n for n in names if p[n] != fixed[n])
                message = (f"completion: '{name}' is fixed when a {self.backend} context of this runtime is created "
                           f"(it is {fixed[name]!r} here)")
            else:
                message = f"completion: '{name}' needs '{feature}', which the {self.backend} backend does not support"
            if feature in P.REFUSED_WHEN_MISSING:
                raise UnsupportedFeatureError(message + " (refused rather than generating unconstrained output)")
            unsupported(strict, message + " (ignored)")
            for n in names:
                p[n] = P.COMPLETION_FIELDS[n].default

    def _check_bans(self, sampling: SamplingParams) -> None:
        """Refuse a request whose bans leave no token to sample (with a grammar, the engine finds it per step)."""
        if len(sampling.logit_bias) < self.n_vocab // 2:  # cheap: most requests ban a few tokens, if any
            return
        adapter = self.adapter
        banned = sampling.banned(t for t in range(self.n_vocab) if adapter.is_eog(t))
        if len(banned) >= self.n_vocab:
            why = "logit_bias and ignore_eos ban" if sampling.ignore_eos else "logit_bias bans"
            raise InvalidParamsError(f"completion: {why} every one of the {self.n_vocab} tokens; nothing could be "
                                     "generated (leave some token without a -inf / false bias)")

    def _resolve_logit_bias(self, pairs: list[tuple[int | str, float]]) -> tuple[tuple[int, float], ...]:
        out: list[tuple[int, float]] = []
        for token, bias in pairs:
            ids = self.adapter.tokenize(P.check_unicode(token, "completion: a logit_bias token"), False) \
                if isinstance(token, str) else [token]
            for tid in ids:
                if not 0 <= tid < self.n_vocab:
                    raise InvalidParamsError(
                        f"completion: logit_bias token {tid} is outside the vocabulary (0..{self.n_vocab - 1})"
                    )
                out.append((tid, bias))
        return tuple(out)

    def _media_tokens(self, text: str, refs: list[str], add_special: bool, where: str) -> Any:
        """``text`` with the media ``refs`` (one per media marker) as the adapter's MediaTokens."""
        self.require("multimodal", f"{where}: media (images, audio)")
        if not self.adapter.multimodal_enabled:
            raise MultimodalNotEnabledError()
        media = [load_media(ref, f"{where}: media {i}", self.media_files) for i, ref in enumerate(refs)]
        return self.adapter.tokenize_media(text, media, add_special)

    def _tokens_with_media(self, text: str, refs: list[str], add_special: bool, where: str) -> list[int]:
        if not refs:
            return self.adapter.tokenize(text, add_special)
        return list(self._media_tokens(text, refs, add_special, where).tokens)

    # -- tokens, embedding, chat, bench --------------------------------------
    def tokenize(self, text: str, params: Mapping[str, Any] | None) -> TokenizeResult:
        text = P.text_argument(text, "tokenize")
        p = P.validate(params, P.TOKENIZE_FIELDS, "tokenize", not_yet=P.TOKENIZE_NOT_YET)
        refs = media_paths_param(p["media_paths"], "tokenize")
        if refs:
            mt = self._media_tokens(text, refs, False, "tokenize")
            return {"tokens": list(mt.tokens), "has_media": True, "bitmap_hashes": list(mt.bitmap_hashes),
                    "chunk_pos": list(mt.chunk_pos), "chunk_pos_media": list(mt.chunk_pos_media)}
        tokens = self.adapter.tokenize(text, False)
        return {"tokens": tokens, "has_media": False, "bitmap_hashes": [], "chunk_pos": [], "chunk_pos_media": []}

    def detokenize(self, tokens: list[int]) -> str:
        return self.adapter.detokenize(P.token_ids(tokens, self.n_vocab, "detokenize"))

    def embedding(self, text: str, params: Mapping[str, Any] | None, on: Adapter | None = None) -> EmbeddingResult:
        text = P.text_argument(text, "embedding")
        normalize = P.embedding_normalize(params, self.params)
        self.require("embedding", "embedding")
        return self._embed(text, normalize, on or self.adapter)

    def _embed(self, text: str, normalize: int, on: Adapter) -> EmbeddingResult:
        tokens = self.adapter.tokenize(text, True)
        if not tokens:  # the engines fail on an empty batch ("llama_decode failed ... n_tokens == 0")
            raise InvalidParamsError("embedding: the text has no tokens (it is empty); pass some text to embed")
        return {"embedding": normalize_embedding(on.embedding(tokens), normalize)}

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None,
               on: Adapter | None = None) -> list[RerankResult]:
        query, documents = P.rerank_arguments(query, documents, params, self.params)
        self.require("rerank", "rerank")
        adapter, on = self.adapter, on or self.adapter
        if adapter.capabilities.features.get("rerank") == "native":
            query_tokens = adapter.tokenize(query, False)
            scores = [on.rank(query_tokens, adapter.tokenize(doc, False)) for doc in documents]
        else:
            scores = cosine_scores(lambda text: self._embed(text, -1, on)["embedding"], query, documents)
        return ranked(scores, documents)

    # -- LoRA adapters and the cache ---------------------------------------------
    def apply_lora_adapters(self, lora_list: Any, where: str = "apply_lora_adapters") -> None:
        entries = P.lora_entries(lora_list, where)
        self.require("lora", "LoRA adapters")
        for entry in entries:
            if not os.path.isfile(entry["path"]):
                raise InvalidParamsError(f"{where}: no such LoRA adapter file: {entry['path']}")
        self.adapter.set_lora([(entry["path"], entry["scaled"]) for entry in entries])
        self._lora = entries

    def remove_lora_adapters(self) -> None:
        if self._lora:
            self.adapter.set_lora([])
            self._lora = []

    def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        return [{"path": entry["path"], "scaled": entry["scaled"]} for entry in self._lora]

    def clear_cache(self, clear_data: bool) -> None:
        if not isinstance(clear_data, bool):
            raise InvalidParamsError(f"clear_cache: clear_data must be a bool, got {clear_data!r}")
        self.adapter.clear_cache(clear_data)

    def get_formatted_chat(self, messages: Any, template: str | None, params: Mapping[str, Any] | None,
                           strict: bool) -> dict[str, Any]:
        if template is not None and not isinstance(template, str):
            raise InvalidParamsError(f"get_formatted_chat: template must be a string, got {type(template).__name__}")
        p = P.validate(params, {name: P.COMPLETION_FIELDS[name] for name in P.CHAT_FIELDS}, "get_formatted_chat")
        schema = p["json_schema"] if p["json_schema"] is not None else P.response_format_schema(p["response_format"])
        chat = self._chat(messages, template or p["chat_template"], p, has_grammar=schema is not None)
        if schema is not None and not chat.grammar:
            chat.grammar = convert_json_schema_to_grammar(schema, strict=strict)
        return chat.as_result()

    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]:
        """llama.rn's bench; ``stop`` (the context's stop_completion flag) ends it early with ``interrupted``."""
        for name, value in (("pp", pp), ("tg", tg), ("pl", pl), ("nr", nr)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParamsError(f"bench: '{name}' must be an int >= 1, got {value!r}")
        self.require("bench", "bench")
        return self.adapter.bench(pp, tg, pl, nr, stop)

    # -- sessions ------------------------------------------------------------
    def load_session(self, path: str) -> SessionLoadResult:
        path = session_path(path, "load_session")
        self.require("session", "load_session")
        if not os.path.isfile(path):
            raise SessionError(f"Failed to load session: no such file: {path}")
        try:
            saved = read_sidecar(path)  # checks the file's checksum before any native loader reads it
        except SessionError:
            raise
        except OSError as err:
            raise SessionError(f"Failed to load session: cannot read {path}: {err.strerror or err}") from err
        if saved is not None:
            check_identity(saved, self.adapter.session_identity(), path)
        tokens = self.adapter.load_session(path)
        # media placeholders (negative) are no vocabulary ids: the prompt is the text around them, as in llama.rn
        return {"tokens_loaded": len(tokens), "prompt": self.adapter.detokenize([t for t in tokens if t >= 0])}

    def save_session(self, path: str, token_size: int) -> int:
        path = session_path(path, "save_session")
        if isinstance(token_size, bool) or not isinstance(token_size, int):
            raise InvalidParamsError(f"save_session: token_size must be an int (<= 0 saves all tokens), got {token_size!r}")
        self.require("session", "save_session")
        if os.path.isdir(path):
            raise SessionError(f"Failed to save session: {path} is a folder; pass a file path")
        try:
            return save_with_media(path, lambda tmp: self.adapter.save_session(tmp, token_size),
                                   self.adapter.session_identity(), lambda: self.adapter.session_media(token_size))
        except SessionError:
            raise
        except OSError as err:  # nothing changed: the previous file and its sidecar are as they were
            raise SessionError(f"Failed to save session: {path}: {err.strerror or err}") from err

    # -- multimodal ----------------------------------------------------------
    def init_multimodal(self, params: Mapping[str, Any] | None) -> bool:
        p = P.validate(params, P.MULTIMODAL_FIELDS, "init_multimodal")
        if not p["path"]:
            raise InvalidParamsError("init_multimodal: 'path' (the mmproj GGUF file) is required")
        self.require("multimodal", "init_multimodal")
        self.adapter.init_multimodal(local_path(p["path"]), p["use_gpu"], p["image_min_tokens"], p["image_max_tokens"])
        return True

    def is_multimodal_enabled(self) -> bool:
        return self.adapter.multimodal_enabled

    def get_multimodal_support(self) -> dict[str, bool]:
        return dict(self.adapter.multimodal_support())

    def release_multimodal(self) -> None:
        self.adapter.release_multimodal()

    def close(self) -> None:
        self.adapter.close()



class LocalSlots:
    """Parallel mode on a model in this process: each request runs the same ``LocalCore`` request building
    and engine loop, on the adapter ``sequence(progress)`` gives it: one sequence of the runtime's batch
    (llama_cpp's ``open_batch``), or the adapter itself where requests take turns (``concurrency`` 1)."""

    support: Literal["native", "emulated"]

    def __init__(self, core: LocalCore, n_parallel: int, batch: Any) -> None:
        self._core, self.batch, self.n_parallel = core, batch, n_parallel
        if batch is None:
            self.concurrency, self.support = 1, "emulated"
        else:
            self.concurrency, self.support = n_parallel, "native"

    def _sequence(self, progress: Progress | None) -> Adapter:
        return self._core.adapter if self.batch is None else self.batch.sequence(progress)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()

    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event, strict: bool,
                   progress: Progress) -> Generator[TokenData, None, CompletionResult]:
        if self.batch is None or not getattr(self.batch, "state_files", False):
            # requests take turns on one sequence, or the batch keeps no state files: the state params warn
            # (completion_params)
            sequence = self._sequence(progress)
            try:
                return (yield from self._core.completion_on(sequence, params, stop, strict, progress))
            finally:
                self._done(sequence)
        # a batch's sequence, with its state files (llama.rn's load/save_state_path): the slot loads and saves them,
        # and keeps its sequence until ``finish`` has saved what the request asks
        params, state = take_state(params)
        sequence = self.batch.sequence(progress, state)
        finished: CompletionResult | None = None  # stays None when the request fails or is closed
        try:
            result = yield from self._core.completion_on(sequence, params, stop, strict, progress)
            finished = result
        finally:
            try:
                sequence.finish(finished)
            finally:
                self._done(sequence)
        return result

    def embedding(self, text: str, params: Mapping[str, Any] | None, progress: Progress) -> EmbeddingResult:
        sequence = self._sequence(progress)
        try:
            return self._core.embedding(text, params, sequence)
        finally:
            self._done(sequence)

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None,
               progress: Progress) -> list[RerankResult]:
        sequence = self._sequence(progress)
        try:
            return self._core.rerank(query, documents, params, sequence)
        finally:
            self._done(sequence)

    def _done(self, sequence: Adapter) -> None:
        if self.batch is not None:  # a batch's sequence: the request is over, whether or not it ever ran
            sequence.close()
