"""The intent tables that accumulate: `intent_taxonomies` (one row per version) and
`intent_llm_labels` (the LLM's answers: the label cache). Both are appended to, never swapped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import duckdb

from producers.datasets.definition import DatasetDefinition
from producers.intents.config import IntentsError
from producers.intents.prompts import Label
from producers.stores.warehouse import one, table_exists, transaction

TAXONOMIES = "intent_taxonomies"
LABELS = "intent_llm_labels"


def taxonomies_ddl(schema: str) -> str:
    return (f'CREATE TABLE IF NOT EXISTS "{schema}".{TAXONOMIES} (version INTEGER PRIMARY KEY, created_at TIMESTAMP, '
            "backend VARCHAR, model VARCHAR, prompt_version VARCHAR, labels JSON, rounds JSON, sample_seed INTEGER, "
            "config JSON, code_version VARCHAR)")


LABEL_COLUMNS = {"session_id": "VARCHAR", "taxonomy_version": "INTEGER", "label": "VARCHAR", "raw": "VARCHAR",
                 "backend": "VARCHAR", "model": "VARCHAR", "mode": "VARCHAR", "prompt_hash": "VARCHAR",
                 "latency_s": "DOUBLE", "created_at": "TIMESTAMP"}
"""`intent_llm_labels`' columns and types, the one place they are written (LabelRow follows them, a test checks)."""
# `mode` (generate / score) is part of the cache key besides the design's (session, version, model, prompt hash):
# the two modes share the prompt but not the answer's nature or latency.
LABEL_KEY = ("session_id", "taxonomy_version", "model", "mode", "prompt_hash")


def labels_ddl(schema: str) -> str:
    columns = ", ".join(f"{name} {sql_type}" for name, sql_type in LABEL_COLUMNS.items())
    return f'CREATE TABLE IF NOT EXISTS "{schema}".{LABELS} ({columns}, PRIMARY KEY ({", ".join(LABEL_KEY)}))'


class LabelRow(NamedTuple):
    """One row of `intent_llm_labels`, in LABEL_COLUMNS' order."""

    session_id: str
    taxonomy_version: int
    label: str | None
    raw: str
    backend: str
    model: str
    mode: str
    prompt_hash: str
    latency_s: float | None
    created_at: datetime

    @property
    def key(self) -> tuple:
        """The table's primary key."""
        return tuple(getattr(self, name) for name in LABEL_KEY)


@dataclass(frozen=True)
class Taxonomy:
    version: int
    labels: list[Label]
    created_at: datetime
    backend: str
    model: str
    prompt_version: str

    @property
    def names(self) -> list[str]:
        return [lb.name for lb in self.labels]


def next_version(con: duckdb.DuckDBPyConnection, schema: str) -> int:
    if not table_exists(con, schema, TAXONOMIES):
        return 1
    return int(one(con, f'SELECT coalesce(max(version), 0) + 1 FROM "{schema}".{TAXONOMIES}')[0])


def store_taxonomy(con: duckdb.DuckDBPyConnection, schema: str, row: dict[str, Any]) -> int:
    """Insert a new version (the next number, taken inside the transaction) and return it."""
    con.execute(taxonomies_ddl(schema))
    with transaction(con):
        version = next_version(con, schema)
        con.execute(f'INSERT INTO "{schema}".{TAXONOMIES} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                    [version, row["created_at"], row["backend"], row["model"], row["prompt_version"],
                     json.dumps(row["labels"]), json.dumps(row["rounds"], default=str), row["sample_seed"],
                     json.dumps(row["config"], default=str), row["code_version"]])
    return version


def load_taxonomy(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, version: int | None = None) -> Taxonomy:
    """The given version, or the newest; IntentsError naming what to run when there is none."""
    if not table_exists(con, d.schema, TAXONOMIES):
        raise IntentsError(f"{d.name} has no intent taxonomy yet: run `llm4es intents build {d.name}` first")
    where = "WHERE version = ?" if version is not None else ""
    row = one(con, f'SELECT version, labels, created_at, backend, model, prompt_version FROM "{d.schema}".{TAXONOMIES} '
                   f"{where} ORDER BY version DESC LIMIT 1", [version] if version is not None else [])
    if row is None:
        held = [r[0] for r in con.execute(f'SELECT version FROM "{d.schema}".{TAXONOMIES} ORDER BY 1').fetchall()]
        raise IntentsError(f"{d.name} has no intent taxonomy version {version} (versions: "
                           f"{', '.join(map(str, held)) or 'none'})")
    labels = [Label(x["name"], x.get("description", "")) for x in json.loads(row[1])]
    return Taxonomy(int(row[0]), labels, row[2], row[3], row[4], row[5])


def cached_labels(con: duckdb.DuckDBPyConnection, schema: str, version: int, model: str,
                  mode: str) -> dict[tuple[str, str], tuple[str | None, float | None]]:
    """{(session_id, prompt_hash): (label, latency_s)} already answered for this version, model and mode."""
    if not table_exists(con, schema, LABELS):
        return {}
    rows = con.execute(f'SELECT session_id, prompt_hash, label, latency_s FROM "{schema}".{LABELS} '
                       "WHERE taxonomy_version = ? AND model = ? AND mode = ?", [version, model, mode]).fetchall()
    return {(s, h): (label, lat) for s, h, label, lat in rows}


def store_labels(con: duckdb.DuckDBPyConnection, schema: str, rows: list[LabelRow]) -> None:
    """Rows of `intent_llm_labels` (LabelRow, or tuples in its order); a repeated key is overwritten."""
    import pyarrow as pa

    con.execute(labels_ddl(schema))
    if not rows:
        return
    # one INSERT from an Arrow table: executemany ran one statement per row, ~1 s per batch of 64, which was 80%
    # of labelling every session with the lexical labeller. The last row of a repeated key wins, as before.
    latest = list({row.key: row for row in map(LabelRow._make, rows)}.values())
    arrow = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(), "TIMESTAMP": pa.timestamp("us")}
    table = pa.table({name: pa.array([getattr(r, name) for r in latest], arrow[sql_type])
                      for name, sql_type in LABEL_COLUMNS.items()})
    con.register("new_labels", table)
    try:
        con.execute(f'INSERT OR REPLACE INTO "{schema}".{LABELS} BY NAME SELECT * FROM new_labels')
    finally:
        con.unregister("new_labels")
