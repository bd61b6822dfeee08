"""The `texts` table: every text a user is represented by (serialized, template- or LLM-enriched).

One table per dataset schema, one row per (user, kind, variant); `fallback` marks the `llm` rows
that are template rewrites standing in for a refused or failed LLM output. A producer replaces all rows of
its kind at once (staging table, then delete + insert in one transaction), and the whole table
is exported to `data/<schema>/texts.parquet` after every change.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from producers.stores.warehouse import Home, transaction

KINDS = ("serialized", "template", "llm")
COLUMNS = """user_id {user_type}, kind VARCHAR, variant INTEGER, format VARCHAR, text VARCHAR,
    n_events INTEGER, n_tokens INTEGER, tokenizer VARCHAR, producer_version VARCHAR,
    source_hash VARCHAR, config VARCHAR, produced_at TIMESTAMP, fallback BOOLEAN DEFAULT false"""
# `fallback`: an `llm` row whose text is a template rewrite standing in for a refused or failed LLM
# output (its format is then "fallback:<template format>"); false for every other row.


def ensure_table(con: duckdb.DuckDBPyConnection, schema: str, user_type: str) -> None:
    con.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".texts ({COLUMNS.format(user_type=user_type)})')
    # Tables made before the `fallback` column get it, set from the format that always said so.
    has = con.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = ? "
                      "AND table_name = 'texts' AND column_name = 'fallback'", [schema]).fetchall()[0][0]
    if not has:
        con.execute(f'ALTER TABLE "{schema}".texts ADD COLUMN fallback BOOLEAN DEFAULT false')
        con.execute(f'UPDATE "{schema}".texts SET fallback = starts_with(format, \'fallback:\')')


def stage_frame(con: duckdb.DuckDBPyConnection, name: str, rows) -> str:
    """Copy a DataFrame into a temp table (the staging side of `replace_kind`); returns its name."""
    view = f"{name}_frame"
    con.register(view, rows)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {view}")
    finally:
        con.unregister(view)
    return name


def replace_kind(con: duckdb.DuckDBPyConnection, schema: str, kind: str, staging: str,
                 only_staged_users: bool = False) -> int:
    """Swap the rows of `kind` for those in `staging`, atomically.

    With `only_staged_users`, only the (user, variant) pairs present in `staging` are replaced,
    so a run over some users keeps the other users' rows.
    """
    where = f"kind = '{kind}'"
    if only_staged_users:
        where += f" AND (user_id, variant) IN (SELECT (user_id, variant) FROM {staging})"
    with transaction(con):
        con.execute(f'DELETE FROM "{schema}".texts WHERE {where}')
        con.execute(f'INSERT INTO "{schema}".texts BY NAME SELECT * FROM {staging}')
    return con.execute(f"SELECT count(*) FROM {staging}").fetchone()[0]


def export_parquet(home: Home, con: duckdb.DuckDBPyConnection, schema: str, table: str = "texts") -> Path:
    """Write the table to `data/<schema>/<table>.parquet` (temp file, then rename)."""
    folder = home.data_dir / schema
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{table}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    con.execute(f'COPY (SELECT * FROM "{schema}"."{table}" ORDER BY ALL) TO \'{tmp}\' (FORMAT parquet)')
    os.replace(tmp, path)
    return path


def config_json(config) -> str:
    """The config as recorded with the texts: JSON, credentials in URLs (an endpoint's key) redacted."""
    from dataclasses import asdict, is_dataclass

    from producers.redact import redacted

    return json.dumps(redacted(asdict(config) if is_dataclass(config) else config), sort_keys=True, default=str)
