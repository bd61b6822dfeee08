"""The contract every feature output keeps: what it holds, where it lives, how it is written and read.

A *feature output* is one set of rows a producer computes for a dataset: a warehouse table in the
dataset's schema plus its Parquet copy under `data/<schema>/`, with the provenance (what data, code and
configuration made it) as JSON in the Parquet metadata under the key `llm4es`. `FeatureOutput` describes
one such set; `OUTPUTS` lists the ones publish serves, in the order their views are listed.

One write path (`write_staged`): the producer builds `<table>__staging` (and its companion tables'
staging copies) inside `staging(...)`; the staged rows go to a temp Parquet file beside the target, the
tables are swapped in in one transaction, then the file is renamed into place. A failure at any point
leaves the previous table and file; no temp file or staging table outlives the call.

One read path: `read_provenance` (the metadata) and `read_output` (rows and metadata).

A refresh changes rows in place instead (`change_in_place`: its DELETE and INSERT of a few users' rows and
the note that the Parquet copy is now behind, in one transaction) and does not rewrite the Parquet copy,
which would cost what every row costs. The table is then the truth: the note, a row of
`"<schema>".output_exports` (table name, a version id, the table's provenance), says the copy is behind
until a copy carrying that version (`table_version` in its provenance) is written. `current_provenance`
reads the table's provenance (the note's, else the copy's); `export_if_behind` writes the copy again from
the table (DuckDB COPY, with the note's provenance) when it is behind: a full `publish` calls it before it
reads the copies, so no reader of a copy sees it stale. A full write (`write_staged`) drops the note in
its swap transaction: its copy is the table's. An empty flag file beside the copy (`.<file>.behind`,
made before the change's transaction) tells `export_if_behind` the warehouse is worth opening: without
one it does not open it (a publish reads files only, even while another process writes the warehouse).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from producers.errors import Llm4esError
from producers.stores.warehouse import STAGING_SUFFIX, Home, swap_tables, table_exists, transaction

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

PARQUET_KEY = b"llm4es"  # the Parquet key-value metadata entry holding an output's provenance
Log = Callable[[str], None]


class OutputError(Llm4esError, ValueError):
    """An output file that lacks what its description promises (e.g. no provenance)."""


@dataclass(frozen=True)
class FeatureOutput:
    """One kind of produced feature set, as the stores and publish see it.

    `scalars` and `vectors` name the feature columns with their DuckDB types; an output whose columns
    depend on the data (aggregates: one column per category value) declares `open_columns` instead and
    publishes every numeric column it holds. `file` is the Parquet location under `data/<schema>/`; a
    `{set}` in it stands for the set's name when one table holds several sets (LLM4ES embeddings).
    `sets` names the columns that tell the sets apart.

    How publish serves it (`publish_as`): `snapshots` (one user-keyed set; every publish adds a snapshot
    to its history, view `<schema>__<view>`), `sets` (user-keyed vectors, one history per set; the default
    set's view is `<schema>__<view>`, and with `view_every_set` every set also gets `<schema>__<label>__<set>`)
    or `sessions` (session-keyed rows written afresh, view `<schema>__<view>`, plus the user-level rollups
    that `rollup` names: a module of the stage that owns the output, offering `session_columns(types)` and
    `session_views(con, provenance, recent, user_dtype)` over a DuckDB table `sess` of the session rows).
    """

    kind: str
    table: str
    entity: str  # user | session
    key: str  # the entity's key column: user_id | session_id
    timestamp: str  # when a row's features became known (the point-in-time column)
    file: str
    scalars: tuple[tuple[str, str], ...] = ()
    vectors: tuple[str, ...] = ()
    open_columns: bool = False
    sets: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()  # tables swapped in with the main one (e.g. `<table>_meta`)
    publish_as: str = "snapshots"  # snapshots | sets | sessions
    view: str = ""  # the (default) view's name after `<schema>__` (default: the table's name)
    view_every_set: bool = False
    label: str = ""  # how a view's description opens (`LLM4ES embeddings of {dataset} users`)
    rollup: str = ""  # sessions: the module that defines the session and user rollup views
    description: str = ""  # the input, as publish's messages name it
    produced_by: str = ""  # the command that writes it (named in publish's "nothing to publish" error)

    @property
    def view_name(self) -> str:
        return self.view or self.table

    def parquet_path(self, home: Home, schema: str, set_name: str | None = None) -> Path:
        if "{set}" in self.file:
            if set_name is None:
                raise ValueError(f"{self.kind}: name the set whose file you want")
            return home.data_dir / schema / self.file.format(set=set_name)
        return home.data_dir / schema / self.file

    def files(self, home: Home, schema: str) -> list[Path]:
        """The Parquet copies of this output that exist for the schema (temp files excluded)."""
        folder = home.data_dir / schema
        pattern = self.file.replace("{set}", "*")
        return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("."))

    def staging_name(self, schema: str, table: str | None = None) -> str:
        return f'"{schema}"."{table or self.table}{STAGING_SUFFIX}"'

    @property
    def columns(self) -> dict[str, str]:
        return dict(self.scalars) | {v: "FLOAT[]" for v in self.vectors}


AGGREGATES = FeatureOutput(
    kind="agg", table="agg_features", entity="user", key="user_id", timestamp="feature_timestamp",
    file="agg_features.parquet", open_columns=True, companions=("agg_features_meta",),
    label="aggregate features of {dataset} users (activity, numeric statistics, top categories)",
    description="aggregate features (agg_features.parquet)", produced_by="llm4es aggregate")
COLES = FeatureOutput(
    kind="coles", table="coles_embeddings", entity="user", key="user_id", timestamp="feature_timestamp",
    file="coles_embeddings.parquet", vectors=("vector",), sets=("model", "checkpoint"),
    scalars=(("dim", "INTEGER"), ("model", "VARCHAR"), ("checkpoint", "VARCHAR"), ("epoch", "INTEGER"),
             ("produced_at", "TIMESTAMP"), ("source_hash", "VARCHAR"), ("code_version", "VARCHAR")),
    publish_as="sets", view="coles_embedding", label="CoLES embeddings of {dataset} users",
    description="CoLES embeddings (coles_embeddings.parquet)", produced_by="llm4es coles")
LLM4ES = FeatureOutput(
    kind="llm4es", table="embeddings", entity="user", key="user_id", timestamp="feature_timestamp",
    file="embeddings/{set}.parquet", vectors=("vector",), sets=("model", "checkpoint", "layers", "text_kind"),
    scalars=(("dim", "INTEGER"), ("model", "VARCHAR"), ("checkpoint", "VARCHAR"), ("epoch", "INTEGER"),
             ("layers", "VARCHAR"), ("text_kind", "VARCHAR"), ("produced_at", "TIMESTAMP"),
             ("source_hash", "VARCHAR"), ("code_version", "VARCHAR")),
    publish_as="sets", view="llm4es_embedding", view_every_set=True, label="LLM4ES embeddings of {dataset} users",
    description="LLM4ES embeddings (embeddings/*.parquet)", produced_by="llm4es embed")
SESSION_EMBEDDINGS = FeatureOutput(
    kind="sessions", table="session_embeddings", entity="session", key="session_id", timestamp="session_end",
    file="session_embeddings.parquet", scalars=(("user_id", "user"),), vectors=("embedding",),
    publish_as="sessions", view="session_embedding", rollup="producers.sessions.rollup",
    description="session embeddings (session_embeddings.parquet)", produced_by="llm4es sessions embed")
SESSION_INTENTS = FeatureOutput(
    kind="intents", table="session_intents", entity="session", key="session_id", timestamp="session_end",
    file="session_intents.parquet", companions=("session_intents_meta",),
    scalars=(("user_id", "user"), ("taxonomy_version", "INTEGER"), ("label", "VARCHAR"), ("classifier", "VARCHAR"),
             ("produced_at", "TIMESTAMP"), ("code_version", "VARCHAR")), vectors=("probabilities",),
    publish_as="sessions", view="session_intent", rollup="producers.intents.shares",
    description="session intents (session_intents.parquet)", produced_by="llm4es intents distill")

@dataclass(frozen=True)
class DerivedView:
    """One view publish serves from a session-keyed output: the sessions themselves or a user rollup of them.

    `query` reads the temp table `sess` (session_id, user_id, feature_timestamp = the session's end,
    produced_at, n = the session's rank among its user's, and the output's value columns); `features`
    are the Feast fields (name, dtype, vector_length); `what` opens the view's description.
    """

    kind: str
    view: str
    query: str
    features: tuple[dict, ...]
    what: str
    session_keyed: bool


def feature_slug(text: str) -> str:
    """A value as part of a feature or view name: `Sci-Fi!` -> `sci_fi`."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")[:48].strip("_") or "x"


# in the order publish reads them and lists their views
OUTPUTS: dict[str, FeatureOutput] = {o.kind: o for o in (AGGREGATES, COLES, LLM4ES, SESSION_EMBEDDINGS,
                                                       SESSION_INTENTS)}


def register(output: FeatureOutput) -> FeatureOutput:
    """Add a kind of output for publish to find (a new producer's one step besides writing its rows)."""
    if output.kind in OUTPUTS and OUTPUTS[output.kind] != output:
        raise ValueError(f"an output of kind {output.kind!r} is registered already")
    OUTPUTS[output.kind] = output
    return output


# --------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def staging(con: "duckdb.DuckDBPyConnection", output: FeatureOutput, schema: str) -> Iterator[str]:
    """The output's staging tables, dropped before (left by a killed run) and after; yields the main one's name."""
    names = [output.staging_name(schema, t) for t in (output.table, *output.companions)]
    for name in names:
        con.execute(f"DROP TABLE IF EXISTS {name}")
    try:
        yield names[0]
    finally:
        for name in names:
            con.execute(f"DROP TABLE IF EXISTS {name}")


def write_output(home: Home, output: FeatureOutput, schema: str, rows: "pa.Table", select: str, provenance: dict,
                 params: dict | None = None, log: Log = lambda _: None,
                 also: Callable[["duckdb.DuckDBPyConnection"], None] | None = None) -> Path:
    """The one write path for a producer's computed rows: `select` (SQL over `rows`, registered as the view
    `new_rows`) builds the staging table, `also(con)` stages the companion tables, then `write_staged`."""
    con = home.connect()
    try:
        with staging(con, output, schema) as stg:
            con.register("new_rows", rows)
            try:
                con.execute(f"CREATE TABLE {stg} AS {select}", params or {})
            finally:
                con.unregister("new_rows")
            if also is not None:
                also(con)
            return write_staged(con, output, schema, output.parquet_path(home, schema), provenance, log)
    finally:
        con.close()


def write_staged(con: "duckdb.DuckDBPyConnection", output: FeatureOutput, schema: str, parquet: Path,
                 provenance: dict, log: Log = lambda _: None) -> Path:
    """Swap the staged output in and write its Parquet copy, together.

    The staged main table's rows (ordered by the key) are written with `provenance` to a temp file beside
    `parquet`; only then are the main table and its companions swapped in from their staging copies, and
    the file renamed into place. A failure before the swap leaves both the old tables and the old file.
    """
    rows = _arrow(con.sql(f"SELECT * FROM {output.staging_name(schema)} ORDER BY {output.key}"))
    tables = [output.table, *output.companions]

    def swap() -> None:
        log(f"swapping {', '.join(f'{schema}.{t}' for t in tables)} into place")
        swap_tables(con, schema, tables, also=lambda: _drop_note(con, output, schema))

    return write_parquet(rows, parquet, provenance, before_rename=swap)


def write_parquet(rows: "pa.Table", parquet: Path, provenance: dict,
                  before_rename: Callable[[], None] = lambda: None) -> Path:
    """`rows` with `provenance` to `parquet`, atomically: a temp file beside it, `before_rename` (the table
    swap of `write_staged`), then the rename. Alone: for a copy of rows that already live in the warehouse
    (the LLM4ES export of one set)."""
    tmp = _write_temp(rows, parquet, provenance)
    try:
        before_rename()
        os.replace(tmp, parquet)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return parquet


def _write_temp(rows: "pa.Table", parquet: Path, provenance: dict) -> Path:
    import pyarrow.parquet as pq

    meta = dict(rows.schema.metadata or {})
    meta[PARQUET_KEY] = json.dumps(provenance, default=str).encode()
    parquet.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{parquet.stem}.", suffix=".parquet.tmp", dir=parquet.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        pq.write_table(rows.replace_schema_metadata(meta), tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_text(path: Path, text: str) -> None:
    """`text` to `path` through a temp file and a rename: a reader sees the old content or the new, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Changing rows in place (a refresh); the Parquet copy follows the table

EXPORTS = "output_exports"  # per schema: the tables changed in place since their Parquet copy was written


def change_in_place(con: "duckdb.DuckDBPyConnection", home: Home, output: FeatureOutput, schema: str,
                    change: Callable[["duckdb.DuckDBPyConnection"], None], provenance: dict) -> dict:
    """`change(con)` (a DELETE and INSERT of some rows of the output's table and companions) and the note
    that the Parquet copy is behind the table, now of `provenance`, in one transaction: a failure or a kill
    leaves both as they were. The provenance as noted (with its `table_version`)."""
    noted = {**provenance, "table_version": uuid.uuid4().hex}
    flag = _behind_flag(output.parquet_path(home, schema))
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()  # first: a kill after the commit must not leave a note nobody looks for
    with transaction(con):
        change(con)
        con.execute(f'CREATE TABLE IF NOT EXISTS "{schema}".{EXPORTS} (table_name VARCHAR, version VARCHAR, '
                    "provenance JSON, changed_at TIMESTAMP)")
        con.execute(f'DELETE FROM "{schema}".{EXPORTS} WHERE table_name = ?', [output.table])
        con.execute(f'INSERT INTO "{schema}".{EXPORTS} VALUES (?, ?, CAST(? AS JSON), now()::TIMESTAMP)',
                    [output.table, noted["table_version"], json.dumps(noted, default=str)])
    return noted


def replace_sessions_in_place(con: "duckdb.DuckDBPyConnection", home: Home, output: FeatureOutput, schema: str,
                              staged: str, alive: str, users: list | None, snapshot: Path | None, provenance: dict,
                              also: Callable[["duckdb.DuckDBPyConnection"], None] | None = None) -> int:
    """A refresh's write of a session-keyed output: the rows of the temp table `staged` replace or are added
    to the output's table, and `users`' rows whose session is no longer in the table `alive` are dropped,
    with `also(con)` (e.g. the meta's provenance), in place (`change_in_place`). With `snapshot`, every current
    row of `users` also goes there (temp file, renamed once the transaction committed). The staged rows' count."""
    s = f'"{schema}"'
    who, params = ("TRUE", {}) if users is None else ("user_id IN (SELECT unnest($users))", {"users": list(users)})
    current = f"(SELECT session_id FROM {alive} WHERE {who})"

    def change(c) -> None:
        c.execute(f"""DELETE FROM {s}.{output.table} WHERE session_id IN (SELECT session_id FROM {staged})
                      OR ({who} AND session_id NOT IN {current})""", params)
        c.execute(f"INSERT INTO {s}.{output.table} BY NAME SELECT * FROM {staged}")
        if also is not None:
            also(c)

    n_new = con.execute(f"SELECT count(*) FROM {staged}").fetchall()[0][0]
    if snapshot is None:
        change_in_place(con, home, output, schema, change, provenance)
        return n_new
    rows = _arrow(con.sql(f"""SELECT * FROM {staged} UNION ALL BY NAME
        SELECT * FROM {s}.{output.table} WHERE {who} AND session_id NOT IN (SELECT session_id FROM {staged})
               AND session_id IN {current} ORDER BY session_id""", params=params))
    snapshot_of = {"table": f"{schema}.{output.table}", "n_users": len(set(users or [])), "n_sessions": rows.num_rows,
                   "sessions_written": n_new}
    write_parquet(rows, snapshot, {**provenance, "snapshot_of": snapshot_of},
                  before_rename=lambda: change_in_place(con, home, output, schema, change, provenance))
    return n_new


def _behind_flag(parquet: Path) -> Path:
    return parquet.with_name(f".{parquet.name}.behind")


def _drop_note(con: "duckdb.DuckDBPyConnection", output: FeatureOutput, schema: str) -> None:
    if table_exists(con, schema, EXPORTS):
        con.execute(f'DELETE FROM "{schema}".{EXPORTS} WHERE table_name = ?', [output.table])


def _note(con: "duckdb.DuckDBPyConnection", output: FeatureOutput, schema: str) -> dict | None:
    if not table_exists(con, schema, EXPORTS):
        return None
    rows = con.execute(f'SELECT provenance FROM "{schema}".{EXPORTS} WHERE table_name = ?', [output.table]).fetchall()
    return json.loads(rows[0][0]) if rows else None


def current_provenance(con: "duckdb.DuckDBPyConnection", home: Home, output: FeatureOutput, schema: str) -> dict:
    """The provenance of the output's table as it is now: the in-place change's note, else its Parquet copy's
    ({} when there is neither)."""
    noted = _note(con, output, schema)
    if noted is not None:
        return noted
    path = output.parquet_path(home, schema)
    return read_provenance(path, missing_ok=True) if path.is_file() else {}


def export_if_behind(home: Home, output: FeatureOutput, schema: str, log: Log = lambda _: None) -> bool:
    """Write the output's Parquet copy again from its table when a change in place left it behind (see the
    module docstring): every row, ordered by the key, with the noted provenance, to a temp file then renamed.
    Whether it was written."""
    path = output.parquet_path(home, schema)
    flag = _behind_flag(path)
    if not flag.exists():
        return False
    con = home.connect(read_only=True)
    try:
        con.execute("BEGIN TRANSACTION")  # the note and the rows read at one point
        try:
            noted = _note(con, output, schema)
            if noted is None or (path.is_file() and
                                 read_provenance(path, missing_ok=True).get("table_version") == noted["table_version"]):
                flag.unlink(missing_ok=True)  # the warehouse is open: no change in place can come in between
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".parquet.tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            try:
                blob = json.dumps(noted, default=str).replace("'", "''")
                con.execute(f'COPY (SELECT * FROM "{schema}".{output.table} ORDER BY {output.key}) TO '
                            f"'{str(tmp).replace(chr(39), chr(39) * 2)}' "
                            f"(FORMAT PARQUET, KV_METADATA {{{PARQUET_KEY.decode()}: '{blob}'}})")
                os.replace(tmp, path)
                flag.unlink(missing_ok=True)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            con.execute("COMMIT")
    finally:
        con.close()
    log(f"{path}: written again from {schema}.{output.table} (changed in place since it was written)")
    return True


def export_behind(home: Home, schema: str, log: Log = lambda _: None) -> None:
    """`export_if_behind` for every registered output (a full publish, before it reads the copies)."""
    for output in OUTPUTS.values():
        if "{set}" not in output.file:  # one table of several sets' files is never changed in place
            export_if_behind(home, output, schema, log)


def _arrow(rel) -> "pa.Table":
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


# --------------------------------------------------------------------------------------------
# Reading


def read_provenance(parquet: str | Path, missing_ok: bool = False) -> dict:
    """The provenance recorded in an output's Parquet copy. `missing_ok`: {} for a file without (or with
    unreadable) provenance instead of an error."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(parquet).metadata or {}
    try:
        value = json.loads(meta[PARQUET_KEY])
    except (KeyError, ValueError) as e:
        if missing_ok:
            return {}
        raise OutputError(f"{parquet} holds no llm4es provenance ({type(e).__name__}): write it again with its "
                          "producer") from e
    if not isinstance(value, dict):
        if missing_ok:
            return {}
        raise OutputError(f"{parquet}: its llm4es provenance is not a JSON object")
    return value


def read_output(parquet: str | Path, columns: list[str] | None = None) -> tuple["pa.Table", dict]:
    """An output's rows and provenance."""
    import pyarrow.parquet as pq

    return pq.read_table(parquet, columns=columns), read_provenance(parquet)
