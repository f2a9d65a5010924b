"""Every script in examples/ runs on the packaged model and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
EXPECTED = {  # script -> text its output must contain
    "streaming_chat.py": "Paris",
    "json_schema_extraction.py": "'age': 34",
    "tool_calling.py": "the model called: [('get_weather'",
    "session_resume.py": "reused",
    "async_server.py": "Name the capital of Italy. ->",
    "bridge_client.py": "served by llama_cpp",
    "port_of_a_chat_screen.py": "tokens/s; saved",
    "toy_adapter.py": "toy: every conformance check passed",  # it runs the whole suite on itself
}


def test_every_example_is_listed():
    assert sorted(EXPECTED) == sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script):
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)], capture_output=True, text=True,
                         timeout=240, cwd=EXAMPLES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert EXPECTED[script] in out.stdout, out.stdout
