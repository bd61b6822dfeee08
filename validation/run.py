"""Run a dataset's checks with Great Expectations on the warehouse tables.

GX Core has no DuckDB data source (its generic SQL source fails on DuckDB), so each batch is a
pandas frame produced by a DuckDB query. Events are validated in chunks of at most
`chunk_rows` rows that hold whole users (partitioned by a hash of user_id), so per-user and
per-key checks stay exact while memory stays bounded; per-user counts and reject shares are
computed in SQL and validated as small frames.

`ValidateConfig.delta` (after `ingest --append`): the same checks on the users the last append touched
only (every event of theirs, their users rows, their event counts) instead of the whole tables, when the
data before that append passed its validation (else the whole tables, said in the log and the report).
Exact for every row-local check (not null, domains, finiteness, the time window, user known), and for the
per-user ones (events per user) since whole users are checked. Three checks would need the whole tables
and are not re-run on them: uniqueness of the event key across users and of user ids (the append adds
only keys and users not stored yet: its anti-joins make them unique by construction), and "the dataset
has events" (it had, and an append removes none). The schema and the append's reject shares are checked
as in a full run.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import duckdb
import pandas as pd

from producers.datasets.definition import DatasetDefinition
from producers.ingest.run import traced_lines
from producers.stores.outputs import atomic_write_text
from producers.stores.provenance import code_version
from producers.stores.warehouse import (Home, forget_dataset_state, last_ingest, sql_ident, stored_definition,
                                       table_exists)
from validation.suites import BATCHES, SESSION_BATCHES, Check, dataset_checks, non_finite_column, session_checks

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network here, and none wanted

EXAMPLES = 5
# Columns that say which row failed, shown next to each failing value.
INDEX_COLUMNS = {"events": ["user_id", "event_time"], "users": ["user_id"], "activity": ["user_id"],
                 "rejects": ["file"], "sessions": ["session_id"], "session_users": ["session_id"]}


@dataclass(frozen=True)
class ValidateConfig:
    chunk_rows: int = 2_000_000
    max_reject_share: float = 0.01
    data_docs: bool = True
    delta: bool = False  # only the users of the last append, when the data before it passed (see above)


@dataclass
class CheckResult:
    batch: str
    check: str
    expectation: str
    column: str
    success: bool
    checked: int = 0  # rows (or values) looked at
    failed: int = 0
    examples: list[Any] = field(default_factory=list)  # failing values
    where: list[dict] = field(default_factory=list)  # failing rows: the value with its row's key
    error: str | None = None  # the check could not run (e.g. the column is missing)
    lines: list[str] = field(default_factory=list)  # where in the source files, when ingest knew: "u.data lines 5, 10"


@dataclass
class ValidationReport:
    dataset: str
    run_id: str
    ingest_id: str
    success: bool
    results: list[CheckResult]
    json_path: Path
    data_docs: Path | None
    started_at: str
    code_version: str
    scope: str = "all"  # "all" tables, or "delta <ingest_id>: N users" (ValidateConfig.delta)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.success]


def validate(home: Home, dataset: str, config: ValidateConfig = ValidateConfig(),
             log: Callable[[str], None] = lambda _: None) -> ValidationReport:
    con = home.connect()
    try:
        definition = stored_definition(con, dataset)
        ingest = last_ingest(con, definition.schema)
        started = datetime.now(timezone.utc).replace(tzinfo=None)
        run_id = started.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        out_dir = home.reports_dir("validation", definition.schema)
        checks = dataset_checks(definition, config.max_reject_share)
        scope, frames = "all", None
        if config.delta:
            users, why = delta_users(con, definition.schema)
            if users is None:
                log(f"validating every row: {why}")
            else:
                scope = f"delta {ingest['ingest_id']}: {len(users):,} users"
                log(f"validating the last append's {len(users):,} users only ({ingest['ingest_id']})")
                checks = [c for c in checks if not _needs_whole_tables(c)]
                frames = _delta_frames(users)
        results = _run_checks(con, definition, checks, config, out_dir / "data_docs", log, frames=frames)
        _trace_null_keys(results, definition, ingest)
        report = ValidationReport(
            dataset=definition.name, run_id=run_id, ingest_id=ingest["ingest_id"],
            success=all(r.success for r in results), results=results,
            json_path=out_dir / f"{run_id}.json",
            data_docs=(out_dir / "data_docs" / "index.html") if config.data_docs else None,
            started_at=started.isoformat(), code_version=code_version(), scope=scope,
        )
        _write_json(report, out_dir)
        _log_run(con, definition.schema, report)
        return report
    finally:
        forget_dataset_state(con)  # within a hold, the old definition, ingest and verdict were remembered
        con.close()


def _run_checks(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, checks: list[Check],
                config: ValidateConfig, docs_dir: Path, log: Callable[[str], None],
                batches: tuple[str, ...] = BATCHES, frames: Callable | None = None) -> list[CheckResult]:
    """Run `checks` batch by batch; `frames(con, d, batch, chunk_rows)` yields each batch's frames.

    With data docs, through a GX checkpoint that updates them; without (the sessions checks, `--no-docs`),
    through `validation.frames` (one context per process, no registered suites: the same expectations and
    results, without GX's per-run setup)."""
    merged: dict[int, CheckResult] = {}
    frames = frames or _frames
    run = _docs_runner(d, docs_dir) if config.data_docs else None
    for batch in batches:
        batch_checks = [(i, c) for i, c in enumerate(checks) if c.batch == batch]
        if not batch_checks:
            continue
        fmt = {"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES,
               **({"unexpected_index_column_names": INDEX_COLUMNS[batch]} if batch in INDEX_COLUMNS else {})}
        expectations = [(c.expectation, c.kwargs, {"index": i, "check": c.description}) for i, c in batch_checks]
        validate_batch = run(batch, expectations, fmt) if run else _frames_runner(batch, expectations, fmt)
        for frame, params in frames(con, d, batch, config.chunk_rows):
            log(f"checking {batch} ({len(frame):,} rows)")
            for er in validate_batch(frame, params):
                index = er.expectation_config.meta["index"]
                _merge(merged, index, checks[index], er)
    return [merged[i] for i in sorted(merged)]


def _frames_runner(batch: str, expectations: list[tuple[str, dict, dict]], fmt: dict):
    from validation.frames import validate_frame

    return lambda frame, params: validate_frame(f"checks.{batch}", frame, expectations, fmt, params)


def _docs_runner(d: DatasetDefinition, docs_dir: Path):
    """(batch, expectations, result format) -> a function validating one frame of that batch through a
    checkpoint that writes the data docs under `docs_dir`."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # we print our own progress
    context.add_data_docs_site(site_name="llm4es", site_config={
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
    })
    source = context.data_sources.add_pandas(d.schema)

    def checkpoint(batch: str, expectations: list[tuple[str, dict, dict]], fmt: dict):
        suite = context.suites.add(gx.ExpectationSuite(name=f"{source.name}.{batch}"))
        for name, kwargs, meta in expectations:
            suite.add_expectation(getattr(gxe, name)(**kwargs, meta=meta))
        asset = source.add_dataframe_asset(batch)
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=f"{source.name}.{batch}", data=asset.add_batch_definition_whole_dataframe("all"), suite=suite))
        point = context.checkpoints.add(gx.Checkpoint(
            name=f"{source.name}.{batch}", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["llm4es"])], result_format=fmt))

        def run(frame, params):
            result = point.run(batch_parameters={"dataframe": frame}, expectation_parameters=params)
            return [er for vr in result.run_results.values() for er in vr.results]
        return run
    return checkpoint


def check_sessions(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, sessions: str, session_events: str,
                   explicit: bool, log: Callable[[str], None] = lambda _: None,
                   only_users: str | None = None) -> list[CheckResult]:
    """The sessions checks (`validation.suites.session_checks`) on built but not yet swapped-in tables.

    `sessions` and `session_events` are qualified table names (the staging tables); the events
    are the dataset's `events` (only those of the users in the table `only_users`, when the staging
    tables hold only theirs). Totals are computed in SQL and validated as one-row frames.
    """
    mine = "" if only_users is None else f" AND user_id IN (SELECT user_id FROM {only_users})"

    def frames(con, d, batch, chunk_rows):
        if batch == "sessions":
            yield con.execute(f"SELECT session_id, n_events, start_time, end_time FROM {sessions}").df(), {}
        elif batch == "session_totals":
            yield con.execute(f"""SELECT
                (SELECT count(*) FROM "{d.schema}".events WHERE user_id IS NOT NULL{mine}) AS events,
                (SELECT coalesce(sum(n_events), 0) FROM {sessions}) AS events_in_sessions,
                (SELECT count(*) FROM {session_events}) AS session_event_rows""").df(), {}
        elif batch == "session_users":
            # sessions seen with more than one user only: a clean table gives an empty frame
            yield con.execute(f"""SELECT session_id, count(DISTINCT user_id) AS n_users FROM {session_events}
                GROUP BY session_id HAVING count(DISTINCT user_id) > 1 ORDER BY session_id""").df(), {}

    return _run_checks(con, d, session_checks(explicit), ValidateConfig(data_docs=False), Path("."), log,
                       batches=SESSION_BATCHES, frames=frames)


def delta_users(con: duckdb.DuckDBPyConnection, schema: str) -> tuple[list | None, str]:
    """The users of the last ingest when it was an append and the data before it passed its validation, else
    (None, why the whole tables must be checked)."""
    from producers.ingest.append import DELTA_USERS_TABLE

    if not table_exists(con, schema, "ingest_log"):
        return None, "nothing ingested"
    ingests = [r[0] for r in con.execute(f'SELECT ingest_id FROM "{schema}".ingest_log '
                                         "ORDER BY finished_at DESC LIMIT 2").fetchall()]
    if not table_exists(con, schema, DELTA_USERS_TABLE):
        return None, "the last ingest was not an append"
    users = [r[0] for r in con.execute(f'SELECT DISTINCT user_id FROM "{schema}".{DELTA_USERS_TABLE} '
                                       "WHERE ingest_id = ? ORDER BY 1", [ingests[0]]).fetchall()]
    if not users:
        return None, "the last ingest was not an append"
    last = None
    if len(ingests) == 2 and table_exists(con, schema, "validation_log"):
        # the latest validation of the data before the append, not the latest of all: after the delta itself was
        # validated once, `validate --delta` again (a cron re-run) still checks the delta
        last = con.execute(f'SELECT success FROM "{schema}".validation_log WHERE ingest_id = ? '
                           "ORDER BY started_at DESC LIMIT 1", [ingests[1]]).fetchall()
    if len(ingests) < 2 or not last or not last[0][0]:
        return None, "the data before the last append has not passed its own validation"
    return users, ""


def _needs_whole_tables(check: Check) -> bool:
    """Uniqueness across the tables and "the dataset has events": true by construction after an append."""
    return check.expectation in ("ExpectColumnValuesToBeUnique", "ExpectCompoundColumnsToBeUnique",
                                 "ExpectTableRowCountToBeBetween")


def _delta_frames(users: list):
    """`_frames` restricted to these users (events, users and activity); schema and rejects as a full run."""
    def frames(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, batch: str, chunk_rows: int):
        if batch not in ("events", "users", "activity"):
            yield from _frames(con, d, batch, chunk_rows)
            return
        con.execute("CREATE OR REPLACE TEMP TABLE delta_users AS SELECT unnest(?) AS user_id", [users])
        try:
            yield from _frames(con, d, batch, chunk_rows, only="user_id IN (SELECT user_id FROM delta_users)")
        finally:
            con.execute("DROP TABLE IF EXISTS delta_users")
    return frames


def _trace_null_keys(results: list[CheckResult], d: DatasetDefinition, ingest: dict | None) -> None:
    """Name the file lines of empty keys: the tables keep no line numbers, but ingest recorded them
    per source file (`null_keys` of its files; an append's log lists the earlier files too)."""
    tables = {"events": d.events.table, "users": d.users.table if d.users else None}
    files = json.loads(ingest["files"]) if ingest else []
    for r in results:
        if r.success or r.expectation != "ExpectColumnValuesToNotBeNull" or tables.get(r.batch) is None:
            continue
        for f in files:
            traced = (f.get("null_keys") or {}).get(r.column) if f.get("table") == tables[r.batch] else None
            if traced:
                r.lines.append(f"{f['file']} {traced_lines(traced)}")


def _frames(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, batch: str, chunk_rows: int, only: str = "TRUE"):
    """(frame, expectation parameters) for each chunk of a batch; `only`: a filter on events and users rows."""
    s = f'"{d.schema}"'
    if batch == "schema":
        rows = con.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name IN ('events', 'users')", [d.schema]).fetchall()
        yield pd.DataFrame({name: [dtype] for name, dtype in rows}), {}
    elif batch == "events":
        n = con.execute(f"SELECT count(*) FROM {s}.events WHERE {only}").fetchone()[0]
        parts = max(1, math.ceil(n / chunk_rows))
        flags = _non_finite_flags(d.events.fields)
        for k in range(parts):
            where = f"hash(user_id) % {parts} = {k} AND {only}"
            frame = con.execute(f"SELECT *{flags} FROM {s}.events WHERE {where}").df()
            known = [r[0] for r in con.execute(f"SELECT user_id FROM {s}.users WHERE {where}").fetchall()]
            yield frame, {"known_users": known}
    elif batch == "users":
        fields = [*d.users.labels, *d.users.attributes] if d.users else []
        yield con.execute(f"SELECT *{_non_finite_flags(fields)} FROM {s}.users WHERE {only}").df(), {}
    elif batch == "activity":
        # Events without a user are the null-key check's to report, not a user of their own.
        yield con.execute(f"SELECT user_id, count(*) AS n_events FROM {s}.events WHERE user_id IS NOT NULL "
                          f"AND {only} GROUP BY user_id").df(), {}
    elif batch == "rejects":
        files = json.loads(last_ingest(con, d.schema)["files"])
        yield pd.DataFrame([{"file": f["file"], "rows_read": f["rows_read"], "rows_rejected": f["rows_rejected"],
                             "reject_share": (f["rows_rejected"] / f["rows_read"]) if f["rows_read"] else 0.0}
                            for f in files]), {}


def _non_finite_flags(fields) -> str:
    """`, <flag column>` per DOUBLE field: the value as text where it is NaN or +-inf, else null
    (see `validation.suites.NON_FINITE`)."""
    out = ""
    for f in fields:
        if (flag := non_finite_column(f)) is not None:
            col = sql_ident(f.name)
            out += f", CASE WHEN isfinite({col}) THEN NULL ELSE CAST({col} AS VARCHAR) END AS {sql_ident(flag)}"
    return out


def _merge(merged: dict[int, CheckResult], index: int, check: Check, er) -> None:
    """Fold one chunk's expectation result into the check's running result."""
    res = merged.setdefault(index, CheckResult(check.batch, check.description, check.expectation, check.column, True))
    error = _raised(er.exception_info or {})
    if error:
        res.success, res.error = False, error
        return
    r = er.result or {}
    res.success = res.success and bool(er.success)
    res.checked += int(r.get("element_count") or 0)
    res.failed += int(r.get("unexpected_count") or 0)
    missing = ((r.get("details") or {}).get("mismatched") or {}).get("missing")
    if missing:
        res.examples += [f"missing: {c}" for c in missing]
    elif not er.success and not r.get("unexpected_count") and "observed_value" in r:
        res.examples.append(_plain(r["observed_value"]))
    for value in r.get("partial_unexpected_list") or []:
        if len(res.examples) < EXAMPLES:
            res.examples.append(_plain(value))
    for row in r.get("partial_unexpected_index_list") or []:
        if isinstance(row, dict) and len(res.where) < EXAMPLES:  # without index columns GX gives row numbers
            res.where.append({k: _plain(v) for k, v in row.items()})


def _raised(info: dict) -> str | None:
    """The first error message in GX's exception info, which 1.x nests per metric."""
    infos = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for i in infos:
        if i.get("raised_exception"):
            return (i.get("exception_message") or "the check could not run").strip().splitlines()[0]
    return None


def _plain(value: Any) -> Any:
    """numpy and pandas scalars as plain Python (NaN/NaT/NA as None), for JSON and printing."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, pd.Timestamp):
        return value.to_pydatetime()
    return value


def _write_json(report: ValidationReport, out_dir: Path) -> None:
    payload = asdict(report)
    text = json.dumps(payload, indent=2, default=str)
    for path in (report.json_path, out_dir / "latest.json"):
        atomic_write_text(path, text)


def _log_run(con: duckdb.DuckDBPyConnection, schema: str, report: ValidationReport) -> None:
    if not table_exists(con, schema, "validation_log"):
        con.execute(f'CREATE TABLE "{schema}".validation_log (run_id VARCHAR, ingest_id VARCHAR, '
                    "started_at TIMESTAMP, success BOOLEAN, n_checks INTEGER, n_failed INTEGER, "
                    "report VARCHAR, code_version VARCHAR)")
    con.execute(f'INSERT INTO "{schema}".validation_log VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                [report.run_id, report.ingest_id, report.started_at, report.success, len(report.results),
                 len(report.failed), str(report.json_path), report.code_version])
