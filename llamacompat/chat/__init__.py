"""Chat formatting: messages → prompt text through the model's Jinja template."""

from .template import BUILTIN_TEMPLATES, normalize_messages, render_chat

__all__ = ["BUILTIN_TEMPLATES", "normalize_messages", "render_chat"]
