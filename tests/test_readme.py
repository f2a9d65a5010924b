"""The README's two opening commands are the project's contract; keep CI and docs in step."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith('llamacompat chat "Name the capital of France."')
    assert commands[1].endswith("pytest")


def test_ci_runs_the_readme_test_command_unchanged():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_ci_lints_after_the_install():
    """ruff and mypy come from the dev extra, so they run once the README's command has installed it."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = ci.index(_readme_commands()[1])
    assert "ruff check ." in ci[install + 1:] and "mypy" in ci[install + 1:]
