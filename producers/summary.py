"""A short description of an ingested dataset, computed in SQL."""
from __future__ import annotations

import duckdb

from producers.stores.warehouse import last_ingest, stored_definition


def dataset_summary(con: duckdb.DuckDBPyConnection, dataset: str) -> dict:
    d = stored_definition(con, dataset)
    s = f'"{d.schema}"'
    n_events, n_users, first, last = con.execute(
        f"SELECT count(*), count(DISTINCT user_id), min(event_time), max(event_time) FROM {s}.events").fetchone()
    per_user = con.execute(
        f"SELECT min(n), median(n), max(n) FROM (SELECT count(*) AS n FROM {s}.events GROUP BY user_id)").fetchone()
    labels = {}
    if d.users:
        for label in d.users.labels:
            if label.task == "regression":
                labels[label.name] = con.execute(
                    f'SELECT round(avg("{label.name}"), 2), min("{label.name}"), max("{label.name}"), '
                    f'count("{label.name}") FROM {s}.users').fetchone()
            else:
                labels[label.name] = con.execute(
                    f'SELECT "{label.name}", count(*) FROM {s}.users WHERE "{label.name}" IS NOT NULL '
                    "GROUP BY 1 ORDER BY 2 DESC LIMIT 10").fetchall()
    ingest = last_ingest(con, d.schema) or {}
    return {
        "dataset": d.name, "events": n_events, "users_with_events": n_users,
        "users": con.execute(f"SELECT count(*) FROM {s}.users").fetchone()[0],
        "first_event": first, "last_event": last, "events_per_user": per_user,
        "rejects": con.execute(f"SELECT count(*) FROM {s}.rejects").fetchone()[0],
        "labels": labels, "fields": [f"{f.display} ({f.kind})" for f in d.events.fields],
        "ingest_id": ingest.get("ingest_id"), "source_hash": ingest.get("source_hash"),
    }
