"""Every ctypes struct of every RKLLM ABI against the C compiler's layout of tests/rkllm_sim/rkllm_abi.h.

The probe program is generated from the ctypes definitions (each field, nested
ones by their dotted path), so a field that the header names differently does not
compile, and one at another offset or of another size shows up in the diff.
"""

from __future__ import annotations

import ctypes as C
import subprocess

import pytest

from llamacompat.adapters.rkllm.abi import ABIS, abi_for, common

from .rkllm_helpers import ABI_BUILDS, SIM_DIR, compiler

# ABI -> the reference table's struct sizes (reference/rkllm-abi.md §3, LP64), for the structs that changed
REFERENCE_SIZES = {
    "1.1": {"RKLLMExtendParam": 116, "RKLLMParam": 200, "RKLLMMultiModalInput": 24, "RKLLMInput": 32,
            "RKLLMInferParam": 24, "RKLLMResult": 32},
    "1.2.0": {"RKLLMExtendParam": 120, "RKLLMParam": 208, "RKLLMMultiModalInput": 24, "RKLLMInput": 32,
              "RKLLMInferParam": 32, "RKLLMResult": 48},
    "1.2.1": {"RKLLMExtendParam": 120, "RKLLMParam": 208, "RKLLMMultiModalInput": 48, "RKLLMInput": 64,
              "RKLLMInferParam": 32, "RKLLMResult": 72, "RKLLMCrossAttnParam": 40, "RKLLMPerfStat": 20},
    "1.3.0": {"RKLLMExtendParam": 120, "RKLLMParam": 184, "RKLLMMultiModalInput": 144, "RKLLMInput": 160,
              "RKLLMInferParam": 40, "RKLLMResult": 72, "RKLLMSamplingParam": 36, "RKLLMCallback": 48},
}
CONSTANTS = {"RKLLM_RUN_NORMAL": common.RUN_NORMAL, "RKLLM_RUN_WAITING": common.RUN_WAITING,
             "RKLLM_RUN_FINISH": common.RUN_FINISH, "RKLLM_RUN_ERROR": common.RUN_ERROR,
             "RKLLM_INPUT_PROMPT": common.INPUT_PROMPT, "RKLLM_INPUT_TOKEN": common.INPUT_TOKEN,
             "RKLLM_INFER_GENERATE": common.INFER_GENERATE,
             "RKLLM_INFER_GET_LAST_HIDDEN_LAYER": common.INFER_GET_LAST_HIDDEN_LAYER}


def ctypes_layout(struct: type, prefix: str = "", base: int = 0):
    """(dotted field path, offset, size) of every field, anonymous unions flattened as C flattens them."""
    anonymous = getattr(struct, "_anonymous_", ())
    for name, kind, *_ in struct._fields_:
        offset = base + getattr(struct, name).offset
        if name in anonymous:
            yield from ctypes_layout(kind, prefix, offset)
            continue
        yield prefix + name, offset, C.sizeof(kind)
        if isinstance(kind, type) and issubclass(kind, (C.Structure, C.Union)):
            yield from ctypes_layout(kind, f"{prefix}{name}.", offset)


def probe_source(abi) -> str:
    lines = ['#include "rkllm_abi.h"', "#include <stdio.h>", "int main(void) {"]
    for struct_name, struct in abi.structs.items():
        lines.append(f'  printf("{struct_name} %zu\\n", sizeof({struct_name}));')
        for path, _, _ in ctypes_layout(struct):
            lines.append(f'  printf("{struct_name}.{path} %zu %zu\\n", offsetof({struct_name}, {path}), '
                         f"sizeof((({struct_name} *)0)->{path}));")
    for constant in CONSTANTS:
        lines.append(f'  printf("{constant} %d\\n", (int){constant});')
    if abi.hidden_layer_state != common.RUN_NORMAL:
        lines.append('  printf("RKLLM_RUN_GET_LAST_HIDDEN_LAYER %d\\n", (int)RKLLM_RUN_GET_LAST_HIDDEN_LAYER);')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def expected_lines(abi) -> list[str]:
    out = []
    for struct_name, struct in abi.structs.items():
        out.append(f"{struct_name} {C.sizeof(struct)}")
        out += [f"{struct_name}.{path} {offset} {size}" for path, offset, size in ctypes_layout(struct)]
    out += [f"{name} {value}" for name, value in CONSTANTS.items()]
    if abi.hidden_layer_state != common.RUN_NORMAL:
        out.append(f"RKLLM_RUN_GET_LAST_HIDDEN_LAYER {abi.hidden_layer_state}")
    return out


@pytest.mark.parametrize("name", list(ABIS))
def test_ctypes_layout_matches_the_c_header(name, tmp_path):
    abi = ABIS[name]
    source = tmp_path / "probe.c"
    source.write_text(probe_source(abi))
    binary = tmp_path / "probe"
    level = ABI_BUILDS[name][0]
    subprocess.run([compiler(), "-std=c11", "-Wall", "-Werror", f"-DRKLLM_ABI={level}", f"-I{SIM_DIR}", "-o",
                    str(binary), str(source)], check=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert printed == expected_lines(abi)
    fields = sum(1 for line in printed if "." in line.split()[0])
    assert fields >= 50, f"the probe compared only {fields} fields"


@pytest.mark.parametrize("name", list(ABIS))
def test_struct_sizes_match_the_reference_table(name):
    if C.sizeof(C.c_void_p) != 8:
        pytest.skip("the reference table is for LP64 (aarch64, x86-64)")
    sizes = {struct_name: C.sizeof(struct) for struct_name, struct in ABIS[name].structs.items()}
    assert {k: sizes[k] for k in REFERENCE_SIZES[name]} == REFERENCE_SIZES[name]


@pytest.mark.parametrize("release,abi", [("1.1.0", "1.1"), ("1.1.4", "1.1"), ("1.2.0", "1.2.0"), ("1.2.1b1", None), ("1.2.1", "1.2.1"),
                                         ("1.2.2", "1.2.1"), ("v1.2.3", "1.2.1"), ("1.3.0", "1.3.0"), ("1.0.1", None),
                                         ("2.0.0", None), ("latest", None)])
def test_release_numbers_map_to_abis(release, abi):
    found = abi_for(release)
    assert (found.name if found else None) == abi
