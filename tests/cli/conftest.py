"""Shared fixtures for driving `llm4es` through click's CliRunner."""
from __future__ import annotations

import pytest
from click.testing import CliRunner
from rich.console import Console

import producers.cli.printers
from producers.cli import cli


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch):
    """rich wraps at 80 columns when not on a terminal, which splits table cells; tests read 250."""
    monkeypatch.setattr(producers.cli.printers, "console", Console(highlight=False, width=250))
    monkeypatch.setattr(producers.cli.printers, "err_console", Console(stderr=True, highlight=False, width=250))


@pytest.fixture
def llm4es(tmp_path):
    """Run `llm4es --home <tmp> --cache <tmp> ARGS...` and return click's Result."""
    runner = CliRunner()
    base = ["--home", str(tmp_path / "home"), "--cache", str(tmp_path / "cache")]

    def invoke(*args: str):
        return runner.invoke(cli, [*base, *map(str, args)])

    return invoke


def assert_clean_exit_1(result) -> None:
    """Exit code 1 from the CLI's own error handling, not from an uncaught exception."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
