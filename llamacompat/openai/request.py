"""llama.rn completion params -> one OpenAI request body for one server dialect.

Validation is the same as on a local backend (``params.COMPLETION_FIELDS``);
what the server cannot honour is refused (grammars) or warned about (sampling),
as ``ctx.capabilities`` says. llama.rn's defaults are sent explicitly, so a
server's own defaults (llama-cpp-python's repeat_penalty 1.1, say) never apply.
Stop strings stay on the client: the OpenAI API does not say which one matched.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from .. import params as P
from ..chat.messages import map_media_parts, media_ref
from ..errors import (
    GrammarError,
    InvalidParamsError,
    MediaError,
    MultimodalNotEnabledError,
    UnsupportedFeatureError,
    unsupported,
)
from ..grammars.builtin import checked_grammar
from ..grammars.gbnf import Group, Repeat, Token, parse_gbnf
from ..grammars.schema import convert_json_schema_to_grammar
from ..media import AUDIO_FORMATS, MEDIA_MARKER, Media, check_media, final_medium_error, load_media, media_paths_param
from .dialects import Dialect, ServerFacts

__all__ = ["CompletionPlan", "plan_completion", "media_parts", "check_sendable", "projector_hint"]

# OpenAI's logit_bias range; -100 bans a token on every server.
_BIAS_LIMIT = 100.0


@dataclass(frozen=True)
class CompletionPlan:
    path: str  # /v1/completions or /v1/chat/completions; llama-server's /completion for a raw prompt's media
    body: dict[str, Any]
    chat: bool
    n_predict: int
    stop: tuple[str, ...]
    n_probs: int


def plan_completion(params: Mapping[str, Any] | None, facts: ServerFacts, strict: bool,
                    tokenize: Callable[[str], list[int]] | None, media: Mapping[str, bool] | None = None) -> CompletionPlan:
    """The request for ``params``; ``media`` is what the server's projector takes (``{"vision", "audio"}``), None
    when the context sends no media (the server has no projector, or ``release_multimodal`` was called)."""
    p = P.completion_params(params, strict)
    dialect = facts.dialect
    chat = p["messages"] is not None
    body: dict[str, Any] = {"model": facts.model, "stream": True, "stream_options": {"include_usage": True},
                            **dialect.always}
    if chat:
        body["messages"] = p["messages"]
        _chat_fields(p, body, dialect, strict)
    else:
        body["prompt"] = p["prompt"]
    _media(p, body, facts, media)
    if p["chat_template"] is not None:
        raise UnsupportedFeatureError("completion: 'chat_template' cannot be honoured: an OpenAI-compatible server "
                                      "applies its own template to 'messages'")
    for name, why in (("n_threads", "the server's own threads run the model"),
                      ("prefill_text", "the server parses its reply itself"),
                      ("force_pure_content", "the server parses its reply itself")):
        if p[name]:
            unsupported(strict, f"completion: '{name}' is not taken by an OpenAI-compatible server ({why}; ignored)")
    _sampling(p, body, dialect, strict)
    _constraint(p, body, dialect, strict, facts.n_vocab, tokenize)
    if p["logit_bias"]:
        body["logit_bias"] = _logit_bias(p["logit_bias"], facts.n_vocab, tokenize)
    n_probs = p["n_probs"]
    if n_probs:
        body.update({"logprobs": True, "top_logprobs": n_probs} if chat else {"logprobs": n_probs})
    n_predict = p["n_predict"]
    if n_predict == 0:  # evaluate the prompt (the server caches it) and keep nothing: llama.rn's cache warm-up
        body["max_tokens"] = 1
    elif n_predict > 0:
        body["max_tokens"] = n_predict
    elif dialect.unlimited is not None:
        body["max_tokens"] = dialect.unlimited[0]
    # llama-server takes a raw prompt's media at its native endpoint only (its /v1/completions wants a string)
    path = "/v1/chat/completions" if chat else "/completion" if isinstance(body["prompt"], dict) else "/v1/completions"
    return CompletionPlan(path, body, chat, n_predict, tuple(p["stop"]), n_probs)


def _media(p: dict[str, Any], body: dict[str, Any], facts: ServerFacts, support: Mapping[str, bool] | None) -> None:
    """Chat ``image_url`` / ``input_audio`` parts and a raw prompt's ``media_paths``, as bytes: the server reads
    none of our files. A chat's media stay OpenAI parts (data: URLs, base64 audio); a raw prompt's go as
    llama-server's ``{prompt_string, multimodal_data}`` prompt, which only it takes."""
    chat = body.get("messages") is not None
    if chat:
        messages, media = media_parts(body["messages"])
    else:
        refs = media_paths_param(p["media_paths"], "completion")
        media = [load_media(ref, f"completion: media {i}") for i, ref in enumerate(refs)]
    if not media:
        return
    check_sendable(media, facts, support, None if chat else p["prompt"])
    if not chat and p["prompt"].endswith(MEDIA_MARKER):  # as the local backend refuses it
        raise final_medium_error()
    if chat:
        body["messages"] = messages
    elif facts.dialect.media == "props":  # its marker is its own (random unless LLAMA_MEDIA_MARKER pins it)
        body["prompt"] = {"prompt_string": p["prompt"].replace(MEDIA_MARKER, facts.media_marker or MEDIA_MARKER),
                          "multimodal_data": [base64.b64encode(m.data).decode() for m in media]}
    else:
        raise UnsupportedFeatureError(f"completion: 'media_paths' (a raw prompt's media) are not taken by this "
                                      f"{facts.dialect.name} server; send 'messages' with image_url / input_audio parts")


def projector_hint(dialect: Dialect) -> str:
    """What gives a server that takes no media a projector (only llama-server's and llama-cpp-python's take none)."""
    return ("start llama-server with --mmproj FILE" if dialect.name == "llama-server"
            else "media are not forwarded to its server")


def check_sendable(media: list[Media], facts: ServerFacts, support: Mapping[str, bool] | None,
                   text: str | None = None) -> None:
    """``media`` may go to the server: the context sends media (``support`` not None) of kinds it takes."""
    if support is None:
        raise MultimodalNotEnabledError(f"Multimodal support not enabled. Call initMultimodal first. (the "
                                        f"{facts.dialect.name} server takes no media here: {projector_hint(facts.dialect)})")
    check_media(media, support, text)


def media_parts(messages: Any) -> tuple[Any, list[Media]]:
    """``messages`` with each media part carrying its bytes, and the media in order. Images travel as data:
    URLs, sounds as OpenAI's ``input_audio`` (base64 data and format); what is not a media part is left for the
    server to judge."""
    media: list[Media] = []

    def with_bytes(part: dict[str, Any], at: str) -> dict[str, Any]:
        where = f"completion: {at}"
        medium = load_media(media_ref(part, where), where)
        media.append(medium)
        if not medium.is_audio:
            return {"type": "image_url", "image_url": {"url": medium.data_url}}
        if medium.audio_format not in AUDIO_FORMATS:  # OpenAI's input_audio takes wav and mp3 only
            raise MediaError(f"{where}: the sound is {medium.audio_format.upper()}; an input_audio part takes WAV or "
                             "MP3 (convert it, or give it to a raw prompt's media_paths, which llama-server decodes "
                             "as bytes)")
        return {"type": "input_audio",
                "input_audio": {"data": base64.b64encode(medium.data).decode(), "format": medium.audio_format}}

    return map_media_parts(messages, with_bytes), media


def _sampling(p: dict[str, Any], body: dict[str, Any], dialect: Dialect, strict: bool) -> None:
    for name in P.COMPLETION_FIELDS:
        server_name = dialect.field_for(name)
        if server_name is None or (name == "seed" and p[name] == -1) or dialect.unsent.get(name, ...) == p[name]:
            continue
        value = p[name]
        if name == "top_k" and value == 0:
            value = dialect.top_k_off
        body[server_name] = list(value) if isinstance(value, tuple) else value
    for feature, name in P.features_used(p):  # per param: "penalties" may be half there (frequency, not repeat)
        if feature in ("grammar", "logit_bias", "n_probs") or dialect.field_for(name) is not None:
            continue
        if feature in P.REFUSED_WHEN_MISSING:  # a lazy grammar sent eagerly would constrain from the first token
            raise UnsupportedFeatureError(f"completion: '{name}' needs '{feature}', which the openai backend does not "
                                          "send yet (refused rather than constraining the whole reply)")
        unsupported(strict, f"completion: '{name}' needs '{feature}', which this {dialect.name} server does not "
                            "take (ignored)")


def _constraint(p: dict[str, Any], body: dict[str, Any], dialect: Dialect, strict: bool, n_vocab: int | None,
                tokenize: Callable[[str], list[int]] | None) -> None:
    """A grammar goes as GBNF where the server takes it; a JSON schema as GBNF there, else as response_format."""
    schema = p["json_schema"]  # response_format's, if it names one (params.completion_params)
    if p["grammar"] is not None:  # as in llama.rn, a grammar wins over a schema
        if dialect.grammar_field is None:
            raise UnsupportedFeatureError(f"completion: 'grammar' needs GBNF grammars, which this {dialect.name} server "
                                          "does not take (refused rather than generating unconstrained output); "
                                          "a 'json_schema' works")
        body[dialect.grammar_field] = checked_grammar(p["grammar"])  # an invalid grammar crashes llama-cpp-python
        _check_grammar_tokens(body[dialect.grammar_field], dialect, n_vocab, tokenize)
    elif schema is not None:
        if dialect.grammar_field is not None:
            body[dialect.grammar_field] = convert_json_schema_to_grammar(schema, strict=strict)
        else:
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as err:
                    raise InvalidParamsError(f"completion: json_schema is not valid JSON: {err}") from None
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "response", "schema": schema, "strict": True}}


def _token_refs(nodes: Any) -> Iterator[str]:
    for node in nodes:
        if isinstance(node, Token):
            yield node.text
        elif isinstance(node, Group):
            for alternative in node.alternatives:
                yield from _token_refs(alternative)
        elif isinstance(node, Repeat):
            yield from _token_refs((node.node,))


@functools.lru_cache(maxsize=128)
def _grammar_token_refs(source: str) -> tuple[str, ...]:
    """The ``<token>`` references of a grammar, parsed once per grammar text (as ``checked_grammar`` caches)."""
    grammar = parse_gbnf(source)
    return tuple(sorted({ref for rule in grammar.rules.values() for alt in rule.alternatives for ref in _token_refs(alt)}))


def _check_grammar_tokens(source: str, dialect: Dialect, n_vocab: int | None,
                          tokenize: Callable[[str], list[int]] | None) -> None:
    """``<token>`` references must name one vocabulary token, and only go to servers that survive them."""
    refs = _grammar_token_refs(source)
    for text in refs:
        if text.startswith("[") and text.endswith("]") and text[1:-1].isdigit():
            if n_vocab is not None and int(text[1:-1]) >= n_vocab:
                raise GrammarError(f"Failed to initialize sampling: grammar token <{text}> is outside the vocabulary "
                                   f"(0..{n_vocab - 1})")
        elif tokenize is not None and len(tokenize(f"<{text}>")) != 1:
            raise GrammarError(f"Failed to initialize sampling: grammar token <{text}> is not one token of this "
                               "model's vocabulary")
    if refs and not dialect.grammar_tokens:
        raise UnsupportedFeatureError(f"completion: grammar token references ({', '.join(refs)}) are refused: the "
                                      f"{dialect.name} server aborts on them; write the text as a string literal")


def _chat_fields(p: dict[str, Any], body: dict[str, Any], dialect: Dialect, strict: bool) -> None:
    if p["tools"]:
        body["tools"] = p["tools"]
        body["tool_choice"] = p["tool_choice"]
        body["parallel_tool_calls"] = p["parallel_tool_calls"]
    kwargs = dict(p["chat_template_kwargs"] or {})
    if not p["enable_thinking"]:
        kwargs["enable_thinking"] = False
    if kwargs:
        if dialect.template_kwargs:
            body["chat_template_kwargs"] = kwargs
        else:
            unsupported(strict, f"completion: 'chat_template_kwargs' / 'enable_thinking' are not taken by this "
                                f"{dialect.name} server (ignored)")
    if dialect.reasoning_format:
        body["reasoning_format"] = p["reasoning_format"]
    elif p["reasoning_format"] != "none":
        unsupported(strict, f"completion: 'reasoning_format' is the {dialect.name} server's setting (ignored); "
                            "reasoning_content is reported when the server splits it off")
    if not p["add_generation_prompt"] or p["now"] is not None:
        unsupported(strict, "completion: 'add_generation_prompt' and 'now' are the server's template inputs (ignored)")


def _logit_bias(value: Any, n_vocab: int | None, tokenize: Callable[[str], list[int]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, (token, bias) in enumerate(P.normalize_logit_bias(value)):
        if isinstance(token, str):
            if tokenize is None:
                raise InvalidParamsError(f"completion: logit_bias[{i}] names a token by text, which needs the "
                                         "server's tokenize endpoint; pass token ids")
            ids = tokenize(token)
        else:
            ids = [token]
        P.token_ids(ids, n_vocab, "completion", f"logit_bias[{i}] token")
        clamped = -_BIAS_LIMIT if math.isinf(bias) and bias < 0 else max(-_BIAS_LIMIT, min(_BIAS_LIMIT, bias))
        out.update({str(tid): clamped for tid in ids})
    return out
