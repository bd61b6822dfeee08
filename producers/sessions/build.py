"""The sessions table: a user's events cut into sessions, in DuckDB SQL, checked before it is swapped in.

`events.sessions` in the dataset definition says how (`SessionSpec`):
- `column`: an events field holding an explicit session id; session_id is its value as text;
- otherwise a gap: the user's events in time order (ties: the definition's key, then every field),
  and a new session wherever more than `gap_minutes` passed since the previous event
  (`SessionsConfig.gap_minutes` overrides the definition). session_id is `<user_id>#<k>`, k the
  1-based index of the user's session.

Tables (staging first; Great Expectations checks run on the staging tables, see
`validation.suites.session_checks`; only if they all pass are the three swapped in together):
- `sessions`: session_id, user_id, session_index (1-based per user, by start time), start_time,
  end_time, n_events, duration_s;
- `session_events`: session_id, user_id, position (1-based), event_time, gap_s (seconds since
  the previous event of the session, 0 for the first), then every events field;
- `sessions_meta`: one row saying what was built from what.

Events without a user (which validation refuses unless forced) belong to no session.

`SessionsConfig.users` (a refresh after appended events): only those users' sessions are cut again, with
the spec stored in `sessions_meta` (so the other users' sessions need not move). Their new rows are checked
alone, plus a check that no new session id belongs to another user; then, in one transaction, their old
rows are deleted, the new ones inserted and `sessions_meta` updated. Every session of a changed user is cut
again, so a session that was still open at the last build and gained events is replaced whole (and, cut by
a gap, sessions a late event merges or splits are renumbered correctly).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Callable

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.stores.outputs import atomic_write_text
from producers.stores.provenance import code_version
from producers.sessions.config import SessionsConfig, SessionsError, SessionsResult
from producers.stores.warehouse import (STAGING_SUFFIX, Home, last_ingest, stored_definition, swap_tables,
                                       table_exists, transaction)

Log = Callable[[str], None]
TABLES = ("sessions", "session_events", "sessions_meta")
LEADING = ("session_id", "user_id", "position", "event_time", "gap_s")  # session_events' own columns


def build_sessions(home: Home, dataset: str, config: SessionsConfig = SessionsConfig(),
                   log: Log = lambda _: None) -> SessionsResult:
    """Cut the dataset's events into sessions; check them; swap `sessions`, `session_events`, `sessions_meta` in."""
    from validation.gate import require_valid

    started = time.perf_counter()
    if config.gap_minutes is not None and not config.gap_minutes > 0:
        raise SessionsError(f"gap_minutes must be positive, not {config.gap_minutes!r}")
    con = home.connect()
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        if config.users is not None:
            return _rebuild_users(home, con, d, config, log, started)
        spec = d.events.sessions
        column = spec.column
        if column and config.gap_minutes is not None:
            log(f"{d.name} has an explicit session column ({column}): gap_minutes {config.gap_minutes} is not used")
        gap = None if column else (config.gap_minutes or spec.gap_minutes)
        spec_used = {"column": column, "gap_minutes": gap}
        fields = _fields(d, column)
        stg = {t: f'"{d.schema}"."{t}{STAGING_SUFFIX}"' for t in TABLES}
        try:
            _create_staging(con, d, stg, fields, column, gap)
            report = _check(home, con, d, stg, column is not None, spec_used, log)
            n_sessions, n_events, stats = _stats(con, stg["sessions"])
            ingest = last_ingest(con, d.schema) or {}
            con.execute(f"""CREATE TABLE {stg['sessions_meta']} AS SELECT
                CAST($spec AS VARCHAR) AS spec, CAST($ingest_id AS VARCHAR) AS ingest_id,
                CAST($fingerprint AS VARCHAR) AS definition_fingerprint, CAST($n_sessions AS BIGINT) AS n_sessions,
                CAST($n_events AS BIGINT) AS n_events, CAST($built_at AS TIMESTAMP) AS built_at,
                CAST($code_version AS VARCHAR) AS code_version, CAST($validation AS VARCHAR) AS validation""",
                        {"spec": json.dumps(spec_used), "ingest_id": ingest.get("ingest_id"),
                         "fingerprint": d.fingerprint(), "n_sessions": n_sessions, "n_events": n_events,
                         "built_at": datetime.now(timezone.utc).replace(tzinfo=None),
                         "code_version": code_version(), "validation": str(report)})
            log(f"swapping {d.schema}.sessions, session_events, sessions_meta into place")
            swap_tables(con, d.schema, list(TABLES))
        finally:
            for table in stg.values():
                con.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        con.close()
    how = f"column {column}" if column else f"gap {gap:g} min"
    log(f"{n_sessions:,} sessions ({how}) over {n_events:,} events; events per session: "
        f"median {stats['median']:g}, p90 {stats['p90']:g}, max {stats['max']:g}")
    return SessionsResult(dataset=d.name, table=f"{d.schema}.sessions", mode="column" if column else "gap",
                          spec=spec_used, n_sessions=n_sessions, n_events=n_events, events_per_session=stats,
                          validation_path=report, seconds=time.perf_counter() - started)


def _fields(d: DatasetDefinition, column: str | None) -> list[str]:
    """The events fields session_events carries (all of them; a session column named session_id is the id itself)."""
    names = []
    for f in d.events.fields:
        if f.name == "session_id" and f.name == column:
            continue
        if f.name in LEADING:
            raise SessionsError(f"{d.name}: events field {f.name!r} has the name of a session_events column "
                                f"({', '.join(LEADING)}); rename it in the definition")
        names.append(f.name)
    return names


def _rebuild_users(home: Home, con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: SessionsConfig,
                   log: Log, started: float) -> SessionsResult:
    """Cut the given users' sessions again (see the module docstring); the others' rows are left alone."""
    if not table_exists(con, d.schema, "sessions_meta"):
        raise SessionsError(f"{d.name} has no sessions: run `llm4es sessions build {d.name}` once first")
    row = con.execute(f'SELECT spec, definition_fingerprint FROM "{d.schema}".sessions_meta').fetchone()
    if row is None:
        raise SessionsError(f"{d.name} has no sessions: run `llm4es sessions build {d.name}` once first")
    spec_used, fingerprint = json.loads(row[0]), row[1]
    if fingerprint != d.fingerprint():
        raise SessionsError(f"{d.name}: its sessions were built with another definition; run "
                            f"`llm4es sessions build {d.name}` for everyone")
    if config.gap_minutes is not None and config.gap_minutes != spec_used.get("gap_minutes"):
        raise SessionsError(f"{d.name}: its sessions were cut with {spec_used}; re-cutting some users with a gap of "
                            f"{config.gap_minutes} minutes would mix two rules (rebuild everyone instead)")
    column, gap = spec_used.get("column"), spec_used.get("gap_minutes")
    fields = _fields(d, column)
    users = sorted(set(config.users))
    # TEMP tables: they are only read back into the live tables, and this connection's memory is cheaper to write
    # and drop than the warehouse file (and nothing is left in it if the process dies)
    stg = {t: f'"_rebuild_{t}"' for t in TABLES}
    live = {t: f'"{d.schema}".{t}' for t in TABLES}
    con.execute(f"CREATE OR REPLACE TEMP TABLE _rebuild_users AS SELECT CAST(unnest($u) AS {d.events.user_dtype}) "
                "AS user_id", {"u": users})
    try:
        _create_staging(con, d, stg, fields, column, gap, only_users="_rebuild_users", temporary=True)
        report = _check(home, con, d, stg, column is not None, spec_used, log, only_users="_rebuild_users")
        clash = con.execute(f"""SELECT n.session_id, n.user_id, o.user_id FROM {stg['sessions']} n
            JOIN {live['sessions']} o USING (session_id) WHERE o.user_id NOT IN (SELECT user_id FROM _rebuild_users)
            LIMIT 5""").fetchall()
        if clash:
            raise SessionsError(f"{d.name}: new sessions of the refreshed users have ids of other users' sessions "
                                f"(e.g. {', '.join(f'{s} of user {a} and of user {b}' for s, a, b in clash)}); "
                                "nothing was replaced")
        ingest = last_ingest(con, d.schema) or {}
        with transaction(con):
            for t in ("sessions", "session_events"):
                con.execute(f"DELETE FROM {live[t]} WHERE user_id IN (SELECT user_id FROM _rebuild_users)")
                con.execute(f"INSERT INTO {live[t]} BY NAME SELECT * FROM {stg[t]}")
            # totals of every user's sessions (a column sum); the quantiles of the refreshed users' own: over
            # every session they would cost what the whole table costs, on every refresh
            n_sessions, n_events = con.execute(f"SELECT count(*), coalesce(sum(n_events), 0) "
                                               f"FROM {live['sessions']}").fetchall()[0]
            con.execute(f"UPDATE {live['sessions_meta']} SET ingest_id = ?, n_sessions = ?, n_events = ?, "
                        "built_at = ?, code_version = ?, validation = ?",
                        [ingest.get("ingest_id"), n_sessions, n_events, datetime.now(timezone.utc).replace(tzinfo=None),
                         code_version(), str(report)])
        my_sessions, my_events, my_stats = _stats(con, stg["sessions"])  # the re-cut users' own
    finally:
        for table in stg.values():
            con.execute(f"DROP TABLE IF EXISTS {table}")
        con.execute("DROP TABLE IF EXISTS _rebuild_users")
    log(f"{len(users):,} users' sessions cut again: {my_sessions:,} sessions over {my_events:,} events; "
        f"{n_sessions:,} sessions in all")
    return SessionsResult(dataset=d.name, table=f"{d.schema}.sessions", mode="column" if column else "gap",
                          spec=spec_used, n_sessions=n_sessions, n_events=n_events, events_per_session=my_stats,
                          validation_path=report, seconds=time.perf_counter() - started)


def changed_sessions(home: Home, dataset: str, first_new: dict) -> list[str]:
    """The sessions of these users that end at or after the user's first new event (`first_new`: user ->
    time; `producers.ingest.delta.first_new_events`): the new ones, and those that gained events. A user's
    sessions ending before it hold only events that were there before, so they are unchanged."""
    if not first_new:
        return []
    con = home.connect(read_only=True)
    try:
        d = stored_definition(con, dataset)
        users, times = zip(*sorted(first_new.items()))
        rows = con.execute(f"""WITH f AS (SELECT CAST(unnest($u) AS {d.events.user_dtype}) AS user_id,
                                                 CAST(unnest($t) AS TIMESTAMP) AS t)
            SELECT s.session_id FROM "{d.schema}".sessions s JOIN f USING (user_id)
            WHERE s.end_time >= f.t ORDER BY s.session_id""", {"u": list(users), "t": list(times)}).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def _create_staging(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, stg: dict[str, str], fields: list[str],
                    column: str | None, gap_minutes: float | None, only_users: str | None = None,
                    temporary: bool = False) -> None:
    """Cut the events (of the users in the table `only_users`, when given) into `stg`'s session_events and
    sessions; `temporary`: as TEMP tables (this connection's memory, never written to the warehouse file)."""
    create = "CREATE TEMP TABLE" if temporary else "CREATE TABLE"
    events = f'"{d.schema}".events'
    if only_users:  # a table of the users whose sessions are cut
        events = f"(SELECT * FROM {events} SEMI JOIN {only_users} USING (user_id))"
    keys = [c for c in (d.events.key or []) if c not in ("user_id", "event_time")]
    tiebreak = [*keys, *(f.name for f in d.events.fields if f.name not in keys)]
    carried = "".join(f', "{f}"' for f in fields)
    for table in stg.values():
        con.execute(f"DROP TABLE IF EXISTS {table}")
    if column:
        # the explicit id; events of one session in time order (ties: user, key, fields)
        order = ", ".join(f'"{c}" NULLS LAST' for c in ["event_time", "user_id", *tiebreak])
        con.execute(f"""{create} {stg['session_events']} AS
            WITH ev AS (SELECT CAST("{column}" AS VARCHAR) AS _sid, *, epoch_us(event_time) AS _t
                        FROM {events} WHERE user_id IS NOT NULL),
            p AS (SELECT *, row_number() OVER w AS _pos, _t - lag(_t) OVER w AS _d FROM ev
                  WINDOW w AS (PARTITION BY _sid ORDER BY {order}))
            SELECT _sid AS session_id, user_id, CAST(_pos AS INTEGER) AS position, event_time,
                   CAST(coalesce(_d, 0) AS DOUBLE) / 1e6 AS gap_s{carried}
            FROM p ORDER BY session_id, position""")
    else:
        # a new session wherever the time since the user's previous event exceeds the gap
        order = ", ".join(f'"{c}" NULLS LAST' for c in ["event_time", *tiebreak])
        con.execute(f"""{create} {stg['session_events']} AS
            WITH ev AS (SELECT *, epoch_us(event_time) AS _t,
                               row_number() OVER (PARTITION BY user_id ORDER BY {order}) AS _upos
                        FROM {events} WHERE user_id IS NOT NULL),
            d AS (SELECT *, _t - lag(_t) OVER (PARTITION BY user_id ORDER BY _upos) AS _d FROM ev),
            n AS (SELECT *, (_d IS NULL OR _d > $gap_us) AS _new FROM d),
            k AS (SELECT *, sum(CAST(_new AS INTEGER)) OVER (PARTITION BY user_id ORDER BY _upos
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS _k FROM n)
            SELECT CAST(user_id AS VARCHAR) || '#' || CAST(_k AS VARCHAR) AS session_id, user_id,
                   CAST(row_number() OVER (PARTITION BY user_id, _k ORDER BY _upos) AS INTEGER) AS position,
                   event_time, CASE WHEN _new THEN 0.0 ELSE CAST(_d AS DOUBLE) / 1e6 END AS gap_s{carried}
            FROM k ORDER BY user_id, _upos""", {"gap_us": float(gap_minutes or 0) * 60e6})
    # min(user_id): a session spanning two users fails the checks before this table is used
    con.execute(f"""{create} {stg['sessions']} AS
        WITH s AS (SELECT session_id, min(user_id) AS user_id, min(event_time) AS start_time,
                          max(event_time) AS end_time, CAST(count(*) AS INTEGER) AS n_events
                   FROM {stg['session_events']} GROUP BY session_id)
        SELECT session_id, user_id,
               CAST(row_number() OVER (PARTITION BY user_id ORDER BY start_time, session_id) AS INTEGER)
                   AS session_index,
               start_time, end_time, n_events,
               CAST(epoch_us(end_time) - epoch_us(start_time) AS DOUBLE) / 1e6 AS duration_s
        FROM s ORDER BY user_id, session_index""")


def _check(home: Home, con: duckdb.DuckDBPyConnection, d: DatasetDefinition, stg: dict[str, str], explicit: bool,
           spec: dict, log: Log, only_users: str | None = None):
    """Run the session checks on the staging tables; write their JSON report; raise SessionsError on a failure."""
    from validation.run import check_sessions

    results = check_sessions(con, d, stg["sessions"], stg["session_events"], explicit, log, only_users)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    path = home.reports_dir("sessions", d.schema) / f"{run_id}.json"
    failed = [r for r in results if not r.success]
    payload = {"dataset": d.name, "run_id": run_id, "spec": spec, "success": not failed,
               "results": [asdict(r) for r in results], "code_version": code_version()}
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    if failed:
        lines = []
        for r in failed:
            detail = r.error or f"{r.failed:,} of {r.checked:,} failed"
            if r.where:
                detail += f"; e.g. {', '.join(_row(w) for w in r.where)}"
            elif r.examples:
                detail += f"; e.g. {', '.join(map(str, r.examples))}"
            lines.append(f"  ✗ {r.check} [{r.column}]: {detail}")
        raise SessionsError(f"sessions of {d.name} failed {len(failed)} check(s); nothing was replaced "
                            f"(report: {path}):\n" + "\n".join(lines))
    return path


def _row(where: dict) -> str:
    return "(" + ", ".join(f"{k} {v!r}" for k, v in where.items()) + ")"


def _stats(con: duckdb.DuckDBPyConnection, sessions: str) -> tuple[int, int, dict[str, float]]:
    n, total, median, p90, most = con.execute(
        f"SELECT count(*), coalesce(sum(n_events), 0), quantile_cont(n_events, 0.5), "
        f"quantile_cont(n_events, 0.9), max(n_events) FROM {sessions}").fetchall()[0]
    return int(n), int(total), {"median": float(median or 0), "p90": float(p90 or 0), "max": float(most or 0)}
