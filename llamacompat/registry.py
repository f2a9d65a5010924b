"""Adapter discovery: built-in backends plus the ``llamacompat.adapters`` entry-point group."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Type

from .adapters.base import Adapter
from .errors import BackendUnavailableError
from .params import unknown_key_error

__all__ = ["BUILTIN", "get_adapter", "available_backends", "installed_builtin_backends", "select_backend",
           "register_adapter", "unregister_adapter"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "llamacompat.adapters"
# name -> "module:Class"; imported lazily so a missing optional backend costs nothing.
BUILTIN = {"llama_cpp": "llamacompat.adapters.llama_cpp:LlamaCppAdapter", "mlx": "llamacompat.adapters.mlx:MlxAdapter",
           "rkllm": "llamacompat.adapters.rkllm:RkllmAdapter"}
# Backends whose model lives in a server: init_llama calls "module:function"(params) for a
# context core instead of loading an adapter (the bridge: ``llamacompat serve``; openai: any
# OpenAI-compatible inference server).
REMOTE = {"bridge": "llamacompat.bridge.client:connect", "openai": "llamacompat.openai.core:connect"}
# the order "auto" tries backends in
AUTO_ORDER = ("llama_cpp", "mlx", "rkllm")
# adapters registered at run time (tests, or an adapter under development before it has an entry point)
_registered: dict[str, Type[Adapter]] = {}


def register_adapter(name: str, adapter: Type[Adapter]) -> None:
    """Make ``adapter`` available as ``backend: name`` in this process (entry points do it for installs)."""
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise TypeError(f"register_adapter: {adapter!r} is not an llamacompat Adapter subclass")
    if name in BUILTIN or name == "auto" or name in REMOTE:
        raise ValueError(f"register_adapter: '{name}' is a built-in backend name")
    _registered[name] = adapter


def unregister_adapter(name: str) -> None:
    _registered.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Every backend name known (built-in and registered), installed or not."""
    return sorted(set(BUILTIN) | set(REMOTE) | set(_registered) | set(_entry_points()))


def installed_builtin_backends() -> list[str]:
    """The built-in backends whose runtime is installed (their adapter imports and finds its runtime)."""
    names = []
    for name in BUILTIN:
        try:
            found = get_adapter(name).runtime_found()
        except BackendUnavailableError:
            continue
        if found:
            names.append(name)
    return names


def get_adapter(name: str) -> Type[Adapter]:
    """The adapter class for ``name``; ``BackendUnavailableError`` says what to install."""
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        module_name, _, class_name = BUILTIN[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except BackendUnavailableError:
            raise
        except ImportError as err:
            raise BackendUnavailableError(f"backend '{name}' cannot be imported: {err}") from err
        return getattr(module, class_name)
    entry_points = _entry_points()
    if name in entry_points:
        try:
            adapter = entry_points[name].load()
        except ImportError as err:
            raise BackendUnavailableError(f"backend '{name}' (entry point {entry_points[name].value}) cannot be imported: {err}") from err
        if not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
            raise BackendUnavailableError(f"entry point '{name}' does not name an llamacompat Adapter subclass")
        return adapter
    raise unknown_key_error(name, ["auto", *available_backends()], "init_llama: backend")


def select_backend(name: str, model_path: str) -> Type[Adapter]:
    """Resolve ``backend`` ("auto" picks the first installed adapter that takes the file)."""
    if name != "auto":
        return get_adapter(name)
    skipped = []
    for candidate in (*AUTO_ORDER, *sorted(set(_entry_points()) - set(AUTO_ORDER))):
        try:
            adapter = get_adapter(candidate)
        except BackendUnavailableError as err:
            skipped.append(f"{candidate}: {err}")
            continue
        if adapter.can_load(model_path):
            logger.info("backend auto: chose %s for %s", candidate, model_path)
            return adapter
        skipped.append(f"{candidate}: does not load {model_path}")
    raise BackendUnavailableError(
        f"no installed backend can load {model_path} (" + "; ".join(skipped) + ")"
        if skipped else "no backend is installed; pip install 'llamacompat[llama-cpp]'"
    )
