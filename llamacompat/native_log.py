"""Backend logs: always into Python ``logging``, and to llama.rn-style listeners when switched on.

Each backend logs its runtime's own messages under ``llamacompat.native.<backend>``
(llama.cpp's log callback is routed there). ``toggle_native_log(True)`` opens
that logger down to DEBUG and hands every line to the listeners added with
``add_native_log_listener`` as ``(level, text)``, with llama.rn's level names.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .errors import InvalidParamsError

__all__ = ["toggle_native_log", "add_native_log_listener", "NativeLogSubscription", "NATIVE_LOGGER"]

NATIVE_LOGGER = "llamacompat.native"
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}

Listener = Callable[[str, str], object]
_listeners: list[Listener] = []
_lock = threading.Lock()
_logger = logging.getLogger(NATIVE_LOGGER)


class _ListenerHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = _LEVEL_NAMES.get(record.levelno, "error" if record.levelno > logging.ERROR else "debug")
        text = record.getMessage()
        for listener in list(_listeners):
            try:
                listener(level, text)
            except Exception:  # a broken listener must not break the backend that is logging
                logging.getLogger(__name__).exception("native log listener %r failed", listener)


_handler = _ListenerHandler()


class NativeLogSubscription:
    """What ``add_native_log_listener`` returns: ``remove()`` stops the deliveries (llama.rn's ``{remove}``)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def remove(self) -> None:
        with _lock:
            if self._listener in _listeners:
                _listeners.remove(self._listener)


def toggle_native_log(enabled: bool) -> None:
    """Deliver backend log lines to the listeners (True) or stop (False); Python logging keeps them either way."""
    if not isinstance(enabled, bool):
        raise InvalidParamsError(f"toggle_native_log: enabled must be a bool, got {enabled!r}")
    with _lock:
        if enabled and _handler not in _logger.handlers:
            _logger.addHandler(_handler)
            _logger.setLevel(logging.DEBUG)  # the backends skip lines no logger wants; now we want them all
        elif not enabled and _handler in _logger.handlers:
            _logger.removeHandler(_handler)
            _logger.setLevel(logging.NOTSET)


def add_native_log_listener(listener: Listener) -> NativeLogSubscription:
    """Call ``listener(level, text)`` for each backend log line while native logging is on."""
    if not callable(listener):
        raise InvalidParamsError("add_native_log_listener: listener must be callable as listener(level, text)")
    with _lock:
        _listeners.append(listener)
    return NativeLogSubscription(listener)
