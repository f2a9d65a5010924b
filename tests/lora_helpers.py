"""A real LoRA adapter for the packaged model, written by the tests (GGUF, as llama.cpp's converter writes them)."""

from __future__ import annotations

import gguf
import numpy as np

N_EMBD = 576  # SmolLM2-135M


def write_lora(path: str, seed: int = 0, rank: int = 8, layers: range = range(0, 30, 3), strength: float = 0.05) -> str:
    """A rank-``rank`` adapter on the attention query of ``layers``; random weights big enough to change the text."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for layer in layers:
        # ggml shapes are numpy's reversed: lora_a is [n_embd, rank], lora_b is [rank, n_out]
        a = rng.normal(0, strength, (rank, N_EMBD)).astype(np.float32)
        b = rng.normal(0, strength * 20, (N_EMBD, rank)).astype(np.float32)
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_a", a)
        writer.add_tensor(f"blk.{layer}.attn_q.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
