"""The rkllm backend: Rockchip's RKLLM NPU runtime (librkllmrt.so) through ctypes."""

from .adapter import RkllmAdapter

__all__ = ["RkllmAdapter"]
