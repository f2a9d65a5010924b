"""Embedding normalisation, as llama.cpp's ``common_embd_normalize`` (and so llama.rn)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["normalize_embedding"]


def normalize_embedding(values: Sequence[float], mode: int) -> list[float]:
    """-1 none, 0 max-abs scaled to int16 range, 1 taxicab, 2 Euclidean, >2 p-norm."""
    vec = np.asarray(values, dtype=np.float64)
    if mode < 0:
        return vec.tolist()
    if mode == 0:
        norm = np.abs(vec).max(initial=0.0) / 32760.0
    elif mode == 1:
        norm = np.abs(vec).sum()
    elif mode == 2:
        norm = np.sqrt((vec * vec).sum())
    else:
        norm = (np.abs(vec) ** mode).sum() ** (1.0 / mode)
    return (vec / norm if norm > 0 else np.zeros_like(vec)).tolist()
