"""The conformance suite itself: each check fails against the adapter bug it exists to catch.

The suite proper runs from ``llamacompat/conformance`` on every installed
built-in backend (pytest's testpaths). Here it runs against ``BrokenAdapter``:
clean, every check passes; with a fault, the check aimed at it must fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamacompat.conformance import CHECKS, run_checks
from llamacompat.registry import register_adapter, unregister_adapter

from .broken_adapter import FAULTS, BrokenAdapter

# check -> the faults it must catch
CAUGHT_BY = {
    "result_shape": ["bad_probs"],
    "timings": ["claims_all_cached"],
    "streaming": ["not_greedy"],
    "n_predict": ["eog_always", "counts_sampled"],
    "stop_strings": ["not_greedy"],  # stop handling is the engine's; an adapter breaks it only through its tokens
    "determinism": ["not_greedy", "seed_ignored"],
    "prefix_reuse": ["stale_cache"],
    "stop_completion": ["abort_raises"],
    "grammar": ["grammar_ignored"],
    "json_schema": ["long_grammar_ignored"],
    "bad_input": ["poisoned_after_error"],
    "capabilities": ["dry_unimplemented"],
    "lifecycle": ["close_raises"],
    "tokenizer_round_trip": ["lossy_detokenize"],
    "embeddings": ["random_embedding"],
    "sessions": ["session_forgets", "trusting_loader"],
}
PARAMS = {"n_ctx": 1024, "n_threads": 2}


@pytest.fixture(scope="module", autouse=True)
def broken_backend():
    register_adapter("broken", BrokenAdapter)
    yield
    unregister_adapter("broken")


def test_every_check_and_fault_is_paired():
    assert set(CAUGHT_BY) == set(CHECKS)
    assert {fault for faults in CAUGHT_BY.values() for fault in faults} == set(FAULTS)


def test_clean_adapter_passes_every_check():
    outcomes = run_checks("broken", {**PARAMS, "fault": ""})
    assert [(o.name, o.status, o.detail) for o in outcomes if o.status == "failed"] == []
    assert [o.name for o in outcomes if o.status == "n/a"] == []


@pytest.mark.parametrize("name,fault", [(name, fault) for name, faults in CAUGHT_BY.items() for fault in faults])
def test_check_catches_its_fault(name, fault):
    (outcome,) = run_checks("broken", {**PARAMS, "fault": fault}, [name])
    assert outcome.status == "failed", f"{name} did not catch '{fault}' ({FAULTS[fault]}): {outcome}"


def test_pytest_entry_point_runs_the_suite_on_a_named_backend(tmp_path):
    """The documented command for adapter authors, from outside the repository."""
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "llamacompat.conformance", "-p", "no:cacheprovider", "-q",
           "--llamacompat-backend", "llama_cpp", "--llamacompat-param", "n_ctx=512", "-k", "tokenizer or n_predict"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
