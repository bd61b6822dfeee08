"""The root of every error llm4es reports to its user.

Each stage's error class (DefinitionError, WarehouseError, IngestError, ...) subclasses
`Llm4esError` as well as the built-in error it always was (ValueError, RuntimeError, ...), so
callers that catch the built-in keep working. The CLI catches `Llm4esError` in one place
(producers/cli/errors.py), prints its message (credentials redacted) and exits with its
`exit_code`. This module imports nothing, so every layer may use it.
"""
from __future__ import annotations


class Llm4esError(Exception):
    """A failure the user can act on: its message says what and where (file, row, field)."""

    exit_code: int = 1
