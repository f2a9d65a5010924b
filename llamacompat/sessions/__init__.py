"""Session files: atomic writes, llama.cpp's ``ggsn`` header, and the model-identity sidecar."""

from .atomic import atomic_write, atomic_write_bytes
from .ggsn import SessionHeader, check_header, read_header
from .sidecar import check_identity, read_sidecar, sidecar_path, write_sidecar

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "SessionHeader",
    "read_header",
    "check_header",
    "read_sidecar",
    "write_sidecar",
    "check_identity",
    "sidecar_path",
]
