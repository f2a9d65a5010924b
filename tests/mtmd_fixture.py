"""Tiny random-weight multimodal projectors (mmproj GGUF) for the packaged SmolLM2, built at test time.

No multimodal model can be downloaded here, so the tests check the plumbing (token counts, positions,
prefix reuse, sessions, errors) on projectors whose weights are noise: the model "sees" nothing, but
llama.cpp's clip loader, encoder and the decoder run for real.

- ``build_mmproj``: the ``mlp`` projector (LLaVA-1.5 style: a fixed square resize, no tiling, no marker
  tokens, causal decoding), the smallest vision projector the loader takes. image_size 64 and patch 16 give
  (64 / 16)^2 = 16 image tokens.
- ``build_audio_mmproj``: the ``ultravox`` projector (a Whisper encoder: two 1-D convolutions over 128 mel
  bins, transformer blocks, then frames stacked ``AUDIO_STACK`` at a time and a SwiGLU MLP). llama.cpp cuts a
  sound into 30 s windows of 3000 mel frames (a shorter one is padded to one window); the second convolution
  halves them to 1500 positions and the stacking gives 1500 / 60 = 25 tokens per window.
- ``build_mmproj(kind="both")``: one file with both encoders (each under its own ``clip.<modality>.projector_type``),
  as llama.cpp's omni projectors are.

The loader's demands met here: ``image_mean``/``image_std`` hold 3 values; ``feed_forward_length`` differs
from ``embedding_length`` (the loader takes equal sizes for swapped up/down weights); ``mlp`` sizes its output
from ``mm.2.weight`` (it must be the text model's n_embd) and runs ``block_count - 1`` blocks. The Whisper
graph wants conv biases shaped (C, 1), q and v biases but none on k, and a position table of 1500 rows;
ultravox sizes its output from ``mm.a.mlp.2.weight``, and its stack factor must divide 1500 (the token count
llama.cpp plans is 3000 / factor / 2 rounded down, the graph's 1500 / factor rounded up: 8 aborts the encoder).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

N_EMBD_SMOLLM2 = 576
IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # what one image costs in the context
N_MEL = 128  # Whisper large-v3's mel bins, what ultravox projectors take
AUDIO_POSITIONS = 1500  # encoder positions per 30 s window (3000 mel frames, halved by the second conv)
AUDIO_STACK = 60  # ultravox's stack factor: a divisor of 1500, large to keep the token count small
AUDIO_TOKENS = AUDIO_POSITIONS // AUDIO_STACK  # what each 30 s window of sound costs in the context
AUDIO_WINDOW_S = 30


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


def _noise(writer, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    def add(name: str, *shape: int, scale: float = 0.02) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))
    return add


def _blocks(writer, prefix: str, rng: np.random.Generator, n_blocks: int, width: int, ff: int,  # type: ignore[no-untyped-def]
            k_bias: bool = True) -> None:
    add = _noise(writer, rng)
    for i in range(n_blocks):
        b = f"{prefix}.blk.{i}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            add(f"{b}.{part}.weight", width, width)
            if k_bias or part != "attn_k":  # Whisper has no bias on k, and llama.cpp's graph asserts there is none
                add(f"{b}.{part}.bias", width)
        writer.add_tensor(f"{b}.ln1.weight", np.ones(width, np.float32))
        writer.add_tensor(f"{b}.ln1.bias", np.zeros(width, np.float32))
        writer.add_tensor(f"{b}.ln2.weight", np.ones(width, np.float32))
        writer.add_tensor(f"{b}.ln2.bias", np.zeros(width, np.float32))
        add(f"{b}.ffn_up.weight", ff, width)
        add(f"{b}.ffn_up.bias", ff)
        add(f"{b}.ffn_down.weight", width, ff)
        add(f"{b}.ffn_down.bias", width)


def build_mmproj(folder: str, n_embd: int = N_EMBD_SMOLLM2, name: str = "mmproj-test.gguf", seed: int = 0,
                 kind: str = "vision") -> str:
    """Write a random-weight projector into ``folder`` and return its path (under 1 MB; 2 MB for "both").

    ``kind``: "vision" (``mlp``), "audio" (``ultravox``) or "both" (one file with the two encoders).
    ``n_embd`` is the text model's embedding size the projector feeds; give another to build a mismatch."""
    if kind not in ("vision", "audio", "both"):
        raise ValueError(f"kind must be 'vision', 'audio' or 'both', got {kind!r}")
    path = os.path.join(folder, name)
    rng = np.random.default_rng(seed)
    writer = _writer(path, has_vision=kind != "audio", has_audio=kind != "vision")
    if kind == "both":  # the loader reads each modality's type under its own key when the shared one is absent
        writer.add_string("clip.vision.projector_type", "mlp")
        writer.add_string("clip.audio.projector_type", "ultravox")
    else:
        writer.add_string("clip.projector_type", "mlp" if kind == "vision" else "ultravox")
    if kind != "audio":
        _vision(writer, rng, n_embd)
    if kind != "vision":
        _audio(writer, rng, n_embd)
    return _save(writer, path)


def build_audio_mmproj(folder: str, n_embd: int = N_EMBD_SMOLLM2, name: str = "mmproj-audio-test.gguf",
                       seed: int = 0) -> str:
    """The audio-only (``ultravox``) projector: ``build_mmproj(kind="audio")``."""
    return build_mmproj(folder, n_embd, name, seed, kind="audio")


def _vision(writer, rng: np.random.Generator, n_embd: int) -> None:  # type: ignore[no-untyped-def]
    width, ff, hidden, blocks = 64, 128, 128, 2
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


def _audio(writer, rng: np.random.Generator, n_embd: int) -> None:  # type: ignore[no-untyped-def]
    width, ff, hidden, blocks = 32, 64, 32, 1
    add = _noise(writer, rng)
    writer.add_uint32("clip.audio.embedding_length", width)
    writer.add_uint32("clip.audio.feed_forward_length", ff)
    writer.add_uint32("clip.audio.projection_dim", n_embd)  # required by the loader, unused by ultravox
    writer.add_uint32("clip.audio.block_count", blocks)
    writer.add_uint32("clip.audio.attention.head_count", 2)
    writer.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
    writer.add_uint32("clip.audio.num_mel_bins", N_MEL)
    writer.add_uint32("clip.audio.projector.stack_factor", AUDIO_STACK)
    # numpy shapes are ggml's reversed: a conv kernel (out, in, 3), its bias (out, 1) to broadcast over time
    add("a.conv1d.1.weight", width, N_MEL, 3)
    add("a.conv1d.1.bias", width, 1)
    add("a.conv1d.2.weight", width, width, 3)
    add("a.conv1d.2.bias", width, 1)
    add("a.position_embd.weight", AUDIO_POSITIONS, width)
    _blocks(writer, "a", rng, blocks, width, ff, k_bias=False)
    writer.add_tensor("mm.a.norm_pre.weight", np.ones(width * AUDIO_STACK, np.float32))
    add("mm.a.mlp.1.weight", 2 * hidden, width * AUDIO_STACK)  # SwiGLU: half gate, half value
    writer.add_tensor("mm.a.norm_mid.weight", np.ones(hidden, np.float32))
    add("mm.a.mlp.2.weight", n_embd, hidden)


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
    return wav_of(tone(seconds, rate, freq), rate)


def tone(seconds: float, rate: int = 16000, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.sin(2 * np.pi * freq * t) * amplitude


def wav_of(samples: np.ndarray, rate: int = 16000) -> bytes:
    """``samples`` (floats in [-1, 1]) as a mono 16-bit PCM WAV."""
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def mp3_bytes(frames: int = 20) -> bytes:
    """A silent MP3 (MPEG-1 Layer III, 44.1 kHz mono, 128 kbit/s) of ``frames`` x 1152 samples, no encoder needed:
    frames whose side information is all zero carry no coded samples, so a decoder makes silence of them."""
    header = bytes([0xFF, 0xFB, 0x90, 0xC0])  # sync, MPEG-1 layer III without CRC; 128 kbit/s, 44.1 kHz; mono
    size = 144 * 128000 // 44100  # 417 bytes a frame (no padding bit)
    return (header + bytes(size - 4)) * frames


def flac_bytes(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A sine tone as a FLAC file of verbatim (uncompressed) subframes: valid FLAC, written without an encoder."""
    import struct

    samples = (tone(seconds, rate, freq) * 32767).astype(">i2")
    block = 4096
    # STREAMINFO: block sizes, unknown frame sizes, then rate (20 bits), channels - 1 (3), bits - 1 (5), samples (36)
    info = struct.pack(">HH", block, block) + bytes(6)
    info += ((rate << 44) | (0 << 41) | (15 << 36) | len(samples)).to_bytes(8, "big") + bytes(16)  # no MD5
    out = b"fLaC" + bytes([0x80, 0, 0, len(info)]) + info  # the last (only) metadata block
    for number, start in enumerate(range(0, len(samples), block)):
        chunk = samples[start:start + block]
        # sync + fixed blocking; block size in 16 bits after the header, rate from STREAMINFO; mono, 16 bits
        header = bytes([0xFF, 0xF8, 0x70, 0x08, number]) + struct.pack(">H", len(chunk) - 1)
        header += bytes([_crc8(header)])
        frame = header + b"\x02" + chunk.tobytes()  # subframe type VERBATIM, no wasted bits
        out += frame + struct.pack(">H", _crc16(frame))
    return out


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    table = _crc16_table()
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[(crc >> 8) ^ byte]
    return crc


def _crc16_table() -> list[int]:  # FLAC's CRC-16 (polynomial 0x8005), a byte at a time
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(crc)
    return table


# -- what the image tests share ---------------------------------------------------------------------------------
def vision_media(folder: str) -> dict[str, str]:
    """The vision projector and two distinct images in ``folder``: ``mmproj``, ``img``, ``other`` (and ``folder``)."""
    return {"mmproj": build_mmproj(folder), "folder": folder, "img": write_png(folder, "a.png", seed=1),
            "other": write_png(folder, "b.png", seed=2)}


def vision_context(mmproj: str, **params: Any) -> Any:
    """A context on the packaged model (2 threads, ``params`` over n_ctx 1024) with the projector ``mmproj`` loaded."""
    from llamacompat import init_llama

    ctx = init_llama({"n_ctx": 1024, "n_threads": 2, **params})
    assert ctx.init_multimodal({"path": mmproj, "use_gpu": False}) is True
    return ctx


def image_chat(image: str, text: str = "What is this?") -> list[dict[str, Any]]:
    """One user message: the image, then ``text``."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": text}]}]
