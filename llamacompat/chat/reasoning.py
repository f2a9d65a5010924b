"""Split a reply's thinking (``<think>...</think>``) from its answer, as llama.cpp's reasoning formats do.

- ``none``: thinking stays inline in ``content``;
- ``auto`` / ``deepseek``: thinking goes to ``reasoning_content``, the rest to ``content``;
- ``deepseek-legacy``: ``reasoning_content`` is filled and ``content`` keeps the tags too.

A template that opens the thinking block itself (the generation prompt ends
with ``<think>``) makes the reply start inside it ("forced open").
"""

from __future__ import annotations

from .formats import held_back

__all__ = ["split_reasoning"]


def split_reasoning(text: str, mode: str, partial: bool, forced_open: bool = False,
                    start: str = "<think>", end: str = "</think>") -> tuple[str, str]:
    """``(reasoning, content)`` of ``text`` under reasoning format ``mode``."""
    if mode == "none":
        return "", text
    body = text.lstrip()
    if not forced_open:
        if not body.startswith(start):
            if partial and start.startswith(body):
                return "", ""  # may still become the start tag
            return "", text
        body = body[len(start):]
    thought, closed, answer = body.partition(end)
    if not closed:  # still thinking (or never stopped)
        thought = held_back(thought, end) if partial else thought
        return thought.strip(), (text if mode == "deepseek-legacy" else "")
    return thought.strip(), (text if mode == "deepseek-legacy" else answer.lstrip())
