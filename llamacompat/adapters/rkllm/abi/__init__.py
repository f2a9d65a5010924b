"""The RKLLM runtime's C ABI, one module per incompatible version (reference/rkllm-abi.md §1).

``ABIS`` maps the name a user gives (``rkllm_version``) to its ABI; ``abi_for``
accepts any release number (``"1.2.3"`` → the 1.2.1 ABI).
"""

from __future__ import annotations

import re

from .common import Abi
from .v1_1 import ABI as V1_1
from .v1_2_0 import ABI as V1_2_0
from .v1_2_1 import ABI as V1_2_1
from .v1_3 import ABI as V1_3

__all__ = ["Abi", "ABIS", "abi_for"]

ABIS: dict[str, Abi] = {abi.name: abi for abi in (V1_1, V1_2_0, V1_2_1, V1_3)}
_RELEASE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?(b\d*|beta\d*)?")


def abi_for(release: str) -> Abi | None:
    """The ABI of a runtime release ("1.1.4", "1.2.2b1", "v1.3.0"), or None for one we have no binding for."""
    match = _RELEASE.match(release.strip())
    if not match:
        return None
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    if (major, minor, patch) == (1, 2, 1) and match[4]:
        return None  # 1.2.1b1 sits between the 1.2.0 and 1.2.1 layouts: no binding
    if (major, minor) == (1, 1):
        return V1_1
    if (major, minor) == (1, 2):
        return V1_2_0 if patch == 0 else V1_2_1
    if (major, minor) == (1, 3):
        return V1_3
    return None
