"""Append new event files to an ingested dataset: only what is new is added, nothing stored is lost.

1. refuse when the dataset was never ingested, or its definition changed since (a full ingest then)
2. find the new files; a table the new source lacks (a lookup, the users file) is read from the
   last ingest's source that still holds it unchanged (same sha256 as recorded)
3. type the new files exactly as `ingest` does (same staging, sandbox, rejects and per-file
   reject threshold; only the new source's files are held to the threshold)
4. keep the new events whose event key is not stored yet (and not repeated within the new files);
   a dataset without `events.key` is deduplicated on all its event columns
5. in one transaction: insert the new events, users and codes, the new files' rejects, an
   `ingest_log` row (so later stages see a new data version and the data gate runs again), and
   a row in `ingest_delta` (files, rows added, duplicates skipped, users touched, time range) and
   one per touched user in `ingest_delta_users`

Existing events, users and codes are never updated or deleted: an append only inserts. A
killed append leaves the previous tables (DuckDB rolls back an uncommitted transaction).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.stores.warehouse import (STAGING_SUFFIX, Home, check_schema_owner, drop_staging, forget_dataset_state,
                                        last_ingest, one, sql_ident, table_exists, transaction)
from producers.ingest.run import FileStats, IngestConfig, IngestError, stage_tables
from producers.ingest.source_files import SourceError, SourceFile, _first_match, locate, unpack_if_zip
from producers.stores.cache import sha256_file
from producers.stores.provenance import code_version

DELTA_TABLE = "ingest_delta"
DELTA_USERS_TABLE = "ingest_delta_users"  # per append, each touched user's added events (late events included)
DELTA_COLUMNS = """ingest_id VARCHAR, dataset VARCHAR, source VARCHAR, files VARCHAR, rows_read BIGINT,
    rows_added BIGINT, duplicates_skipped BIGINT, rejects BIGINT, users_touched BIGINT, users_new BIGINT,
    min_event_time TIMESTAMP, max_event_time TIMESTAMP, dedupe_key VARCHAR, source_hash VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP, code_version VARCHAR"""


@dataclass
class AppendResult:
    dataset: str
    schema: str
    ingest_id: str | None  # None: nothing was new, the warehouse is unchanged
    source_hash: str  # the data version after the append
    files: list[FileStats]  # the new source's files
    rows_read: int
    rows_added: int
    duplicates_skipped: int
    rejects: int
    users_touched: int  # users with at least one added event
    users_new: int  # of those, users without a stored event before
    min_event_time: datetime | None
    max_event_time: datetime | None
    dedupe_key: list[str]
    dedupe_on_all_columns: bool  # the dataset declares no events.key
    n_events: int  # stored after the append
    n_users: int
    fallback_files: dict[str, str] = field(default_factory=dict)  # table -> file read from an earlier source
    n_event_users: int | None = None  # users with events after the append (n_users counts the users table)

    @property
    def changed(self) -> bool:
        return self.ingest_id is not None


def append(home: Home, definition: DatasetDefinition, config: IngestConfig,
           log: Callable[[str], None] = lambda _: None) -> AppendResult:
    schema = definition.schema
    with tempfile.TemporaryDirectory(prefix="llm4es-append-") as scratch:
        con = home.connect()
        try:
            check_schema_owner(con, definition.name)
            previous = last_ingest(con, schema)
            if previous is None or not table_exists(con, schema, "events"):
                raise IngestError(f"{definition.name} has no stored events to append to: run "
                                  f"`llm4es ingest {definition.name}` first")
            if previous["definition_fingerprint"] != definition.fingerprint():
                raise IngestError(f"{definition.name}: the definition changed since ingest {previous['ingest_id']}; "
                                  "appending would mix events typed two ways: re-ingest the full source instead")
            files, fallback = _locate(con, definition, Path(config.source), Path(scratch))
            drop_staging(con, schema)
            try:
                return _append(con, definition, config, files, fallback, previous, log)
            finally:
                drop_staging(con, schema)
        finally:
            forget_dataset_state(con)  # within a hold, the old definition, ingest and verdict were remembered
            con.close()


def _locate(con, definition: DatasetDefinition, source: Path,
            scratch: Path) -> tuple[dict[str, SourceFile], dict[str, str]]:
    """The new source's files, plus earlier sources' unchanged files for the tables it lacks."""
    folder = unpack_if_zip(source, scratch / "new")
    found: dict[str, SourceFile] = {}
    missing = []
    for table in definition.tables:
        try:
            found.update(locate(definition.model_copy(update={"tables": {table: definition.tables[table]}}), folder))
        except SourceError:
            missing.append(table)
    events_table = definition.events.table
    if events_table in missing:
        spec = definition.tables[events_table]
        raise SourceError(f"{definition.name}: the new source {source} has no events file (one of "
                          f"{spec.candidates}); an append needs the new events")
    fallback: dict[str, str] = {}
    if missing:
        earlier = con.execute(f"SELECT source, files FROM {sql_ident(definition.schema)}.ingest_log "
                              "ORDER BY finished_at DESC").fetchall()
        for table in missing:
            hit = _earlier_file(definition, table, earlier, scratch)
            if hit is None:
                raise SourceError(
                    f"{definition.name}: table {table!r} ({definition.tables[table].candidates}) is neither in the "
                    f"new source {source} nor, unchanged, in an earlier ingest's source: "
                    "put its file beside the new events")
            found[table] = hit
            fallback[table] = str(hit.path)
    return found, fallback


def _earlier_file(definition: DatasetDefinition, table: str, earlier: list[tuple[str, str]],
                  scratch: Path) -> SourceFile | None:
    for i, (source, files_json) in enumerate(earlier):
        recorded = {f["table"]: f["sha256"] for f in json.loads(files_json)}
        if table not in recorded or not Path(source).exists():
            continue
        try:
            folder = unpack_if_zip(Path(source), scratch / f"earlier{i}")
        except SourceError:
            continue
        path = _first_match(folder, definition.tables[table].candidates)
        if path is not None and path.resolve().is_relative_to(folder.resolve()):
            sha = sha256_file(path)
            if sha == recorded[table]:
                return SourceFile(table, path, sha)
    return None


def _append(con: duckdb.DuckDBPyConnection, definition: DatasetDefinition, config: IngestConfig,
            files: dict[str, SourceFile], fallback: dict[str, str], previous: dict,
            log: Callable[[str], None]) -> AppendResult:
    schema = definition.schema
    q = lambda name: f"{sql_ident(schema)}.{sql_ident(name)}"  # noqa: E731
    stg = lambda name: q(name + STAGING_SUFFIX)  # noqa: E731
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    new_tables = {t for t in files if t not in fallback}
    staged_definition, files = _skip_unchanged_users(definition, files, fallback)
    all_stats = stage_tables(con, staged_definition, config, files, log, check_tables=new_tables)
    stats = [s for s in all_stats if s.table in new_tables]
    new_names = sorted({s.file for s in stats})

    columns = [r[0] for r in con.execute(f"DESCRIBE {stg('events')}").fetchall()]
    key = list(definition.events.key or columns)
    if not definition.events.key:
        log(f"{definition.name} declares no events.key: duplicates are rows equal in every column "
            f"({', '.join(columns)})")
    _add_new_events(con, q("events"), stg("events"), stg("added"), key, columns)

    rows_read = sum(s.rows_read for s in stats if s.table == definition.events.table)
    n_valid = one(con, f"SELECT count(*) FROM {stg('events')}")[0]
    n_added, touched, new_users, t_min, t_max = one(con, f"""
        SELECT count(*), count(DISTINCT a.user_id),
               count(DISTINCT a.user_id) FILTER (WHERE NOT EXISTS (
                   SELECT 1 FROM {q('events')} e WHERE e.user_id = a.user_id)),  -- not the users file: it may omit some
               min(a.event_time), max(a.event_time)
        FROM {stg('added')} AS a""")
    # The new files' rejects, less those a re-sent file already put there.
    n_rejects = one(con, f"SELECT count(DISTINCT (source, row_number)) FROM {stg('rejects')} "
                         f"WHERE source IN (SELECT unnest(?::VARCHAR[]))", [new_names])[0]
    con.execute(f"CREATE TABLE {stg('new_rejects')} AS SELECT n.* FROM {stg('rejects')} n ANTI JOIN {q('rejects')} o "
                "ON n.source = o.source AND n.row_number = o.row_number AND n.raw_record IS NOT DISTINCT FROM "
                "o.raw_record WHERE n.source IN (SELECT unnest(?::VARCHAR[]))", [new_names])
    n_new_rejects = one(con, f"SELECT count(DISTINCT (source, row_number)) FROM {stg('new_rejects')}")[0]
    # Users and codes: only ids not stored yet (an append never rewrites a stored label).
    if staged_definition.users is definition.users:
        con.execute(f"CREATE TABLE {stg('new_users')} AS SELECT * FROM {stg('users')} "
                    f"WHERE user_id NOT IN (SELECT user_id FROM {q('users')})")
    else:  # the users file was not read again: no user to add
        con.execute(f"CREATE TABLE {stg('new_users')} AS SELECT * FROM {q('users')} LIMIT 0")
    con.execute(f"CREATE TABLE {stg('new_codes')} AS SELECT n.* FROM {stg('codes')} n ANTI JOIN {q('codes')} o "
                "ON n.code_table IS NOT DISTINCT FROM o.code_table AND n.code IS NOT DISTINCT FROM o.code")
    n_new_user_rows = one(con, f"SELECT count(*) FROM {stg('new_users')}")[0]
    n_new_codes = one(con, f"SELECT count(*) FROM {stg('new_codes')}")[0]

    n_events_before = one(con, f"SELECT count(*) FROM {q('events')}")[0]
    n_users_before = one(con, f"SELECT count(*) FROM {q('users')}")[0]
    common = dict(dataset=definition.name, schema=schema, files=stats, rows_read=rows_read,
                  duplicates_skipped=n_valid - n_added, rejects=n_rejects, dedupe_key=key,
                  dedupe_on_all_columns=not definition.events.key, fallback_files=fallback)
    if not (n_added or n_new_rejects or n_new_user_rows or n_new_codes):
        log(f"{definition.name}: nothing new in {config.source} ({n_valid - n_added:,} events already stored); "
            "the warehouse is unchanged")
        return AppendResult(ingest_id=None, source_hash=previous["source_hash"], rows_added=0, users_touched=0,
                            users_new=0, min_event_time=None, max_event_time=None, n_events=n_events_before,
                            n_users=n_users_before, **common)

    ingest_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    # The data version after the append: the previous one chained with the new files' hashes, so
    # every output keyed by it (texts, embeddings) knows the data changed.
    h = hashlib.sha256(previous["source_hash"].encode())
    for s in sorted(stats, key=lambda s: s.table):
        h.update(f"{s.table}:{s.sha256}\n".encode())
    data_hash = h.hexdigest()[:16]
    n_events = n_events_before + n_added
    n_users = n_users_before + n_new_user_rows
    n_event_users = one(con, f"SELECT count(DISTINCT user_id) FROM {q('events')}")[0] + new_users
    total_rejects = one(con, f"SELECT count(DISTINCT (source, row_number)) FROM {q('rejects')}")[0] + n_new_rejects
    # ingest_log lists every file the stored data came from, so the data gate checks reject shares of all.
    all_files = json.loads(previous["files"]) + [asdict(s) for s in stats]
    finished = datetime.now(timezone.utc).replace(tzinfo=None)
    source = str(Path(config.source).resolve())
    delta = {"ingest_id": ingest_id, "dataset": definition.name, "source": source,
             "files": json.dumps([asdict(s) for s in stats]), "rows_read": rows_read, "rows_added": n_added,
             "duplicates_skipped": n_valid - n_added, "rejects": n_rejects, "users_touched": touched,
             "users_new": new_users, "min_event_time": t_min, "max_event_time": t_max,
             "dedupe_key": json.dumps(key), "source_hash": data_hash, "started_at": started,
             "finished_at": finished, "code_version": code_version()}
    log_row = {"ingest_id": ingest_id, "dataset": definition.name, "source": source,
               "files": json.dumps(all_files), "source_hash": data_hash,
               "definition_fingerprint": definition.fingerprint(), "rows_read": previous["rows_read"] + rows_read,
               "events": n_events, "users": n_users, "rejects": total_rejects,
               "max_reject_share": config.max_reject_share, "started_at": started, "finished_at": finished,
               "code_version": code_version()}

    log(f"appending {n_added:,} events")
    with transaction(con):
        con.execute(f"INSERT INTO {q('events')} BY NAME SELECT * FROM {stg('added')}")
        con.execute(f"INSERT INTO {q('users')} BY NAME SELECT * FROM {stg('new_users')}")
        con.execute(f"INSERT INTO {q('codes')} BY NAME SELECT * FROM {stg('new_codes')}")
        con.execute(f"INSERT INTO {q('rejects')} BY NAME SELECT * FROM {stg('new_rejects')}")
        _insert_row(con, q("ingest_log"), log_row)
        con.execute(f"UPDATE {q('dataset_meta')} SET source_hash = ?, ingest_id = ?", [data_hash, ingest_id])
        con.execute(f"CREATE TABLE IF NOT EXISTS {q(DELTA_TABLE)} ({DELTA_COLUMNS})")
        _insert_row(con, q(DELTA_TABLE), delta)
        con.execute(f"CREATE TABLE IF NOT EXISTS {q(DELTA_USERS_TABLE)} AS SELECT ''::VARCHAR AS ingest_id, user_id, "
                    f"0::BIGINT AS events, event_time AS min_event_time, event_time AS max_event_time "
                    f"FROM {q('events')} LIMIT 0")
        con.execute(f"INSERT INTO {q(DELTA_USERS_TABLE)} SELECT ?, user_id, count(*), min(event_time), "
                    f"max(event_time) FROM {stg('added')} GROUP BY user_id ORDER BY user_id", [ingest_id])
    return AppendResult(ingest_id=ingest_id, source_hash=data_hash, rows_added=n_added, users_touched=touched,
                        users_new=new_users, min_event_time=t_min, max_event_time=t_max, n_events=n_events,
                        n_users=n_users, n_event_users=n_event_users, **common)


def _skip_unchanged_users(definition: DatasetDefinition, files: dict[str, SourceFile],
                          fallback: dict[str, str]) -> tuple[DatasetDefinition, dict[str, SourceFile]]:
    """An unchanged users file read from an earlier source adds no user: it is not read again.

    Its users are all stored; a new event's user missing from it stays missing (the data gate
    reports events of unknown users where the definition says the users file covers them)."""
    us = definition.users
    if us is None or us.table not in fallback or us.table == definition.events.table:
        return definition, files
    used_elsewhere = ({lk.table for lk in definition.events.lookups} |
                      {s.table for ct in definition.codes.values() for s in ct.sources if s.table})
    if us.table in used_elsewhere:
        return definition, files
    return (definition.model_copy(update={"users": None}),
            {t: f for t, f in files.items() if t != us.table})


def _add_new_events(con, stored: str, staged: str, target: str, key: list[str], columns: list[str]) -> None:
    """`target`: the staged events whose key is in neither the stored events nor earlier in the staged ones.

    Keys compare with IS NOT DISTINCT FROM, so a NULL in a key column matches a NULL (the same
    event sent twice must not count as two)."""
    cols = ", ".join(sql_ident(c) for c in columns)
    keys = ", ".join(sql_ident(k) for k in key)
    on = " AND ".join(f"n.{sql_ident(k)} IS NOT DISTINCT FROM o.{sql_ident(k)}" for k in key)
    # A key repeated within the new files is one event sent twice: keep one row of it.
    con.execute(f"""CREATE TABLE {target} AS
        SELECT {cols} FROM (SELECT DISTINCT ON ({keys}) * FROM {staged} ORDER BY {keys}, user_id, event_time) n
        ANTI JOIN {stored} o ON {on}
        ORDER BY user_id, event_time""")


def _insert_row(con, table: str, row: dict) -> None:
    cols = ", ".join(sql_ident(k) for k in row)
    con.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' for _ in row)})", list(row.values()))
