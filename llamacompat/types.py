"""Typed shapes of llama.rn's params and results (snake_case, as llama.rn's native side).

Results are plain dicts so they serialise to JSON as they are and port 1:1 from
TypeScript (``result.text`` becomes ``result["text"]``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Literal, Tuple, TypedDict, Union

__all__ = [
    "ContextParams",
    "BridgeContextParams",
    "OpenAIContextParams",
    "RkllmContextParams",
    "RkllmSampling",
    "InitParams",
    "CompletionParams",
    "FormattedChatParams",
    "TokenizeParams",
    "EmbeddingParams",
    "RerankParams",
    "ChatMessage",
    "GrammarTrigger",
    "ResponseFormat",
    "LogitBiasPair",
    "TokenProb",
    "CompletionProbability",
    "TokenData",
    "Timings",
    "CompletionResult",
    "TokenizeResult",
    "EmbeddingResult",
    "RerankResult",
    "LoraAdapter",
    "SessionLoadResult",
    "BenchResult",
    "TokenCallback",
    "ProgressCallback",
]

# Each params TypedDict lists exactly the keys its table in llamacompat.params accepts, with the same value types
# (tests/test_types.py holds them equal). A list param that also takes a tuple says so; None is Optional. Keys that
# validation only refuses (COMPLETION_NOT_YET) or warns about (COMPLETION_IGNORED) are left out: a type checker
# flags them before the call does.


class _LoraAdapterRequired(TypedDict):
    path: str


class LoraAdapter(_LoraAdapterRequired, total=False):
    scaled: Union[float, None]  # None: 1.0


class ContextParams(TypedDict, total=False):
    """``init_llama``'s params on every backend (``params.CONTEXT_FIELDS``)."""

    model: str
    backend: str
    strict: bool
    chat_template: Union[str, None]
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_gpu_layers: int
    use_mlock: bool
    use_mmap: bool
    vocab_only: bool
    embedding: bool
    pooling_type: Union[Literal["none", "mean", "cls", "last", "rank"], None]
    embd_normalize: int
    ctx_shift: bool
    cache_type_k: str
    cache_type_v: str
    flash_attn_type: Literal["auto", "on", "off"]
    flash_attn: bool  # llama.rn's deprecated bool, read when flash_attn_type is not given
    rope_freq_base: float
    rope_freq_scale: float
    kv_unified: bool | None
    swa_full: bool
    no_extra_bufts: bool
    is_model_asset: bool
    n_parallel: int
    devices: Union[List[str], Tuple[str, ...], None]
    no_gpu_devices: bool
    n_cpu_moe: int
    use_progress_callback: bool
    lora: Union[str, None]
    lora_scaled: float
    lora_list: Union[List[LoraAdapter], Tuple[LoraAdapter, ...], None]


# The backends with init params of their own: separate TypedDicts, because init_llama refuses those keys on every
# other backend, so one ContextParams holding them all would let a checker pass what the call rejects.
class BridgeContextParams(ContextParams, total=False):
    """``backend: "bridge"`` (``bridge.client.BRIDGE_FIELDS``)."""

    socket: Union[str, None]
    host: Union[str, None]
    port: Union[int, None]
    token: Union[str, None]
    timeout: float


class OpenAIContextParams(ContextParams, total=False):
    """``backend: "openai"`` (``openai.core.OPENAI_FIELDS``)."""

    base_url: Union[str, None]
    api_key: Union[str, None]
    server: str  # "auto" or a dialect name (openai.dialects.DIALECTS)
    timeout: float
    connect_timeout: float
    max_retries: int
    max_connections: int
    lora_prompt_cache: bool  # keep llama-server's prompt cache with LoRA adapters loaded (README, openai LoRA)


class RkllmSampling(TypedDict, total=False):
    """The sampling settings an RKLLM model loads with (``rkllm_sampling``; the completion params' types)."""

    temperature: float
    top_k: int
    top_p: float
    penalty_repeat: float
    penalty_freq: float
    penalty_present: float
    mirostat: Literal[0, 1, 2]
    mirostat_tau: float
    mirostat_eta: float


class RkllmContextParams(ContextParams, total=False):
    """``backend: "rkllm"`` (``RkllmAdapter.context_fields``)."""

    rkllm_lib: Union[str, None]
    rkllm_version: Union[str, None]
    rkllm_platform: Union[str, None]
    rkllm_base_domain_id: int
    rkllm_sampling: Union[RkllmSampling, None]
    rkllm_tokenizer: Union[str, None]


InitParams = Union[ContextParams, BridgeContextParams, OpenAIContextParams, RkllmContextParams]


class ChatMessage(TypedDict, total=False):
    role: str
    content: Union[str, List[dict]]
    reasoning_content: str
    tool_calls: List[dict]
    tool_call_id: str
    name: str


class GrammarTrigger(TypedDict, total=False):
    """A lazy grammar's trigger (llamacompat.grammars.triggers): ``type`` a llama.cpp number or its name."""

    type: Union[Literal[0, 1, 2, 3], Literal["token", "word", "pattern", "pattern_full"]]
    value: str
    token: int  # the token id of a "token" trigger


class ResponseFormat(TypedDict, total=False):
    """OpenAI's ``response_format``: ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` and the rest."""

    type: Literal["text", "json_object", "json_schema"]
    schema: Dict[str, Any]
    json_schema: Dict[str, Any]


# [token, bias]: a token id or a string (each of its tokens), the bias a number or False (never this token)
LogitBiasPair = Union[Tuple[Union[int, str], Union[float, bool]], List[Union[int, str, float]]]


class FormattedChatParams(TypedDict, total=False):
    """``get_formatted_chat``'s params: the completion params that shape the chat (``params.CHAT_FIELDS``)."""

    chat_template: Union[str, None]
    add_generation_prompt: bool
    tools: Union[List[Dict[str, Any]], None]
    tool_choice: Literal["auto", "none", "required"]
    parallel_tool_calls: bool
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"]
    enable_thinking: bool
    chat_template_kwargs: Union[Dict[str, Any], None]
    now: Union[float, str, None]  # seconds since the epoch, as llama.rn (a string of digits too)
    jinja: bool
    json_schema: Union[str, Dict[str, Any], bool, None]
    response_format: Union[ResponseFormat, None]
    force_pure_content: bool


class CompletionParams(FormattedChatParams, total=False):
    """``completion``'s params (``params.COMPLETION_FIELDS``)."""

    prompt: Union[str, None]
    media_paths: Union[str, List[str], None]  # a raw prompt's media: paths, file:// or data: URLs
    messages: Union[List[ChatMessage], None]
    n_predict: int
    stop: Union[List[str], Tuple[str, ...]]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    xtc_probability: float
    xtc_threshold: float
    top_n_sigma: float
    penalty_last_n: int
    penalty_repeat: float
    penalty_freq: float
    penalty_present: float
    mirostat: Literal[0, 1, 2]
    mirostat_tau: float
    mirostat_eta: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_penalty_last_n: int
    dry_sequence_breakers: Union[List[str], Tuple[str, ...]]
    seed: int
    ignore_eos: bool
    logit_bias: Union[List[LogitBiasPair], Tuple[LogitBiasPair, ...], Dict[Union[int, str], Union[float, bool]]]
    n_probs: int
    grammar: Union[str, None]
    grammar_lazy: bool
    grammar_triggers: Union[List[GrammarTrigger], Tuple[GrammarTrigger, ...]]
    preserved_tokens: Union[List[str], Tuple[str, ...]]
    grammar_engine: Literal["auto", "llguidance", "llama_cpp"]
    emit_partial_completion: bool
    chatTemplate: Union[str, None]  # llama.rn's deprecated alias of chat_template
    prefill_text: Union[str, None]
    n_threads: int
    thinking_budget_tokens: int
    thinking_budget_message: Union[str, None]
    # llama.rn's parallel-only params (ctx.parallel.completion on llama_cpp; warned about anywhere else)
    load_state_path: Union[str, None]
    save_state_path: Union[str, None]
    save_prompt_state_path: Union[str, None]
    load_state_size: int  # <= 0: every token of the file
    save_state_size: int  # <= 0: every evaluated token


class TokenizeParams(TypedDict, total=False):
    """``tokenize``'s params (``params.TOKENIZE_FIELDS``)."""

    media_paths: Union[str, List[str], None]  # one per media marker of the text (needs init_multimodal)


class EmbeddingParams(TypedDict, total=False):
    """``embedding``'s params (``params.EMBEDDING_FIELDS``)."""

    embd_normalize: int  # -1 none, 0 max-abs, 1 taxicab, 2 L2, >2 p-norm


class RerankParams(TypedDict, total=False):
    """``rerank``'s params (``params.RERANK_FIELDS``): ``normalize`` is accepted and ignored, as llama.rn's native side does."""

    normalize: Union[float, None]


class TokenProb(TypedDict):
    tok_str: str
    prob: float


class CompletionProbability(TypedDict):
    content: str
    probs: List[TokenProb]


class TokenData(TypedDict, total=False):
    token: str
    completion_probabilities: List[CompletionProbability]
    # Cumulative parses of the reply so far, as llama.rn sends them (only the non-empty ones): a plain completion's
    # content is its text; accumulated_text is the reply's text so far (prefill_text included).
    content: str
    reasoning_content: str
    tool_calls: List[dict]
    accumulated_text: str


class Timings(TypedDict):
    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


class _CompletionResultRequired(TypedDict):
    text: str
    chat_format: int
    completion_probabilities: List[CompletionProbability]
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int
    draft_tokens: int
    draft_tokens_accepted: int
    truncated: bool
    context_full: bool
    interrupted: bool
    stopped_eos: bool
    stopped_word: bool
    stopped_limit: bool
    stopping_word: str
    timings: Timings


class CompletionResult(_CompletionResultRequired, total=False):
    context_released: bool  # True: release_context ran while this completion was generating
    content: str
    reasoning_content: str
    tool_calls: List[dict]
    accumulated_text: str  # the reply's text (prefill_text included), as llama.rn reports it


class TokenizeResult(TypedDict):
    tokens: List[int]
    has_media: bool
    bitmap_hashes: List[str]
    chunk_pos: List[int]
    chunk_pos_media: List[int]


class EmbeddingResult(TypedDict):
    embedding: List[float]


class RerankResult(TypedDict):
    score: float
    index: int
    document: str


class SessionLoadResult(TypedDict):
    tokens_loaded: int
    prompt: str


BenchResult = dict  # llama.rn's camelCase bench keys; see LlamaContext.bench

TokenCallback = Callable[[TokenData], Any]
ProgressCallback = Callable[[int], Any]
