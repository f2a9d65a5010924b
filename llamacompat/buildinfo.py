"""``BuildInfo``: llama.rn reports the llama.cpp build it vendors; we report ours and each backend's package."""

from __future__ import annotations

import importlib.metadata
from typing import Any

__all__ = ["build_info"]

_BACKEND_PACKAGES = {"llama_cpp": "llama-cpp-python", "mlx": "mlx-lm", "openai": "httpx2", "rkllm": "tokenizers"}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, Any]:
    """``{"number": llamacompat's version, "commit": "", "backends": {backend: package version or None}}``.

    ``commit`` is kept for llama.rn's shape; a pip-installed package has none to report.
    """
    return {"number": _version("llamacompat") or "", "commit": "",
            "backends": {name: _version(package) for name, package in _BACKEND_PACKAGES.items()}}
