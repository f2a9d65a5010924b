"""What each kind of OpenAI-compatible server accepts beyond the OpenAI API, and how to tell them apart.

Every server takes the OpenAI fields (temperature, top_p, presence and frequency
penalties, seed, logit_bias, logprobs, response_format). The rest of llama.rn's
sampling goes in extension fields whose names differ per server, and tokenize /
detokenize live at different paths with different field names. A ``Dialect``
holds those differences as data; ``probe`` picks one from the server's own
endpoints, once, when the context is created.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import InvalidParamsError, ModelLoadError
from ..models.gguf import SKIPPED_KEYS, read_metadata
from ..params import FEATURE_PARAMS
from .http import HttpSession

__all__ = ["Dialect", "DIALECTS", "ServerFacts", "probe", "STANDARD_FIELDS"]

logger = logging.getLogger(__name__)

# llama.rn param -> OpenAI field, on every server.
STANDARD_FIELDS = {"temperature": "temperature", "top_p": "top_p", "penalty_present": "presence_penalty",
                   "penalty_freq": "frequency_penalty", "seed": "seed"}
# Request features every server has (OpenAI fields): logit_bias and logprobs.
_STANDARD_FEATURES = {"logit_bias", "n_probs"}


@dataclass(frozen=True)
class Endpoint:
    """A JSON endpoint outside /v1: path, the field that takes the input, the field of the answer."""

    path: str
    takes: str
    gives: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Dialect:
    name: str
    sampling: Mapping[str, str]  # llama.rn param -> the server's extension field
    grammar_field: str | None = None  # where a GBNF grammar goes; None: only JSON schemas (response_format)
    tokenize: Endpoint | None = None
    detokenize: Endpoint | None = None
    always: Mapping[str, Any] = field(default_factory=dict)  # sent with every completion
    # max_tokens for llama.rn's n_predict -1, as a 1-tuple; None: leave max_tokens out (the server's own limit)
    unlimited: tuple[Any] | None = None
    reports_cache: bool = False  # timings.cache_n in the stream (llama-server)
    grammar_tokens: bool = True  # whether its grammars may use <token> references
    template_kwargs: bool = False  # takes chat_template_kwargs (enable_thinking goes there)
    reasoning_format: bool = False  # takes llama.rn's reasoning_format
    top_k_off: int = 0  # its top_k for "disabled" (llama.rn's 0)
    # values the server refuses although they are its own default: left out
    unsent: Mapping[str, Any] = field(default_factory=dict)
    # serves concurrent requests side by side (batched, or queued); False: a new request cuts the one it streams,
    # so parallel mode sends one at a time
    concurrent: bool = True
    rerank: str | None = None  # a Jina-style rerank endpoint (scores with a reranker model)
    apply_template: str | None = None  # renders a chat's prompt without generating (get_formatted_chat)
    # media (image_url / input_audio parts): "props" (its /props says what its projector takes; raw prompts take
    # media too), "forward" (sent; the server judges), "none" (refused: not verified to work)
    media: str = "forward"
    lora: str | None = None  # lists the LoRA adapters loaded at start; completions take a per-request 'lora'

    def field_for(self, param: str) -> str | None:
        return STANDARD_FIELDS.get(param) or self.sampling.get(param)

    def features(self) -> dict[str, str]:
        """llama.rn's request features: native when the server takes every param of the feature."""
        out = {}
        for feature, params in FEATURE_PARAMS.items():
            if feature == "grammar":
                native = self.grammar_field is not None
            elif feature in _STANDARD_FEATURES:
                native = True
            else:
                native = all(self.field_for(p) is not None for p in params)
            out[feature] = "native" if native else "missing"
        out["json_schema"] = "native"  # as a GBNF grammar where the server takes one, else response_format
        out["tokenize"] = out["detokenize"] = "native" if self.tokenize else "missing"
        out["prefix_cache"] = "native" if self.reports_cache else "missing"
        out["parallel"] = "native" if self.concurrent else "emulated"
        return out


_MIROSTAT = {"mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
DIALECTS: dict[str, Dialect] = {d.name: d for d in (
    # llama-cpp-python's server (python -m llama_cpp.server): verified by the test suite.
    Dialect("llama-cpp-python",
            {"top_k": "top_k", "min_p": "min_p", "penalty_repeat": "repeat_penalty", "mirostat": "mirostat_mode",
             **_MIROSTAT},
            grammar_field="grammar",
            tokenize=Endpoint("/extras/tokenize", "input", "tokens"),
            detokenize=Endpoint("/extras/detokenize", "tokens", "text"),
            unlimited=(None,),  # its max_tokens defaults to 16; null is "until the context ends"
            grammar_tokens=False,  # the process aborts on them (std::runtime_error in the grammar sampler)
            media="none",  # only with a llava chat handler set up at its start; not verified here
            # a second request interrupts the stream in progress (its interrupt_requests setting, on by default):
            # two parallel requests each ended after one token, without a finish_reason
            concurrent=False),
    # llama.cpp's llama-server: it takes every llama.rn sampling param under llama.cpp's names.
    Dialect("llama-server",
            {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p", "xtc_probability": "xtc_probability",
             "xtc_threshold": "xtc_threshold", "top_n_sigma": "top_n_sigma", "penalty_repeat": "repeat_penalty",
             "penalty_last_n": "repeat_last_n", "mirostat": "mirostat", **_MIROSTAT,
             "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
             "dry_penalty_last_n": "dry_penalty_last_n", "dry_sequence_breakers": "dry_sequence_breakers",
             "ignore_eos": "ignore_eos"},
            grammar_field="grammar",
            tokenize=Endpoint("/tokenize", "content", "tokens", {"add_special": False, "parse_special": True}),
            detokenize=Endpoint("/detokenize", "tokens", "content"),
            always={"cache_prompt": True}, unlimited=(-1,), reports_cache=True, template_kwargs=True,
            reasoning_format=True, apply_template="/apply-template", rerank="/v1/rerank", media="props",
            lora="/lora-adapters",
            unsent={"dry_penalty_last_n": -1}),  # "context size", but its range check says >= 0
    # vLLM: its own sampling extensions; grammars only as JSON schemas (response_format).
    Dialect("vllm",
            {"top_k": "top_k", "min_p": "min_p", "penalty_repeat": "repetition_penalty", "ignore_eos": "ignore_eos"},
            tokenize=Endpoint("/tokenize", "prompt", "tokens", {"add_special_tokens": False}),
            detokenize=Endpoint("/detokenize", "tokens", "prompt"),
            template_kwargs=True, top_k_off=-1),
    # Anything else (Ollama, LM Studio, SGLang, the OpenAI API): the OpenAI fields only.
    Dialect("openai", {}),
)}


@dataclass
class ServerFacts:
    """What the server says about its model; None where it does not say."""

    model: str
    dialect: Dialect
    n_ctx: int | None = None
    n_vocab: int | None = None
    n_embd: int | None = None
    info: dict[str, Any] = field(default_factory=dict)  # llama.rn's ctx.model fields that are known
    # what the server's projector takes ({"vision", "audio"}); None: the server takes no media
    modalities: dict[str, bool] | None = None
    media_marker: str | None = None  # where a medium goes in a raw prompt, for this server (llama-server's /props)

    def model_dict(self) -> dict[str, Any]:
        return {"desc": self.model, "size": 0, "n_embd": self.n_embd or 0, "n_params": 0, "metadata": {},
                **self.info, "n_ctx": self.n_ctx, "n_vocab": self.n_vocab, "server": self.dialect.name,
                "chat_templates": {"llama_chat": False, "jinja": {"default": False, "default_caps": None,
                                                                  "tool_use": False}},
                "is_chat_template_supported": False}


def _served_models(session: HttpSession) -> list[dict[str, Any]]:
    listing = session.get("/v1/models")
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise ModelLoadError(f"Failed to load model: GET /v1/models at {session.base_url} did not list models: {listing!r}")
    return data


def _pick(models: list[dict[str, Any]], wanted: str | None, base_url: str) -> dict[str, Any]:
    names = [m["id"] for m in models]
    if wanted is None:
        if not models:
            raise ModelLoadError(f"Failed to load model: the server at {base_url} serves no model")
        return models[0]
    for entry in models:
        if entry["id"] == wanted:
            return entry
    if not models:  # some servers list nothing but take any name
        return {"id": wanted}
    raise ModelLoadError(f"Failed to load model: the server at {base_url} does not serve {wanted!r}; "
                         f"it serves: {', '.join(names)}")


def _detect(session: HttpSession, props: Any) -> Dialect:
    if isinstance(props, dict) and ("default_generation_settings" in props or "build_info" in props):
        return DIALECTS["llama-server"]
    spec = session.try_get("/openapi.json")
    paths = spec.get("paths", {}) if isinstance(spec, dict) else {}
    if "/extras/tokenize" in paths:
        return DIALECTS["llama-cpp-python"]
    if "/tokenize" in paths and "/detokenize" in paths:
        return DIALECTS["vllm"]
    return DIALECTS["openai"]


def _modalities(dialect: Dialect, props: Any) -> dict[str, bool] | None:
    """What the server's projector takes: llama-server's /props say; a forwarding dialect's server judges each
    request (both kinds are sent)."""
    if dialect.media == "forward":
        return {"vision": True, "audio": True}
    said = props.get("modalities") if dialect.media == "props" and isinstance(props, dict) else None
    if not isinstance(said, dict):
        return None
    modalities = {kind: said.get(kind) is True for kind in ("vision", "audio")}
    return modalities if any(modalities.values()) else None


def _local_gguf_facts(facts: ServerFacts) -> None:
    """Servers that name a model by its file (llama-cpp-python does): read the facts from the file when it is here.

    The vocabulary size matters most: llama-cpp-python's server aborts on a token id
    outside the vocabulary, so llamacompat must refuse such ids before sending them.
    """
    path = facts.model
    if not (path.endswith(".gguf") and os.path.isfile(path)):
        return
    try:
        meta = read_metadata(path)
    except ModelLoadError as err:
        logger.info("openai: cannot read the served model's file %s: %s", path, err)
        return
    arch = meta.get("general.architecture", "")
    n_vocab = meta.get(f"{arch}.vocab_size")
    if n_vocab is None:
        tokens = read_metadata(path, skip=SKIPPED_KEYS - {"tokenizer.ggml.tokens"}).get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens else None
    facts.n_vocab = facts.n_vocab or n_vocab
    facts.n_embd = facts.n_embd or meta.get(f"{arch}.embedding_length")
    facts.info.setdefault("n_ctx_train", meta.get(f"{arch}.context_length"))
    facts.info.setdefault("desc", str(meta.get("general.name", path)))
    facts.info.setdefault("size", os.path.getsize(path))


def probe(session: HttpSession, wanted_model: str | None, server: str) -> ServerFacts:
    """List the models (this also checks the key), pick the dialect and gather what the server tells."""
    entry = _pick(_served_models(session), wanted_model, session.base_url)
    if server not in DIALECTS and server != "auto":
        raise InvalidParamsError(f"init_llama: 'server' must be 'auto' or one of {', '.join(DIALECTS)}, got {server!r}")
    props = session.try_get("/props") if server in ("auto", "llama-server") else None
    dialect = _detect(session, props) if server == "auto" else DIALECTS[server]
    facts = ServerFacts(entry["id"], dialect)
    facts.modalities = _modalities(dialect, props)
    if isinstance(props, dict) and isinstance(props.get("media_marker"), str):
        facts.media_marker = props["media_marker"]
    meta = entry.get("meta")
    if isinstance(meta, dict):  # llama-server
        facts.n_vocab, facts.n_embd = meta.get("n_vocab"), meta.get("n_embd")
        facts.n_ctx = meta.get("n_ctx") or meta.get("n_ctx_train")
        facts.info.update({k: meta[k] for k in ("size", "n_params") if isinstance(meta.get(k), int)})
    if isinstance(entry.get("max_model_len"), int):  # vLLM
        facts.n_ctx = entry["max_model_len"]
    _local_gguf_facts(facts)
    return facts
