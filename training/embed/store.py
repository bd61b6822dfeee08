"""The warehouse side: the users' texts read in; the parts merged into `"<schema>".embeddings` in one
transaction and exported to the set's Parquet file."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from producers.stores.outputs import LLM4ES, read_provenance, write_parquet
from producers.stores.provenance import code_version
from producers.stores.warehouse import Home, stored_definition, table_exists, transaction
from training.embed.config import TABLE, EmbedConfig, EmbedError, EmbedSet
from validation.gate import require_valid


@dataclass
class Texts:
    schema: str
    user_type: str
    users: list  # ordered by user_id
    texts: list[str]
    source_hashes: list[str | None]
    digest: str  # of every (user, text) of this kind and variant, before limit_users
    as_of: datetime | None = None  # the last event time: the features' point-in-time timestamp


def read_texts(home: Home, dataset: str, config: EmbedConfig) -> Texts:
    con = home.connect(read_only=True)
    try:
        require_valid(con, dataset, config.force)
        d = stored_definition(con, dataset)
        if not table_exists(con, d.schema, "texts"):
            raise EmbedError(f"{dataset} has no texts: run `llm4es serialize {dataset}` first")
        rows = con.execute(f'SELECT user_id, text, source_hash FROM "{d.schema}".texts '
                           "WHERE kind = ? AND variant = ? ORDER BY user_id", [config.kind, config.variant]).fetchall()
        # The texts describe every event, so the features hold as of the last one (point-in-time key).
        as_of = con.execute(f'SELECT max(event_time) FROM "{d.schema}".events').fetchall()[0][0]
    finally:
        con.close()
    if not rows:
        raise EmbedError(f"{dataset} has no {config.kind!r} texts (variant {config.variant}): run `llm4es "
                         f"{'serialize' if config.kind == 'serialized' else 'enrich'} {dataset}` first")
    h = hashlib.sha256()
    for user, text, _ in rows:
        h.update(f"{user}\x00{len(text)}\x00".encode())
        h.update(text.encode())
    if config.limit_users is not None:
        rows = rows[:config.limit_users]
    if config.users is not None:
        wanted = set(config.users)
        rows = [r for r in rows if r[0] in wanted]
    return Texts(d.schema, d.events.user_dtype, [r[0] for r in rows], [r[1] for r in rows],
                  [r[2] for r in rows], h.hexdigest(), as_of)


def finished_set(home: Home, data: Texts, key: dict, run_key: str, config: EmbedConfig) -> EmbedSet | None:
    """The exported set, when a finished run with this run key made it for all users (else None)."""
    path = parquet_path(home, data.schema, key)
    if config.limit_users is not None or config.users is not None or not path.is_file():
        return None
    try:
        provenance = read_provenance(path)
    except (KeyError, ValueError, OSError):
        return None
    if provenance.get("run_key") != run_key or provenance.get("n_users") != len(data.users):
        return None
    return EmbedSet(model=key["model"], checkpoint=key["checkpoint"], epoch=provenance.get("epoch"),
                    layers=key["layers"], text_kind=key["text_kind"], n_users=provenance["n_users"], n_computed=0,
                    n_resumed=provenance["n_users"], n_truncated=0, dim=provenance["dim"], tokens=0, padded_tokens=0,
                    seconds=0.0, cpu_seconds=0.0, wall_seconds=0.0, tokens_per_s=0.0, parquet=str(path),
                    run_key=run_key)


def ensure_table(con: Any, schema: str, user_type: str) -> None:
    con.execute(f'''CREATE TABLE IF NOT EXISTS "{schema}".{TABLE} (
        user_id {user_type}, vector FLOAT[], dim INTEGER, model VARCHAR, checkpoint VARCHAR, epoch INTEGER,
        layers VARCHAR, text_kind VARCHAR, feature_timestamp TIMESTAMP, produced_at TIMESTAMP, source_hash VARCHAR,
        code_version VARCHAR)''')
    # Tables made before feature_timestamp existed get it (NULL until their sets are embedded again).
    con.execute(f'ALTER TABLE "{schema}".{TABLE} ADD COLUMN IF NOT EXISTS feature_timestamp TIMESTAMP')


def merge_parts(home: Home, data: Texts, parts: Path, key: dict, epoch: int | None, full: bool,
           expected_dim: int) -> tuple[int, int, int]:
    """Parts -> table, replacing the set (or, for a partial run, its rows for these users) in one transaction."""
    files = sorted(parts.glob("batch-*.parquet"))
    if not files:
        raise EmbedError("nothing was embedded")
    listing = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    where = " AND ".join(f"{k} = ${k}" for k in key)
    con = home.connect()
    try:
        ensure_table(con, data.schema, data.user_type)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE embed_staging AS
            SELECT user_id::{data.user_type} AS user_id, vector::FLOAT[] AS vector, len(vector)::INTEGER AS dim,
                   $model AS model, $checkpoint AS checkpoint, $epoch::INTEGER AS epoch, $layers AS layers,
                   $text_kind AS text_kind, $feature_timestamp::TIMESTAMP AS feature_timestamp, produced_at,
                   source_hash, $code_version AS code_version, n_tokens
            FROM read_parquet({listing})
            QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY produced_at DESC) = 1""",
                    {**key, "epoch": epoch, "code_version": code_version(), "feature_timestamp": data.as_of})
        n_users, n_dims, min_dim, tokens = con.execute(
            "SELECT count(*), count(DISTINCT dim), min(dim), sum(n_tokens) FROM embed_staging").fetchone()
        if n_dims != 1 or min_dim != expected_dim:
            raise EmbedError(f"the parts in {parts} hold vectors of other sizes than the model's hidden size "
                             f"{expected_dim}; delete the folder and run again")
        with transaction(con):
            scope = "" if full else " AND user_id IN (SELECT user_id FROM embed_staging)"
            con.execute(f'DELETE FROM "{data.schema}".{TABLE} WHERE {where}{scope}', key)
            con.execute(f'INSERT INTO "{data.schema}".{TABLE} BY NAME SELECT * EXCLUDE (n_tokens) FROM embed_staging')
        con.execute("DROP TABLE embed_staging")
    finally:
        con.close()
    return int(n_users), int(min_dim), int(tokens or 0)


def parquet_path(home: Home, schema: str, key: dict) -> Path:
    """`data/<schema>/embeddings/<model>__<checkpoint>__L<a>-<b>__<kind>-<hash>.parquet`."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-80:] or "_"

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{slug(key['model'])}__{slug(key['checkpoint'])}__L{key['layers'].replace(':', '-')}"
            f"__{slug(key['text_kind'])}-{digest}")
    return LLM4ES.parquet_path(home, schema, name)


def export_set(home: Home, schema: str, key: dict, provenance: dict) -> Path:
    """The set's rows, as merged into the warehouse table, to its Parquet copy (the one write path for files)."""
    con = home.connect(read_only=True)
    try:
        where = " AND ".join(f"{k} = ${k}" for k in key)
        rel = con.sql(f'SELECT * FROM "{schema}".{TABLE} WHERE {where} ORDER BY user_id', params=key)
        table = (getattr(rel, "to_arrow_table", None) or rel.arrow)()  # DuckDB 1.x calls it arrow()
    finally:
        con.close()
    return write_parquet(table, parquet_path(home, schema, key), dict(sorted(provenance.items())))
