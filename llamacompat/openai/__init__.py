"""``backend: "openai"``: llama.rn's API over an OpenAI-compatible inference server (see ``core``)."""

from .core import OPENAI_FIELDS, OpenAICore, connect

__all__ = ["OpenAICore", "connect", "OPENAI_FIELDS"]
