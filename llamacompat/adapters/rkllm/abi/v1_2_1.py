"""RKLLM runtime 1.2.1-1.2.3 (1.2.2 and 1.2.3 change no layout): roles, perf stats, function tools,
an ``int`` callback (0 continue, 1 pause) and ranged kv-cache clearing."""

from __future__ import annotations

import ctypes as C

from . import common as c
from .v1_1 import input_union
from .v1_2_0 import ABI as V1_2_0
from .v1_2_0 import param_fields

__all__ = ["ABI"]


class ExtendParam(C.Structure):
    _fields_ = [("base_domain_id", C.c_int32), ("embed_flash", C.c_int8), ("enabled_cpus_num", C.c_int8),
                ("enabled_cpus_mask", C.c_uint32), ("n_batch", C.c_uint8), ("use_cross_attn", C.c_int8),
                ("reserved", C.c_uint8 * 104)]


class Param(C.Structure):
    _fields_ = param_fields(ExtendParam)


class MultiModalInput(C.Structure):
    _fields_ = [("prompt", C.c_char_p), ("image_embed", C.POINTER(C.c_float)), ("n_image_tokens", C.c_size_t),
                ("n_image", C.c_size_t), ("image_width", C.c_size_t), ("image_height", C.c_size_t)]


def input_fields(multimodal: type[C.Structure]) -> c.Fields:
    """RKLLMInput since 1.2.1: role and enable_thinking come first."""
    return [("role", C.c_char_p), ("enable_thinking", C.c_bool), ("input_type", C.c_int),
            ("u", input_union(multimodal))]


class Input(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = input_fields(MultiModalInput)


class Result(C.Structure):
    _fields_ = [("text", C.c_char_p), ("token_id", C.c_int32), ("last_hidden_layer", c.LastHiddenLayer),
                ("logits", c.Logits), ("perf", c.PerfStat)]


ResultCallback = C.CFUNCTYPE(C.c_int, C.POINTER(Result), C.c_void_p, C.c_int)


def functions_since_1_2_1(param: type, input_: type, infer: type) -> dict[str, tuple[object, list[object]]]:
    int_p = C.POINTER(C.c_int)
    return {**c.common_functions(param, input_, infer),
            "rkllm_clear_kv_cache": (C.c_int, [c.HANDLE, C.c_int, int_p, int_p]),
            "rkllm_get_kv_cache_size": (C.c_int, [c.HANDLE, int_p]),
            "rkllm_set_chat_template": (C.c_int, [c.HANDLE, C.c_char_p, C.c_char_p, C.c_char_p]),
            "rkllm_set_function_tools": (C.c_int, [c.HANDLE, C.c_char_p, C.c_char_p, C.c_char_p]),
            "rkllm_set_cross_attn_params": (C.c_int, [c.HANDLE, C.POINTER(c.CrossAttnParam)])}


ABI = c.Abi(
    name="1.2.1", covers="1.2.1-1.2.3",
    structs={**V1_2_0.structs, "RKLLMExtendParam": ExtendParam, "RKLLMParam": Param,
             "RKLLMMultiModalInput": MultiModalInput, "RKLLMInput": Input, "RKLLMPerfStat": c.PerfStat,
             "RKLLMResult": Result, "RKLLMCrossAttnParam": c.CrossAttnParam},
    result_callback=ResultCallback,
    functions={**functions_since_1_2_1(Param, Input, V1_2_0.InferParam),
               "rkllm_init": (C.c_int, [C.POINTER(c.HANDLE), C.POINTER(Param), ResultCallback])},
    hidden_layer_state=c.RUN_NORMAL, clear_kv_args=3, roles=True, perf=True,
)
