"""``backend: "openai"``: a context core over an OpenAI-compatible inference server.

vLLM, SGLang, llama.cpp's llama-server, Ollama, LM Studio and llama-cpp-python's
server all speak the OpenAI HTTP API. ``OpenAICore`` maps llama.rn's calls onto
it: completions stream over SSE into TokenData, stop strings are matched here
(so ``stopping_word`` is exact), token counts and timings come from the
server's usage and timings where it sends them, and HTTP failures arrive as the
usual ``LlamaError`` classes. The context's busy/released rules, streams and
async twin are the same as on a local model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Generator, Mapping
from urllib.parse import urlsplit

import numpy as np

from .. import params as P
from ..chat.messages import media_refs
from ..embeddings import cosine_scores, normalize_embedding, ranked
from ..errors import (
    GenerationError,
    InvalidParamsError,
    LlamaError,
    SessionError,
    UnsupportedFeatureError,
    unsupported,
)
from ..grammars.schema import convert_json_schema_to_grammar
from ..media import MEDIA_MARKER
from ..parallel.slots import CoreSlots, Progress, Slots
from ..sessions import atomic_write_bytes
from ..text_stream import TextStream, drain
from ..types import (
    CompletionProbability,
    CompletionResult,
    EmbeddingResult,
    LoraAdapter,
    RerankResult,
    SessionLoadResult,
    TokenData,
    TokenizeResult,
)
from .dialects import DIALECTS, ServerFacts, probe
from .http import HttpSession, http_error
from .lora import ServerAdapter, list_adapters, match_adapters, request_field
from .request import CompletionPlan, check_sendable, media_parts, plan_completion, projector_hint
from .slot_sessions import (
    CLAIMS,
    Descriptor,
    client_path,
    new_stem,
    probe_slot_saving,
    read_descriptor,
    server_file_name,
    slot_action,
)
from .slot_sessions import encode as encode_descriptor

__all__ = ["OpenAICore", "connect", "OPENAI_FIELDS"]

logger = logging.getLogger(__name__)

OPENAI_FIELDS: dict[str, P.Field] = {
    "base_url": P.Field((str,), None, lambda v: urlsplit(v).scheme in ("http", "https"),
                        "an http(s) URL such as http://127.0.0.1:8080/v1", nullable=True),
    "api_key": P.Field((str,), None, nullable=True),
    "server": P.Field((str,), "auto", lambda v: v == "auto" or v in DIALECTS, f"'auto' or one of {', '.join(DIALECTS)}"),
    "timeout": P.Field((int, float), 120.0, lambda v: v > 0, "> 0 seconds (to wait for the next data)"),
    "connect_timeout": P.Field((int, float), 10.0, lambda v: v > 0, "> 0 seconds"),
    "max_retries": P.Field((int,), 2, lambda v: 0 <= v <= 10, "0..10"),
    "max_connections": P.Field((int,), 8, lambda v: v >= 1, ">= 1"),
    # llama-server's prompt cache with LoRA adapters loaded: off unless asked (see OpenAICore.completion)
    "lora_prompt_cache": P.Field((bool,), False),
}
DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
# How often a waiting completion looks at its stop flag (stop latency while no token arrives).
_STOP_POLL_S = 0.02


def _server_root(base_url: str) -> str:
    """The server's root URL: OpenAI paths go under ``/v1``, the extensions (tokenize, props) beside it."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def connect(raw: dict[str, Any]) -> "OpenAICore":
    """Validate the init params, reach the server, and probe what it can do."""
    params = P.validate_remote(raw, OPENAI_FIELDS, "openai", uses=P.LORA_INIT_FIELDS)
    base_url = params["base_url"] or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    session = HttpSession(_server_root(base_url), params["api_key"] or os.environ.get("OPENAI_API_KEY"),
                          timeout=float(params["timeout"]), connect_timeout=float(params["connect_timeout"]),
                          max_retries=params["max_retries"], max_connections=params["max_connections"])
    try:
        facts = probe(session, raw.get("model"), params["server"])
        core = OpenAICore(session, facts, params)
        if facts.dialect.name == "llama-server":
            core.probe_sessions()
        if params["embedding"]:
            core.probe_embedding()
        core.probe_lora()
        lora = P.init_lora(params)
        if lora:
            core.apply_lora_adapters(lora, "init_llama")
    except BaseException:
        session.close()
        raise
    return core


class OpenAICore:
    """A context core whose model lives in an OpenAI-compatible server."""

    backend = "openai"

    def __init__(self, session: HttpSession, facts: ServerFacts, params: dict[str, Any]) -> None:
        self._session = session
        self.facts = facts
        self.params = {**params, "model": facts.model}
        self.model = facts.model_dict()
        self._embedding_error = "the context was created without 'embedding': True"
        dialect = facts.dialect
        self._features: dict[str, str] = {
            "completion": "native", "streaming": "native", "stop": "emulated", "temperature": "native",
            **dialect.features(), "embedding": "missing", "bench": "missing", "session": "missing",
            "interrupt_prompt": "emulated", "chat_template": "native",
            "formatted_chat": "native" if dialect.apply_template else "missing",
            "rerank": "missing", "lora": "missing",
            "multimodal": "native" if facts.modalities else "missing",
        }
        self._media_on = facts.modalities is not None  # release_multimodal turns this context's media off
        # sessions: llama-server's slot save/restore (probe_sessions); the slot this context pins its cache to
        self._session_error = "an OpenAI-compatible server keeps its KV cache to itself"
        self._n_slots: int | None = None
        self._home_slot: int | None = None
        self._cached: _SlotCache | None = None  # what the home slot holds, as far as this context knows
        self.gpu, self.reason_no_gpu = False, "the model runs in a server that does not say"
        self.devices: list[str] = []
        # LoRA (llama-server): the server's adapters, and this context's applied ones ({path, scaled, id})
        self._server_adapters: list[ServerAdapter] = []
        self._lora: list[dict[str, Any]] = []
        self._cache_prompt = True
        self.system_info = f"the model runs in an OpenAI-compatible server ({facts.dialect.name}) that does not report its system"
        self.android_lib = None

    @property
    def capabilities(self) -> dict[str, Any]:
        return {"backend": self.backend, "server": self.facts.dialect.name, "features": dict(self._features)}

    def probe_sessions(self) -> None:
        """llama-server saves slots only with --slot-save-path: one refused slot action (no side effect) tells."""
        if self.facts.modalities is not None and self.facts.dialect.media == "props":
            # it refuses slot actions with a projector loaded, after the filename check the probe relies on
            self._session_error = ("llama-server refuses slot save/restore while a projector is loaded (--mmproj); "
                                   "run one without it for sessions")
            logger.info("openai: no sessions: %s", self._session_error)
            return
        n_slots, why = probe_slot_saving(self._session)
        if n_slots is None:
            logger.info("openai: no sessions: %s", why)
            self._session_error = why or self._session_error
            return
        self._n_slots = n_slots
        self._features["session"] = "native"

    def probe_embedding(self) -> None:
        """One tiny embedding: servers without embeddings (or started without them) say so once, here."""
        try:
            vector = self._embed("probe")
        except (UnsupportedFeatureError, InvalidParamsError, GenerationError) as err:
            logger.info("openai: the server has no embeddings: %s", err)
            fix = " (start llama-server with --embeddings)" if self.facts.dialect.name == "llama-server" else ""
            self._embedding_error = err.detail + fix
            return
        self._features["embedding"] = "native"
        # rerank: a reranker model's own scores (llama-server started with --pooling rank), else cosine similarity
        self._features["rerank"] = "emulated"
        if self.facts.dialect.rerank is not None:
            try:
                self._rank("probe", ["probe"])
                self._features["rerank"] = "native"
            except LlamaError as err:
                logger.info("openai: the server does not rerank (%s); rerank uses cosine similarity", err)
        self.facts.n_embd = self.facts.n_embd or len(vector)
        self.model["n_embd"] = self.facts.n_embd

    def probe_lora(self) -> None:
        """The adapters llama-server loaded at start. The context starts with the server's own setting (those at a
        non-zero global scale: ``--lora`` applies, ``--lora-init-without-apply`` does not), held from here on."""
        endpoint = self.facts.dialect.lora
        if endpoint is None:
            return
        try:
            adapters = list_adapters(self._session, endpoint)
        except (UnsupportedFeatureError, InvalidParamsError, GenerationError) as err:
            logger.info("openai: the server does not list LoRA adapters (%s); LoRA calls are refused", err)
            return
        self._features["lora"] = "native"
        self._set_server_adapters(adapters)
        self._lora = [{"path": a.path, "scaled": a.scale, "id": a.id} for a in adapters if a.scale != 0]

    def _set_server_adapters(self, adapters: list[ServerAdapter]) -> None:
        self._server_adapters = adapters
        # llama-server's RAM prompt cache (--cache-ram, on by default) keys its entries by tokens alone, and hands a
        # prompt's KV computed under one LoRA setting to a request under another (seen on b11434: a prompt cached
        # with the adapter at 0, evicted, then asked at 1, answered from the scale-0 KV). Every request sends
        # cache_prompt false on a server with adapters, unless the caller says the cache is safe there.
        self._cache_prompt = not adapters or self.params["lora_prompt_cache"]
        if self.facts.dialect.reports_cache:
            self._features["prefix_cache"] = "native" if self._cache_prompt else "missing"

    # -- completion ----------------------------------------------------------
    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event,
                   strict: bool) -> Generator[TokenData, None, CompletionResult]:
        return self._complete(params, stop, strict, pin=True)

    def _complete(self, params: Mapping[str, Any] | None, stop: threading.Event, strict: bool,
                  pin: bool) -> Generator[TokenData, None, CompletionResult]:
        tokenize = self._tokenize if self.facts.dialect.tokenize else None
        plan = plan_completion(params, self.facts, strict, tokenize, self._media_support())
        if self._server_adapters:  # this context's adapters, whatever the server's global scales are now
            lora = request_field(self._lora, self._server_adapters)
            plan = replace(plan, body={**plan.body, "lora": lora, **({} if self._cache_prompt else {"cache_prompt": False})})
        slot = self._home() if pin and self._n_slots is not None else None
        if slot is None:
            if self._n_slots is not None:  # unpinned, it may land in any slot: no context's save may trust its own
                for any_slot in range(self._n_slots):
                    CLAIMS.used(self._session.base_url, any_slot, self)
            return (yield from _Run(self, plan, stop).events())
        # pinned: the cache stays in the slot that save_session saves; what the slot holds is unknown until done
        plan = replace(plan, body={**plan.body, "id_slot": slot})
        self._cached = None
        CLAIMS.used(self._session.base_url, slot, self)
        run = _Run(self, plan, stop)
        result = yield from run.events()
        self._cached = _SlotCache(plan, result["tokens_evaluated"], result["tokens_cached"], tuple(run.pieces), None)
        return result

    # -- tokens, embedding ---------------------------------------------------
    def _tokenize(self, text: str) -> list[int]:
        endpoint = self.facts.dialect.tokenize
        if endpoint is None:
            raise UnsupportedFeatureError(f"tokenize: this {self.facts.dialect.name} server has no tokenize endpoint")
        reply = self._session.post(endpoint.path, {"model": self.facts.model, endpoint.takes: text, **endpoint.extra})
        tokens = reply.get(endpoint.gives) if isinstance(reply, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise GenerationError(f"tokenize: unexpected reply from {endpoint.path}: {reply!r}")
        return tokens

    def tokenize(self, text: str, params: Mapping[str, Any] | None) -> TokenizeResult:
        text = P.text_argument(text, "tokenize")
        if P.validate(params, P.TOKENIZE_FIELDS, "tokenize", not_yet=P.TOKENIZE_NOT_YET).get("media_paths"):
            raise UnsupportedFeatureError("tokenize: 'media_paths' cannot be tokenized over the OpenAI API")
        return {"tokens": self._tokenize(text) if text else [], "has_media": False, "bitmap_hashes": [],
                "chunk_pos": [], "chunk_pos_media": []}

    def detokenize(self, tokens: list[int]) -> str:
        tokens = P.token_ids(tokens, self.facts.n_vocab, "detokenize")
        endpoint = self.facts.dialect.detokenize
        if endpoint is None:
            raise UnsupportedFeatureError(f"detokenize: this {self.facts.dialect.name} server has no detokenize endpoint")
        if not tokens:
            return ""
        reply = self._session.post(endpoint.path, {"model": self.facts.model, endpoint.takes: tokens})
        text = reply.get(endpoint.gives) if isinstance(reply, dict) else None
        if not isinstance(text, str):
            raise GenerationError(f"detokenize: unexpected reply from {endpoint.path}: {reply!r}")
        return text

    def _embed(self, text: str) -> list[float]:
        try:
            reply = self._session.post("/v1/embeddings", {"model": self.facts.model, "input": text})
            path = "/v1/embeddings"
        except InvalidParamsError as err:
            # llama-server with a generative model pools 'none' by default and refuses /v1/embeddings; its own
            # /embeddings serves the per-token rows, pooled below as the local backends pool them
            if self.facts.dialect.name != "llama-server" or "pooling type 'none'" not in err.detail.lower():
                raise
            reply, path = self._session.post("/embeddings", {"content": text}), "/embeddings"
            reply = {"data": reply} if isinstance(reply, list) else reply
        try:
            vector = reply["data"][0]["embedding"]
            if vector and isinstance(vector[0], list):  # per-token rows (a model without pooling): mean-pooled,
                return np.asarray(vector, dtype=np.float64).mean(axis=0).tolist()  # as the local backends pool
            return [float(v) for v in vector]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise GenerationError(f"embedding: unexpected reply from {path}: {str(reply)[:200]}") from err

    def embedding(self, text: str, params: Mapping[str, Any] | None) -> EmbeddingResult:
        text = P.text_argument(text, "embedding")
        normalize = P.embedding_normalize(params, self.params)
        if self._features["embedding"] == "missing":
            raise UnsupportedFeatureError(f"embedding is not available from this server: {self._embedding_error}")
        return {"embedding": normalize_embedding(self._embed(text), normalize)}

    # -- what an OpenAI server does not offer --------------------------------
    def get_formatted_chat(self, messages: Any, template: str | None, params: Mapping[str, Any] | None,
                           strict: bool) -> dict[str, Any]:
        """llama-server renders the prompt its chat completions would use (POST /apply-template); other OpenAI
        servers do not expose it."""
        if self.facts.dialect.apply_template is None:
            raise UnsupportedFeatureError("get_formatted_chat: an OpenAI-compatible server applies its chat template "
                                          f"itself, and this {self.facts.dialect.name} server does not expose the "
                                          "rendered prompt")
        if template is not None:
            raise UnsupportedFeatureError("get_formatted_chat: 'template' cannot be honoured: the server renders "
                                          "its own chat template")
        p = P.validate(params, {name: P.COMPLETION_FIELDS[name] for name in P.CHAT_FIELDS}, "get_formatted_chat")
        messages = P.completion_params({"messages": messages}, strict)["messages"]
        forwarded, media = media_parts(messages)
        if media:
            check_sendable(media, self.facts, self._media_support())
        body: dict[str, Any] = {"messages": forwarded}
        if p["tools"]:
            body["tools"] = p["tools"]
        reply = self._session.post(self.facts.dialect.apply_template, body)
        prompt = reply.get("prompt") if isinstance(reply, dict) else None
        if not isinstance(prompt, str):
            raise GenerationError(f"get_formatted_chat: unexpected reply from {self.facts.dialect.apply_template}: "
                                  f"{str(reply)[:200]}")
        if media and self.facts.media_marker:  # the server's own marker, as llama.rn's (a raw prompt takes it back)
            prompt = prompt.replace(self.facts.media_marker, MEDIA_MARKER)
        schema = p["json_schema"] if p["json_schema"] is not None else P.response_format_schema(p["response_format"])
        grammar = convert_json_schema_to_grammar(schema, strict=strict) if schema is not None else ""
        return {"type": "jinja", "prompt": prompt, "chat_format": 0, "grammar": grammar, "grammar_lazy": False,
                "grammar_triggers": [], "preserved_tokens": [], "additional_stops": [], "generation_prompt": "",
                "thinking_forced_open": False, "has_media": bool(media), "media_paths": media_refs(messages) if media else []}

    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]:
        raise UnsupportedFeatureError("bench: not available over the OpenAI API; time completions instead")

    def _rank(self, query: str, documents: list[str]) -> list[float]:
        path = self.facts.dialect.rerank or "/v1/rerank"
        reply = self._session.post(path, {"model": self.facts.model, "query": query, "documents": documents})
        try:
            scores = [0.0] * len(documents)
            for item in reply["results"]:
                scores[item["index"]] = float(item["relevance_score"])
            return scores
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise GenerationError(f"rerank: unexpected reply from {path}: {str(reply)[:200]}") from err

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None) -> list[RerankResult]:
        query, documents = P.rerank_arguments(query, documents, params, self.params)
        if self._features["rerank"] == "missing":
            raise UnsupportedFeatureError(f"rerank needs embeddings, not available from this server: "
                                          f"{self._embedding_error}")
        if self._features["rerank"] == "native":
            scores = self._rank(query, documents) if documents else []
        else:  # as the local backends rank with an embedding model
            scores = cosine_scores(self._embed, query, documents)
        return ranked(scores, documents)

    def apply_lora_adapters(self, lora_list: Any, where: str = "apply_lora_adapters") -> None:
        """llama.rn's set of adapters (it replaces the last), among those llama-server loaded at start; sent with
        each of this context's requests, so other clients of the server keep theirs."""
        entries = P.lora_entries(lora_list, where)
        if self._features["lora"] != "native":
            message = (f"{where}: this {self.facts.dialect.name} server takes no LoRA adapters over its API "
                       "(llama.cpp's llama-server does: --lora FILE)")
            if where == "init_llama":  # an init param: a warning, as other params a backend lacks
                unsupported(self.params["strict"], message + "; 'lora' / 'lora_list' ignored")
                return
            raise UnsupportedFeatureError(message)
        # listed again: the same URL may answer from a server restarted with other adapters
        adapters = list_adapters(self._session, self.facts.dialect.lora or "")
        self._lora = match_adapters(entries, adapters, where, self._session.base_url)
        self._set_server_adapters(adapters)

    def remove_lora_adapters(self) -> None:
        if self._features["lora"] != "native":
            raise UnsupportedFeatureError(f"remove_lora_adapters: this {self.facts.dialect.name} server takes no LoRA "
                                          "adapters over its API")
        self._lora = []  # the server's adapters at scale 0 from the next request on

    def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        return [{"path": entry["path"], "scaled": entry["scaled"]} for entry in self._lora]

    def clear_cache(self, clear_data: bool) -> None:
        """Nothing to clear here: every request carries its whole prompt, and the server's cache is its own."""

    # -- sessions: llama-server's slot save/restore (slot_sessions) ------------
    def _home(self) -> int:
        """This context's slot, claimed on first use."""
        if self._home_slot is None:
            assert self._n_slots is not None
            self._home_slot = CLAIMS.claim(self._session.base_url, self._n_slots)
        return self._home_slot

    def _require_sessions(self, what: str) -> None:
        if self._n_slots is None:
            raise UnsupportedFeatureError(f"{what}: {self._session_error}")

    def load_session(self, path: str) -> SessionLoadResult:
        path = client_path(path, "load_session")
        self._require_sessions("load_session")
        if not os.path.isfile(path):
            raise SessionError(f"Failed to load session: no such file: {path}")
        saved = read_descriptor(path)  # checked whole before the server is asked
        if saved.model != self.facts.model:
            raise SessionError(f"Failed to load session: {path} was saved from model {saved.model!r}; this context "
                               f"runs {self.facts.model!r}")
        slot = self._home()
        self._cached = None
        CLAIMS.used(self._session.base_url, slot, self)
        where = f" (saved on {saved.server}; a server restores only files in its own --slot-save-path)"
        try:
            reply = slot_action(self._session, slot, "restore", saved.server_file, "Failed to load session")
        except SessionError as err:
            raise SessionError(f"{err.detail}{where if saved.server != self._session.base_url else ''}") from None
        n_restored = reply.get("n_restored")
        if n_restored != saved.n_tokens:
            raise SessionError(f"Failed to load session: {path} lists {saved.n_tokens} tokens but the server's "
                               f"{saved.server_file} held {n_restored!r}: the server-side file was replaced (a copy "
                               "of a descriptor outlives its file once the original path is saved twice more)")
        self._cached = _SlotCache(None, 0, saved.n_tokens, (), saved.text)
        return {"tokens_loaded": saved.n_tokens, "prompt": saved.text}

    def save_session(self, path: str, token_size: int) -> int:
        path = client_path(path, "save_session")
        if isinstance(token_size, bool) or not isinstance(token_size, int):
            raise InvalidParamsError(f"save_session: token_size must be an int (<= 0 saves all tokens), got {token_size!r}")
        self._require_sessions("save_session")
        if os.path.isdir(path):
            raise SessionError(f"Failed to save session: {path} is a folder; pass a file path")
        cached, slot = self._cached, self._home_slot
        if cached is None or slot is None or CLAIMS.last_user(self._session.base_url, slot) is not self:
            raise SessionError("Failed to save session: this context holds no cache on the server that it knows of "
                               "(none yet, the last completion failed, parallel mode ran, or another context of "
                               "this process shares its slot and ran since): run a completion, then save")
        if 0 < token_size < cached.n_cached:
            raise SessionError(f"Failed to save session: token_size {token_size} asks for part of the cache, and "
                               f"llama-server saves a slot's whole cache ({cached.n_cached} tokens): pass -1, or "
                               f"run a completion on the first {token_size} tokens' text and save that")
        stem, generation = new_stem(), 0
        try:  # a save to a descriptor's path writes the other of its two server files: that one stays whole
            previous = read_descriptor(path) if os.path.isfile(path) else None
        except SessionError:
            previous = None
        if previous is not None:
            stem, generation = previous.stem, 1 - previous.generation
        n_saved, cached = self._save_slot(slot, server_file_name(stem, generation), cached)
        if 0 < token_size < n_saved:
            raise SessionError(f"Failed to save session: the slot held {n_saved} tokens, more than token_size "
                               f"{token_size}, and llama-server saves a slot's whole cache: pass -1")
        descriptor = Descriptor(stem, generation, n_saved, self.facts.model, self._session.base_url,
                                self._cached_text(cached, n_saved))
        try:
            atomic_write_bytes(path, encode_descriptor(descriptor))
        except OSError as err:  # the previous descriptor and its server file are as they were
            raise SessionError(f"Failed to save session: {path}: {err.strerror or err}") from err
        return n_saved

    def _save_slot(self, slot: int, name: str, cached: "_SlotCache") -> tuple[int, "_SlotCache"]:
        """Save the slot as ``name``: the token count, and what the slot held."""
        for attempt in range(2):
            reply = slot_action(self._session, slot, "save", name, "Failed to save session")
            n_saved = reply.get("n_saved")
            if not isinstance(n_saved, int) or n_saved < 0:
                raise SessionError(f"Failed to save session: llama-server answered the slot save with {reply!r}")
            if n_saved >= cached.n_cached:
                return n_saved, cached
            # the slot lost the cache: with a unified KV cache llama-server clears idle slots (into its RAM
            # prompt cache) when another request starts (--cache-idle-slots, its default); evaluate the known
            # text into the slot again (often from that RAM cache) and save that
            if attempt:
                break
            text = self._cached_text(cached, cached.n_cached)
            drain(self._complete({"prompt": text, "n_predict": 0}, threading.Event(), False, pin=True), None)
            assert self._cached is not None
            cached = self._cached
        raise SessionError(f"Failed to save session: llama-server cleared slot {slot} again before it was saved (it "
                           "clears idle slots when other requests start): start it with --no-cache-idle-slots, or "
                           "save while no other client sends requests")

    def _cached_text(self, cached: "_SlotCache", n_saved: int) -> str:
        """The text of the slot's ``n_saved`` tokens: the prompt (a chat's as the server renders it), then the
        reply's first pieces (one per token as llama-server streams them; a chat's are its parsed content)."""
        if cached.text is not None:
            return cached.text
        plan = cached.plan
        assert plan is not None
        if plan.chat:
            body: dict[str, Any] = {k: plan.body[k] for k in ("messages", "tools", "chat_template_kwargs")
                                    if k in plan.body}
            reply = self._session.post("/apply-template", body)
            prompt = reply.get("prompt") if isinstance(reply, dict) else None
            if not isinstance(prompt, str):
                raise SessionError(f"Failed to save session: unexpected reply from /apply-template: {str(reply)[:200]}")
        else:
            prompt = plan.body["prompt"] if isinstance(plan.body["prompt"], str) else ""
        return prompt + "".join(cached.pieces[: max(n_saved - cached.n_prompt, 0)])

    # -- multimodal: the server's own projector (llama-server --mmproj); the context only turns its media on or off
    def init_multimodal(self, params: Mapping[str, Any] | None) -> bool:
        """True when the server takes media: its projector serves, and ``path`` (a file of this machine) is not
        loaded (a server loads its projector at its start)."""
        p = P.validate(params, P.MULTIMODAL_FIELDS, "init_multimodal")
        if not p["path"]:
            raise InvalidParamsError("init_multimodal: 'path' (the mmproj GGUF file) is required")
        if self.facts.modalities is None:
            raise UnsupportedFeatureError(f"init_multimodal: the {self.facts.dialect.name} server at "
                                          f"{self._session.base_url} loads no projector ({projector_hint(self.facts.dialect)})")
        logger.info("openai: init_multimodal: the server's own projector serves; %s is not loaded", p["path"])
        self._media_on = True
        return True

    def is_multimodal_enabled(self) -> bool:
        return self._media_on

    def _media_support(self) -> dict[str, bool] | None:
        """What this context's media may be (``{"vision", "audio"}``); None while it sends none."""
        return self.facts.modalities if self._media_on else None

    def get_multimodal_support(self) -> dict[str, bool]:
        return dict(self._media_support() or {"vision": False, "audio": False})

    def release_multimodal(self) -> None:
        self._media_on = False  # the server keeps its projector (other clients use it); this context sends no media

    def open_slots(self, n_parallel: int, n_batch: int) -> Slots:
        """Parallel mode: concurrent streams, which the server batches (``n_batch`` is the server's own); one at a
        time to a server that cuts a stream when the next request comes (``Dialect.concurrent``)."""
        self._cached = None  # unpinned requests may land in this context's slot
        if self.facts.dialect.concurrent:
            return _UnpinnedSlots(self, n_parallel, n_parallel, "native")
        return _UnpinnedSlots(self, n_parallel, 1, "emulated")

    def close(self) -> None:
        if self._home_slot is not None:
            CLAIMS.release(self._session.base_url, self._home_slot, self)
            self._home_slot = None
        self._session.close()


@dataclass(frozen=True)
class _SlotCache:
    """What a context's home slot holds: after a completion (its plan, prompt tokens, cached tokens and streamed
    pieces), or after load_session (the descriptor's count and text)."""

    plan: CompletionPlan | None
    n_prompt: int
    n_cached: int
    pieces: tuple[str, ...]
    text: str | None


class _UnpinnedSlots(CoreSlots):
    """Parallel mode: requests go unpinned, for the server to spread over its slots."""

    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event, strict: bool,
                   progress: Progress) -> Generator[TokenData, None, CompletionResult]:
        return self._core._complete(params, stop, strict, pin=False)


class _Run:
    """One streamed completion: SSE chunks in, TokenData out (through the sequence's ``TextStream``), llama.rn's
    result at the end."""

    def __init__(self, core: OpenAICore, plan: CompletionPlan, stop: threading.Event) -> None:
        self.core, self.plan, self.stop = core, plan, stop
        self.reasoning = ""
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.n_chunks = self.n_probs_seen = 0
        self.pieces: list[str] = []  # the reply's text pieces as streamed (llama-server: one per token)
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        # A chat's parsed fields are the server's (content, reasoning and tool-call deltas), not parsed here.
        self.text = TextStream(plan.stop, plan.n_probs, self._parsed if plan.chat else None)

    def events(self) -> Generator[TokenData, None, CompletionResult]:
        text = self.text
        keep = self.plan.n_predict != 0
        started = time.perf_counter()
        first: float | None = None
        interrupted = done = False
        chunks = _stream(self.core._session, self.plan, self.stop)
        try:
            for chunk in chunks:
                if chunk is None:  # stopped
                    interrupted = True
                    break
                if first is None:
                    first = time.perf_counter()
                piece, probs, note = self._read(chunk)
                if not keep:
                    continue
                if piece:
                    self.pieces.append(piece)
                event = text.push(piece, probs, note)
                if event is not None:
                    yield event
                if text.stopping_word:
                    break
            else:
                done = True
            last = text.flush()
            if last is not None:
                yield last
        finally:
            chunks.close()
        if done and self.finish is None and self.n_chunks == 0:
            self._diagnose_empty_stream()
        return self._result(started, first, interrupted)

    # -- chunks --------------------------------------------------------------
    def _read(self, chunk: dict[str, Any]) -> tuple[str, list[CompletionProbability], str | None]:
        """One chunk's text of the reply, its probabilities, and a note (the reasoning delta, or "") when it
        carries a chat delta without reply text (reasoning, tool calls); None when it carries none."""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        if "choices" not in chunk and isinstance(chunk.get("content"), str):
            return self._read_native(chunk)
        choices = chunk.get("choices") or []
        if not choices:
            return "", [], None
        choice = choices[0]
        self.finish = choice.get("finish_reason") or self.finish
        logprobs = choice.get("logprobs")
        probs = _probabilities(logprobs, self.plan.n_probs) if self.plan.n_probs and logprobs else []
        self.n_probs_seen += len(probs)
        if not self.plan.chat:
            text = choice.get("text") or ""
            self.n_chunks += bool(text)
            return text, probs, None
        delta = choice.get("delta") or {}
        note: str | None = None
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        if reasoning:
            self.reasoning += reasoning
            note = reasoning
        for call in delta.get("tool_calls") or []:
            self._add_tool_call(call)
            note = note or ""
        text = delta.get("content") or ""
        self.n_chunks += bool(text or note is not None)
        return text, probs, note

    def _read_native(self, chunk: dict[str, Any]) -> tuple[str, list[CompletionProbability], str | None]:
        """llama-server's native /completion chunk (a raw prompt's media go there): content, and at the end
        stop_type with the counts."""
        if chunk.get("stop"):
            self.finish = "length" if chunk.get("stop_type") == "limit" else "stop"
            self.usage = {key: chunk[name] for key, name in (("completion_tokens", "tokens_predicted"),
                                                              ("prompt_tokens", "tokens_evaluated"))
                          if isinstance(chunk.get(name), int)}
        entries = chunk.get("completion_probabilities")
        probs = (_probabilities({"content": entries}, self.plan.n_probs)
                 if self.plan.n_probs and isinstance(entries, list) else [])
        self.n_probs_seen += len(probs)
        text = chunk["content"]
        self.n_chunks += bool(text)
        return text, probs, None

    def _add_tool_call(self, call: dict[str, Any]) -> None:
        slot = self.tool_calls.setdefault(call.get("index", len(self.tool_calls)),
                                          {"type": "function", "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            slot["id"] = call["id"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def _parsed(self, content: str, _partial: bool) -> dict[str, Any]:
        """llama.rn's parsed fields, cumulative: content, reasoning_content, tool_calls (each when non-empty)."""
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [dict(call, function=dict(call["function"])) for _, call in sorted(self.tool_calls.items())]
        return out

    def _diagnose_empty_stream(self) -> None:
        """Some servers (llama-cpp-python) report request errors by ending the stream: ask once more, unstreamed."""
        body = {**self.plan.body, "stream": False, "max_tokens": 1}
        body.pop("stream_options", None)
        self.core._session.post(self.plan.path, body)  # raises the server's error, which is the point
        raise GenerationError(f"POST {self.plan.path}: the server ended the stream before any token, "
                              "and the same request unstreamed succeeded; see the server's log")

    # -- the result ----------------------------------------------------------
    def _result(self, started: float, first: float | None, interrupted: bool) -> CompletionResult:
        plan, usage, timings, word = self.plan, self.usage, self.timings, self.text.stopping_word
        finished = time.perf_counter()
        first = first if first is not None else finished
        limit_hit = self.finish == "length"
        if not plan.n_predict:
            n_predicted = 0
        elif isinstance(usage.get("completion_tokens"), int):
            n_predicted = usage["completion_tokens"]
        elif limit_hit and plan.n_predict > 0:
            n_predicted = plan.n_predict
        else:  # one token per chunk (or probability entry), plus the end-of-generation token, as llama.rn counts
            n_predicted = max(self.n_chunks, self.n_probs_seen) + (self.finish == "stop" and not word and not interrupted)
        n_evaluated = usage.get("prompt_tokens")
        if not isinstance(n_evaluated, int):
            n_evaluated = self._count_prompt()
        cache_n = timings.get("cache_n")
        if not isinstance(cache_n, int):
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            cache_n = cached if isinstance(cached, int) else 0
        ended = not interrupted and not word
        return self.text.result(
            # the server's cache, as llama.rn counts it: the last sampled token is never evaluated
            n_predicted=n_predicted, n_evaluated=n_evaluated, n_cached=n_evaluated + max(n_predicted - 1, 0),
            cache_n=cache_n, prompt_n=max(n_evaluated - cache_n, 0),
            prompt_ms=float(timings.get("prompt_ms", (first - started) * 1000.0)),
            predicted_ms=float(timings.get("predicted_ms", (finished - first) * 1000.0)),
            interrupted=interrupted, stopped_eos=ended and not limit_hit and self.finish is not None,
            stopped_limit=ended and limit_hit and plan.n_predict >= 0,
            context_full=ended and limit_hit and plan.n_predict < 0,
        )

    def _count_prompt(self) -> int:
        """The prompt's token count when the server sent no usage: its tokenize endpoint, for plain prompts."""
        if self.plan.chat or self.core.facts.dialect.tokenize is None or not isinstance(self.plan.body["prompt"], str):
            return 0  # a chat's template, or a prompt's media, are the server's to count
        try:
            return len(self.core._tokenize(self.plan.body["prompt"]))
        except LlamaError as err:
            logger.info("openai: could not count the prompt's tokens: %s", err)
            return 0


def _probabilities(logprobs: dict[str, Any], n_probs: int) -> list[CompletionProbability]:
    """OpenAI logprobs -> llama.rn's completion_probabilities (top n, most likely first, as probabilities).

    Told apart by shape, not endpoint: llama-server answers /v1/completions in the chat shape.
    """
    if isinstance(logprobs.get("content"), list):  # chat: [{token, logprob, top_logprobs: [{token, logprob}]}]
        return [_entry(item.get("token", ""), [(t["token"], t["logprob"]) for t in item.get("top_logprobs") or []],
                       n_probs) for item in logprobs["content"]]
    tokens = logprobs.get("tokens") or []  # completions: tokens + top_logprobs [{token: logprob}]
    return [_entry(token, list((tops or {}).items()), n_probs)
            for token, tops in zip(tokens, logprobs.get("top_logprobs") or [], strict=False)]


def _entry(content: str, tops: list[tuple[str, float]], n_probs: int) -> CompletionProbability:
    best = sorted(tops, key=lambda pair: pair[1], reverse=True)[:n_probs]
    return {"content": content, "probs": [{"tok_str": tok, "prob": math.exp(lp) if lp is not None else 0.0}
                                          for tok, lp in best]}


def _stream(session: HttpSession, plan: CompletionPlan, stop: threading.Event) -> Generator[dict[str, Any] | None, None, None]:
    """The request's SSE chunks as dicts, read on a helper thread so that ``stop`` acts within ``_STOP_POLL_S``.

    Yields None once when stopped. Closing the generator asks the reader to drop the
    connection at its next chunk (the server notices and stops generating).
    """
    replies: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    cancel = threading.Event()

    def read() -> None:
        try:
            with session.events(plan.path, plan.body) as events:
                for event in events:
                    if cancel.is_set():
                        return
                    replies.put(("data", event.data))
            replies.put(("end", None))
        except BaseException as err:  # handed to the caller's thread
            replies.put(("error", err))

    reader = threading.Thread(target=read, name="llamacompat-openai-stream", daemon=True)
    reader.start()
    try:
        while True:
            if stop.is_set():
                yield None
                return
            try:
                kind, value = replies.get(timeout=_STOP_POLL_S)
            except queue.Empty:
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            if value.strip() == "[DONE]":
                return
            chunk = _decode(value, plan.path)
            yield chunk
    finally:
        cancel.set()


def _decode(data: str, path: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as err:
        raise GenerationError(f"POST {path}: the server streamed something that is not JSON: {data[:200]!r}") from err
    if not isinstance(chunk, dict):
        raise GenerationError(f"POST {path}: the server streamed {data[:200]!r}")
    error = chunk.get("error")
    if error is not None:  # llama-server and vLLM report failures inside the stream
        code = error.get("code") if isinstance(error, dict) else None
        status = code if isinstance(code, int) else 500
        raise http_error(status, data, f"POST {path} (mid-stream)")
    return chunk
