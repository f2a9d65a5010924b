"""ctypes structs that every RKLLM runtime version (1.1 to 1.3) lays out the same way.

Field names follow rkllm.h; reference/rkllm-abi.md gives the offsets, and
tests/test_rkllm_abi.py checks them against a C probe of tests/rkllm_sim/rkllm_abi.h.
"""

from __future__ import annotations

import ctypes as C
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Fields", "Abi", "LoraAdapter", "EmbedInput", "TokenInput", "LoraParam", "PromptCacheParam", "LastHiddenLayer", "Logits",
           "PerfStat", "CrossAttnParam", "HANDLE", "common_functions", "RUN_NORMAL", "RUN_WAITING", "RUN_FINISH",
           "RUN_ERROR", "INPUT_PROMPT", "INPUT_TOKEN", "INFER_GENERATE", "INFER_GET_LAST_HIDDEN_LAYER"]

Fields = list[tuple[str, type[Any]]]  # a ctypes ``_fields_`` list built by a function (one layout per version)

HANDLE = C.c_void_p

# LLMCallState
RUN_NORMAL, RUN_WAITING, RUN_FINISH, RUN_ERROR = 0, 1, 2, 3
# RKLLMInputType
INPUT_PROMPT, INPUT_TOKEN = 0, 1
# RKLLMInferMode
INFER_GENERATE, INFER_GET_LAST_HIDDEN_LAYER = 0, 1


class LoraAdapter(C.Structure):
    _fields_ = [("lora_adapter_path", C.c_char_p), ("lora_adapter_name", C.c_char_p), ("scale", C.c_float)]


class EmbedInput(C.Structure):
    _fields_ = [("embed", C.POINTER(C.c_float)), ("n_tokens", C.c_size_t)]


class TokenInput(C.Structure):
    _fields_ = [("input_ids", C.POINTER(C.c_int32)), ("n_tokens", C.c_size_t)]


class LoraParam(C.Structure):
    _fields_ = [("lora_adapter_name", C.c_char_p)]


class PromptCacheParam(C.Structure):
    _fields_ = [("save_prompt_cache", C.c_int), ("prompt_cache_path", C.c_char_p)]


class LastHiddenLayer(C.Structure):
    _fields_ = [("hidden_states", C.POINTER(C.c_float)), ("embd_size", C.c_int), ("num_tokens", C.c_int)]


class Logits(C.Structure):
    _fields_ = [("logits", C.POINTER(C.c_float)), ("vocab_size", C.c_int), ("num_tokens", C.c_int)]


class PerfStat(C.Structure):
    _fields_ = [("prefill_time_ms", C.c_float), ("prefill_tokens", C.c_int), ("generate_time_ms", C.c_float),
                ("generate_tokens", C.c_int), ("memory_usage_mb", C.c_float)]


class CrossAttnParam(C.Structure):
    _fields_ = [("encoder_k_cache", C.POINTER(C.c_float)), ("encoder_v_cache", C.POINTER(C.c_float)),
                ("encoder_mask", C.POINTER(C.c_float)), ("encoder_pos", C.POINTER(C.c_int32)),
                ("num_tokens", C.c_int)]


def common_functions(param: type, input_: type, infer: type) -> dict[str, tuple[object, list[object]]]:
    """name -> (restype, argtypes) of the functions whose signature never changed (given each version's structs)."""
    return {
        "rkllm_createDefaultParam": (param, []),
        "rkllm_load_lora": (C.c_int, [HANDLE, C.POINTER(LoraAdapter)]),
        "rkllm_load_prompt_cache": (C.c_int, [HANDLE, C.c_char_p]),
        "rkllm_release_prompt_cache": (C.c_int, [HANDLE]),
        "rkllm_destroy": (C.c_int, [HANDLE]),
        "rkllm_run": (C.c_int, [HANDLE, C.POINTER(input_), C.POINTER(infer), C.c_void_p]),
        "rkllm_run_async": (C.c_int, [HANDLE, C.POINTER(input_), C.POINTER(infer), C.c_void_p]),
        "rkllm_abort": (C.c_int, [HANDLE]),
        "rkllm_is_running": (C.c_int, [HANDLE]),
    }


@dataclass(frozen=True)
class Abi:
    """One runtime ABI: its structs, its callback type, its function signatures, and what it can do."""

    name: str  # "1.2.1"
    covers: str  # the runtime releases with this ABI, e.g. "1.2.1-1.2.3"
    structs: Mapping[str, type]  # rkllm.h name -> ctypes class (the probe test walks these)
    result_callback: Any  # CFUNCTYPE of LLMResultCallback
    functions: Mapping[str, tuple[Any, list[Any]]]
    hidden_layer_state: int  # the LLMCallState that carries last-hidden-layer results
    keep_history: bool = True  # RKLLMInferParam.keep_history exists
    clear_kv_args: int = 0  # rkllm_clear_kv_cache's arity after the handle (0: no such function)
    per_run_sampling: bool = False  # RKLLMInferParam.sampling_params and max_new_tokens (1.3)
    roles: bool = False  # RKLLMInput.role and enable_thinking
    perf: bool = False  # RKLLMResult.perf, filled at FINISH
    callback_struct: bool = False  # rkllm_init takes RKLLMCallback* instead of the function

    def __getattr__(self, name: str) -> Any:  # abi.Param, abi.Input, ...: the structs by their short name
        structs = self.__dict__.get("structs", {})
        if "RKLLM" + name in structs:
            return structs["RKLLM" + name]
        raise AttributeError(name)
