"""The params TypedDicts in llamacompat.types say what validation accepts: the same keys as each Field table, the
same value types, and Literal values the table's check passes. A key added to a table without its TypedDict entry
(or the reverse, as ``seed`` once was in ContextParams) fails here; and a type checker holds callers to them."""

from __future__ import annotations

import textwrap
import types as pytypes
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest
from mypy import api as mypy_api

from llamacompat import params as P
from llamacompat import types as T
from llamacompat.bridge.client import BRIDGE_FIELDS
from llamacompat.openai.core import OPENAI_FIELDS
from llamacompat.registry import BUILTIN, get_adapter

NONE = type(None)


def _rkllm_sampling_fields() -> dict[str, P.Field]:
    from llamacompat.adapters.rkllm.adapter import SAMPLING_NAMES

    return {name: P.COMPLETION_FIELDS[name] for name in SAMPLING_NAMES}


# TypedDict -> the table validation checks its keys against.
TABLES: dict[str, tuple[Any, Mapping[str, P.Field]]] = {
    "ContextParams": (T.ContextParams, P.CONTEXT_FIELDS),
    "BridgeContextParams": (T.BridgeContextParams, {**P.CONTEXT_FIELDS, **BRIDGE_FIELDS}),
    "OpenAIContextParams": (T.OpenAIContextParams, {**P.CONTEXT_FIELDS, **OPENAI_FIELDS}),
    "RkllmContextParams": (T.RkllmContextParams, {**P.CONTEXT_FIELDS, **get_adapter("rkllm").context_fields}),
    "RkllmSampling": (T.RkllmSampling, _rkllm_sampling_fields()),
    "CompletionParams": (T.CompletionParams, P.COMPLETION_FIELDS),
    "FormattedChatParams": (T.FormattedChatParams, {name: P.COMPLETION_FIELDS[name] for name in P.CHAT_FIELDS}),
    "TokenizeParams": (T.TokenizeParams, P.TOKENIZE_FIELDS),
    "EmbeddingParams": (T.EmbeddingParams, P.EMBEDDING_FIELDS),
    "RerankParams": (T.RerankParams, P.RERANK_FIELDS),
}


def _runtime_types(hint: Any) -> set[type]:
    """The classes a value of type ``hint`` may have at run time, in the terms of ``Field.types``."""
    origin = get_origin(hint)
    if origin is Union or origin is pytypes.UnionType:
        return set().union(*(_runtime_types(arg) for arg in get_args(hint)))
    if origin is Literal:
        return {type(value) for value in get_args(hint)}
    if origin is not None:  # List[...], Tuple[...], Dict[...]
        return {origin}
    if is_typeddict(hint):
        return {dict}
    if hint is float:  # a float param takes an int (PEP 484's numeric tower; Field spells it (int, float))
        return {int, float}
    return {hint}


def _literals(hint: Any) -> list[Any]:
    if get_origin(hint) is Literal:
        return list(get_args(hint))
    if get_origin(hint) is Union:
        return [value for arg in get_args(hint) for value in _literals(arg)]
    return []


@pytest.mark.parametrize("name", TABLES)
def test_the_typeddict_has_the_keys_of_its_table(name):
    typed, table = TABLES[name]
    hints = get_type_hints(typed)
    assert set(hints) == set(table), (f"{name}: missing {sorted(set(table) - set(hints))}, "
                                      f"not accepted {sorted(set(hints) - set(table))}")
    assert not typed.__required_keys__, f"{name}: every param is optional (validation fills in the defaults)"


@pytest.mark.parametrize("name", TABLES)
def test_the_typeddict_value_types_are_the_field_types(name):
    typed, table = TABLES[name]
    for key, hint in get_type_hints(typed).items():
        field = table[key]
        expected = set(field.types) | ({NONE} if field.nullable else set())
        assert _runtime_types(hint) == expected, f"{name}[{key!r}]: {hint} is not the field's {sorted(map(str, expected))}"
        for value in _literals(hint):
            assert field.check is None or field.check(value), f"{name}[{key!r}]: {value!r} fails the field's check"
            assert P.validate({key: value}, table, "test")[key] == value


def test_every_backend_with_init_params_of_its_own_has_its_typeddict():
    typed = {"rkllm": T.RkllmContextParams}
    for name in BUILTIN:
        fields = get_adapter(name).context_fields
        if fields:
            assert name in typed, f"backend {name!r} has init params of its own ({sorted(fields)}) but no TypedDict"
            assert set(fields) <= set(get_type_hints(typed[name]))
    assert set(get_args(T.InitParams)) == {T.ContextParams, T.BridgeContextParams, T.OpenAIContextParams,
                                           T.RkllmContextParams}


def test_refused_and_ignored_completion_keys_are_not_typed():
    """What validation refuses (not yet) or only warns about (ignored) is not a param a caller should write."""
    keys = set(get_type_hints(T.CompletionParams))
    assert not keys & set(P.COMPLETION_NOT_YET)
    assert not keys & set(P.COMPLETION_IGNORED)
    assert not set(get_type_hints(T.TokenizeParams)) & set(P.TOKENIZE_NOT_YET)


def test_lora_adapter_matches_what_lora_entries_takes(tmp_path):
    hints = get_type_hints(T.LoraAdapter)
    assert set(hints) == {"path", "scaled"} and T.LoraAdapter.__required_keys__ == {"path"}
    adapter = tmp_path / "a.gguf"
    entries = P.lora_entries([{"path": str(adapter), "scaled": None}, {"path": str(tmp_path / "b.gguf")}], "test")
    assert [entry["scaled"] for entry in entries] == [1.0, 1.0]
    with pytest.raises(P.InvalidParamsError, match="unknown parameter 'scale'"):
        P.lora_entries([{"path": str(adapter), "scale": 0.5}], "test")


def test_a_type_checker_holds_a_caller_to_them(tmp_path):
    """mypy (the dev extra's) passes the right dicts and flags a wrong key, a wrong type and a backend's key on
    another backend: llamacompat/types.py alone is checked (it imports only typing), so this takes seconds."""
    snippet = tmp_path / "caller.py"
    snippet.write_text(textwrap.dedent("""
        from llamacompat.types import (BridgeContextParams, CompletionParams, ContextParams, InitParams,
                                       RkllmContextParams)

        good: InitParams = {"model": "smollm2", "n_ctx": 2048, "lora_list": [{"path": "a.gguf"}]}
        bridge: InitParams = {"backend": "bridge", "socket": "/tmp/s", "timeout": 5}
        rkllm: RkllmContextParams = {"rkllm_sampling": {"temperature": 0.2, "mirostat": 2}}
        request: CompletionParams = {"prompt": "Hi", "n_predict": 8, "stop": ("\\n",), "logit_bias": [[15, False]],
                                     "grammar_triggers": [{"type": "word", "value": "<tool>"}]}
        seed: ContextParams = {"seed": 1}  # E1: a completion param
        socket: ContextParams = {"socket": "/tmp/s"}  # E2: the bridge's
        typo: CompletionParams = {"n_predcit": 8}  # E3
        wrong: CompletionParams = {"n_predict": "8"}  # E4
        choice: CompletionParams = {"tool_choice": "any"}  # E5
        bridged: BridgeContextParams = {"base_url": "http://x"}  # E6: openai's
    """))
    out, err, status = mypy_api.run([str(snippet), T.__file__, "--follow-imports=skip", "--cache-dir",
                                     str(tmp_path / "cache"), "--no-error-summary"])
    lines = [line for line in out.splitlines() if ": error:" in line]
    flagged = {int(line.split(":")[1]) for line in lines}
    text = snippet.read_text().splitlines()
    expected = {i + 1 for i, line in enumerate(text) if "# E" in line}
    assert status == 1 and flagged == expected, out + err
