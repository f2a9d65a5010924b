"""The mlx backend: mlx-lm models, GGUF files included (see adapter.py)."""

from .adapter import MlxAdapter

__all__ = ["MlxAdapter"]
