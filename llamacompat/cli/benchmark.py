"""``llamacompat bench``: llama.rn's bench figures for one backend, or every backend that loads a model.

With several backends the rounds alternate (A, B, A, B, ...) in one process, so a
machine that slows down halfway (heat, a neighbour) slows every backend alike.
Each round is llama.rn's ``bench(pp, tg, 1, 1)`` on a fresh cache plus one real
completion for the time to first token; the figures are medians over rounds.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..context import LlamaContext, init_llama
from ..models import resolve_model
from ..registry import get_adapter, installed_builtin_backends

__all__ = ["BenchRow", "backends_for", "run_bench", "summarize", "format_table"]


@dataclass
class BenchRow:
    """One backend's figures: llama.rn's ``bench`` keys plus time to first token and memory."""

    backend: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    load_s: float = 0.0
    peak_rss_mb: float = 0.0  # the process's resident memory above what it held before this backend loaded

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)

    def as_dict(self, fastest_tg: float) -> dict[str, Any]:
        last = self.rounds[-1]
        return {
            "backend": self.backend, "pp": last["pp"], "tg": last["tg"], "rounds": len(self.rounds),
            "speedPp": self.median("speedPp"), "speedTg": self.median("speedTg"),
            "ttftMs": statistics.median(self.ttft_ms), "loadS": self.load_s, "peakRssMb": self.peak_rss_mb,
            "ratioTg": self.median("speedTg") / fastest_tg if fastest_tg else 0.0,
            "bench": last,  # llama.rn's full result of the last round
        }


def backends_for(model: str) -> list[str]:
    """Installed built-in backends that can load ``model`` (a path or the default model's name)."""
    path = resolve_model(model)
    return [name for name in installed_builtin_backends() if get_adapter(name).can_load(path)]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRss:
    """Samples the resident set every 20 ms while a backend works (ru_maxrss is per process, not per backend)."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mb())


def _first_token_ms(ctx: LlamaContext, pp: int) -> float:
    """Time from the call to the first streamed token of a completion on a ``pp``-token prompt (cache cleared)."""
    ctx.clear_cache()
    prompt = ctx.detokenize(ctx.tokenize(" The quick brown fox jumps over the lazy dog." * (pp // 10 + 1))["tokens"][:pp])
    first: list[float] = []
    start = time.perf_counter()

    def on_token(_event: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    ctx.completion({"prompt": prompt, "n_predict": 1, "temperature": 0, "ignore_eos": True}, on_token)
    return ((first[0] if first else time.perf_counter()) - start) * 1000


def run_bench(model: str, backends: list[str], pp: int, tg: int, nr: int, params: dict[str, Any] | None = None,
              on_step: Callable[[], None] | None = None) -> list[BenchRow]:
    """``nr`` rounds on each backend: the first right after its load (memory is measured over load and that
    round, before the next backend loads), the others alternating; contexts stay loaded throughout."""
    rows = {name: BenchRow(name) for name in backends}
    contexts: dict[str, LlamaContext] = {}

    def round_of(name: str) -> None:
        ctx = contexts[name]
        rows[name].rounds.append(ctx.bench(pp, tg, 1, 1))
        rows[name].ttft_ms.append(_first_token_ms(ctx, pp))
        if on_step:
            on_step()

    try:
        for name in backends:
            before, peak = _rss_mb(), _PeakRss()
            start = time.perf_counter()
            try:
                contexts[name] = init_llama({"model": model, "backend": name, "n_ctx": max(512, pp + tg + 16),
                                             **(params or {})})
                rows[name].load_s = time.perf_counter() - start
                round_of(name)
            finally:
                rows[name].peak_rss_mb = max(0.0, peak.stop() - before)
        for _ in range(nr - 1):
            for name in backends:
                round_of(name)
    finally:
        for ctx in contexts.values():
            ctx.release()
    return list(rows.values())


def summarize(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Each backend's figures (``BenchRow.as_dict``), generation speed relative to the fastest backend's."""
    fastest = max((row.median("speedTg") for row in rows), default=0.0)
    return [row.as_dict(fastest) for row in rows]


def format_table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (the CLI draws it)."""
    header = ["backend", "pp t/s", "tg t/s", "first token ms", "memory MB", "load s", "tg vs fastest"]
    cells = [[d["backend"], f"{d['speedPp']:.1f}", f"{d['speedTg']:.1f}", f"{d['ttftMs']:.1f}",
              f"{d['peakRssMb']:.0f}", f"{d['loadS']:.2f}", f"{d['ratioTg']:.2f}"] for d in summary]
    return header, cells
