"""Parameter specs: llama.rn's defaults, type and range checks, "did you mean" errors.

Defaults are applied on every call (llama.rn keeps sampling settings from one
call to the next; llamacompat does not, see MIGRATION.md).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import EmbeddingDisabledError, InvalidParamsError, UnsupportedFeatureError, unsupported
from .models import local_path

__all__ = ["Field", "parse_params", "validate", "validate_remote", "check_unicode", "lora_entries", "init_lora", "LORA_INIT_FIELDS",
           "COMPLETION_FIELDS", "STATE_FIELDS", "state_used", "CONTEXT_FIELDS", "CONTEXT_IGNORED", "COMPLETION_IGNORED",
           "EMBEDDING_FIELDS", "RERANK_FIELDS", "TOKENIZE_FIELDS", "TOKENIZE_NOT_YET", "MULTIMODAL_FIELDS",
           "completion_params", "init_params", "text_argument", "token_ids", "check_prompt", "embedding_normalize", "require_embedding"]

_MISSING = object()
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Field:
    """One parameter: accepted Python types, default, and an optional range check."""

    types: tuple[type, ...]
    default: Any = _MISSING
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human description of `check`, used in error messages
    nullable: bool = False


def _number(default: float, check=None, rule: str = "") -> Field:
    return Field((int, float), default, check, rule)


def _int(default: int, check=None, rule: str = "") -> Field:
    return Field((int,), default, check, rule)


def _bool(default: bool) -> Field:
    return Field((bool,), default)


def _unit(default: float) -> Field:
    return _number(default, lambda v: 0.0 <= v <= 1.0, "between 0 and 1")


def _is_str_list(value: Any) -> bool:
    return all(isinstance(item, str) for item in value)


def _is_message_list(value: Any) -> bool:
    return len(value) > 0 and all(isinstance(item, dict) for item in value)


TOOL_CHOICES = ("auto", "none", "required")
GRAMMAR_ENGINES = ("auto", "llguidance", "llama_cpp")
MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS: past it llama.cpp aborts, or fails to allocate its threads
REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
_SEED_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1  # llama.rn's native side holds n_predict in an int32

# llama.rn's parallel-only params: one slot's KV cache (llama.cpp's per-sequence state file) loaded before the
# prompt, saved after it and at the end. Only a parallel request on llama_cpp uses them (local.LocalSlots takes
# them out first); anywhere else completion_params warns and drops them. Sizes <= 0: every token, as in llama.rn.
STATE_FIELDS: dict[str, Field] = {
    "load_state_path": Field((str,), None, nullable=True),
    "save_state_path": Field((str,), None, nullable=True),
    "save_prompt_state_path": Field((str,), None, nullable=True),
    "load_state_size": _int(-1, lambda v: v <= _INT32_MAX, f"an int up to {_INT32_MAX} (<= 0: every token)"),
    "save_state_size": _int(-1, lambda v: v <= _INT32_MAX, f"an int up to {_INT32_MAX} (<= 0: every token)"),
}


def state_used(p: Mapping[str, Any]) -> list[str]:
    """The state params of validated completion params ``p`` that ask for something (a path, a size > 0)."""
    def asks(name: str) -> bool:
        value: Any = p.get(name)
        return value > 0 if name.endswith("_size") and isinstance(value, int) else bool(value)

    return [name for name in STATE_FIELDS if asks(name)]


COMPLETION_FIELDS: dict[str, Field] = {
    "prompt": Field((str,), None, nullable=True),
    # a raw prompt's media (one media marker each, in order); a chat's come from its image_url / input_audio parts
    "media_paths": Field((str, list), None, nullable=True),
    "messages": Field((list,), None, _is_message_list, "a non-empty list of message dicts", nullable=True),
    "chat_template": Field((str,), None, nullable=True),
    "add_generation_prompt": _bool(True),
    "n_predict": _int(-1, lambda v: -1 <= v <= _INT32_MAX, f"-1 (no limit) or 0..{_INT32_MAX}"),
    "stop": Field((list, tuple), (), lambda v: _is_str_list(v) and all(v), "a list of non-empty strings"),
    "temperature": _number(0.8, lambda v: v >= 0 and math.isfinite(v), ">= 0 (0 = greedy)"),
    "top_k": _int(40, lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "top_p": _unit(0.95),
    "min_p": _unit(0.05),
    "typical_p": _unit(1.0),
    "xtc_probability": _unit(0.0),
    "xtc_threshold": _unit(0.1),
    "top_n_sigma": _number(-1.0, lambda v: v == -1 or v > 0, "-1 (disabled) or > 0"),
    "penalty_last_n": _int(64, lambda v: v >= -1, ">= -1 (-1 = context size)"),
    "penalty_repeat": _number(1.0, lambda v: v > 0 and math.isfinite(v), "> 0 (1 = disabled)"),
    "penalty_freq": _number(0.0, math.isfinite, "a finite number"),
    "penalty_present": _number(0.0, math.isfinite, "a finite number"),
    "mirostat": _int(0, lambda v: v in (0, 1, 2), "0, 1 or 2"),
    "mirostat_tau": _number(5.0, lambda v: v > 0, "> 0"),
    "mirostat_eta": _number(0.1, lambda v: v > 0, "> 0"),
    "dry_multiplier": _number(0.0, lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "dry_base": _number(1.75, lambda v: v >= 1, ">= 1"),
    "dry_allowed_length": _int(2, lambda v: v >= 0, ">= 0"),
    "dry_penalty_last_n": _int(-1, lambda v: v >= -1, ">= -1 (-1 = context size)"),
    "dry_sequence_breakers": Field((list, tuple), ("\n", ":", '"', "*"), _is_str_list, "a list of strings"),
    "seed": _int(-1, lambda v: v == -1 or 0 <= v <= _SEED_MAX, f"-1 (random) or 0..{_SEED_MAX}"),
    "ignore_eos": _bool(False),
    "logit_bias": Field((list, tuple, dict), (), None),  # shape checked by normalize_logit_bias
    "n_probs": _int(0, lambda v: 0 <= v <= 1000, "between 0 and 1000"),
    "grammar": Field((str,), None, nullable=True),
    "json_schema": Field((str, dict, bool), None, nullable=True),  # ignored when 'grammar' is set, as in llama.rn
    "response_format": Field((dict,), None, nullable=True),
    # Lazy grammars (llama.cpp's): free text until a trigger, then the grammar (llamacompat.grammars.triggers).
    "grammar_lazy": _bool(False),
    "grammar_triggers": Field((list, tuple), (), None),  # entries checked by grammars.triggers.parse_triggers
    "preserved_tokens": Field((list, tuple), (), _is_str_list, "a list of strings"),
    # Which engine runs a grammar where there is a choice: llguidance (llama_cpp's default, mlx's only one),
    # or llama.cpp's own, which alone takes negated token references (!<[id]>).
    "grammar_engine": Field((str,), "auto", lambda v: v in GRAMMAR_ENGINES, "'auto', 'llguidance' or 'llama_cpp'"),
    # Chat: tools, reasoning and template inputs (llamacompat.chat).
    "tools": Field((list,), None, nullable=True),
    "tool_choice": Field((str,), "auto", lambda v: v in TOOL_CHOICES, "'auto', 'none' or 'required'"),
    "parallel_tool_calls": _bool(False),
    "reasoning_format": Field((str,), "none", lambda v: v in REASONING_FORMATS,
                              "'none', 'auto', 'deepseek' or 'deepseek-legacy' (Unknown reasoning format)"),
    "enable_thinking": _bool(True),
    "chat_template_kwargs": Field((dict,), None, nullable=True),
    # llama.rn: seconds since the epoch, a number or a string of digits (a string that is not one means "now")
    "now": Field((int, float, str), None, lambda v: isinstance(v, str) or v >= 0, "seconds since the epoch",
                 nullable=True),
    "jinja": _bool(True),
    "chatTemplate": Field((str,), None, nullable=True),  # llama.rn's deprecated alias, used when chat_template is not given
    # llama.cpp's force_pure_content: the template renders the messages and the reply is all content (no tool or
    # reasoning parse); any template in the model's metadata is used as it is
    "force_pure_content": _bool(False),
    # Text the assistant's reply already starts with (the last assistant message of a prefill): llama.rn parses
    # prefill_text + the generated text into content / reasoning_content / tool_calls; 'text' is what was generated.
    "prefill_text": Field((str,), None, nullable=True),
    # After this many tokens of reasoning, thinking_budget_message + the template's end tag are forced (llama.cpp's
    # reasoning budget); -1: no budget. Chats only: the template names the thinking tags.
    "thinking_budget_tokens": _int(-1, lambda v: -1 <= v <= _INT32_MAX, f"-1 (no budget) or 0..{_INT32_MAX}"),
    "thinking_budget_message": Field((str,), "", nullable=True),
    # Per completion, where the backend can (llama_cpp: llama_set_n_threads, the context's own restored after).
    "n_threads": _int(0, lambda v: 0 <= v <= MAX_THREADS, f"between 0 and {MAX_THREADS} (0 = the context's)"),
    # llama.rn sends this; the native default is what llamacompat does.
    "emit_partial_completion": _bool(False),
    **STATE_FIELDS,
}

# The completion params that also shape get_formatted_chat.
CHAT_FIELDS = ("chat_template", "add_generation_prompt", "tools", "tool_choice", "parallel_tool_calls",
               "reasoning_format", "enable_thinking", "chat_template_kwargs", "now", "jinja", "json_schema",
               "response_format", "force_pure_content")

# Capability name -> the completion params that use it (used = not the default).
# A backend that lacks the feature refuses a grammar outright (never unconstrained
# output) and ignores a sampling setting with a LlamaCompatWarning (an error with strict).
FEATURE_PARAMS: dict[str, tuple[str, ...]] = {
    "grammar": ("grammar", "json_schema", "response_format"),
    "lazy_grammar": ("grammar_lazy",),
    "thinking_budget": ("thinking_budget_tokens",),
    "temperature": ("temperature",),
    "top_k": ("top_k",),
    "top_p": ("top_p",),
    "min_p": ("min_p",),
    "typical_p": ("typical_p",),
    "xtc": ("xtc_probability",),
    "top_n_sigma": ("top_n_sigma",),
    "penalties": ("penalty_repeat", "penalty_freq", "penalty_present"),
    "mirostat": ("mirostat",),
    "dry": ("dry_multiplier",),
    "seed": ("seed",),
    "logit_bias": ("logit_bias",),
    "ignore_eos": ("ignore_eos",),
    "n_probs": ("n_probs",),
}
REFUSED_WHEN_MISSING = frozenset({"grammar", "lazy_grammar"})


def response_format_schema(value: Mapping[str, Any] | None) -> Any:
    """The JSON schema a ``response_format`` asks for, or None for plain text (llama.cpp server's rules)."""
    if value is None:
        return None
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":  # any JSON value, unless a schema is given
        return value.get("schema", {})
    if kind == "json_schema":
        inner = value.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, Mapping) else value.get("schema")
        if schema is None:
            raise InvalidParamsError("completion: response_format of type 'json_schema' needs "
                                     "{'json_schema': {'schema': {...}}}")
        return schema
    raise InvalidParamsError(f"completion: response_format 'type' must be 'text', 'json_object' or 'json_schema', "
                             f"got {kind!r}")


def features_used(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(feature, param) for every capability a validated completion request relies on."""
    used = []
    for feature, names in FEATURE_PARAMS.items():
        for name in names:
            default = COMPLETION_FIELDS[name].default
            value = params.get(name, default)
            if value is None or value == default or (isinstance(default, tuple) and not value):
                continue
            used.append((feature, name))
            break
    return used


# llama.rn completion keys that change what is generated and that llamacompat
# does not implement yet: refusing them beats silently unconstrained output.
COMPLETION_NOT_YET: dict[str, str] = {}

_SPECULATIVE = "speculative decoding is not implemented yet; the output is the same without it, only slower"
_FROM_TEMPLATE = "llamacompat derives it from the chat template of 'messages'"

# llama.rn keys accepted with no effect on any backend: a LlamaCompatWarning names the key and what is missing
# (UnsupportedFeatureError with strict: True). A value that asks for nothing (None, False, 0, -1, "", [], {})
# passes without a word.
COMPLETION_IGNORED = {
    "chat_format": _FROM_TEMPLATE,
    "thinking_forced_open": "it is derived from the template's generation prompt",
    "generation_prompt": _FROM_TEMPLATE,
    "chat_parser": _FROM_TEMPLATE + " (llama.cpp's PEG parsers are not used)",
    "embedding": "a completion returns no per-token embeddings; call ctx.embedding",
    "speaker": "text-to-speech is not supported",
    "speculative": _SPECULATIVE,
    "spec_type": _SPECULATIVE,
    "spec_draft_n_max": _SPECULATIVE,
    "spec_draft_n_min": _SPECULATIVE,
    "spec_draft_p_min": _SPECULATIVE,
    "spec_draft_p_split": _SPECULATIVE,
}

CONTEXT_FIELDS: dict[str, Field] = {
    "model": Field((str,), "smollm2"),
    "backend": Field((str,), "auto"),
    "strict": _bool(False),
    "chat_template": Field((str,), None, nullable=True),
    "n_ctx": _int(0, lambda v: v >= 0, ">= 0 (0 = the model's training context)"),
    "n_batch": _int(2048, lambda v: v >= 1, ">= 1"),
    "n_ubatch": _int(512, lambda v: v >= 1, ">= 1"),
    "n_threads": _int(0, lambda v: 0 <= v <= MAX_THREADS, f"between 0 and {MAX_THREADS} (ggml's limit; 0 = half the CPU cores)"),
    "n_gpu_layers": _int(-1, lambda v: v >= -1, ">= -1 (-1 = all)"),
    "use_mlock": _bool(False),
    "use_mmap": _bool(True),
    "vocab_only": _bool(False),
    "embedding": _bool(False),
    "pooling_type": Field((str,), None, lambda v: v in ("none", "mean", "cls", "last", "rank"),
                          "one of none, mean, cls, last, rank", nullable=True),
    "embd_normalize": _int(2, lambda v: v >= -1, ">= -1"),
    "ctx_shift": _bool(False),
    "cache_type_k": Field((str,), "f16"),
    "cache_type_v": Field((str,), "f16"),
    "flash_attn_type": Field((str,), "auto", lambda v: v in ("auto", "on", "off"), "'auto', 'on' or 'off'"),
    "flash_attn": _bool(False),
    "rope_freq_base": _number(0.0, lambda v: v >= 0, ">= 0 (0 = from the model)"),
    "rope_freq_scale": _number(0.0, lambda v: v >= 0, ">= 0 (0 = from the model)"),
    # llama_cpp: one KV cache for every sequence; None (auto): unified when n_parallel > 1, so a plain
    # completion keeps all of n_ctx (without it, llama.cpp gives each sequence n_ctx / n_parallel)
    "kv_unified": Field((bool,), None, nullable=True),
    "swa_full": _bool(False),
    "no_extra_bufts": _bool(False),
    "is_model_asset": _bool(False),  # iOS's app-bundle lookup: a warning says 'model' is used as given
    # the most slots ctx.parallel.enable may ask for (llama.rn's default 8; llama.cpp's n_seq_max)
    "n_parallel": _int(8, lambda v: 1 <= v <= 256, "1..256"),
    # llama_cpp: backend device names (get_backend_devices_info's deviceName) the model may use
    "devices": Field((list, tuple), None, lambda v: _is_str_list(v) and all(v), "a list of device names", nullable=True),
    "no_gpu_devices": _bool(False),  # llama.rn's deprecated switch: n_gpu_layers 0
    "n_cpu_moe": _int(0, lambda v: v >= 0, ">= 0 (keep the MoE experts of the first N layers on the CPU)"),
    "use_progress_callback": _bool(False),  # llama.rn's JS sets it; progress is reported whenever on_progress is given
    # LoRA adapters applied at init; llama.rn merges the three into one lora_list (lora_entries)
    "lora": Field((str,), None, lambda v: bool(v), "a LoRA adapter path", nullable=True),
    "lora_scaled": _number(1.0),
    "lora_list": Field((list, tuple), None, nullable=True),
}


# llama.rn init keys accepted with no effect (a warning; an error with strict: True), as COMPLETION_IGNORED.
CONTEXT_IGNORED = {
    "cpu_mask": "llama-cpp-python binds no ggml threadpool, and its OpenMP threads take no CPU mask; pin the "
                "process with os.sched_setaffinity",
    "cpu_strict": "it goes with cpu_mask, which llama-cpp-python cannot apply",
    "model_draft": _SPECULATIVE,
    "draft_model": _SPECULATIVE,
    "is_model_draft_asset": _SPECULATIVE,
    "speculative": _SPECULATIVE,
    "spec_type": _SPECULATIVE,
    **{f"spec_draft_{name}": _SPECULATIVE for name in ("n_max", "n_min", "p_min", "p_split", "n_gpu_layers",
                                                          "cache_type_k", "cache_type_v")},
    "state_cache_budget_mb": "llama.rn's prefix snapshots for recurrent, hybrid and SWA models are not implemented",
    "state_cache_max_checkpoints": "llama.rn's prefix snapshots for recurrent, hybrid and SWA models are not implemented",
}


def lora_entries(value: Any, where: str) -> list[dict[str, Any]]:
    """llama.rn's ``[{path, scaled?}]``: ``file://`` stripped, scale 1.0 by default, one entry per path (last wins)."""
    if not isinstance(value, (list, tuple)):
        raise InvalidParamsError(f"{where}: LoRA adapters must be a list of {{'path': str, 'scaled': float}}, "
                                 f"got {type(value).__name__}")
    merged: dict[str, float] = {}
    for i, item in enumerate(value):
        path = item.get("path") if isinstance(item, Mapping) else None
        if not isinstance(path, str) or not path:
            raise InvalidParamsError(f"{where}: adapter [{i}] must be a dict with a non-empty 'path', got {item!r}")
        scale = item.get("scaled", 1.0)
        if scale is None:
            scale = 1.0
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidParamsError(f"{where}: adapter [{i}] 'scaled' must be a number, got {scale!r}")
        unknown = set(item) - {"path", "scaled"}
        if unknown:
            raise unknown_key_error(sorted(unknown)[0], ["path", "scaled"], f"{where}: adapter [{i}]")
        path = local_path(path)
        merged.pop(path, None)  # the last mention decides the scale and the order
        merged[path] = float(scale)
    return [{"path": path, "scaled": scale} for path, scale in merged.items()]


def init_lora(checked: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The adapters ``init_llama`` applies: ``lora`` (at ``lora_scaled``), then ``lora_list``, as llama.rn merges them."""
    entries = [{"path": checked["lora"], "scaled": checked["lora_scaled"]}] if checked.get("lora") else []
    return lora_entries(entries + list(checked.get("lora_list") or []), "init_llama")

def init_params(raw: Mapping[str, Any], extra: Mapping[str, Field]) -> dict[str, Any]:
    """``init_llama``'s params checked against CONTEXT_FIELDS plus a backend's ``extra`` (CONTEXT_IGNORED warns)."""
    checked = validate(raw, CONTEXT_FIELDS, "init_llama", extra=extra, ignored=CONTEXT_IGNORED,
                       strict=raw.get("strict") is True)
    if checked["is_model_asset"]:
        unsupported(checked["strict"], "init_llama: 'is_model_asset' (iOS: look the model up in the app bundle) has no "
                    "meaning here; 'model' is used as given (a path, or a model name)", stacklevel=4)
    return checked


# Init params a remote core (bridge, openai) uses itself; the others describe a model the server already loaded.
# n_parallel: the most slots this client's ctx.parallel may ask for (the server's own slots are its business)
_REMOTE_CLIENT_FIELDS = frozenset({"backend", "strict", "embedding", "embd_normalize", "model", "n_parallel"})
# The init params of LoRA adapters (init_lora), for a remote core that applies them itself.
LORA_INIT_FIELDS = frozenset({"lora", "lora_scaled", "lora_list"})


def validate_remote(raw: Mapping[str, Any], fields: Mapping[str, Field], backend: str,
                    uses: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Init params of a core whose model lives in a server: checked as ``init_llama``'s, plus ``fields``.

    Model-shaping params (``n_ctx``, ...) are the server's: accepted, and logged as ignored, but for the
    CONTEXT_FIELDS the core names in ``uses`` (it acts on them).
    """
    params = init_params(raw, fields)
    ignored = sorted(set(raw) - _REMOTE_CLIENT_FIELDS - uses - set(fields))
    if ignored:
        logger.info("%s: the server's model settings apply; ignored init params: %s", backend, ", ".join(ignored))
    return params


EMBEDDING_FIELDS: dict[str, Field] = {
    "embd_normalize": _int(2, lambda v: v >= -1, ">= -1 (-1 none, 0 max-abs, 1 taxicab, 2 L2, >2 p-norm)"),
}

# llama.rn's tokenize params: media_paths, one per media marker of the text (needs init_multimodal).
TOKENIZE_FIELDS: dict[str, Field] = {"media_paths": Field((str, list), None, nullable=True)}
TOKENIZE_NOT_YET: dict[str, str] = {}

# llama.rn's initMultimodal params (-1: the projector's own token limits)
MULTIMODAL_FIELDS: dict[str, Field] = {
    "path": Field((str,), None, nullable=True),
    "use_gpu": _bool(True),
    "image_min_tokens": _int(-1, lambda v: v == -1 or v > 0, "-1 (the projector's) or > 0"),
    "image_max_tokens": _int(-1, lambda v: v == -1 or v > 0, "-1 (the projector's) or > 0"),
}

# llama.rn's rerank params: its native side ignores ``normalize``, and so do we (accepted for ported code).
RERANK_FIELDS: dict[str, Field] = {
    "normalize": Field((int, float), None, nullable=True),
}


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "int", float: "number", str: "string", bool: "bool", list: "list", tuple: "list", dict: "dict"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _check_value(name: str, value: Any, field: Field, where: str) -> Any:
    if value is None and field.nullable:
        return None
    # bool is an int subclass: True must not pass for n_predict.
    type_ok = isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)
    if not type_ok:
        raise InvalidParamsError(
            f"{where}: '{name}' must be {_type_name(field.types)}, got {type(value).__name__} {value!r}"
        )
    if field.check is not None and not field.check(value):
        raise InvalidParamsError(f"{where}: '{name}' must be {field.rule}, got {value!r}")
    return value


def unknown_key_error(name: str, valid: "list[str] | Mapping[str, Any]", where: str) -> InvalidParamsError:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return InvalidParamsError(f"{where}: unknown parameter '{name}'{hint}")


def validate(
    params: Mapping[str, Any] | None,
    fields: Mapping[str, Field],
    where: str,
    *,
    extra: Mapping[str, Field] | None = None,
    not_yet: Mapping[str, str] | None = None,
    ignored: Mapping[str, str] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Check ``params`` against ``fields`` and return a new dict with every default filled in.

    ``not_yet`` keys are refused unless empty; ``ignored`` keys warn (``UnsupportedFeatureError`` when ``strict``)
    unless their value asks for nothing.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidParamsError(f"{where}: params must be a dict, got {type(params).__name__}")
    spec = {**fields, **(extra or {})}
    out: dict[str, Any] = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise InvalidParamsError(f"{where}: parameter names must be strings, got {name!r}")
        if name in spec:
            out[name] = _check_value(name, value, spec[name], where)
        elif not_yet and name in not_yet:
            if value not in (None, False, [], {}):
                raise UnsupportedFeatureError(f"{where}: '{name}' ({not_yet[name]}) is not supported yet")
        elif ignored and name in ignored:
            if _asks_something(value):
                unsupported(strict, f"{where}: '{name}' is ignored ({ignored[name]})", stacklevel=4)
        else:
            raise unknown_key_error(name, list(spec) + list(not_yet or ()) + list(ignored or ()), where)
    for name, field in spec.items():
        if name not in out and field.default is not _MISSING:
            default = field.default
            out[name] = list(default) if isinstance(default, tuple) else default
    return out


def _asks_something(value: Any) -> bool:
    """Whether an ignored key's value asks for anything: None, False, 0, -1 and empty values do not."""
    if isinstance(value, (list, tuple, dict, str)):
        return bool(value)
    return value not in (None, False, 0, -1)


def check_unicode(text: str, what: str) -> str:
    """``text``, if UTF-8 can encode it: a lone surrogate (a JSON ``"\\ud800"`` escape, a template's ``'\\ud800'``)
    is InvalidParamsError before it reaches a tokenizer or grammar engine, which take UTF-8 bytes."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidParamsError(
                f"{what} holds a lone surrogate {text[err.start]!r} at index {err.start}: it is not Unicode text and "
                "UTF-8 cannot encode it; remove it, or write the whole surrogate pair (one character)") from None
    return text


def normalize_logit_bias(value: Any) -> list[tuple[int | str, float]]:
    """llama.rn's ``[[token, bias | false], ...]`` (or ``{token: bias}``) → ``[(token, bias)]``.

    ``false`` means "never generate this token" (bias -inf). A token may be an
    id or a string; a string applies to each of its tokens.
    """
    pairs = list(value.items()) if isinstance(value, dict) else list(value)
    out: list[tuple[int | str, float]] = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidParamsError(f"completion: logit_bias[{i}] must be [token, bias], got {pair!r}")
        token, bias = pair
        if isinstance(token, bool) or not isinstance(token, (int, str)):
            raise InvalidParamsError(f"completion: logit_bias[{i}] token must be an int id or a string, got {token!r}")
        if bias is False:
            bias = -math.inf
        elif isinstance(bias, bool) or not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
            # +inf makes the samplers' softmax NaN (inf - inf): a large finite bias forces a token as well
            raise InvalidParamsError(f"completion: logit_bias[{i}] bias must be a number below +inf or false, got {bias!r}")
        out.append((token, float(bias)))
    return out


def completion_params(params: Mapping[str, Any] | None, strict: bool) -> dict[str, Any]:
    """``completion``'s params, checked as far as they can be without a model, the same way on every core.

    Defaults applied; ``json_schema`` is the schema to follow (``response_format``'s if it names one);
    ``logit_bias`` is ``[(token, bias)]``; a raw prompt, the grammar and the DRY breakers are valid UTF-8;
    ``grammar_lazy`` has what it needs. What needs the model (tokens, the chat template, the backend's
    features) is the core's.
    """
    p = validate(params, COMPLETION_FIELDS, "completion", not_yet=COMPLETION_NOT_YET, ignored=COMPLETION_IGNORED,
                 strict=strict)
    if p["chat_template"] is None:  # llama.rn: params.chat_template || params.chatTemplate
        p["chat_template"] = p["chatTemplate"]
    format_schema = response_format_schema(p["response_format"])
    if format_schema is None:
        p["response_format"] = None  # plain text: nothing to constrain
    if p["json_schema"] is None:
        p["json_schema"] = format_schema
    if not check_prompt(p):
        check_unicode(p["prompt"], "completion: the prompt")
    if p["grammar"] is not None:  # the engines take UTF-8, as they take the prompt
        check_unicode(p["grammar"], "completion: the grammar")
    for breaker in p["dry_sequence_breakers"]:
        check_unicode(breaker, "completion: dry_sequence_breakers")
    if p["grammar_lazy"] and p["grammar"] is None and p["json_schema"] is None:
        raise InvalidParamsError("completion: 'grammar_lazy' needs a 'grammar' (or 'json_schema') to apply lazily")
    if p["grammar_lazy"] and not p["grammar_triggers"]:
        raise InvalidParamsError("completion: 'grammar_lazy' needs 'grammar_triggers' (where the grammar starts)")
    p["logit_bias"] = normalize_logit_bias(p["logit_bias"])
    used = state_used(p)
    if used:  # a parallel slot on llama_cpp took them out before; anywhere else they have nothing to act on
        names = ", ".join(f"'{name}'" for name in used)
        verb = "work" if len(used) > 1 else "works"
        unsupported(strict, f"completion: {names} (a slot's per-sequence state) {verb} in ctx.parallel.completion "
                            "only, on a llama_cpp context (or a bridge server running one with --parallel); ignored")
    for name in STATE_FIELDS:
        p[name] = STATE_FIELDS[name].default
    return p


# -- the arguments of the calls, checked the same way by every core ------------------------------------------
def text_argument(text: Any, where: str, what: str = "text") -> str:
    """A call's text: a string the engines can take (UTF-8: no lone surrogate)."""
    if not isinstance(text, str):
        raise InvalidParamsError(f"{where}: {what} must be a string, got {type(text).__name__}")
    return check_unicode(text, f"{where}: {what}")


def token_ids(tokens: Any, n_vocab: int | None, where: str, label: str = "tokens") -> list[int]:
    """Token ids as a list, each inside the vocabulary (``n_vocab`` None: unknown, only >= 0 is checked)."""
    if not isinstance(tokens, (list, tuple)):
        raise InvalidParamsError(f"{where}: {label} must be a list of ints, got {type(tokens).__name__}")
    top = f"0..{n_vocab - 1}" if n_vocab else ">= 0"
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (n_vocab and token >= n_vocab):
            raise InvalidParamsError(f"{where}: {label}[{i}] = {token!r} is not a token id ({top})")
    return list(tokens)


def check_prompt(p: Mapping[str, Any]) -> bool:
    """Whether validated completion params ``p`` are a chat (``messages``) rather than a raw ``prompt``."""
    if p["messages"] is not None:
        if p["prompt"] is not None:
            raise InvalidParamsError("completion: pass either 'prompt' or 'messages', not both")
        return True
    if not p["prompt"]:
        raise InvalidParamsError("Prompt is required: pass a non-empty 'prompt' or 'messages'")
    if p["tools"]:
        raise InvalidParamsError("completion: 'tools' need 'messages' (the chat template describes them)")
    return False


def embedding_normalize(params: Mapping[str, Any] | None, init: Mapping[str, Any], what: str = "embedding") -> int:
    """The ``embd_normalize`` of one embedding call (the context's own when the call names none); raises
    ``EmbeddingDisabledError`` unless the context was created with ``embedding: True``."""
    p = validate(params, EMBEDDING_FIELDS, what)
    require_embedding(init, what)
    return p["embd_normalize"] if params and "embd_normalize" in params else init["embd_normalize"]


def rerank_arguments(query: Any, documents: Any, params: Any, init: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``rerank``'s query and documents, checked (and its params, and that the context embeds)."""
    query = text_argument(query, "rerank", "query")
    if not isinstance(documents, (list, tuple)):
        raise InvalidParamsError("rerank: documents must be a list of strings")
    texts = [text_argument(doc, "rerank", f"documents[{i}]") for i, doc in enumerate(documents)]
    validate(params, RERANK_FIELDS, "rerank")
    require_embedding(init, "rerank")
    return query, texts


def require_embedding(init: Mapping[str, Any], what: str) -> None:
    if not init["embedding"]:
        hint = " (and 'pooling_type': 'rank' for a reranker model)" if what == "rerank" else ""
        raise EmbeddingDisabledError(f"Embedding is not enabled: {what} needs a context created with "
                                     f"'embedding': True{hint}")


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["n_ctx=512", "model=/m.gguf"]`` (the ``--param`` of the CLI and of the conformance plugin) -> init params;
    values are JSON where they parse, else strings."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params
