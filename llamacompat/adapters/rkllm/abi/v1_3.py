"""RKLLM runtime 1.3.0: per-run sampling and max_new_tokens, ignore_eos_token, and ``rkllm_init`` taking an
RKLLMCallback struct (a 1.2-style binding inits fine and then crashes in rkllm_run: rknn-llm#509)."""

from __future__ import annotations

import ctypes as C

from . import common as c
from .v1_2_1 import ABI as V1_2_1
from .v1_2_1 import ResultCallback, functions_since_1_2_1, input_fields

__all__ = ["ABI"]


class Param(C.Structure):
    _fields_ = [("model_path", C.c_char_p), ("max_context_len", C.c_int32), ("max_new_tokens", C.c_int32),
                ("top_k", C.c_int32), ("n_keep", C.c_int32), ("top_p", C.c_float), ("temperature", C.c_float),
                ("repeat_penalty", C.c_float), ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float),
                ("mirostat", C.c_int32), ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float),
                ("skip_special_token", C.c_bool), ("ignore_eos_token", C.c_bool), ("is_async", C.c_bool),
                ("extend_param", V1_2_1.ExtendParam)]


class ImageInput(C.Structure):
    _fields_ = [("image_embed", C.POINTER(C.c_float)), ("n_image_tokens", C.c_size_t), ("n_image", C.c_size_t),
                ("image_start", C.c_char_p), ("image_end", C.c_char_p), ("image_content", C.c_char_p),
                ("image_width", C.c_size_t), ("image_height", C.c_size_t)]


class VideoInput(C.Structure):
    _fields_ = [("video_embed", C.POINTER(C.c_float)), ("n_frame_tokens", C.c_size_t),
                ("n_frame_per_video", C.c_size_t), ("n_video", C.c_size_t), ("video_start", C.c_char_p),
                ("video_end", C.c_char_p), ("video_content", C.c_char_p), ("frame_width", C.c_size_t),
                ("frame_height", C.c_size_t)]


class MultiModalInput(C.Structure):
    _fields_ = [("prompt", C.c_char_p), ("image", ImageInput), ("video", VideoInput)]


class Input(C.Structure):
    _anonymous_ = ("u",)
    _fields_ = input_fields(MultiModalInput)


class SamplingParam(C.Structure):
    _fields_ = [("top_k", C.c_int32), ("top_p", C.c_float), ("temperature", C.c_float),
                ("repeat_penalty", C.c_float), ("frequency_penalty", C.c_float), ("presence_penalty", C.c_float),
                ("mirostat", C.c_int32), ("mirostat_tau", C.c_float), ("mirostat_eta", C.c_float)]


class InferParam(C.Structure):
    _fields_ = [("mode", C.c_int), ("lora_params", C.POINTER(c.LoraParam)),
                ("prompt_cache_params", C.POINTER(c.PromptCacheParam)),
                ("sampling_params", C.POINTER(SamplingParam)), ("keep_history", C.c_int),
                ("max_new_tokens", C.c_int32)]


TokenizerCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.c_char_p, C.c_int32, C.POINTER(C.c_int32), C.c_int32)
EmbedCallback = C.CFUNCTYPE(C.c_int, C.c_void_p, C.POINTER(C.c_int32), C.c_uint64, C.c_void_p, C.c_uint64)


class Callback(C.Structure):
    _fields_ = [("result_callback", ResultCallback), ("result_userdata", C.c_void_p),
                ("tokenizer_callback", TokenizerCallback), ("tokenizer_userdata", C.c_void_p),
                ("embed_callback", EmbedCallback), ("embed_userdata", C.c_void_p)]


ABI = c.Abi(
    name="1.3.0", covers="1.3.0",
    structs={**V1_2_1.structs, "RKLLMParam": Param, "RKLLMMultiModalInput": MultiModalInput, "RKLLMInput": Input,
             "RKLLMSamplingParam": SamplingParam, "RKLLMInferParam": InferParam, "RKLLMCallback": Callback},
    result_callback=ResultCallback,
    functions={**functions_since_1_2_1(Param, Input, InferParam),
               "rkllm_init": (C.c_int, [C.POINTER(c.HANDLE), C.POINTER(Param), C.POINTER(Callback)])},
    hidden_layer_state=c.RUN_NORMAL, clear_kv_args=3, per_run_sampling=True, roles=True, perf=True,
    callback_struct=True,
)
