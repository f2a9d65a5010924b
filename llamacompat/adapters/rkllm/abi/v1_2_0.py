"""RKLLM runtime 1.2.0: n_keep, keep_history, logits, CPU masks, kv-cache clearing and chat templates."""

from __future__ import annotations

import ctypes as C

from . import common as c
from .v1_1 import ABI as V1_1
from .v1_1 import MultiModalInput, input_union

__all__ = ["ABI"]


class ExtendParam(C.Structure):
    _fields_ = [("base_domain_id", C.c_int32), ("embed_flash", C.c_int8), ("enabled_cpus_num", C.c_int8),
                ("enabled_cpus_mask", C.c_uint32), ("reserved", C.c_uint8 * 106)]


def param_fields(extend: type[C.Structure]) -> c.Fields:
    """RKLLMParam of 1.2.0-1.2.3 (only the ExtendParam inside differs)."""
    return [("model_path", C.c_char_p), ("max_context_len", C.c_int32), ("max_new_tokens", C.c_int32),
            ("top_k", C.c_int32), ("n_keep", C.c_int32), ("top_p", C.c_float), ("temperature", C.c_float),
            ("repeat_penalty", C.c_float), ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float),
            ("mirostat", C.c_int32), ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float),
            ("skip_special_token", C.c_bool), ("is_async", C.c_bool), ("img_start", C.c_char_p),
            ("img_end", C.c_char_p), ("img_content", C.c_char_p), ("extend_param", extend)]


class Param(C.Structure):
    _fields_ = param_fields(ExtendParam)


class Input(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("input_type", C.c_int), ("u", input_union(MultiModalInput))]


class InferParam(C.Structure):
    _fields_ = [("mode", C.c_int), ("lora_params", C.POINTER(c.LoraParam)),
                ("prompt_cache_params", C.POINTER(c.PromptCacheParam)), ("keep_history", C.c_int)]


class Result(C.Structure):
    _fields_ = [("text", C.c_char_p), ("token_id", C.c_int32), ("last_hidden_layer", c.LastHiddenLayer),
                ("logits", c.Logits)]


ResultCallback = C.CFUNCTYPE(None, C.POINTER(Result), C.c_void_p, C.c_int)

ABI = c.Abi(
    name="1.2.0", covers="1.2.0",
    structs={**V1_1.structs, "RKLLMExtendParam": ExtendParam, "RKLLMParam": Param, "RKLLMInput": Input,
             "RKLLMInferParam": InferParam, "RKLLMResultLogits": c.Logits, "RKLLMResult": Result},
    result_callback=ResultCallback,
    functions={**c.common_functions(Param, Input, InferParam),
               "rkllm_init": (C.c_int, [C.POINTER(c.HANDLE), C.POINTER(Param), ResultCallback]),
               "rkllm_clear_kv_cache": (C.c_int, [c.HANDLE, C.c_int]),
               "rkllm_set_chat_template": (C.c_int, [c.HANDLE, C.c_char_p, C.c_char_p, C.c_char_p])},
    hidden_layer_state=c.RUN_NORMAL, clear_kv_args=1,
)
