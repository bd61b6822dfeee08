"""Ingest a dataset's raw files into its warehouse schema, atomically and idempotently.

1. find and hash the files; skip when this exact source and definition are already ingested
2. load each file as text into staging tables, keeping line numbers and structural rejects
3. type every column in SQL; rows whose values do not parse become rejects with a reason.
   This is the step that runs a mapping's `sql:` expressions, so it runs in a sandbox: a
   DuckDB without file or network access that holds only the declared tables
4. stop, leaving the warehouse untouched, when a file's rejected share exceeds the threshold
5. swap all staging tables into place in one transaction and append to the ingest log
"""
from __future__ import annotations

import json
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.errors import Llm4esError
from producers.ingest.codes import build_codes
from producers.ingest.raw_load import RawLoadError, RawTable, duckdb_message, load_raw
from producers.stores.warehouse import (STAGING_SUFFIX, Home, check_schema_owner, drop_staging, forget_dataset_state,
                                        last_ingest, sql_ident, sql_str, swap_tables, table_exists)
from producers.ingest.sandbox import Sandbox
from producers.ingest.source_files import SourceFile, locate, source_hash, unpack_if_zip
from producers.ingest.typed_sql import (RawColumns, TypedColumn, expression, field_column, reasons, time_column,
                                        user_column)
from producers.stores.provenance import code_version

SWAPPED_TABLES = ["events", "users", "codes", "rejects", "dataset_meta", "ingest_log"]
MAX_SHRINK = 0.5
"""A re-ingest that loses more than this share of the last ingest's events or users (or all of
them: a header-only file) needs `allow_shrink`; a truncated export otherwise replaces good data."""
NULL_KEY_LINES = 10  # the first lines named per file and key column left empty


class IngestError(Llm4esError, RuntimeError):
    """The source could not be ingested; the warehouse is as it was before."""


@dataclass(frozen=True)
class IngestConfig:
    source: Path
    max_reject_share: float = 0.01  # per file
    force: bool = False  # re-ingest even when the source is unchanged
    max_line_size: int | None = None  # bytes per CSV line; None: DuckDB's default (2,000,000)
    allow_shrink: bool = False  # replace the data even when events or users drop by more than MAX_SHRINK


@dataclass
class FileStats:
    table: str
    file: str
    sha256: str
    rows_read: int
    rows_rejected: int
    # key columns (user_id, event_time) left empty: loaded as NULL for validation to fail on, and traced here
    # to their lines: {"user_id": {"rows": 2, "lines": [5, 10]}}, the first NULL_KEY_LINES lines of each
    null_keys: dict = field(default_factory=dict)

    @property
    def reject_share(self) -> float:
        return self.rows_rejected / self.rows_read if self.rows_read else 0.0

    def null_key_text(self) -> str:
        """`u.data: 2 rows without user_id (lines 5, 10)`, or "" when every key is there."""
        parts = [f"{v['rows']:,} row{'s' if v['rows'] > 1 else ''} without {k} ({traced_lines(v)})"
                 for k, v in self.null_keys.items()]
        return f"{self.file}: {' and '.join(parts)}" if parts else ""


def traced_lines(traced: dict) -> str:
    """`line 7`, or `lines 5, 10 ...` (the dots: more rows than the lines kept) of one `null_keys` entry."""
    more = " ..." if traced["rows"] > len(traced["lines"]) else ""
    return f"line{'s' if traced['rows'] > 1 else ''} {', '.join(map(str, traced['lines']))}{more}"


@dataclass
class IngestResult:
    dataset: str
    schema: str
    ingest_id: str
    source_hash: str
    n_events: int
    n_users: int
    n_rejects: int
    files: list[FileStats] = field(default_factory=list)
    skipped: bool = False  # the same source was already ingested
    # n_users counts the users table: with a label file that is its rows, not the users with events
    n_event_users: int | None = None
    n_users_without_events: int | None = None  # label rows whose user has no event (None: no users file)
    n_repeated_events: int | None = None  # events equal in every column to another (None: events.key declared)


def ingest(home: Home, definition: DatasetDefinition, config: IngestConfig,
           log: Callable[[str], None] = lambda _: None) -> IngestResult:
    schema = definition.schema
    with tempfile.TemporaryDirectory(prefix="llm4es-ingest-") as scratch:
        folder = unpack_if_zip(Path(config.source), Path(scratch) / "unzipped")
        files = locate(definition, folder)
        data_hash = source_hash(files)
        con = home.connect()
        try:
            check_schema_owner(con, definition.name)
            previous = last_ingest(con, schema)
            if (not config.force and previous and previous["source_hash"] == data_hash
                    and previous["definition_fingerprint"] == definition.fingerprint()):
                log(f"{definition.name}: source unchanged since ingest {previous['ingest_id']}; "
                    "skipping (--force re-runs)")
                return _summary(con, definition, previous, skipped=True)
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {sql_ident(schema)}")
            drop_staging(con, schema)
            try:
                return _ingest(con, definition, config, files, data_hash, log)
            finally:
                drop_staging(con, schema)
        finally:
            forget_dataset_state(con)  # within a hold, the old definition, ingest and verdict were remembered
            con.close()


def _ingest(con: duckdb.DuckDBPyConnection, definition: DatasetDefinition, config: IngestConfig,
            files: dict[str, SourceFile], data_hash: str, log: Callable[[str], None]) -> IngestResult:
    schema = definition.schema
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    ingest_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    stats = stage_tables(con, definition, config, files, log)
    stg = lambda name: f"{sql_ident(schema)}.{sql_ident(name + STAGING_SUFFIX)}"  # noqa: E731
    n_events = con.execute(f"SELECT count(*) FROM {stg('events')}").fetchall()[0][0]
    n_users = con.execute(f"SELECT count(*) FROM {stg('users')}").fetchall()[0][0]
    n_rejects = sum(s.rows_rejected for s in stats)
    previous = last_ingest(con, schema)
    _refuse_shrink(definition.name, previous, n_events, n_users, config.allow_shrink)
    _refuse_dropping_appends(con, definition.name, schema, previous, n_events, config.allow_shrink)
    con.execute(f"CREATE TABLE {stg('dataset_meta')} AS SELECT ? AS name, ? AS definition, "
                f"? AS definition_fingerprint, ? AS source_hash, ? AS ingest_id",
                [definition.name, json.dumps(definition.model_dump(mode="json")), definition.fingerprint(),
                 data_hash, ingest_id])
    _stage_ingest_log(con, schema, stg("ingest_log"), {
        # absolute, so `ingest --append` finds the unchanged tables here from any directory
        "ingest_id": ingest_id, "dataset": definition.name, "source": str(Path(config.source).resolve()),
        "files": json.dumps([s.__dict__ for s in stats]), "source_hash": data_hash,
        "definition_fingerprint": definition.fingerprint(),
        "rows_read": sum(s.rows_read for s in stats), "events": n_events, "users": n_users,
        "rejects": n_rejects, "max_reject_share": config.max_reject_share,
        "started_at": started, "finished_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "code_version": code_version(),
    })
    log("swapping tables into place")
    n_event_users = con.execute(f"SELECT count(DISTINCT user_id) FROM {stg('events')}").fetchall()[0][0]
    without = None
    if definition.users:
        without = con.execute(f"SELECT count(*) FROM {stg('users')} u WHERE NOT EXISTS "
                              f"(SELECT 1 FROM {stg('events')} e WHERE e.user_id = u.user_id)").fetchall()[0][0]
    repeated = None
    if not definition.events.key:  # nothing checks uniqueness then: a re-sent row would count twice, unsaid
        repeated = n_events - con.execute(
            f"SELECT count(*) FROM (SELECT DISTINCT * FROM {stg('events')})").fetchall()[0][0]
    swap_tables(con, schema, SWAPPED_TABLES)
    return IngestResult(definition.name, schema, ingest_id, data_hash, n_events, n_users, n_rejects, stats,
                        n_event_users=n_event_users, n_users_without_events=without, n_repeated_events=repeated)


def stage_tables(con: duckdb.DuckDBPyConnection, definition: DatasetDefinition, config: IngestConfig,
                 files: dict[str, SourceFile], log: Callable[[str], None],
                 check_tables: set[str] | None = None) -> list[FileStats]:
    """Steps 2-4: `events`, `users`, `codes` and `rejects` of `files`, typed, as `<name>__staging` tables.

    Raises IngestError when a file's rejected share exceeds the threshold (only the files of
    `check_tables` are held to it; None: all). `append` reuses this for the new files.
    """
    schema = definition.schema
    raw: dict[str, RawTable] = {}
    for table, src in files.items():
        log(f"reading {src.path.name} ({table})")
        try:
            raw[table] = load_raw(con, schema, src, definition.tables[table], config.max_line_size)
        except RawLoadError as e:
            raise IngestError(str(e)) from None
        except duckdb.Error as e:
            raise IngestError(f"{src.path.name}: cannot be read ({duckdb_message(e)}); check the definition of "
                              f"table {table!r}") from None
    cols = _check_columns(definition, files, raw)

    stg = lambda name: f"{sql_ident(schema)}.{sql_ident(name + STAGING_SUFFIX)}"  # noqa: E731
    with Sandbox(con, raw) as box:
        events_from = _events_from(con, definition, raw, cols, files)
        _check_expressions(box, definition, events_from)
        log("typing events")
        rejects, null_keys = _build_events(con, box, definition, raw, cols, files, events_from,
                                           stg("events"), stg("evrej"))
        type_rejects = [rejects]
        if definition.users:
            log("typing users")
            rejects, users_null = _build_users(con, box, definition, raw, cols, files, stg("users"), stg("usrej"))
            type_rejects.append(rejects)
            for source, keys in users_null.items():  # one file may hold both tables: the events' lines stay
                null_keys[source] = {**keys, **null_keys.get(source, {})}
        else:
            con.execute(f"CREATE TABLE {stg('users')} AS SELECT DISTINCT user_id FROM {stg('events')} ORDER BY 1")
    build_codes(con, stg("codes"), definition.codes, {t: r.table for t, r in raw.items()}, cols)

    rejects = [r.rejects for r in raw.values() if r.rejects] + type_rejects
    con.execute(f"CREATE TABLE {stg('rejects')} AS " +
                " UNION ALL ".join(f"SELECT source, row_number, raw_record, reason FROM {t}" for t in rejects) +
                " ORDER BY source, row_number")

    stats = _file_stats(con, files, raw, stg("rejects"), null_keys)
    for s in stats:
        if s.null_keys:
            log(f"{s.null_key_text()}: loaded as NULL; validation fails on them")
    checked = stats if check_tables is None else [s for s in stats if s.table in check_tables]
    _enforce_reject_threshold(con, checked, stg("rejects"), config.max_reject_share)
    return stats


def _check_columns(definition: DatasetDefinition, files: dict[str, SourceFile],
                   raw: dict[str, RawTable]) -> RawColumns:
    """Name the file and column when a column reference is missing (before any SQL fails)."""
    cols = RawColumns({t: r.columns for t, r in raw.items()})
    ev = definition.events
    refs = [(ev.table, ev.user), *((ev.table, f.column) for f in ev.fields if f.column)]
    if ev.time.column:
        refs.append((ev.table, ev.time.column))
    for lk in ev.lookups:
        refs += [(ev.table, a) for a in lk.join] + [(lk.table, b) for b in lk.join.values()]
    if definition.users:
        us = definition.users
        refs += [(us.table, us.user)] + [(us.table, f.column) for f in us.labels + us.attributes if f.column]
    refs += [(s.table, c) for ct in definition.codes.values() for s in ct.sources if s.table
             for c in (s.code, s.description) if c]
    missing: dict[str, list[str]] = {}
    for table, ref in refs:
        if cols.find(ref, table) is None:
            missing.setdefault(table, []).append(ref)
    for table, names in missing.items():
        raise IngestError(f"{files[table].path.name}: missing column(s) {sorted(set(names))}; "
                          f"the file has {raw[table].columns}")
    return cols


def _check_expressions(box: Sandbox, definition: DatasetDefinition, events_from: str) -> None:
    """Bind each `sql:` expression on its own, so a typo is reported with its place in the mapping."""
    for path, table, sql in definition.sql_expressions():
        from_sql = events_from if table == definition.events.table else sql_ident(table)
        try:
            box.execute(f"SELECT {expression(sql)} FROM {from_sql} LIMIT 0")
        except duckdb.Error as e:
            raise IngestError(f"{definition.origin}: {path}: {duckdb_message(e)}") from None


def _evaluate(box: Sandbox, definition: DatasetDefinition, sql: str, from_sql: str, table: str,
              what: str):
    """The typed rows as Arrow; an expression that fails on some value is named with its mapping path."""
    try:
        return box.to_arrow(sql)
    except duckdb.Error as e:
        for path, expr_table, expr in definition.sql_expressions():
            if expr_table != table:
                continue
            try:
                box.execute(f"SELECT count({expression(expr)}) FROM {from_sql}")
            except duckdb.Error as inner:
                raise IngestError(f"{definition.origin}: {path}: {duckdb_message(inner)}") from None
        raise IngestError(f"{what}: typing failed ({duckdb_message(e)})") from None


def _typed_select(columns: list[TypedColumn], table: str, line: str, from_sql: str, raw_cols: RawColumns,
                  delimiter: str) -> str:
    # The raw record is rebuilt from the text columns so a reject shows what the file said.
    raw_record = (f"concat_ws({sql_str(delimiter)}, " +
                  ", ".join(f"coalesce({raw_cols.sql(c, table)}, '')" for c in raw_cols.tables[table]) + ")")
    values = ", ".join(f"{c.value} AS {sql_ident(c.name)}" for c in columns)
    return (f"SELECT {sql_ident(table)}.{sql_ident(line)} AS __line, {raw_record} AS __raw, "
            f"{reasons(columns)} AS __reason, {values} FROM {from_sql}")


def _split(con: duckdb.DuckDBPyConnection, parsed, target: str, rejects: str, source: str,
           names: list[str], order: str, keys: list[str]) -> tuple[str, dict[str, dict]]:
    """Rows that parsed (an Arrow table from the sandbox) go to `target`, the others to `rejects`;
    also `{source: {key: {"rows": n, "lines": [...]}}}` for the parsed rows whose `keys` are empty: they
    load (a missing value is not malformed) and validation fails on them, but only here are their lines known."""
    view = "__typed_rows"
    con.register(view, parsed)
    try:
        cols = ", ".join(sql_ident(n) for n in names)
        con.execute(f"CREATE TABLE {target} AS SELECT {cols} FROM {view} WHERE __reason IS NULL ORDER BY {order}")
        con.execute(f"CREATE TABLE {rejects} AS SELECT {sql_str(source)} AS source, __line AS row_number, "
                    f"__raw AS raw_record, __reason AS reason FROM {view} WHERE __reason IS NOT NULL")
        per_key = ", ".join(f"count(*) FILTER (WHERE {sql_ident(k)} IS NULL), "
                            f"(list(__line ORDER BY __line) FILTER (WHERE {sql_ident(k)} IS NULL))[1:{NULL_KEY_LINES}]"
                            for k in keys)  # one scan for every key
        found = con.execute(f"SELECT {per_key} FROM {view} WHERE __reason IS NULL").fetchall()[0]
        missing = {k: {"rows": n, "lines": lines} for k, n, lines in zip(keys, found[::2], found[1::2]) if n}
    finally:
        con.unregister(view)
    return rejects, ({source: missing} if missing else {})


def _events_from(con, definition: DatasetDefinition, raw: dict[str, RawTable], cols: RawColumns,
                 files: dict[str, SourceFile]) -> str:
    """The FROM clause of the events, in the sandbox: the events table and its lookups, joined."""
    ev = definition.events
    from_sql = sql_ident(ev.table)
    for lk in ev.lookups:
        keys = [cols.find(b, lk.table)[1] for b in lk.join.values()]
        _check_unique_lookup(con, raw[lk.table].table, lk.table, keys, files[lk.table])
        cond = " AND ".join(f"{cols.sql(a, ev.table)} = {cols.sql(b, lk.table)}" for a, b in lk.join.items())
        from_sql += f" LEFT JOIN {sql_ident(lk.table)} ON {cond}"
    return from_sql


def _build_events(con, box: Sandbox, definition: DatasetDefinition, raw: dict[str, RawTable], cols: RawColumns,
                  files: dict[str, SourceFile], from_sql: str, target: str, rejects: str) -> str:
    ev = definition.events
    columns = [user_column(ev.user, ev.user_dtype, ev.table, cols), time_column(ev.time, ev.table, cols)]
    columns += [field_column(f, ev.table, cols, _pad(definition, f)) for f in ev.fields]
    delimiter = definition.tables[ev.table].delimiter or ","
    sql = _typed_select(columns, ev.table, raw[ev.table].line, from_sql, cols, delimiter)
    parsed = _evaluate(box, definition, sql, from_sql, ev.table, files[ev.table].path.name)
    return _split(con, parsed, target, rejects, files[ev.table].path.name, [c.name for c in columns],
                  "user_id, event_time", ["user_id", "event_time"])


def _build_users(con, box: Sandbox, definition: DatasetDefinition, raw: dict[str, RawTable], cols: RawColumns,
                 files: dict[str, SourceFile], target: str, rejects: str) -> str:
    us = definition.users
    columns = [user_column(us.user, definition.events.user_dtype, us.table, cols)]
    columns += [field_column(f, us.table, cols, _pad(definition, f)) for f in [*us.labels, *us.attributes]]
    delimiter = definition.tables[us.table].delimiter or ","
    from_sql = sql_ident(us.table)
    sql = _typed_select(columns, us.table, raw[us.table].line, from_sql, cols, delimiter)
    # Label files of transaction datasets repeat the user's label on every row: keep one.
    sql = f"SELECT DISTINCT ON (__reason IS NULL, {', '.join(sql_ident(c.name) for c in columns)}) * FROM ({sql})"
    parsed = _evaluate(box, definition, sql, from_sql, us.table, files[us.table].path.name)
    return _split(con, parsed, target, rejects, files[us.table].path.name, [c.name for c in columns], "user_id",
                  ["user_id"])


def _pad(definition: DatasetDefinition, f) -> int | None:
    return definition.codes[f.codes].pad if f.codes else None


def _check_unique_lookup(con, table: str, name: str, keys: list[str], src: SourceFile) -> None:
    cols = ", ".join(sql_ident(k) for k in keys)
    dupes = con.execute(f"SELECT {cols}, count(*) FROM {table} GROUP BY ALL HAVING count(*) > 1 LIMIT 5").fetchall()
    if dupes:
        raise IngestError(f"{src.path.name}: {name} must have one row per {keys}, but these repeat: {dupes}; "
                          "joining it would duplicate events")


def _file_stats(con, files: dict[str, SourceFile], raw: dict[str, RawTable], rejects: str,
                null_keys: dict[str, dict]) -> list[FileStats]:
    counts = dict(con.execute(f"SELECT source, count(DISTINCT row_number) FROM {rejects} GROUP BY 1").fetchall())
    return [FileStats(table, src.path.name, src.sha256, raw[table].rows_read, counts.get(src.path.name, 0),
                      null_keys.get(src.path.name, {}))
            for table, src in files.items()]


DECIMAL_COMMA = re.compile(r'field (\S+): cannot read "[-+]?[\d.]*\d,\d+" as [A-Z]+(;|$)')  # not read as such yet


def _reject_hints(file: str, reasons: list[str]) -> list[str]:
    """What to change in the mapping for the two rejects a European or Windows export gives on every row."""
    hints = []
    if any(r.startswith("INVALID ENCODING") for r in reasons):
        hints.append(f"    {file} is not UTF-8: declare its encoding on its table in the mapping, e.g. "
                     f"`{{file: {file}, encoding: latin-1}}` (or utf-16)")
    comma = next((m.group(1) for m in map(DECIMAL_COMMA.search, reasons) if m), None)
    if comma:
        hints.append(f"    field {comma} has a decimal comma: add `decimal: \",\"` to it (and `thousands: \".\"` "
                     "when values like 1.234,56 appear; README: 'Describing your own data')")
    return hints


def _enforce_reject_threshold(con, stats: list[FileStats], rejects: str, max_share: float) -> None:
    bad = [s for s in stats if s.reject_share > max_share]
    if not bad:
        return
    lines = []
    for s in bad:
        examples = con.execute(
            f"SELECT row_number, reason FROM {rejects} WHERE source = ? ORDER BY row_number LIMIT 5", [s.file]
        ).fetchall()
        rows = con.execute(
            f"SELECT list(row_number ORDER BY row_number) FROM (SELECT DISTINCT row_number FROM {rejects} "
            f"WHERE source = ? ORDER BY 1 LIMIT 20)", [s.file]).fetchall()[0][0]
        lines.append(f"{s.file}: {s.rows_rejected} of {s.rows_read} rows rejected ({s.reject_share:.2%}, "
                     f"threshold {max_share:.2%}); rows {', '.join(map(str, rows))}"
                     f"{' ...' if s.rows_rejected > len(rows) else ''}")
        lines += [f"    row {n}: {reason}" for n, reason in examples]
        lines += _reject_hints(s.file, [reason or "" for _, reason in examples])
    raise IngestError("too many malformed rows; the warehouse was left unchanged\n" + "\n".join(lines) +
                      "\nFix the file, or raise the threshold with --max-reject-share.")


def _refuse_shrink(name: str, previous: dict | None, n_events: int, n_users: int, allowed: bool) -> None:
    if previous is None or allowed:
        return
    drops = []
    for what, before, now in (("events", previous["events"], n_events), ("users", previous["users"], n_users)):
        if before and (now == 0 or (before - now) / before > MAX_SHRINK):
            drops.append(f"{what} {before:,} -> {now:,} ({(before - now) / before:.0%} fewer)")
    if drops:
        raise IngestError(f"{name}: this source would shrink the dataset against ingest {previous['ingest_id']}: "
                          f"{'; '.join(drops)} (more than {MAX_SHRINK:.0%} or down to none, e.g. a truncated or "
                          "header-only file); the warehouse was left unchanged. Check the files, or pass "
                          "--allow-shrink to replace the data anyway")


def _refuse_dropping_appends(con, name: str, schema: str, previous: dict | None, n_events: int,
                             allowed: bool) -> None:
    """After `ingest --append`, a full ingest of a source without the appended events (yesterday's full
    export, run again by mistake) would drop them: fewer events than stored needs `allow_shrink`."""
    if previous is None or allowed or n_events >= previous["events"] or not table_exists(con, schema, "ingest_delta"):
        return
    row = con.execute(f"SELECT ingest_id FROM {sql_ident(schema)}.ingest_delta WHERE ingest_id = ?",
                      [previous["ingest_id"]]).fetchall()
    if row:
        raise IngestError(f"{name}: the stored data includes events appended by ingest {previous['ingest_id']} "
                          f"(`ingest --append`); this source has {n_events:,} events against {previous['events']:,} "
                          "stored, so replacing the data would drop appended events; the warehouse was left "
                          "unchanged. Ingest a source that includes them, append to it, or pass --allow-shrink")


def _stage_ingest_log(con, schema: str, target: str, row: dict) -> None:
    cols = ", ".join(f"? AS {k}" for k in row)
    con.execute(f"CREATE TABLE {target} AS SELECT {cols}", list(row.values()))
    if table_exists(con, schema, "ingest_log"):
        con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM {sql_ident(schema)}.ingest_log")


def _summary(con, definition: DatasetDefinition, previous: dict, skipped: bool) -> IngestResult:
    files = [FileStats(**f) for f in json.loads(previous["files"])]
    return IngestResult(definition.name, definition.schema, previous["ingest_id"], previous["source_hash"],
                        previous["events"], previous["users"], previous["rejects"], files, skipped)
