"""The data-quality checks of a dataset, derived from its definition.

Checks are grouped by the batch they run on, because each batch is a differently shaped frame:
- `schema`: one row whose columns are the warehouse columns and whose values are their types
- `events`: the events (validated in chunks that hold whole users, see `validation.run`), plus
  one `<field> (non-finite)` column per DOUBLE field (see `NON_FINITE`)
- `users`: the users table, with the same non-finite columns
- `activity`: events per user, computed in SQL (an empty frame means no events at all)
- `rejects`: each source file's rejected-row share, from the ingest log
The sessions stage (`producers.sessions.build`) checks its tables before swapping them in, on
batches of its own (`SESSION_BATCHES`, see `session_checks`).
This module only declares; it runs nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from producers.datasets.definition import DatasetDefinition, FieldSpec

BATCHES = ("schema", "events", "users", "activity", "rejects")
SESSION_BATCHES = ("sessions", "session_totals", "session_users")


@dataclass(frozen=True)
class Check:
    batch: str
    expectation: str  # GX expectation class name, e.g. "ExpectColumnValuesToNotBeNull"
    kwargs: dict[str, Any]
    description: str  # what a person reads in the report

    @property
    def column(self) -> str:
        return self.kwargs.get("column") or ", ".join(self.kwargs.get("column_list", []))


def dataset_checks(d: DatasetDefinition, max_reject_share: float = 0.01, now: datetime | None = None) -> list[Check]:
    """The checks of `d`; a time window ending "now" ends at `now` (default: the current time) plus a day."""
    ev = d.events
    start, end = ev.time.window_bounds(now)
    shown = [f"{b} ({t:%Y-%m-%d %H:%M})" if b == "now" else b for b, t in zip(ev.time.window, (start, end))]
    checks = _schema_checks(d)
    checks += [
        Check("events", "ExpectColumnValuesToNotBeNull", {"column": "user_id"}, "every event has a user"),
        Check("events", "ExpectColumnValuesToNotBeNull", {"column": "event_time"}, "every event has a time"),
        Check("events", "ExpectColumnValuesToBeBetween",
              {"column": "event_time", "min_value": start, "max_value": end},
              f"event times within the plausible window {shown[0]} .. {shown[1]}"),
    ]
    checks += [c for f in ev.fields for c in _domain_checks("events", f)]
    if ev.key:
        if len(ev.key) == 1:
            checks.append(Check("events", "ExpectColumnValuesToBeUnique", {"column": ev.key[0]},
                                f"{ev.key[0]} identifies an event"))
        else:
            checks.append(Check("events", "ExpectCompoundColumnsToBeUnique", {"column_list": list(ev.key)},
                                f"({', '.join(ev.key)}) identifies an event"))
    if d.users and d.users.covers_all_events:
        checks.append(Check("events", "ExpectColumnValuesToBeInSet",
                            {"column": "user_id", "value_set": {"$PARAMETER": "known_users"}},
                            "every event's user is in users"))
    checks += [
        Check("users", "ExpectColumnValuesToNotBeNull", {"column": "user_id"}, "every user row has an id"),
        Check("users", "ExpectColumnValuesToBeUnique", {"column": "user_id"},
              "one row per user (a repeated id means conflicting labels)"),
    ]
    if d.users:
        checks += [c for f in [*d.users.labels, *d.users.attributes] for c in _domain_checks("users", f)]
    checks += [
        # An empty events table (a header-only file) would pass every per-row check.
        Check("activity", "ExpectTableRowCountToBeBetween", {"min_value": 1},
              "the dataset has events (at least one user with an event)"),
        Check("activity", "ExpectColumnValuesToBeBetween", {"column": "n_events", "min_value": ev.min_events_per_user},
              f"every user has at least {ev.min_events_per_user} events"),
        Check("rejects", "ExpectColumnValuesToBeBetween",
              {"column": "reject_share", "min_value": 0, "max_value": max_reject_share},
              f"each file's rejected-row share is at most {max_reject_share:.2%}"),
    ]
    return checks


def expected_types(d: DatasetDefinition) -> dict[str, dict[str, str]]:
    """Warehouse column -> DuckDB type, per table, as ingestion writes them."""
    user = {"user_id": d.events.user_dtype}
    events = {**user, "event_time": "TIMESTAMP", **{f.name: _duck_type(f) for f in d.events.fields}}
    users = dict(user)
    if d.users:
        users.update({f.name: _duck_type(f) for f in [*d.users.labels, *d.users.attributes]})
    return {"events": events, "users": users}


def _duck_type(f: FieldSpec) -> str:
    return f.dtype.upper()


def _schema_checks(d: DatasetDefinition) -> list[Check]:
    checks = []
    for table, cols in expected_types(d).items():
        checks.append(Check("schema", "ExpectTableColumnsToMatchSet",
                            {"column_set": [f"{table}.{c}" for c in cols], "exact_match": False},
                            f"{table} has its required columns"))
        checks += [Check("schema", "ExpectColumnValuesToBeInSet", {"column": f"{table}.{c}", "value_set": [t]},
                         f"{table}.{c} is {t}") for c, t in cols.items()]
    return checks


NON_FINITE = " (non-finite)"
"""Suffix of the extra frame column `validation.run` adds per DOUBLE field: the value as text where
it is NaN or +-inf, else null. pandas reads NaN as missing, so no check on the value itself can
see it; and a `min: 0` check lets +inf through."""


def non_finite_column(f: FieldSpec) -> str | None:
    """The frame column that flags `f`'s non-finite values (DOUBLE fields only: integers are always finite)."""
    return f.name + NON_FINITE if f.dtype.upper() == "DOUBLE" else None


def _domain_checks(batch: str, f: FieldSpec) -> list[Check]:
    checks = []
    if (flag := non_finite_column(f)) is not None:
        checks.append(Check(batch, "ExpectColumnValuesToBeNull", {"column": flag},
                            f"{f.name} is a finite number (no NaN, inf or -inf)"))
    if f.values is not None:
        checks.append(Check(batch, "ExpectColumnValuesToBeInSet", {"column": f.name, "value_set": list(f.values)},
                            f"{f.name} in {list(f.values)}"))
    if f.min is not None or f.max is not None:
        checks.append(Check(batch, "ExpectColumnValuesToBeBetween",
                            {"column": f.name, "min_value": f.min, "max_value": f.max},
                            f"{f.name} between {_num(f.min, '-inf')} and {_num(f.max, 'inf')}"))
    return checks


def _num(x: float | None, unbounded: str) -> str:
    return unbounded if x is None else f"{x:g}"


def session_checks(explicit: bool) -> list[Check]:
    """Checks of a built sessions table, on three batches:
    - `sessions`: session_id, n_events, start_time, end_time of every session
    - `session_totals`: one row: events (with a user), events_in_sessions (sum of n_events),
      session_event_rows (rows of session_events)
    - `session_users` (explicit session column only): session_id, n_users of every session seen
      with more than one user (so the frame is empty when all is well)
    """
    checks = [
        Check("sessions", "ExpectColumnValuesToNotBeNull", {"column": "session_id"},
              "every session has an id (an explicit session column must not be empty)"),
        Check("sessions", "ExpectColumnValuesToBeUnique", {"column": "session_id"}, "session_id identifies a session"),
        Check("sessions", "ExpectColumnValuesToBeBetween", {"column": "n_events", "min_value": 1},
              "every session has at least one event"),
        Check("sessions", "ExpectColumnPairValuesAToBeGreaterThanB",
              {"column_A": "end_time", "column_B": "start_time", "or_equal": True},
              "a session does not end before it starts"),
        Check("session_totals", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "events_in_sessions", "column_B": "events"},
              "every event belongs to exactly one session (sum of n_events = events)"),
        Check("session_totals", "ExpectColumnPairValuesToBeEqual",
              {"column_A": "session_event_rows", "column_B": "events"},
              "session_events holds every event once"),
    ]
    if explicit:
        checks.append(Check("session_users", "ExpectColumnValuesToBeBetween",
                            {"column": "n_users", "min_value": 1, "max_value": 1},
                            "a session never spans two users"))
    return checks
