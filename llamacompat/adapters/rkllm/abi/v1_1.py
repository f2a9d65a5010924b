"""RKLLM runtime 1.1.0-1.1.4 (byte-identical headers): no n_keep, no keep_history, a void callback.

Hidden states arrive with their own callback state, RKLLM_RUN_GET_LAST_HIDDEN_LAYER (4).
"""

from __future__ import annotations

import ctypes as C

from . import common as c

__all__ = ["ABI"]


class ExtendParam(C.Structure):
    _fields_ = [("base_domain_id", C.c_int32), ("reserved", C.c_uint8 * 112)]


class Param(C.Structure):
    _fields_ = [("model_path", C.c_char_p), ("max_context_len", C.c_int32), ("max_new_tokens", C.c_int32),
                ("top_k", C.c_int32), ("top_p", C.c_float), ("temperature", C.c_float),
                ("repeat_penalty", C.c_float), ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float),
                ("mirostat", C.c_int32), ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float),
                ("skip_special_token", C.c_bool), ("is_async", C.c_bool), ("img_start", C.c_char_p),
                ("img_end", C.c_char_p), ("img_content", C.c_char_p), ("extend_param", ExtendParam)]


class MultiModalInput(C.Structure):
    _fields_ = [("prompt", C.c_char_p), ("image_embed", C.POINTER(C.c_float)), ("n_image_tokens", C.c_size_t)]


def input_union(multimodal: type[C.Structure]) -> type[C.Union]:
    class InputUnion(C.Union):
        _fields_ = [("prompt_input", C.c_char_p), ("embed_input", c.EmbedInput), ("token_input", c.TokenInput),
                    ("multimodal_input", multimodal)]
    return InputUnion


class Input(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("input_type", C.c_int), ("u", input_union(MultiModalInput))]


class InferParam(C.Structure):
    _fields_ = [("mode", C.c_int), ("lora_params", C.POINTER(c.LoraParam)),
                ("prompt_cache_params", C.POINTER(c.PromptCacheParam))]


class Result(C.Structure):
    _fields_ = [("text", C.c_char_p), ("token_id", C.c_int32), ("last_hidden_layer", c.LastHiddenLayer)]


ResultCallback = C.CFUNCTYPE(None, C.POINTER(Result), C.c_void_p, C.c_int)

ABI = c.Abi(
    name="1.1", covers="1.1.0-1.1.4",
    structs={"RKLLMExtendParam": ExtendParam, "RKLLMParam": Param, "RKLLMLoraAdapter": c.LoraAdapter,
             "RKLLMEmbedInput": c.EmbedInput, "RKLLMTokenInput": c.TokenInput, "RKLLMMultiModalInput": MultiModalInput,
             "RKLLMInput": Input, "RKLLMLoraParam": c.LoraParam, "RKLLMPromptCacheParam": c.PromptCacheParam,
             "RKLLMInferParam": InferParam, "RKLLMResultLastHiddenLayer": c.LastHiddenLayer, "RKLLMResult": Result},
    result_callback=ResultCallback,
    functions={**c.common_functions(Param, Input, InferParam),
               "rkllm_init": (C.c_int, [C.POINTER(c.HANDLE), C.POINTER(Param), ResultCallback])},
    hidden_layer_state=4, keep_history=False,
)
