"""The DuckDB warehouse: one file under the home directory, one schema per dataset.

Every dataset schema holds `events`, `users`, `codes`, `rejects`, `dataset_meta` (the
definition the data was ingested with), `ingest_log` and `validation_log`. Tables are only ever
replaced by `swap_tables`, which renames fully built staging tables into place in one
transaction, so a reader sees either the old tables or the new ones, never a mix.

`Home.hold()` keeps one connection open for a block (a refresh): every `Home.connect` of that warehouse
inside it gets a cursor of that connection instead of opening the file again. Within a hold, what every
stage reads first (the stored definition, the last ingest, the data gate's verdict) is read once: see
`forget_dataset_state`.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import duckdb

from producers.datasets.definition import DatasetDefinition, DefinitionError, schema_name
from producers.errors import Llm4esError
from producers.stores.locks import file_lock

STAGING_SUFFIX = "__staging"


class WarehouseError(Llm4esError, RuntimeError):
    """The warehouse lacks what a stage needs (e.g. the dataset was never ingested)."""


@dataclass(frozen=True)
class Home:
    """Where llm4es keeps its data: `--home`, else `$LLM4ES_HOME`, else the current directory."""

    root: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> "Home":
        chosen = home or os.environ.get("LLM4ES_HOME") or "."
        return cls(Path(chosen).expanduser().resolve())

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def warehouse_path(self) -> Path:
        return self.data_dir / "warehouse.duckdb"

    def relative(self, path: str | Path) -> str:
        """`path` relative to the home when it lies inside it (how outputs record files), else as is."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)

    def reports_dir(self, *parts: str) -> Path:
        path = self.root.joinpath("reports", *parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection to the warehouse; the caller closes it. Inside `hold()`: a cursor of the held one."""
        if read_only and not self.warehouse_path.exists():
            raise WarehouseError(f"no warehouse at {self.warehouse_path}: run `llm4es ingest` first")
        held = _held_for(self.warehouse_path)
        if held is not None:
            return held.cursor()
        return _open(self, read_only)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, one connection to the warehouse, shared: `connect()` returns a cursor of it.

        Opening the file costs ~10-20 ms and closing one that was written costs a checkpoint; a refresh
        made of many small stages, each opening and closing its own connection, paid that a dozen times
        and more. Inside a hold the connection opens at the first `connect()` and closes (one checkpoint)
        when the outermost hold of this warehouse ends, also when the block raises or is interrupted
        (its open transactions roll back: a write is committed or absent, as without the hold).

        The held connection is read-write: DuckDB gives one process one configuration per file, so a
        cursor asked for `read_only` can write too. The code inside a hold (a refresh) is trusted not
        to. Other processes are kept out of the file for the whole block, as they were while a stage
        wrote (their lock error names this process). Holds nest (keyed by the warehouse's resolved path: several `Home`
        objects name one warehouse) and are process-wide, so a stage's worker thread gets its own
        cursor too (a DuckDB connection is not for two threads at once; a cursor per thread is).

        Holds of two processes queue: the outermost hold of a process first takes an exclusive file lock
        beside the warehouse, so a second refresh (of any dataset of this warehouse, e.g. two cron jobs)
        waits for the first instead of failing on the held connection. A command outside a hold (ingest,
        publish) still fails at once with the lock error."""
        key = _key(self.warehouse_path)
        with _holds_lock:
            held = _holds.get(key)
            if held is not None:
                held.depth += 1
        if held is None:
            queue = contextlib.ExitStack()  # taken outside _holds_lock: waiting here must not stop other warehouses
            queue.enter_context(file_lock(self.warehouse_path.with_name(self.warehouse_path.name + ".hold.lock")))
            with _holds_lock:
                held = _holds.get(key)
                if held is None:
                    held = _holds[key] = _Held(self, queue)
                else:  # another thread of this process got there first: join its hold
                    queue.close()
                held.depth += 1
        try:
            yield
        finally:
            with _holds_lock:
                held.depth -= 1
                last = held.depth == 0
                if last:
                    del _holds[key]
            if last:
                held.close()


def _open(home: Home, read_only: bool) -> duckdb.DuckDBPyConnection:
    home.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        return duckdb.connect(str(home.warehouse_path), read_only=read_only)
    except duckdb.IOException as e:
        if "lock" not in str(e).lower():
            raise
        raise WarehouseLockedError(locked_message(home.warehouse_path, str(e))) from e


class _Held:
    """The shared connection of a `Home.hold()`, opened at its first use (a refresh that finds nothing to
    do, or refuses to start, opens the file no more often than before)."""

    def __init__(self, home: Home, queue: contextlib.ExitStack):
        self.home = home
        self.queue = queue  # the file lock that makes other processes' holds wait; released after the close
        self.depth = 0
        self.lock = threading.Lock()  # cursor() from two threads at once, and the first open
        self.con: duckdb.DuckDBPyConnection | None = None
        self.memo: dict = {}  # see forget_dataset_state
        self.pid = os.getpid()  # a forked child has a copy of this object, not a connection it may use

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self.lock:
            if self.con is None:
                self.con = _open(self.home, read_only=False)
            # closing a cursor ends its own transaction and temp tables, not the database: no checkpoint
            cursor = self.con.cursor()
            _cursor_holds[cursor] = self
            return cursor

    def close(self) -> None:
        with self.lock:
            con, self.con = self.con, None
        try:
            if con is not None:
                con.close()  # also closes any cursor a caller left open
        finally:
            self.queue.close()


_holds: dict[str, _Held] = {}
_holds_lock = threading.Lock()
_cursor_holds: "weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, _Held]" = weakref.WeakKeyDictionary()


def _key(path: Path) -> str:
    return str(path.resolve())


def _held_for(path: Path) -> _Held | None:
    if not _holds:  # no hold anywhere: not even the path's resolve()
        return None
    key = _key(path)
    with _holds_lock:
        held = _holds.get(key)
    return held if held is not None and held.pid == os.getpid() else None


class WarehouseLockedError(WarehouseError):
    """Another process has the warehouse open for writing."""


def locked_message(path: Path, error: str) -> str:
    """Who holds the warehouse (DuckDB names the program and PID in its error), and what to do."""
    import re

    holder = re.search(r"held in (.+?) \(PID (\d+)\)", error)
    who = f"process {holder.group(2)} ({holder.group(1)})" if holder else "another process"
    command = ""
    if holder:
        try:
            raw = Path(f"/proc/{holder.group(2)}/cmdline").read_bytes().replace(b"\0", b" ")
            command = " ".join(raw.decode(errors="replace").split())
            command = f"`{command[:157]}...`" if len(command) > 160 else f"`{command}`"
        except OSError:  # not Linux, or the process just ended
            pass
    return (f"the warehouse {path} is in use by {who}{f': {command}' if command else ''}; DuckDB lets one process "
            "write it at a time and nobody read it meanwhile: try again when that command has finished")


def _memo(con: duckdb.DuckDBPyConnection) -> dict | None:
    """The memo of the hold `con` is a cursor of (None: a connection of its own, nothing is memoized)."""
    held = _cursor_holds.get(con) if _holds else None
    return None if held is None else held.memo


def forget_dataset_state(con: duckdb.DuckDBPyConnection) -> None:
    """Call after changing a dataset's definition, ingest log or validation log through `con` (ingest,
    append, validate): within a hold, `stored_definition`, `last_ingest` and `require_valid` read them
    once and remember them. Nothing else can change them meanwhile: the held connection is a writer, so
    no other process opens the file while the hold lasts."""
    memo = _memo(con)
    if memo is not None:
        memo.clear()


def remembered(con: duckdb.DuckDBPyConnection, key: tuple, read: Callable[[], object]):
    """`read()`, or within a hold what it returned the last time (see `forget_dataset_state`)."""
    memo = _memo(con)
    if memo is None:
        return read()
    if key not in memo:
        memo[key] = read()
    return memo[key]


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier: any text, quotes and dots included, names exactly one column or table."""
    return '"' + name.replace('"', '""') + '"'


def one(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> tuple | None:
    """The first row of a query, reading the result to its end (DuckDB 2 refuses new work on a
    connection that still has a half-read result)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    row = one(con, "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
              [schema, table])
    return bool(row and row[0])


def table_names(con: duckdb.DuckDBPyConnection, schema: str) -> list[str]:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY 1", [schema]
    ).fetchall()
    return [r[0] for r in rows]


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """The block's statements, all or nothing: committed when it ends, rolled back when it raises (or is killed)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def swap_tables(con: duckdb.DuckDBPyConnection, schema: str, names: Iterator[str] | list[str],
                also: Callable[[], None] | None = None) -> None:
    """Replace `schema.<name>` by `schema.<name>__staging` for every name, all or nothing (`also()` runs in
    the same transaction)."""
    with transaction(con):
        for name in names:
            _swap_one(con, schema, name)
        if also is not None:
            also()


def _swap_one(con: duckdb.DuckDBPyConnection, schema: str, name: str) -> None:
    con.execute(f'DROP TABLE IF EXISTS "{schema}"."{name}"')
    con.execute(f'ALTER TABLE "{schema}"."{name}{STAGING_SUFFIX}" RENAME TO "{name}"')


def drop_staging(con: duckdb.DuckDBPyConnection, schema: str) -> None:
    for name in table_names(con, schema):
        if name.endswith(STAGING_SUFFIX):
            con.execute(f'DROP TABLE IF EXISTS "{schema}"."{name}"')


def schema_owner(con: duckdb.DuckDBPyConnection, schema: str) -> str | None:
    """The name of the dataset whose tables the schema holds (None: no dataset yet)."""
    if not table_exists(con, schema, "dataset_meta"):
        return None
    row = one(con, f'SELECT name FROM "{schema}".dataset_meta')
    return row[0] if row else None


def check_schema_owner(con: duckdb.DuckDBPyConnection, dataset: str) -> None:
    """Refuse a dataset whose schema belongs to another dataset: names differing only in case or punctuation
    (`shop-eu`, `Shop_EU`) map to one schema, and the second would silently replace the first's tables."""
    schema = schema_name(dataset)
    owner = schema_owner(con, schema)
    if owner is not None and owner != dataset:
        raise WarehouseError(f"dataset {dataset!r} would use the warehouse schema {schema!r}, which holds dataset "
                             f"{owner!r} (names that differ only in case or punctuation share a schema): use "
                             f"{owner!r} to mean that dataset, or give this one a name that differs in letters or "
                             "digits")


def stored_definition(con: duckdb.DuckDBPyConnection, dataset: str) -> DatasetDefinition:
    """The definition the dataset was last ingested with: later stages read fields from it."""
    # the stored text is remembered, not the object: each caller gets its own (callers may change it)
    blob = remembered(con, ("definition", dataset), lambda: _definition_text(con, dataset))
    try:
        return DatasetDefinition.model_validate(json.loads(blob))
    except ValueError as e:  # written by an older, incompatible version
        raise DefinitionError(f"stored definition of {dataset!r} is unreadable ({e}); re-run ingest") from e


def _definition_text(con: duckdb.DuckDBPyConnection, dataset: str) -> str:
    schema = schema_name(dataset)
    check_schema_owner(con, dataset)
    if not table_exists(con, schema, "dataset_meta"):
        from producers.datasets.definition import builtin_names

        held = ", ".join(ingested_datasets(con)) or "nothing yet"
        if dataset in builtin_names():
            raise WarehouseError(f"dataset {dataset!r} is not in the warehouse: run `llm4es ingest {dataset}` first")
        raise WarehouseError(f"unknown dataset {dataset!r}: the warehouse holds {held}; built-in datasets are "
                             f"{', '.join(builtin_names())} (your own data: `llm4es ingest NAME --mapping FILE`)")
    (blob,) = one(con, f'SELECT definition FROM "{schema}".dataset_meta')
    return blob


def ingested_datasets(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT table_schema FROM information_schema.tables WHERE table_name = 'dataset_meta' ORDER BY 1"
    ).fetchall()
    return [one(con, f'SELECT name FROM "{r[0]}".dataset_meta')[0] for r in rows]


def last_ingest(con: duckdb.DuckDBPyConnection, schema: str) -> dict | None:
    row = remembered(con, ("last_ingest", schema), lambda: _last_ingest(con, schema))
    return None if row is None else dict(row)  # the caller's own copy


def _last_ingest(con: duckdb.DuckDBPyConnection, schema: str) -> dict | None:
    if not table_exists(con, schema, "ingest_log"):
        return None
    cur = con.execute(f'SELECT * FROM "{schema}".ingest_log ORDER BY finished_at DESC LIMIT 1')
    rows = cur.fetchall()  # fetchall, not fetchone: DuckDB 2 keeps a half-read result open on the connection
    return dict(zip([d[0] for d in cur.description], rows[0])) if rows else None


def float32_lists(matrix):
    """The rows of a 2-d array as an Arrow list<float32> column (one vector per row), without a Python loop."""
    import numpy as np
    import pyarrow as pa

    n, dim = matrix.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)),
                                    pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)))
