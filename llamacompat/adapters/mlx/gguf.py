"""A GGUF file as an mlx-lm model: ``mx.load`` reads the tensors, we name them for mlx-lm's classes.

MLX reads Q4_0, Q4_1 and Q8_0 tensors as its own affine-quantised triples
(``weight``/``scales``/``biases``, group size 32) and F16/F32 as they are, so the
weights stay quantised. llama.cpp stores a llama model's Q and K rows in the
order its rope kernel wants, which is mlx-lm's ``rope_traditional``.
"""

from __future__ import annotations

import re
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from ...errors import ModelLoadError
from ...models.gguf import meta_value

__all__ = ["gguf_module_path", "load_gguf", "read_gguf", "meta_value", "model_from_gguf"]

# GGUF tensor name (after "blk.N.") -> mlx-lm llama module path
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GROUP_SIZE = 32  # every GGUF block type MLX reads holds 32 weights
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)$")


GgufContents = tuple[dict[str, mx.array], dict[str, Any]]


def read_gguf(path: str) -> GgufContents:
    """``mx.load`` of a GGUF file: (tensors, metadata). Its stub returns what every format and flag can give;
    GGUF with ``return_metadata`` is this pair. MLX's RuntimeError / ValueError pass through."""
    return cast(GgufContents, mx.load(path, format="gguf", return_metadata=True))


def load_gguf(path: str) -> GgufContents:
    """The file's tensors and metadata; an unreadable file or tensor type is a ``ModelLoadError``."""
    try:
        return read_gguf(path)
    except (RuntimeError, ValueError) as err:  # MLX names the tensor type it cannot read
        raise ModelLoadError(f"Failed to load model: {path}: MLX cannot read this GGUF file ({err})") from err


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta_value(meta, key, default)
    if value is None:
        raise ModelLoadError(f"Failed to load model: the GGUF metadata has no '{key}'")
    return value


def _model_args(meta: dict[str, Any], tensors: dict[str, mx.array], n_vocab: int) -> llama.ModelArgs:
    arch = "llama"
    n_heads = _scalar(meta, f"{arch}.attention.head_count")
    hidden = _scalar(meta, f"{arch}.embedding_length")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    rope_scaling = None
    if scaling == "linear":
        rope_scaling = {"type": "linear", "factor": _scalar(meta, f"{arch}.rope.scaling.factor")}
    elif scaling not in (None, "none") or "rope_freqs.weight" in tensors:
        raise ModelLoadError(f"Failed to load model: rope scaling {scaling or 'rope_freqs'} is not supported by the mlx backend")
    return llama.ModelArgs(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=_scalar(meta, f"{arch}.block_count"),
        intermediate_size=_scalar(meta, f"{arch}.feed_forward_length"),
        num_attention_heads=n_heads,
        num_key_value_heads=_scalar(meta, f"{arch}.attention.head_count_kv", n_heads),
        head_dim=_scalar(meta, f"{arch}.attention.key_length", hidden // n_heads),
        rms_norm_eps=_scalar(meta, f"{arch}.attention.layer_norm_rms_epsilon"),
        vocab_size=n_vocab,
        max_position_embeddings=_scalar(meta, f"{arch}.context_length", 4096),
        rope_theta=_scalar(meta, f"{arch}.rope.freq_base", 10000.0),
        rope_traditional=True,
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
    )


def gguf_module_path(name: str) -> str | None:
    """The mlx-lm module a GGUF tensor belongs to ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj")."""
    base = name.rpartition(".")[0]
    layer = _LAYER_NAME.match(base)
    if layer and layer[2] in _LAYER_TENSORS:
        return f"model.layers.{layer[1]}.{_LAYER_TENSORS[layer[2]]}"
    return _MODEL_TENSORS.get(base)


def _mlx_name(name: str) -> str:
    module = gguf_module_path(name)
    if module is None:
        raise ModelLoadError(f"Failed to load model: unexpected tensor '{name}' for a llama model")
    return f"{module}.{name.rpartition('.')[2]}"


def model_from_gguf(tensors: dict[str, mx.array], meta: dict[str, Any], path: str) -> llama.Model:
    """An mlx-lm ``llama.Model`` holding the file's (still quantised) tensors."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"Failed to load model: {path}: the mlx backend maps GGUF architecture 'llama' only, this file is {arch!r}; "
            "use the llama_cpp backend or an mlx-lm model folder"
        )
    # float32 scales and biases: exact (they are float16 in the file) and about 12% faster on the CPU
    weights = {_mlx_name(name): value.astype(mx.float32) if name.endswith((".scales", ".biases")) else value
               for name, value in tensors.items()}
    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    model = llama.Model(_model_args(meta, tensors, n_vocab))

    def quantisation(path: str, _module: nn.Module) -> dict[str, int] | bool:
        scales = weights.get(f"{path}.scales")
        if scales is None:
            return False  # F16/F32: a plain layer
        packed_columns = weights[f"{path}.weight"].shape[-1]
        bits = packed_columns * 32 // (scales.shape[-1] * _GROUP_SIZE)
        return {"group_size": _GROUP_SIZE, "bits": bits}

    nn.quantize(model, class_predicate=quantisation)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise ModelLoadError(f"Failed to load model: {path}: its tensors do not fit a llama model ({err})") from err
    mx.eval(model.parameters())
    return model
