"""The ``llamacompat`` command: ``main`` parses it, one module a group of subcommands."""

from .main import main

__all__ = ["main"]
