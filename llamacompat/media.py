"""Media references (llama.rn's ``media_paths`` and chat ``image_url`` / ``input_audio`` parts) → bytes.

One place reads media for every core: a local path, a ``file://`` URL or a ``data:`` URL with base64. An
http(s) URL is refused (llamacompat never downloads). Files are size-limited before they are read, so a
wrong path to a huge file fails fast; what the bytes hold (a decodable image, a projector that takes audio)
is the runtime's to judge.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidParamsError, MediaError, UnsupportedFeatureError
from .models import local_path

__all__ = ["MEDIA_MARKER", "MAX_MEDIA_BYTES", "AUDIO_FORMATS", "Media", "load_media", "media_paths_param",
           "audio_data_url", "inline_media", "check_media", "final_medium_error"]

MEDIA_MARKER = "<__media__>"  # llama.rn's RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER, where each medium goes in a prompt
MAX_MEDIA_BYTES = 32 * 1024 * 1024  # one image or sound; far above a photo, and what the bridge forwards at most
AUDIO_FORMATS = ("wav", "mp3")  # what llama.cpp's miniaudio decodes (llama.rn's input_audio formats)
_IMAGE_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


@dataclass(frozen=True)
class Media:
    data: bytes
    source: str  # what the caller gave (a path, or the start of a data: URL), for messages

    @property
    def is_audio(self) -> bool:
        """What llama.cpp's mtmd helper decodes as sound (its is_audio_file): WAV (RIFF, but not WebP's RIFF),
        MP3 (an ID3 tag or an MPEG sync word) and FLAC."""
        data = self.data
        if len(data) < 12:
            return False
        return self._is_wav or data.startswith((b"ID3", b"fLaC")) or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)

    @property
    def _is_wav(self) -> bool:  # RIFF is also WebP's container: the form type tells them apart
        return self.data[:4] == b"RIFF" and self.data[8:12] == b"WAVE"

    @property
    def audio_format(self) -> str:
        """The sound's format as OpenAI's ``input_audio`` names it (wav, mp3; flac beyond OpenAI's two)."""
        return "wav" if self._is_wav else "flac" if self.data.startswith(b"fLaC") else "mp3"

    @property
    def mime_type(self) -> str:
        """What the bytes are, from their first bytes (servers want ``data:image/...`` or ``data:audio/...``)."""
        if self.is_audio:
            return {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}[self.audio_format]
        for magic, kind in _IMAGE_MAGIC:
            if self.data.startswith(magic):
                return kind
        if self.data[:4] == b"RIFF" and self.data[8:12] == b"WEBP":
            return "image/webp"
        return "image/octet-stream"  # the runtime judges whether it decodes

    @property
    def data_url(self) -> str:
        return f"data:{self.mime_type};base64," + base64.b64encode(self.data).decode()


def audio_data_url(data: str, fmt: str) -> str:
    """llama.rn's ``input_audio`` part as a data URL; a format other than wav/mp3 is llama.rn's error."""
    if fmt not in AUDIO_FORMATS:
        raise UnsupportedFeatureError(f"Unsupported audio format: {fmt}")
    return f"data:audio/{fmt};base64,{data}"


def media_paths_param(value: Any, where: str) -> list[str]:
    """llama.rn's ``media_paths``: a string or a list of strings (native needs a list)."""
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) and p for p in paths):
        raise InvalidParamsError(f"{where}: 'media_paths' must be a path or a list of non-empty paths, got {value!r}")
    return list(paths)


def load_media(ref: str, where: str, files: bool = True) -> Media:
    """The bytes ``ref`` names (a path, ``file://`` or ``data:``), at most ``MAX_MEDIA_BYTES``.

    ``files=False`` (a bridge server) takes only ``data:`` URLs: a client must not make the server read its files.
    """
    if ref.startswith(("http://", "https://")):
        raise UnsupportedFeatureError(f"{where}: {ref[:80]!r} is a web URL; llamacompat never downloads media: "
                                      "fetch it yourself and pass a path or a data: URL")
    if ref.startswith("data:"):
        head, sep, payload = ref.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaError(f"{where}: a data: URL must be 'data:<type>;base64,<data>', got {ref[:40]!r}...")
        if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
            raise MediaError(f"{where}: the medium in {head!r} is over {MAX_MEDIA_BYTES >> 20} MiB; send a smaller one")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{where}: the data: URL ({head}) is not valid base64") from None
        return Media(data, head)
    if not files:
        raise MediaError(f"{where}: the bridge server reads no media files a client names ({ref[:80]!r}); send the "
                         "bytes as a data: URL (the bridge client does this for its own paths)")
    path = local_path(ref)
    try:
        size = os.path.getsize(path)
        if size > MAX_MEDIA_BYTES:
            raise MediaError(f"{where}: {path} is {size >> 20} MiB, over the {MAX_MEDIA_BYTES >> 20} MiB a medium may "
                             "have; scale it down first")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise MediaError(f"{where}: cannot read the medium {path!r} ({err.strerror or err}); check the path") from None
    if not data:
        raise MediaError(f"{where}: {path} is empty")
    return Media(data, path)


def check_media(media: list[Media], support: Mapping[str, bool], text: str | None = None) -> None:
    """Media a projector with ``support`` (``{"vision", "audio"}``) takes, one per media marker of ``text`` (None:
    a chat, whose parts each become a marker)."""
    if text is not None and (n_markers := text.count(MEDIA_MARKER)) != len(media):
        raise MediaError(f"the prompt has {n_markers} media markers ({MEDIA_MARKER}) for {len(media)} media; put "
                         "one marker where each medium goes")
    for i, medium in enumerate(media):
        if medium.is_audio and not support.get("audio"):
            raise MediaError(f"media {i} ({medium.source[:60]}) is audio, and this projector takes images only; "
                             "use a projector that takes audio")
        if not medium.is_audio and not support.get("vision"):
            raise MediaError(f"media {i} ({medium.source[:60]}) is an image, and this projector takes audio only")


def final_medium_error() -> MediaError:
    """A completion's prompt may not end with a medium: llama.cpp computes no logits there (sampling after one hit
    a GGML_ASSERT that aborted the process)."""
    return MediaError("completion: the prompt ends with a medium, and llama.cpp computes no next-token logits on a "
                      "medium's positions; put text after the last media marker (chat templates do)")


def inline_media(ref: str, where: str) -> str:
    """``ref`` as a ``data:`` URL (a path or ``file://`` read here), so another process needs no file of ours."""
    if ref.startswith("data:"):
        return ref
    return load_media(ref, where).data_url
