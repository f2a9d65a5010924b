"""What a model file or folder is, read without loading it: format, architecture, size, quantisation, backends.

GGUF files through our header reader (milliseconds, no tensor data read); mlx-lm
folders through ``config.json``, ``tokenizer_config.json`` and the safetensors
headers; ``.rkllm`` files by their name and size (Rockchip's format is closed).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from ..errors import ModelLoadError
from .gguf import read_gguf

__all__ = ["model_facts", "model_format", "FILE_TYPES"]

# llama.cpp's llama_ftype (general.file_type) -> the quantisation's usual name
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}
# What the mlx backend maps from GGUF (llamacompat/adapters/mlx/gguf.py): llama models in types MLX reads.
_MLX_GGUF_ARCHITECTURES = ("llama",)
_MLX_GGUF_FILE_TYPES = (0, 1, 2, 3, 7)


def model_format(path: str) -> str | None:
    """"gguf", "mlx" (an mlx-lm / Hugging Face folder), "rkllm", or None for anything else."""
    if os.path.isdir(path):
        return "mlx" if os.path.isfile(os.path.join(path, "config.json")) else None
    lower = path.lower()
    if lower.endswith(".gguf"):
        return "gguf"
    if lower.endswith(".rkllm"):
        return "rkllm"
    return None


def model_facts(path: str) -> dict[str, Any]:
    """``format``, ``architecture``, ``n_params``, ``context_length``, ``quantization``, ``chat_template``
    (bool), ``size`` (bytes) and ``backends`` (the ones that load such a model; installed or not)."""
    kind = model_format(path)
    if kind == "gguf":
        return _gguf(path)
    if kind == "mlx":
        return _folder(path)
    if kind == "rkllm":
        return {"format": "rkllm", "architecture": None, "n_params": None, "context_length": None,
                "quantization": None, "chat_template": None, "size": os.path.getsize(path), "backends": ["rkllm"]}
    raise ModelLoadError(f"Failed to load model info: {path} is not a GGUF file, an mlx-lm model folder "
                         "(with config.json) or an .rkllm file")


def _gguf(path: str) -> dict[str, Any]:
    meta, n_params = read_gguf(path)
    arch = meta.get("general.architecture")
    file_type = meta.get("general.file_type")
    backends = ["llama_cpp"]
    if arch in _MLX_GGUF_ARCHITECTURES and file_type in _MLX_GGUF_FILE_TYPES:
        backends.append("mlx")
    return {
        "format": "gguf", "architecture": arch, "name": meta.get("general.name"), "n_params": n_params,
        "context_length": meta.get(f"{arch}.context_length"),
        "quantization": FILE_TYPES.get(file_type, f"type {file_type}") if file_type is not None else None,
        "chat_template": "tokenizer.chat_template" in meta, "size": os.path.getsize(path), "backends": backends,
    }


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Failed to load model info: {path}: {err}") from err


def _folder(path: str) -> dict[str, Any]:
    config = _json(os.path.join(path, "config.json"))
    tokenizer = _json(os.path.join(path, "tokenizer_config.json"))
    quant = config.get("quantization") or config.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    n_params, size = 0, 0
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            size += os.path.getsize(file)
        if name.endswith(".safetensors"):
            n_params += _safetensors_params(file, bits)
    return {
        "format": "mlx", "architecture": config.get("model_type"), "name": os.path.basename(os.path.normpath(path)),
        "n_params": n_params or None, "context_length": config.get("max_position_embeddings"),
        "quantization": f"{bits}-bit" if bits else config.get("torch_dtype"),
        "chat_template": bool(tokenizer.get("chat_template"))
        or os.path.isfile(os.path.join(path, "chat_template.jinja")),
        "size": size, "backends": ["mlx"],
    }


def _safetensors_params(path: str, bits: int | None) -> int:
    """Weights in a safetensors file, from its JSON header; packed quantised words count as their values,
    and a quantised layer's scales and biases are not parameters."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__" or (bits and name.endswith((".scales", ".biases"))):
            continue
        count = math.prod(tensor["shape"])
        total += count * (32 // bits) if bits and tensor["dtype"] == "U32" else count
    return total
