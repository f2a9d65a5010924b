"""Typed shapes of llama.rn's params and results (snake_case, as llama.rn's native side).

Results are plain dicts so they serialise to JSON as they are and port 1:1 from
TypeScript (``result.text`` becomes ``result["text"]``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Literal, TypedDict, Union

__all__ = [
    "ContextParams",
    "CompletionParams",
    "ChatMessage",
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
    "EmbeddingParams",
    "RerankParams",
    "TokenizeParams",
]


class ContextParams(TypedDict, total=False):
    model: str
    backend: str
    strict: bool
    chat_template: str
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    n_gpu_layers: int
    use_mlock: bool
    use_mmap: bool
    vocab_only: bool
    embedding: bool
    pooling_type: Literal["none", "mean", "cls", "last", "rank"]
    embd_normalize: int
    ctx_shift: bool
    cache_type_k: str
    cache_type_v: str
    flash_attn_type: Literal["auto", "on", "off"]
    rope_freq_base: float
    rope_freq_scale: float
    seed: int


class ChatMessage(TypedDict, total=False):
    role: str
    content: Union[str, List[dict]]
    reasoning_content: str
    tool_calls: List[dict]
    tool_call_id: str
    name: str


class CompletionParams(TypedDict, total=False):
    prompt: str
    messages: List[ChatMessage]
    chat_template: str
    n_predict: int
    stop: List[str]
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
    mirostat: int
    mirostat_tau: float
    mirostat_eta: float
    dry_multiplier: float
    dry_base: float
    dry_allowed_length: int
    dry_penalty_last_n: int
    dry_sequence_breakers: List[str]
    seed: int
    ignore_eos: bool
    logit_bias: List[list]
    n_probs: int
    grammar: str
    json_schema: Union[str, dict, bool]
    response_format: dict
    add_generation_prompt: bool
    tools: List[dict]
    tool_choice: Literal["auto", "none", "required"]
    parallel_tool_calls: bool
    reasoning_format: Literal["none", "auto", "deepseek", "deepseek-legacy"]
    enable_thinking: bool
    chat_template_kwargs: dict
    now: float
    jinja: bool


class TokenProb(TypedDict):
    tok_str: str
    prob: float


class CompletionProbability(TypedDict):
    content: str
    probs: List[TokenProb]


class TokenData(TypedDict, total=False):
    token: str
    completion_probabilities: List[CompletionProbability]
    # Chat completions: cumulative parses of the reply so far (only the non-empty ones).
    content: str
    reasoning_content: str
    tool_calls: List[dict]


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
    content: str
    reasoning_content: str
    tool_calls: List[dict]


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


class LoraAdapter(TypedDict, total=False):
    path: str
    scaled: float


class SessionLoadResult(TypedDict):
    tokens_loaded: int
    prompt: str


BenchResult = dict  # llama.rn's camelCase bench keys; see LlamaContext.bench

TokenCallback = Callable[[TokenData], Any]
ProgressCallback = Callable[[int], Any]


class EmbeddingParams(TypedDict, total=False):
    embd_normalize: int


class RerankParams(TypedDict, total=False):
    normalize: float


class TokenizeParams(TypedDict, total=False):
    media_paths: list[str]
