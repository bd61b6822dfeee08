"""Which users have events after a point in time: the users a refresh must recompute.

Times are event times (naive UTC, as the warehouse stores them), the same clock a feature
snapshot's as-of uses. An event that arrives late (appended after a snapshot, but stamped
before its as-of) is not found by time; `appended_users` lists the users of later appends for
that case.
"""
from __future__ import annotations

from datetime import datetime

from producers.stores.warehouse import Home, WarehouseError, sql_ident, table_exists
from producers.shared.as_of import utc_naive


def changed_users(home: Home, schema: str, since: datetime) -> list:
    """The users with at least one event strictly after `since`, sorted."""
    con = home.connect(read_only=True)
    try:
        if not table_exists(con, schema, "events"):
            raise WarehouseError(f"no events in schema {schema!r}: run `llm4es ingest` first")
        rows = con.execute(f"SELECT DISTINCT user_id FROM {sql_ident(schema)}.events WHERE event_time > ? ORDER BY 1",
                           [utc_naive(since)]).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def appended_users(home: Home, schema: str, finished_after: datetime) -> list:
    """The users given events by an append that finished after `finished_after` (wall clock, naive UTC),
    whatever the events' own times (late events included); sorted. Empty when nothing was appended."""
    con = home.connect(read_only=True)
    try:
        if not table_exists(con, schema, "ingest_delta_users"):
            return []
        q = sql_ident(schema)
        rows = con.execute(f"SELECT DISTINCT u.user_id FROM {q}.ingest_delta_users u JOIN {q}.ingest_delta d "
                           "USING (ingest_id) WHERE d.finished_at > ? ORDER BY 1",
                           [utc_naive(finished_after)]).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def first_new_events(home: Home, schema: str, since: datetime, finished_after: datetime) -> dict:
    """Per changed user, the time of its earliest new event: the first after `since`, or the earliest event
    of an append that finished after `finished_after` (a late event can be older than `since`).

    What a refresh of per-session outputs needs: a user's sessions that end before this time hold no new
    event (a session holding one ends at or after it), so they are unchanged."""
    con = home.connect(read_only=True)
    try:
        if not table_exists(con, schema, "events"):
            raise WarehouseError(f"no events in schema {schema!r}: run `llm4es ingest` first")
        q = sql_ident(schema)
        parts = [f"SELECT user_id, min(event_time) AS t FROM {q}.events WHERE event_time > ? GROUP BY user_id"]
        params = [utc_naive(since)]
        if table_exists(con, schema, "ingest_delta_users"):
            parts.append(f"SELECT u.user_id, min(u.min_event_time) AS t FROM {q}.ingest_delta_users u "
                         f"JOIN {q}.ingest_delta d USING (ingest_id) WHERE d.finished_at > ? GROUP BY u.user_id")
            params.append(utc_naive(finished_after))
        rows = con.execute(f"SELECT user_id, min(t) FROM ({' UNION ALL '.join(parts)}) WHERE user_id IS NOT NULL "
                           "GROUP BY user_id ORDER BY user_id", params).fetchall()
    finally:
        con.close()
    return dict(rows)
