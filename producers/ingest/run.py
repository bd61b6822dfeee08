"""Ingest a dataset's raw files into its warehouse schema, atomically and idempotently.

1. find and hash the files; skip when this exact source and definition are already ingested
2. load each file as text into staging tables, keeping line numbers and structural rejects
3. type every column in SQL; rows whose values do not parse become rejects with a reason
4. stop, leaving the warehouse untouched, when a file's rejected share exceeds the threshold
5. swap all staging tables into place in one transaction and append to the ingest log
"""
from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.ingest.codes import build_codes
from producers.ingest.raw_load import RawTable, load_raw, sql_str
from producers.ingest.source_files import SourceFile, locate, source_hash, unpack_if_zip
from producers.ingest.typed_sql import TypedColumn, field_column, qualify, reasons, time_column, user_column
from producers.provenance import code_version
from producers.warehouse import (STAGING_SUFFIX, Home, check_schema_owner, drop_staging, last_ingest, swap_tables,
                                 table_exists)

SWAPPED_TABLES = ["events", "users", "codes", "rejects", "dataset_meta", "ingest_log"]


class IngestError(RuntimeError):
    """The source could not be ingested; the warehouse is as it was before."""


@dataclass(frozen=True)
class IngestConfig:
    source: Path
    max_reject_share: float = 0.01  # per file
    force: bool = False  # re-ingest even when the source is unchanged


@dataclass
class FileStats:
    table: str
    file: str
    sha256: str
    rows_read: int
    rows_rejected: int

    @property
    def reject_share(self) -> float:
        return self.rows_rejected / self.rows_read if self.rows_read else 0.0


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
                log(f"{definition.name}: source unchanged since ingest {previous['ingest_id']}; skipping (--force re-runs)")
                return _summary(con, definition, previous, skipped=True)
            con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            drop_staging(con, schema)
            try:
                return _ingest(con, definition, config, files, data_hash, log)
            finally:
                drop_staging(con, schema)
        finally:
            con.close()


def _ingest(con: duckdb.DuckDBPyConnection, definition: DatasetDefinition, config: IngestConfig,
            files: dict[str, SourceFile], data_hash: str, log: Callable[[str], None]) -> IngestResult:
    schema = definition.schema
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    ingest_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]

    raw: dict[str, RawTable] = {}
    for table, src in files.items():
        log(f"reading {src.path.name} ({table})")
        try:
            raw[table] = load_raw(con, schema, src, definition.tables[table])
        except duckdb.Error as e:
            first = str(e).strip().splitlines()[0]
            raise IngestError(f"{src.path.name}: cannot be read ({first}); check its delimiter, quote and "
                              f"encoding in the definition of table {table!r}") from e
    _check_columns(definition, files, raw)

    stg = lambda name: f'"{schema}"."{name}{STAGING_SUFFIX}"'  # noqa: E731
    log("typing events")
    type_rejects = [_build_events(con, definition, raw, files, stg("events"), stg("evrej"))]
    if definition.users:
        log("typing users")
        type_rejects.append(_build_users(con, definition, raw, files, stg("users"), stg("usrej")))
    else:
        con.execute(f"CREATE TABLE {stg('users')} AS SELECT DISTINCT user_id FROM {stg('events')} ORDER BY 1")
    build_codes(con, stg("codes"), definition.codes, {t: r.table for t, r in raw.items()})

    rejects = [r.rejects for r in raw.values() if r.rejects] + type_rejects
    con.execute(f"CREATE TABLE {stg('rejects')} AS " +
                " UNION ALL ".join(f"SELECT source, row_number, raw_record, reason FROM {t}" for t in rejects) +
                " ORDER BY source, row_number")

    stats = _file_stats(con, files, raw, stg("rejects"))
    _enforce_reject_threshold(con, stats, stg("rejects"), config.max_reject_share)

    n_events = con.execute(f"SELECT count(*) FROM {stg('events')}").fetchone()[0]
    n_users = con.execute(f"SELECT count(*) FROM {stg('users')}").fetchone()[0]
    n_rejects = sum(s.rows_rejected for s in stats)
    con.execute(f"CREATE TABLE {stg('dataset_meta')} AS SELECT ? AS name, ? AS definition, "
                f"? AS definition_fingerprint, ? AS source_hash, ? AS ingest_id",
                [definition.name, json.dumps(definition.model_dump(mode="json")), definition.fingerprint(),
                 data_hash, ingest_id])
    _stage_ingest_log(con, schema, stg("ingest_log"), {
        "ingest_id": ingest_id, "dataset": definition.name, "source": str(config.source),
        "files": json.dumps([s.__dict__ for s in stats]), "source_hash": data_hash,
        "definition_fingerprint": definition.fingerprint(),
        "rows_read": sum(s.rows_read for s in stats), "events": n_events, "users": n_users,
        "rejects": n_rejects, "max_reject_share": config.max_reject_share,
        "started_at": started, "finished_at": datetime.now(timezone.utc).replace(tzinfo=None),
        "code_version": code_version(),
    })
    log("swapping tables into place")
    swap_tables(con, schema, SWAPPED_TABLES)
    return IngestResult(definition.name, schema, ingest_id, data_hash, n_events, n_users, n_rejects, stats)


def _check_columns(definition: DatasetDefinition, files: dict[str, SourceFile], raw: dict[str, RawTable]) -> None:
    """Name the file and column when a plain column reference is missing (before any SQL fails)."""
    needed: dict[str, set[str]] = {t: set() for t in raw}
    ev = definition.events
    needed[ev.table].add(ev.user)
    if ev.time.column:
        needed[ev.table].add(ev.time.column)
    for lk in ev.lookups:
        needed[ev.table].update(lk.join)
        needed[lk.table].update(lk.join.values())
    refs = [(ev.table, f.column) for f in ev.fields if f.column]
    if definition.users:
        needed[definition.users.table].add(definition.users.user)
        refs += [(definition.users.table, f.column) for f in definition.users.labels + definition.users.attributes
                 if f.column]
    for table, col in refs:
        tbl, _, name = col.rpartition(".")
        needed[tbl or table].add(name)
    for table, cols in needed.items():
        missing = sorted(cols - set(raw[table].columns))
        if missing:
            raise IngestError(f"{files[table].path.name}: missing column(s) {missing}; "
                              f"the file has {raw[table].columns}")


def _typed_select(columns: list[TypedColumn], table: str, from_sql: str, raw_cols: list[str],
                  delimiter: str) -> str:
    # The raw record is rebuilt from the text columns so a reject shows what the file said.
    raw_record = f"concat_ws({sql_str(delimiter)}, " + ", ".join(f"coalesce({qualify(c, table)}, '')" for c in raw_cols) + ")"
    values = ", ".join(f'{c.value} AS "{c.name}"' for c in columns)
    return (f'SELECT "{table}"._line AS _line, {raw_record} AS _raw, {reasons(columns)} AS _reason, {values} '
            f"FROM {from_sql}")


def _split(con: duckdb.DuckDBPyConnection, parsed_sql: str, target: str, rejects: str, source: str,
           names: list[str], order: str) -> str:
    """Rows that parsed go to `target`, the others to `rejects`."""
    parsed = target.replace(STAGING_SUFFIX, "_parsed" + STAGING_SUFFIX)
    con.execute(f"CREATE TABLE {parsed} AS {parsed_sql}")
    cols = ", ".join(f'"{n}"' for n in names)
    con.execute(f"CREATE TABLE {target} AS SELECT {cols} FROM {parsed} WHERE _reason IS NULL ORDER BY {order}")
    con.execute(f"CREATE TABLE {rejects} AS SELECT {sql_str(source)} AS source, _line AS row_number, "
                f"_raw AS raw_record, _reason AS reason FROM {parsed} WHERE _reason IS NOT NULL")
    con.execute(f"DROP TABLE {parsed}")
    return rejects


def _build_events(con, definition: DatasetDefinition, raw: dict[str, RawTable], files: dict[str, SourceFile],
                  target: str, rejects: str) -> str:
    ev = definition.events
    columns = [user_column(ev.user, ev.user_dtype, ev.table), time_column(ev.time, ev.table)]
    columns += [field_column(f, ev.table, _pad(definition, f)) for f in ev.fields]
    from_sql = f'{raw[ev.table].table} AS "{ev.table}"'
    for lk in ev.lookups:
        _check_unique_lookup(con, raw[lk.table].table, lk.table, list(lk.join.values()), files[lk.table])
        cond = " AND ".join(f"{qualify(a, ev.table)} = {qualify(b, lk.table)}" for a, b in lk.join.items())
        from_sql += f' LEFT JOIN {raw[lk.table].table} AS "{lk.table}" ON {cond}'
    delimiter = definition.tables[ev.table].delimiter or ","
    sql = _typed_select(columns, ev.table, from_sql, raw[ev.table].columns, delimiter)
    return _split(con, sql, target, rejects, files[ev.table].path.name, [c.name for c in columns],
                  "user_id, event_time")


def _build_users(con, definition: DatasetDefinition, raw: dict[str, RawTable], files: dict[str, SourceFile],
                 target: str, rejects: str) -> str:
    us = definition.users
    columns = [user_column(us.user, definition.events.user_dtype, us.table)]
    columns += [field_column(f, us.table, _pad(definition, f)) for f in [*us.labels, *us.attributes]]
    delimiter = definition.tables[us.table].delimiter or ","
    sql = _typed_select(columns, us.table, f'{raw[us.table].table} AS "{us.table}"', raw[us.table].columns, delimiter)
    # Label files of transaction datasets repeat the user's label on every row: keep one.
    sql = f"SELECT DISTINCT ON (_reason IS NULL, {', '.join(c.name for c in columns)}) * FROM ({sql})"
    return _split(con, sql, target, rejects, files[us.table].path.name, [c.name for c in columns], "user_id")


def _pad(definition: DatasetDefinition, f) -> int | None:
    return definition.codes[f.codes].pad if f.codes else None


def _check_unique_lookup(con, table: str, name: str, keys: list[str], src: SourceFile) -> None:
    cols = ", ".join(f'"{k}"' for k in keys)
    dupes = con.execute(f"SELECT {cols}, count(*) FROM {table} GROUP BY ALL HAVING count(*) > 1 LIMIT 5").fetchall()
    if dupes:
        raise IngestError(f"{src.path.name}: {name} must have one row per {keys}, but these repeat: {dupes}; "
                          "joining it would duplicate events")


def _file_stats(con, files: dict[str, SourceFile], raw: dict[str, RawTable], rejects: str) -> list[FileStats]:
    counts = dict(con.execute(f"SELECT source, count(DISTINCT row_number) FROM {rejects} GROUP BY 1").fetchall())
    return [FileStats(table, src.path.name, src.sha256, raw[table].rows_read, counts.get(src.path.name, 0))
            for table, src in files.items()]


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
            f"WHERE source = ? ORDER BY 1 LIMIT 20)", [s.file]).fetchone()[0]
        lines.append(f"{s.file}: {s.rows_rejected} of {s.rows_read} rows rejected ({s.reject_share:.2%}, "
                     f"threshold {max_share:.2%}); rows {', '.join(map(str, rows))}"
                     f"{' ...' if s.rows_rejected > len(rows) else ''}")
        lines += [f"    row {n}: {reason}" for n, reason in examples]
    raise IngestError("too many malformed rows; the warehouse was left unchanged\n" + "\n".join(lines) +
                      "\nFix the file, or raise the threshold with --max-reject-share.")


def _stage_ingest_log(con, schema: str, target: str, row: dict) -> None:
    cols = ", ".join(f"? AS {k}" for k in row)
    con.execute(f"CREATE TABLE {target} AS SELECT {cols}", list(row.values()))
    if table_exists(con, schema, "ingest_log"):
        con.execute(f'INSERT INTO {target} BY NAME SELECT * FROM "{schema}".ingest_log')


def _summary(con, definition: DatasetDefinition, previous: dict, skipped: bool) -> IngestResult:
    files = [FileStats(**f) for f in json.loads(previous["files"])]
    return IngestResult(definition.name, definition.schema, previous["ingest_id"], previous["source_hash"],
                        previous["events"], previous["users"], previous["rejects"], files, skipped)
