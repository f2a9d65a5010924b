"""Tiny random-weight multimodal projectors (mmproj GGUF) for the packaged SmolLM2, built at test time.

No multimodal model can be downloaded here, so the tests check the plumbing (token counts, positions,
prefix reuse, sessions, errors) on projectors whose weights are noise: the model "sees" nothing, but
llama.cpp's clip loader, encoder and the decoder run for real.

- ``build_mmproj``: the ``mlp`` projector (LLaVA-1.5 style: a fixed square resize, no tiling, no marker
  tokens, causal decoding), the smallest vision projector the loader takes. image_size 64 and patch 16 give
  (64 / 16)^2 = 16 image tokens.
- audio: not built yet. ``ultravox`` (a Whisper-style encoder) is the candidate; ``wav_bytes`` is here for the
  test that a vision-only projector refuses audio.

The loader's demands met here: ``image_mean``/``image_std`` hold 3 values; ``feed_forward_length`` differs
from ``embedding_length`` (the loader takes equal sizes for swapped up/down weights); ``mlp`` sizes its output
from ``mm.2.weight`` (it must be the text model's n_embd) and runs ``block_count - 1`` blocks. (For a future
ultravox fixture, issue 29 notes: conv biases shaped (C, 1), q and v biases but no k bias, a stack factor
that divides 1500.)
"""

from __future__ import annotations

import os

import numpy as np

N_EMBD_SMOLLM2 = 576
IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # what one image costs in the context


def _writer(path: str, has_vision: bool, has_audio: bool):  # type: ignore[no-untyped-def]
    import gguf

    writer = gguf.GGUFWriter(path, "clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", has_vision)
    writer.add_bool("clip.has_audio_encoder", has_audio)
    writer.add_string("general.name", "llamacompat random-weight test projector")
    return writer


def _save(writer, path: str) -> str:  # type: ignore[no-untyped-def]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _blocks(writer, prefix: str, rng: np.random.Generator, n_blocks: int, width: int, ff: int) -> None:  # type: ignore[no-untyped-def]
    def add(name: str, *shape: int, scale: float = 0.02) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    for i in range(n_blocks):
        b = f"{prefix}.blk.{i}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            add(f"{b}.{part}.weight", width, width)
            add(f"{b}.{part}.bias", width)
        writer.add_tensor(f"{b}.ln1.weight", np.ones(width, np.float32))
        writer.add_tensor(f"{b}.ln1.bias", np.zeros(width, np.float32))
        writer.add_tensor(f"{b}.ln2.weight", np.ones(width, np.float32))
        writer.add_tensor(f"{b}.ln2.bias", np.zeros(width, np.float32))
        add(f"{b}.ffn_up.weight", ff, width)
        add(f"{b}.ffn_up.bias", ff)
        add(f"{b}.ffn_down.weight", width, ff)
        add(f"{b}.ffn_down.bias", width)


def build_mmproj(folder: str, n_embd: int = N_EMBD_SMOLLM2, name: str = "mmproj-test.gguf", seed: int = 0) -> str:
    """Write a random-weight ``mlp`` vision projector into ``folder`` and return its path (under 1 MB).

    ``n_embd`` is the text model's embedding size the projector feeds; give another to build a mismatch."""
    path = os.path.join(folder, name)
    rng = np.random.default_rng(seed)
    width, ff, hidden, blocks = 64, 128, 128, 2
    writer = _writer(path, has_vision=True, has_audio=False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", width)
    writer.add_uint32("clip.vision.feed_forward_length", ff)
    writer.add_uint32("clip.vision.projection_dim", n_embd)
    writer.add_uint32("clip.vision.block_count", blocks)
    writer.add_uint32("clip.vision.attention.head_count", 4)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_gelu", True)
    n_patches = IMAGE_TOKENS
    writer.add_tensor("v.patch_embd.weight",
                      (rng.standard_normal((width, 3, PATCH_SIZE, PATCH_SIZE)) * 0.02).astype(np.float32))
    writer.add_tensor("v.position_embd.weight", (rng.standard_normal((n_patches, width)) * 0.02).astype(np.float32))
    writer.add_tensor("v.pre_ln.weight", np.ones(width, np.float32))
    writer.add_tensor("v.pre_ln.bias", np.zeros(width, np.float32))
    _blocks(writer, "v", rng, blocks, width, ff)
    writer.add_tensor("mm.0.weight", (rng.standard_normal((hidden, width)) * 0.02).astype(np.float32))
    writer.add_tensor("mm.0.bias", np.zeros(hidden, np.float32))
    writer.add_tensor("mm.2.weight", (rng.standard_normal((n_embd, hidden)) * 0.02).astype(np.float32))
    writer.add_tensor("mm.2.bias", np.zeros(n_embd, np.float32))
    return _save(writer, path)


def png_bytes(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    """A small RGB PNG of noise (PIL is not a dependency; zlib writes it). Another seed: another image (hash)."""
    import struct
    import zlib

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_png(folder: str, name: str = "image.png", seed: int = 0, width: int = 32, height: int = 24) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(png_bytes(width, height, seed))
    return path


def wav_bytes(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A mono 16-bit PCM WAV of a sine tone."""
    import io
    import wave

    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * freq * t) * 0.3 * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()
