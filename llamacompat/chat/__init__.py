"""Chat formatting: messages → prompt through the model's Jinja template, and replies → content, reasoning, tool calls."""

from .builtin import BUILTIN_TEMPLATES
from .formatter import ChatOptions, FormattedChat, ReplyParser, TemplateTokens, format_chat
from .template import render

__all__ = ["BUILTIN_TEMPLATES", "ChatOptions", "FormattedChat", "ReplyParser", "TemplateTokens", "format_chat", "render"]
