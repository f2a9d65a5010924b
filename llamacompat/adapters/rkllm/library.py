"""Finding ``librkllmrt.so``, telling which ABI it speaks, and binding its functions.

A binding of the wrong ABI does not fail cleanly: the runtime reads structs at
the wrong offsets and crashes later (rknn-llm#509). So the ABI is never guessed:
it is the user's ``rkllm_version``, or the version string inside the library
file (the runtime logs ``rkllm-runtime version: X``), cross-checked against the
exported symbols, which tell 1.1.x, 1.2.0 and 1.2.1+ apart. What cannot be told
(1.2.1-1.2.3 against 1.3.0 with no version string) is refused with the fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from ...errors import BackendUnavailableError
from .abi import ABIS, Abi, abi_for

__all__ = ["Runtime", "open_runtime", "candidate_paths", "read_release"]

LIBRARY = "librkllmrt.so"
_BANNER = re.compile(rb"rkllm-runtime version:?\s*v?(\d+\.\d+\.\d+[0-9a-z]*)")
# What exported symbols reveal: the first function of each family that has it, newest first.
_SYMBOL_FAMILIES = (("rkllm_set_function_tools", "1.2.1+"), ("rkllm_clear_kv_cache", "1.2.0"))
_ARCH = {"aarch64": "aarch64", "arm64": "aarch64", "armv7l": "armhf", "armv8l": "armhf", "x86_64": "x86_64"}


@dataclass
class Runtime:
    """A loaded librkllmrt.so with its functions typed for ``abi``."""

    lib: ctypes.CDLL
    path: str
    abi: Abi
    release: str | None  # the version string found in the file, when there is one

    def __getattr__(self, name: str):  # runtime.rkllm_run(...)
        if name.startswith("rkllm_"):
            return getattr(self.lib, name)
        raise AttributeError(name)


def candidate_paths(explicit: str | None) -> list[str]:
    """Where to look, in order: the ``rkllm_lib`` param, ``$RKLLM_LIB_PATH``, ./libs/rkllm/<arch>/, /usr/lib,
    /usr/local/lib; then the loader's own search path (the bare name)."""
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    paths = [explicit] if explicit else []
    from_env = os.environ.get("RKLLM_LIB_PATH")
    if from_env:
        paths.append(os.path.join(from_env, LIBRARY) if os.path.isdir(from_env) else from_env)
    paths += [os.path.join("libs", "rkllm", arch, LIBRARY), os.path.join("/usr/lib", LIBRARY),
              os.path.join("/usr/local/lib", LIBRARY)]
    return paths


@lru_cache(maxsize=8)
def _release_in_file(path: str, size: int, mtime: float) -> str | None:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        match = _BANNER.search(data)
        return data[match.start(1):match.end(1)].decode() if match else None


def read_release(path: str) -> str | None:
    """The runtime version written in the library file ("1.2.3"), or None."""
    stat = os.stat(path)
    return _release_in_file(os.path.realpath(path), stat.st_size, stat.st_mtime) if stat.st_size else None


def _loaded_path(name: str) -> str | None:
    """Where the loader found a library opened by bare name (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if line.rstrip().endswith("/" + name) or f"/{name}." in line:
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    return None


def _load(explicit: str | None) -> tuple[ctypes.CDLL, str]:
    tried = []
    for path in candidate_paths(explicit):
        if not os.path.isfile(path):
            tried.append(f"{path} (no such file)")
            continue
        try:
            return ctypes.CDLL(os.path.abspath(path)), os.path.abspath(path)
        except OSError as err:
            tried.append(f"{path} ({err})")
    found = ctypes.util.find_library("rkllmrt")
    try:
        lib = ctypes.CDLL(found or LIBRARY)
        return lib, _loaded_path(LIBRARY) or found or LIBRARY
    except OSError:
        tried.append(f"{LIBRARY} on the loader's search path (not found)")
    raise BackendUnavailableError(
        "the rkllm backend needs Rockchip's librkllmrt.so (from airockchip/rknn-llm, rkllm-runtime/Linux/"
        "librkllm_api/<arch>/): pass 'rkllm_lib' or set RKLLM_LIB_PATH. Looked in: " + "; ".join(tried)
    )


def _family(exports: Callable[[str], bool]) -> str:
    """"1.1", "1.2.0" or "1.2.1+": the ABI family a set of exported functions belongs to."""
    for symbol, family in _SYMBOL_FAMILIES:
        if exports(symbol):
            return family
    return "1.1"


def choose_abi(path: str, lib: ctypes.CDLL, version: str | None) -> tuple[Abi, str | None]:
    """The ABI to bind ``lib`` with, and the release found in the file; ``BackendUnavailableError`` on doubt."""
    release = read_release(path) if os.path.isfile(path) else None
    family = _family(lambda name: hasattr(lib, name))
    found = abi_for(release) if release else None
    if release and found is None:
        raise BackendUnavailableError(f"{path} is rkllm runtime {release}, which llamacompat has no binding for "
                                      f"(known ABIs: {', '.join(a.covers for a in ABIS.values())})")
    chosen = abi_for(version) if version else found
    if chosen is None:
        if family != "1.2.1+":
            chosen = ABIS["1.1"] if family == "1.1" else ABIS["1.2.0"]
        else:
            raise BackendUnavailableError(
                f"cannot tell which rkllm runtime {path} is: it carries no version string, and its symbols fit both "
                "1.2.1-1.2.3 and 1.3.0, whose structs differ (a wrong guess crashes in rkllm_run). "
                "Pass 'rkllm_version' (e.g. '1.2.3' or '1.3.0')"
            )
    if found is not None and found is not chosen:
        raise BackendUnavailableError(f"rkllm_version {version!r} (ABI {chosen.covers}) does not match {path}, "
                                      f"which is runtime {release} (ABI {found.covers}); drop 'rkllm_version' or fix it")
    if _family(chosen.functions.__contains__) != family:
        raise BackendUnavailableError(
            f"{path} exports the functions of an rkllm {family} runtime, not of ABI {chosen.covers}"
            + (f" (rkllm_version {version!r})" if version else "") + "; pass the runtime's real version as 'rkllm_version'"
        )
    return chosen, release


def open_runtime(explicit: str | None, version: str | None) -> Runtime:
    """Load the library (lookup order in ``candidate_paths``) and type its functions for its ABI."""
    lib, path = _load(explicit)
    abi, release = choose_abi(path, lib, version)
    missing = [name for name in abi.functions if not hasattr(lib, name)]
    if missing:
        raise BackendUnavailableError(f"{path} lacks {', '.join(missing)}, which ABI {abi.covers} has: "
                                      "it is not an rkllm runtime of that version")
    for name, (restype, argtypes) in abi.functions.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return Runtime(lib, path, abi, release)
