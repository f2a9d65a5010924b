"""What a context asks of its core, and the one table of those calls.

A core does the work of a context: ``LocalCore`` for a model in this process,
``BridgeCore`` for one served by ``llamacompat serve``, ``OpenAICore`` for an
OpenAI-compatible server. Each core is the one place that validates its calls.
``CALLS`` names every call once, with llama.rn's method name: the context
(``LlamaContext``) takes from it whether a call holds the model or runs beside a
completion, and the bridge builds both its client methods and its server's
dispatch from it, so a call cannot be half added.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Generator, Literal, Mapping, Protocol

from ..parallel.slots import Slots
from ..types import (
    CompletionResult,
    EmbeddingResult,
    LoraAdapter,
    RerankResult,
    SessionLoadResult,
    TokenData,
    TokenizeResult,
)

__all__ = ["Core", "Call", "CALLS"]


class Core(Protocol):
    """The calls of ``CALLS`` (same names, same arguments: then ``stop``, then ``strict`` where the call takes
    them), plus what the context shows of its model."""

    backend: str
    model: dict[str, Any]
    params: dict[str, Any]  # the checked init params
    gpu: bool  # llama.rn's context attributes, of the process that holds the model
    reason_no_gpu: str
    devices: list[str]
    system_info: str  # llama.rn's systemInfo (llama.cpp's llama_print_system_info on llama_cpp)
    android_lib: str | None  # llama.rn's androidLib: the native library variant loaded on Android; None here

    @property
    def capabilities(self) -> dict[str, Any]: ...
    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event,
                   strict: bool) -> Generator[TokenData, None, CompletionResult]: ...
    def tokenize(self, text: str, params: Mapping[str, Any] | None) -> TokenizeResult: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def embedding(self, text: str, params: Mapping[str, Any] | None) -> EmbeddingResult: ...
    def get_formatted_chat(self, messages: Any, template: str | None, params: Mapping[str, Any] | None,
                           strict: bool) -> dict[str, Any]: ...
    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]: ...
    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None) -> list[RerankResult]: ...
    def apply_lora_adapters(self, lora_list: Any) -> None: ...
    def remove_lora_adapters(self) -> None: ...
    def get_loaded_lora_adapters(self) -> list[LoraAdapter]: ...
    def clear_cache(self, clear_data: bool) -> None: ...
    def load_session(self, path: str) -> SessionLoadResult: ...
    def save_session(self, path: str, token_size: int) -> int: ...
    def init_multimodal(self, params: Mapping[str, Any] | None) -> bool: ...
    def is_multimodal_enabled(self) -> bool: ...
    def get_multimodal_support(self) -> dict[str, bool]: ...
    def release_multimodal(self) -> None: ...
    def open_slots(self, n_parallel: int, n_batch: int) -> "Slots":
        """Parallel mode (``ctx.parallel.enable``): up to ``n_parallel`` requests at once, ``n_batch`` tokens a step."""
        ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Call:
    """One call of a core: llama.rn's method name (the core's method and the bridge's JSON method), its
    arguments by name (the bridge's request params), and how it runs."""

    name: str
    args: tuple[str, ...] = ()
    #: "model": holds the model (a context runs one at a time, busy otherwise; the bridge queues it in FIFO
    #: order); "beside": short, and may run while a completion runs (tokenize)
    runs: Literal["model", "beside"] = "model"
    stop: bool = False  # takes the context's stop flag (stop_completion ends it early)
    strict: bool = False  # takes the context's strict flag
    events: bool = False  # yields TokenData before its result
    defaults: dict[str, Any] = field(default_factory=dict)  # for arguments a bridge request may leave out


CALLS: dict[str, Call] = {call.name: call for call in (
    Call("completion", ("params",), stop=True, strict=True, events=True),
    Call("tokenize", ("text", "params"), "beside"),
    Call("detokenize", ("tokens",), "beside"),
    Call("embedding", ("text", "params")),
    Call("get_formatted_chat", ("messages", "template", "params"), "beside", strict=True),
    Call("bench", ("pp", "tg", "pl", "nr"), stop=True, defaults={"pl": 1, "nr": 1}),
    Call("rerank", ("query", "documents", "params")),
    Call("apply_lora_adapters", ("lora_list",)),
    Call("remove_lora_adapters"),
    Call("get_loaded_lora_adapters", runs="beside"),
    Call("clear_cache", ("clear_data",), defaults={"clear_data": False}),
    Call("load_session", ("path",)),
    Call("save_session", ("path", "token_size"), defaults={"token_size": -1}),
    Call("init_multimodal", ("params",)),
    Call("is_multimodal_enabled", runs="beside"),
    Call("get_multimodal_support", runs="beside"),
    Call("release_multimodal"),
)}
