"""Session files: atomic writes, llama.cpp's ``ggsn`` header, and the sidecar (checksum and model identity)."""

from .atomic import atomic_write, atomic_write_bytes
from .ggsn import SessionHeader, check_header, read_header
from .ggsq import SeqStateHeader, check_seq_header, parse_seq_header, read_seq_header
from .media_meta import META_SUFFIX, NULL_TOKEN, file_tokens, meta_path, read_meta, save_with_media, write_meta
from .sidecar import check_identity, file_crc32, read_sidecar, save_with_sidecar, sidecar_path

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "SessionHeader",
    "read_header",
    "check_header",
    "SeqStateHeader",
    "read_seq_header",
    "parse_seq_header",
    "check_seq_header",
    "read_sidecar",
    "save_with_sidecar",
    "check_identity",
    "sidecar_path",
    "file_crc32",
    "META_SUFFIX",
    "NULL_TOKEN",
    "meta_path",
    "read_meta",
    "write_meta",
    "save_with_media",
    "file_tokens",
]
