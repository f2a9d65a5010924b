"""llama.cpp's GGUF LoRA adapters on an mlx-lm model, so both backends run the very same adapter file.

A GGUF adapter holds ``blk.N.<tensor>.weight.lora_a`` (rank × n_in) and ``.lora_b`` (n_out × rank) for
the linear layers it changes. llama.cpp adds ``scale · B(A x)`` to the layer's output, with
``scale = adapter_scale · alpha / rank`` (``adapter_scale`` alone when alpha is 0); ``LoraStack`` does the
same around the model's (quantised) linear layer, for each applied adapter.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ...errors import ModelLoadError
from ...models.gguf import meta_value
from .gguf import gguf_module_path, read_gguf

__all__ = ["LoraStack", "read_lora", "apply_lora"]

Pairs = dict[str, tuple[mx.array, mx.array]]  # module path -> (A, B)


class LoraStack(nn.Module):
    """A linear layer plus the low-rank updates of the applied adapters."""

    def __init__(self, base: nn.Module, updates: list[tuple[mx.array, mx.array, float]]) -> None:
        super().__init__()
        self.base = base
        self._updates = [(a.T, b.T, scale) for a, b, scale in updates]  # kept out of the parameter tree

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for a_t, b_t, scale in self._updates:
            y = y + scale * ((x @ a_t) @ b_t).astype(y.dtype)
        return y


def read_lora(path: str) -> tuple[Pairs, float]:
    """An adapter file's (A, B) pairs by mlx-lm module path, and its alpha."""
    try:
        tensors, meta = read_gguf(path)
    except (RuntimeError, ValueError) as err:
        raise ModelLoadError(f"Failed to apply lora adapters: {path}: not a GGUF file MLX can read ({err})") from err
    kind = (meta_value(meta, "general.type"), meta_value(meta, "adapter.type"))
    if kind != ("adapter", "lora"):
        raise ModelLoadError(f"Failed to apply lora adapters: {path}: expect general.type 'adapter' and adapter.type "
                             f"'lora', got {kind[0]!r} and {kind[1]!r}")
    pairs: dict[str, dict[str, mx.array]] = {}
    for name, value in tensors.items():
        base, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ModelLoadError(f"Failed to apply lora adapters: {path}: unexpected tensor {name!r}")
        module = gguf_module_path(base)
        if module is None or module.endswith("embed_tokens"):
            raise ModelLoadError(f"Failed to apply lora adapters: {path}: the mlx backend applies LoRA to linear "
                                 f"layers only, not to {base!r}")
        pairs.setdefault(module, {})[part] = value.astype(mx.float32)
    out: Pairs = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_a", "lora_b"} or parts["lora_a"].shape[0] != parts["lora_b"].shape[1]:
            raise ModelLoadError(f"Failed to apply lora adapters: {path}: {module} needs lora_a (rank × n_in) and "
                                 "lora_b (n_out × rank) of the same rank")
        out[module] = (parts["lora_a"], parts["lora_b"])
    return out, float(meta_value(meta, "adapter.lora.alpha", 0.0) or 0.0)


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(n_out, n_in) of a linear or quantised linear layer."""
    n_out, n_in = layer.weight.shape
    return n_out, (n_in * 32 // layer.bits) if isinstance(layer, nn.QuantizedLinear) else n_in


def apply_lora(model: nn.Module, bases: dict[str, nn.Module], adapters: list[tuple[Pairs, float, float]],
               path_of: list[str]) -> dict[str, nn.Module]:
    """Put ``adapters`` ((pairs, alpha, scale) each) on ``model``, on top of its original layers ``bases``
    (module path -> layer, as returned by the previous call; ``{}`` the first time). Every shape is checked
    before anything changes. Returns the original layers of the modules now wrapped."""
    # a wrapped layer's leaf is "<path>.base": its original is in ``bases`` under "<path>"
    original = {**dict(tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))), **bases}
    updates: dict[str, list[tuple[mx.array, mx.array, float]]] = {}
    for (pairs, alpha, scale), file in zip(adapters, path_of, strict=True):
        for module, (a, b) in pairs.items():
            layer = original.get(module)
            if layer is None or not hasattr(layer, "weight"):
                raise ModelLoadError(f"Failed to apply lora adapters: {file}: the model has no linear layer {module}")
            if _dims(layer) != (b.shape[0], a.shape[1]):
                raise ModelLoadError(f"Failed to apply lora adapters: {file}: {module} is {_dims(layer)} (out, in), "
                                     f"the adapter is {(b.shape[0], a.shape[1])} (maybe another base model?)")
            rank = a.shape[0]
            updates.setdefault(module, []).append((a, b, scale * alpha / rank if alpha else scale))
    restored = [(path, layer) for path, layer in bases.items() if path not in updates]
    wrapped = [(path, LoraStack(original[path], ups)) for path, ups in updates.items()]
    model.update_modules(tree_unflatten(restored + wrapped))
    return {path: original[path] for path in updates}
