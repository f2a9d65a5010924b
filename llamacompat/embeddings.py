"""Embedding normalisation, as llama.cpp's ``common_embd_normalize`` (and so llama.rn), and rerank results."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .types import RerankResult

__all__ = ["normalize_embedding", "cosine_scores", "ranked"]


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


def cosine_scores(embed: Callable[[str], Sequence[float]], query: str, documents: list[str]) -> list[float]:
    """How an embedding model ranks (no reranker head): cosine similarity of each document to the query."""
    target = np.asarray(normalize_embedding(embed(query), 2))
    return [float(target @ np.asarray(normalize_embedding(embed(doc), 2))) for doc in documents]


def ranked(scores: Sequence[float], documents: list[str]) -> list[RerankResult]:
    """llama.rn's rerank result: every document with its score and index, best first."""
    results = [RerankResult(score=float(score), index=i, document=doc)
               for i, (score, doc) in enumerate(zip(scores, documents, strict=True))]
    return sorted(results, key=lambda r: -r["score"])
