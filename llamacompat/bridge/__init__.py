"""The bridge: one loaded model served to many processes over a Unix socket (or TCP with a token).

``llamacompat serve`` runs :class:`~llamacompat.bridge.server.BridgeServer`;
``init_llama({"backend": "bridge", "socket": PATH})`` is its client. The wire
protocol is documented in ``docs/bridge-protocol.md``.
"""

from .protocol import MAX_LINE, default_socket

__all__ = ["MAX_LINE", "default_socket"]
