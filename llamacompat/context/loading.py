"""Making contexts: ``init_llama`` (a model in this process, or a remote core), its async twin, and the
module functions of llama.rn that need no context."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
from typing import Any

from .. import params as P
from ..adapters.base import Adapter
from ..errors import InvalidParamsError, ModelLoadError, unsupported
from ..local import LocalCore
from ..models import resolve_model
from ..models.gguf import load_model_info
from ..registry import REMOTE, get_adapter, installed_builtin_backends, select_backend
from ..types import ContextParams, ProgressCallback
from .asynchronous import AsyncLlamaContext
from .live import context_slot
from .sync import LlamaContext

__all__ = ["init_llama", "init_llama_async", "load_local", "load_llama_model_info", "get_backend_devices_info"]


def _progress_reporter(on_progress: ProgressCallback | None):
    """llama.rn reports integer percentages: 0 first, the loader's values, then 100."""
    if on_progress is None:
        return None, lambda: None, lambda: None
    state: dict[str, Any] = {"last": -1, "error": None}

    def emit(percent: int) -> bool:
        if percent == state["last"]:
            return True
        state["last"] = percent
        try:
            return on_progress(percent) is not False
        except BaseException as err:  # re-raised after the native call returns
            state["error"] = err
            return False

    def reraise() -> None:
        if state["error"] is not None:
            raise state["error"]

    return (lambda fraction: emit(min(100, max(0, int(fraction * 100))))), (lambda: emit(0)), reraise


def _raw_params(params: ContextParams | dict[str, Any] | None) -> dict[str, Any]:
    if params is not None and not isinstance(params, dict):
        raise InvalidParamsError(f"init_llama: params must be a dict, got {type(params).__name__}")
    raw = dict(params or {})
    if not isinstance(raw.get("backend", "auto"), str):
        raise InvalidParamsError(f"init_llama: 'backend' must be a string, got {raw['backend']!r}")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParamsError(f"init_llama: 'model' must be a string path, got {type(model).__name__}")
    return raw


def _context_params(raw: dict[str, Any]) -> tuple[type[Adapter], dict[str, Any]]:
    model_path = resolve_model(raw.get("model"))
    adapter_cls = select_backend(raw.get("backend", "auto"), model_path)
    checked = P.init_params(raw, adapter_cls.context_fields)
    checked["model"] = model_path
    checked["lora_list"] = P.init_lora(checked)
    if "flash_attn" in raw and "flash_attn_type" not in raw:  # llama.rn's deprecated bool
        checked["flash_attn_type"] = "on" if raw["flash_attn"] else "off"
    if checked["ctx_shift"]:
        unsupported(checked["strict"], "init_llama: ctx_shift=True is not implemented; a full context stops generation")
        checked["ctx_shift"] = False
    return adapter_cls, checked


def load_local(params: ContextParams | dict[str, Any] | None, on_progress: ProgressCallback | None = None) -> LocalCore:
    """Load a model in this process (what ``init_llama`` does for every backend but the remote ones)."""
    adapter_cls, checked = _context_params(_raw_params(params))
    native_progress, start, reraise = _progress_reporter(on_progress)
    start()
    try:
        adapter = adapter_cls.load(checked, native_progress)
    except ModelLoadError:
        reraise()
        raise
    reraise()
    try:
        core = LocalCore(adapter, checked)
        if checked["lora_list"]:
            core.apply_lora_adapters(checked["lora_list"], "init_llama")
    except BaseException:
        adapter.close()
        raise
    if native_progress is not None:
        native_progress(1.0)
    return core


def init_llama(params: ContextParams | dict[str, Any] | None = None,
               on_progress: ProgressCallback | None = None) -> LlamaContext:
    """Load a model and return a context (llama.rn's ``initLlama``). Blocks while loading.

    ``backend: "bridge"`` connects to a ``llamacompat serve`` process instead of loading, and
    ``backend: "openai"`` to an OpenAI-compatible inference server.
    """
    raw = _raw_params(params)
    remote = REMOTE.get(raw.get("backend", "auto"))
    with context_slot():
        if remote is not None:
            module_name, _, function = remote.partition(":")
            core = getattr(importlib.import_module(module_name), function)(raw)
        else:
            core = load_local(raw, on_progress)
        return LlamaContext(core)


async def init_llama_async(params: ContextParams | dict[str, Any] | None = None,
                           on_progress: ProgressCallback | None = None) -> AsyncLlamaContext:
    """Awaitable ``init_llama``; the load runs on the context's own worker thread, ``on_progress`` on the loop."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacompat")
    loop = asyncio.get_running_loop()
    progress = None
    if on_progress is not None:
        progress = lambda percent: loop.call_soon_threadsafe(on_progress, percent)  # noqa: E731
    try:
        ctx = await loop.run_in_executor(executor, init_llama, params, progress)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return AsyncLlamaContext(ctx, executor)


def load_llama_model_info(path: str) -> dict[str, str]:
    """GGUF metadata as strings without loading the model (llama.rn's ``loadLlamaModelInfo``)."""
    if not isinstance(path, str):
        raise InvalidParamsError(f"load_llama_model_info: path must be a string, got {type(path).__name__}")
    return load_model_info(resolve_model(path))


def get_backend_devices_info() -> list[dict[str, Any]]:
    """llama.rn's getBackendDevicesInfo: the devices of every installed backend
    (``backend``, ``type``, ``deviceName``, ``maxMemorySize``, ``metadata``)."""
    devices: list[dict[str, Any]] = []
    for name in installed_builtin_backends():
        devices += get_adapter(name).backend_devices()
    return devices
