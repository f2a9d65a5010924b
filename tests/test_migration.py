"""MIGRATION.md's tables name what exists, and their llama_cpp and mlx columns say what ctx.capabilities says."""

from __future__ import annotations

import os
import re

import pytest

import llamacompat
from llamacompat import LlamaContext, init_llama
from llamacompat.adapters.rkllm.adapter import RkllmAdapter
from llamacompat.params import COMPLETION_FIELDS, COMPLETION_IGNORED, CONTEXT_FIELDS, CONTEXT_IGNORED, FEATURE_PARAMS
from llamacompat.types import CompletionResult, TokenData

MIGRATION = os.path.join(os.path.dirname(__file__), "..", "MIGRATION.md")
BACKENDS = ("llama_cpp", "mlx", "rkllm")
# methods whose support is a capability feature
METHOD_FEATURES = {"rerank": "rerank", "apply_lora_adapters": "lora", "remove_lora_adapters": "lora",
                   "get_loaded_lora_adapters": "lora", "embedding": "embedding", "bench": "bench",
                   "load_session": "session", "save_session": "session", "tokenize": "tokenize",
                   "detokenize": "detokenize", "parallel": "parallel", "init_multimodal": "multimodal",
                   "is_multimodal_enabled": "multimodal", "get_multimodal_support": "multimodal",
                   "release_multimodal": "multimodal"}
PARAM_FEATURES = {name: feature for feature, names in FEATURE_PARAMS.items() for name in names}


def _tables() -> dict[str, list[dict[str, str]]]:
    """Each '## ' section's table rows as {column: cell}."""
    tables: dict[str, list[dict[str, str]]] = {}
    section, header = "", None
    for line in open(MIGRATION, encoding="utf-8"):
        if line.startswith("## "):
            section, header = line[3:].strip(), None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                tables.setdefault(section, []).append(dict(zip(header, cells, strict=True)))
    return tables


TABLES = _tables()


def _name(cell: str) -> str | None:
    match = re.match(r"`([^`]+)`", cell)
    return match.group(1) if match else None  # "(none ...)" rows name nothing in llamacompat


def test_the_tables_are_complete():
    assert set(TABLES) == {"Functions and methods", "Context params (`init_llama`)",
                           "Completion params (`ctx.completion`)", "Result fields"}
    for rows in TABLES.values():
        for row in rows:
            assert all(row[b].split()[0] in ("native", "emulated", "missing") for b in BACKENDS), row


@pytest.fixture(scope="module")
def live():
    with init_llama({"n_ctx": 512, "n_threads": 2, "embedding": True}) as lctx, \
            init_llama({"backend": "mlx", "n_ctx": 512, "embedding": True}) as mctx:
        result = lctx.completion({"prompt": "Hi", "n_predict": 2})
        yield {"llama_cpp": lctx, "mlx": mctx}, result


def test_every_function_and_method_exists(live):
    contexts, _ = live
    ctx = contexts["llama_cpp"]
    for row in TABLES["Functions and methods"]:
        name = _name(row["llamacompat"])
        if name is None:
            continue
        if name.startswith("ctx."):
            attr = re.match(r"ctx\.(\w+)", name).group(1)
            assert hasattr(LlamaContext, attr) or hasattr(ctx, attr), name
            for key in re.findall(r'\["(\w+)"\]', name):
                assert key in ctx.model["chat_templates"] or key in ctx.model, name
        else:
            assert hasattr(llamacompat, re.match(r"\w+", name).group(0)), name


def test_every_param_and_result_field_exists(live):
    _, result = live
    for row in TABLES["Context params (`init_llama`)"]:
        name = _name(row["llamacompat"])
        assert name in CONTEXT_FIELDS or name in CONTEXT_IGNORED or name in RkllmAdapter.context_fields, name
    for row in TABLES["Completion params (`ctx.completion`)"]:
        name = _name(row["llamacompat"])
        assert name is None or name in COMPLETION_FIELDS or name in COMPLETION_IGNORED, name
    for row in TABLES["Result fields"]:
        name = _name(row["llamacompat"])
        if name is None:
            continue
        key = re.search(r'\["(\w+)"\]', name).group(1)
        if name.startswith("result"):
            assert key in result or key in CompletionResult.__annotations__, name
        else:
            assert key in TokenData.__annotations__, name


@pytest.mark.parametrize("backend", ["llama_cpp", "mlx"])
def test_backend_columns_match_the_capabilities(live, backend):
    features = live[0][backend].capabilities["features"]
    checked = 0
    for section, key_of in (("Functions and methods", lambda n: METHOD_FEATURES.get(re.match(r"ctx\.(\w+)", n).group(1))
                             if n.startswith("ctx.") else None),
                            ("Completion params (`ctx.completion`)", PARAM_FEATURES.get)):
        for row in TABLES[section]:
            name = _name(row["llamacompat"])
            feature = key_of(name) if name else None
            if feature is None:
                continue
            assert row[backend].split()[0] == features.get(feature, "missing"), (backend, name, feature)
            checked += 1
    assert checked >= 25
