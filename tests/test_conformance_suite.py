"""The conformance suite itself: each check fails against the adapter bug it exists to catch.

The suite proper runs from ``llamacompat/conformance`` on every installed
built-in backend (pytest's testpaths). Here it runs against ``BrokenAdapter``:
clean, every check passes; with a fault, the check aimed at it must fail.
What parallel mode's own machinery does (request ids, routing events, the
status, settling queued requests, routing plain calls) no adapter can break, so
those faults are patched into llamacompat itself (``PATCHES``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamacompat.conformance import CHECKS, run_checks
from llamacompat.parallel import Parallel, Pool, Progress
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
    "parallel_requests": ["events_under_first_id", "ids_repeat"],
    "parallel_stop": ["stop_leaks"],
    "parallel_status": ["status_says_running"],
    "parallel_release": ["queued_left_pending"],
    "parallel_plain_calls": ["plain_calls_unaware"],
}
PARAMS = {"n_ctx": 1024, "n_threads": 2}


def _events_under_first_id(monkeypatch):
    first: dict[Pool, int] = {}
    token = Pool._token

    def misrouted(self, request, on_token, rid, event):
        token(self, request, on_token, first.setdefault(self, rid), event)

    monkeypatch.setattr(Pool, "_token", misrouted)


def _ids_repeat(monkeypatch):
    init = Parallel.__init__

    def counting_from_one_on_each_enable(self, context):
        init(self, context)
        self._ids = lambda: 1

    monkeypatch.setattr(Parallel, "__init__", counting_from_one_on_each_enable)


def _status_says_running(monkeypatch):
    as_dict = Progress.as_dict
    monkeypatch.setattr(Progress, "as_dict", lambda self: {**as_dict(self), "state": {"generating": "running"}.get(
        self.state, self.state)})


# faults in llamacompat's parallel mode, not in an adapter: each patches it for one test
PATCHES = {
    "events_under_first_id": ("every on_token event carries the id of the first request", _events_under_first_id),
    "ids_repeat": ("every request gets id 1", _ids_repeat),
    "status_says_running": ("the status says 'running', not llama.rn's 'generating'", _status_says_running),
    "queued_left_pending": ("disable() and release() drop the queued requests without settling their promises",
                            lambda monkeypatch: monkeypatch.setattr(Pool, "_cancel", lambda self, request, why: None)),
    "plain_calls_unaware": ("the context does not see that parallel mode is on (plain calls claim the model)",
                            lambda monkeypatch: monkeypatch.setattr(Parallel, "enabled", property(lambda self: False))),
}


@pytest.fixture(scope="module", autouse=True)
def broken_backend():
    register_adapter("broken", BrokenAdapter)
    yield
    unregister_adapter("broken")


def test_every_check_and_fault_is_paired():
    assert set(CAUGHT_BY) == set(CHECKS)
    assert not set(FAULTS) & set(PATCHES)
    assert {fault for faults in CAUGHT_BY.values() for fault in faults} == set(FAULTS) | set(PATCHES)


def test_clean_adapter_passes_every_check():
    outcomes = run_checks("broken", {**PARAMS, "fault": ""})
    assert [(o.name, o.status, o.detail) for o in outcomes if o.status == "failed"] == []
    assert [o.name for o in outcomes if o.status == "n/a"] == []


@pytest.mark.parametrize("name,fault", [(name, fault) for name, faults in CAUGHT_BY.items() for fault in faults])
def test_check_catches_its_fault(name, fault, monkeypatch):
    if fault in PATCHES:
        what, patch = PATCHES[fault]
        patch(monkeypatch)
        (outcome,) = run_checks("broken", {**PARAMS, "fault": ""}, [name])
    else:
        what = FAULTS[fault]
        (outcome,) = run_checks("broken", {**PARAMS, "fault": fault}, [name])
    assert outcome.status == "failed", f"{name} did not catch '{fault}' ({what}): {outcome}"


def test_pytest_entry_point_runs_the_suite_on_a_named_backend(tmp_path):
    """The documented command for adapter authors, from outside the repository."""
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "llamacompat.conformance", "-p", "no:cacheprovider", "-q",
           "--llamacompat-backend", "llama_cpp", "--llamacompat-param", "n_ctx=512", "-k", "tokenizer or n_predict"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
