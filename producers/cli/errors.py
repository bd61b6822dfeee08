"""The one place where an error becomes a message and an exit code.

Every command is wrapped in `handle_errors`: an `Llm4esError` (the root of every stage's error
class) prints `error: <message>` with any credentials redacted and exits with its `exit_code`; a
full disk and a warehouse DuckDB cannot open get the same treatment with a message that says what
to do. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

from producers.cli import printers
from producers.errors import Llm4esError


def handle_errors(fn):
    """Map every domain error to a short message and its exit code (1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import duckdb

        try:
            return fn(*args, **kwargs)
        except Llm4esError as e:
            fail(str(e), e.exit_code)
        except Exception as e:
            if (full := _disk_full(e)) is not None:
                home = args[0].home.root if args and hasattr(args[0], "home") else "the llm4es home"
                detail = str(full).strip().splitlines()[0] if str(full).strip() else repr(full)
                fail(f"no space left on the device holding {home} (data, reports and temporary files are "
                     f"written there): free some space or point --home / LLM4ES_HOME elsewhere, then run the "
                     f"command again. Tables and files are written to a staging copy first, so the previous "
                     f"results are intact. ({type(full).__name__}: {detail})")
            if isinstance(e, (duckdb.IOException, duckdb.ConnectionException)):
                if "lock" in str(e).lower():  # a connection opened without Home.connect
                    from producers.stores.warehouse import locked_message

                    fail(locked_message(_warehouse_of(args), str(e)))
                fail(f"cannot open the warehouse: {e}")
            raise

    return wrapper


def fail(message: str, exit_code: int = 1) -> None:
    """Print `error: message` on stderr and exit."""
    from producers.shared.redact import redact_text

    # Messages may quote an endpoint URL: never print its credentials.
    printers.err_console.print(f"[bold red]error:[/] {redact_text(message)}", soft_wrap=True)
    sys.exit(exit_code)


def _disk_full(e: BaseException) -> BaseException | None:
    """The error in `e`'s chain that says the disk is full: ENOSPC from Python, or DuckDB's
    'No space left on device' (an IOException, or another error quoting it); else None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "no space left on device" in str(e).lower():
            return e
        e = e.__cause__ or e.__context__
    return None


def _warehouse_of(args) -> Path | str:
    """The warehouse path of the command's Pipeline (its first argument), for messages."""
    home = getattr(args[0], "home", None) if args else None
    return home.warehouse_path if home is not None else "warehouse"
