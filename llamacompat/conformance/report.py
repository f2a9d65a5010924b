"""Run the checks without pytest and report passed / failed / n/a per check."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

from .kit import CHECKS, Kit, NotApplicable

__all__ = ["CheckOutcome", "run_checks", "format_report"]


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    title: str
    status: str  # "passed", "failed" or "n/a"
    detail: str
    seconds: float


def run_checks(backend: str, params: dict[str, Any] | None = None, names: Iterable[str] | None = None) -> list[CheckOutcome]:
    """Run the named checks (all by default) against ``backend``; never raises for a failed check."""
    kit = Kit(backend, params)
    outcomes = []
    try:
        for name in names or CHECKS:
            check = CHECKS[name]
            start = time.perf_counter()
            try:
                check.run(kit)
                status, detail = "passed", ""
            except NotApplicable as why:
                status, detail = "n/a", str(why)
            except Exception as err:  # a check's failure is data here, not a crash
                status, detail = "failed", f"{type(err).__name__}: {err}"
            outcomes.append(CheckOutcome(name, check.title, status, detail, time.perf_counter() - start))
    finally:
        kit.close()
    return outcomes


def format_report(backend: str, outcomes: list[CheckOutcome]) -> str:
    width = max(len(o.name) for o in outcomes)
    lines = [f"conformance of backend '{backend}'", ""]
    for o in outcomes:
        lines.append(f"  {o.status:<6}  {o.name:<{width}}  {o.seconds:5.1f}s  {o.title}")
        if o.detail:
            lines.append(f"  {'':<6}  {'':<{width}}          -> {o.detail.splitlines()[0][:200]}")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("passed", "failed", "n/a")}
    lines += ["", f"  {counts['passed']} passed, {counts['failed']} failed, {counts['n/a']} not applicable"]
    return "\n".join(lines)
