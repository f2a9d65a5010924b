"""Backend adapters: each knows one runtime and nothing about llama.rn's result shapes."""

from .base import Adapter, Capabilities, Interrupted, SamplingParams

__all__ = ["Adapter", "Capabilities", "Interrupted", "SamplingParams"]
