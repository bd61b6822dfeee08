"""Aggregate features ("agg", the LLM4ES paper's hand-crafted baseline), computed in DuckDB SQL.

One row per user who has at least one event at or before `as_of` (the snapshot's point in
time; default: the dataset's last event). Only those events count. Columns, in this order:

- `user_id`, `feature_timestamp` (= as_of, the same on every row);
- activity: `n_events`, `active_days` (distinct calendar dates), `span_days` (last minus first
  event, fractional days), `events_per_active_day`, `recency_days` (as_of minus the last event,
  fractional days). First and last event times themselves are not features (they leak dates);
- per numeric event field (numeric dtype), in definition order: `{field}_count` (non-null
  values), `_mean`, `_std` (sample standard deviation; NULL for one value), `_min`, `_max`, `_sum`;
- per grouping field, in definition order: `{field}_n_distinct` (distinct values of the user),
  then for each of the `top_n` most frequent values (counted over all users' events up to as_of;
  ties broken by the value), by rank: `{field}__{slug}_count` (the user's events with that
  value), `{field}__{slug}_share` (that count over n_events), `{field}__{slug}_{amount}_sum`
  when there is an amount field (0 without such events), and `{field}__{slug}_{numeric}_mean`
  for every numeric field (mean rating per genre, mean amount per MCC; NULL without such events).

Grouping fields are every categorical field, and every text field that is multi-valued (the
field the dataset's `summary` groups by with a `split`: MovieLens genres "Action, Comedy" count
for both) or has at most `max_text_values` distinct values. Free text (titles, queries with
thousands of values) and user attributes/labels are never used (labels would leak the targets). The
amount field is `AggregateConfig.amount_field`, else a numeric field named `amount`, else none
(MovieLens has ratings, not amounts). A slug is the value lower-cased with
each run of characters other than a-z and 0-9 replaced by `_` (at most 40 characters);
colliding names get `_2`, `_3`...; the value each column stands for is recorded in the
provenance (`categories`).

Written atomically: `<schema>.agg_features` and `<schema>.agg_features_meta` (one row: what
produced the table) are built as staging tables and swapped in together, and a Parquet copy
`data/<schema>/agg_features.parquet` replaces the old one by rename; the Parquet file carries
the same provenance as JSON under the key-value metadata key `llm4es`.

A refresh (`AggregateConfig.users`, with the served `categories`) costs what its users cost: the grouping
fields are those of `categories` (no scan of every event), only the users' events are read, their rows are
replaced in `agg_features` in one transaction (the other rows stay where they are) and written alone to
`data/<schema>/refresh/<as-of>/agg_features.parquet` (`refresh_file`), the snapshot a refresh publishes.
`agg_features.parquet` stays the last full run's.

How (the same code for both): one per-user SELECT of a few aggregates, and one statement counting long (a row
per user and top value: count, amount sum, numeric means; a row per user and field: distinct values) whose rows
are spread into the per-value columns in numpy. DuckDB plans a wide SELECT of a few hundred CASE WHEN
aggregates in longer than it runs it over a refresh's users, and count(DISTINCT) costs twice a GROUP BY.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import duckdb

from producers.shared.as_of import pick_as_of
from producers.datasets.definition import DatasetDefinition, DefinitionError, FieldSpec
from producers.stores.warehouse import Home, last_ingest, one, sql_ident, stored_definition, transaction
from producers.stores.provenance import code_version
from producers.stores.outputs import AGGREGATES, staging, write_parquet, write_staged

TABLE = AGGREGATES.table
META_TABLE = AGGREGATES.companions[0]
NUMERIC_STATS = ("count", "mean", "std", "min", "max", "sum")
ACTIVITY = ("n_events", "active_days", "span_days", "events_per_active_day", "recency_days")
SLUG_MAX = 40
_US_PER_DAY = 86_400_000_000


class AggregateError(DefinitionError):
    """The aggregate configuration does not fit the dataset (unknown amount field, no events)."""


@dataclass(frozen=True)
class AggregateConfig:
    top_n: int = 20  # values per categorical field (each: count, share, amount sum, numeric means)
    max_text_values: int = 50  # a text field with more distinct values is free text, not categories
    as_of: datetime | None = None  # snapshot time (UTC); default: the dataset's last event
    amount_field: str | None = None  # default: a numeric field named `amount`, if any
    force: bool = False  # run even if the dataset has not passed validation
    # A refresh: only these users are recomputed (the others' rows are kept), with the top values of
    # `categories` (a previous run's provenance) so the columns stay those already served.
    users: tuple | None = None
    categories: dict | None = None


@dataclass
class AggregateResult:
    dataset: str
    n_users: int
    n_features: int
    columns: list[str]
    parquet_path: Path
    as_of: datetime
    table: str = ""  # "<schema>.agg_features"
    provenance: dict[str, Any] = field(default_factory=dict)


def aggregate(home: Home, dataset: str, config: AggregateConfig = AggregateConfig(),
              log: Callable[[str], None] = lambda _: None) -> AggregateResult:
    from validation.gate import require_valid

    if config.top_n < 0:
        raise AggregateError(f"top_n must be at least 0, not {config.top_n}")
    con = home.connect()
    try:
        require_valid(con, dataset, config.force)
        definition = stored_definition(con, dataset)
        schema = definition.schema
        if config.users is not None:
            return _refresh(con, home, definition, config, log)
        with staging(con, AGGREGATES, schema):
            return _aggregate(con, home, definition, config, log)
    finally:
        con.close()


@dataclass
class _Group:
    """One grouping field's per-value columns. They are counted long, one row per user and top value the user
    has (`rank`: the value's rank, 1-based, NULL for the other values), then spread into the wide columns:
    a couple of aggregates per field instead of three or four per value."""
    field: FieldSpec
    rank: str  # SQL: the rank of the event's value (of `value`, one of the event's values, for a split field)
    split: str | None  # SQL: the list of the event's values of a multi-valued field, else None
    entries: list[dict]


@dataclass
class _Features:
    """The per-user aggregates over `<schema>.events` (the per-user SELECT `select`, grouped by user_id, and
    the per-value counts `groups`) and what they stand for."""
    as_of: datetime
    select: list[str]  # every column but the per-value ones, in `columns` order
    params: dict[str, Any]
    where: str
    columns: list[str]
    categories: dict[str, list[dict]]
    amount: FieldSpec | None
    numeric: list[FieldSpec] = field(default_factory=list)
    groups: list[_Group] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)  # the event fields read (numeric and grouping)
    rank_params: dict[str, Any] = field(default_factory=dict)
    # (column, SQL of the value, SQL condition): distinct values per user, counted long with the per-value rows
    distinct: list[tuple[str, str, str]] = field(default_factory=list)


def _features(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: AggregateConfig,
              log: Callable[[str], None]) -> _Features:
    schema = d.schema
    events = f'"{schema}".events'
    first, last = one(con, f"SELECT min(event_time), max(event_time) FROM {events}")
    as_of = pick_as_of(d.name, config.as_of, first, last, AggregateError)

    numeric, skipped = [], []
    for f in d.events.fields:
        if f.kind == "numeric":
            (numeric if f.is_number else skipped).append(f)
    if skipped:
        log(f"skipping numeric fields without a numeric dtype: {', '.join(f.name for f in skipped)}")
    amount = _amount_field(d, config.amount_field, numeric)
    if config.categories is not None:
        # the served columns' fields: no scan of every event to pick them again
        grouped = [f for f in d.events.fields if f.name in config.categories]
    else:
        grouped = _grouping_fields(con, d, events, config.max_text_values, log)

    names = _Names(["user_id", "feature_timestamp", *ACTIVITY])
    params: dict[str, Any] = {"as_of": as_of}
    rank_params: dict[str, Any] = {"as_of": as_of}
    where = "event_time <= $as_of AND user_id IS NOT NULL"
    # active_days and events_per_active_day (n_events over it) come from the distinct counts (`_spread`)
    select = [
        "user_id",
        "CAST($as_of AS TIMESTAMP) AS feature_timestamp",
        "count(*) AS n_events",
        f"(epoch_us(max(event_time)) - epoch_us(min(event_time))) / {_US_PER_DAY}.0 AS span_days",
        f"(epoch_us(CAST($as_of AS TIMESTAMP)) - epoch_us(max(event_time))) / {_US_PER_DAY}.0 AS recency_days",
    ]
    distinct = [("active_days", "CAST(event_time AS DATE)", "true")]
    for f in numeric:
        col = f'"{f.name}"'
        integral = f.dtype.upper() != "DOUBLE"
        exprs = {
            "count": f"count({col})",
            "mean": f"avg({col})",
            "std": f"stddev_samp({col})",
            "min": f"min({col})",
            "max": f"max({col})",
            # sum of an integer column is HUGEINT in DuckDB: keep it a plain BIGINT
            "sum": f"CAST(sum({col}) AS BIGINT)" if integral else f"sum({col})",
        }
        select += [f'{exprs[stat]} AS "{names.take(f"{f.name}_{stat}")}"' for stat in NUMERIC_STATS]

    categories: dict[str, list[dict]] = {}
    groups: list[_Group] = []
    for f in grouped:
        col = f'"{f.name}"'
        split = _split_of(d, f)
        top_params: dict[str, Any] = {"as_of": as_of}
        if split is None:
            values_sql = f"SELECT {col} AS v FROM {events} WHERE {where} AND {col} IS NOT NULL"
            parts = None
            distinct.append((names.take(f"{f.name}_n_distinct"), col, f"{col} IS NOT NULL"))
        else:
            params[f"split_{f.name}"] = top_params[f"split_{f.name}"] = rank_params[f"split_{f.name}"] = split
            parts = f"list_filter(string_split({col}, $split_{f.name}), lambda x: x <> '')"
            values_sql = f"SELECT unnest({parts}) AS v FROM {events} WHERE {where} AND {col} IS NOT NULL"
            distinct.append((names.take(f"{f.name}_n_distinct"), f"unnest({parts})", f"{col} IS NOT NULL"))
        if config.categories is not None:
            top = [(e["value"], e["events"]) for e in config.categories.get(f.name, [])]
        else:
            top = con.execute(f"SELECT v, count(*) AS n FROM ({values_sql}) GROUP BY 1 ORDER BY n DESC, v "
                              f"LIMIT {int(config.top_n)}", top_params).fetchall()
        slugs: set[str] = set()
        categories[f.name] = []
        for rank, (value, n) in enumerate(top, start=1):
            slug = _unique(slugify(value), slugs)
            entry = {"rank": rank, "value": value, "events": n,
                     "count_column": names.take(f"{f.name}__{slug}_count"),
                     "share_column": names.take(f"{f.name}__{slug}_share")}
            if amount is not None:
                entry["sum_column"] = names.take(f"{f.name}__{slug}_{amount.name}_sum")
            # NULL where the user has no event in the category: "no opinion" is not a mean of 0
            entry["mean_columns"] = {m.name: names.take(f"{f.name}__{slug}_{m.name}_mean") for m in numeric}
            categories[f.name].append(entry)
        if top:
            p = f"top_{len(groups)}"
            rank_params[p] = [value for value, _ in top]
            # the rank of the event's value among the top values (NULL for another value); the top values as
            # the column's type: a refresh has them from JSON (dates as text)
            dtype, value = ("VARCHAR", "value") if parts else (f.dtype.upper(), col)
            groups.append(_Group(f, f"list_position(CAST(${p} AS {dtype}[]), {value})", parts, categories[f.name]))

    log(f"aggregating {d.name} as of {as_of}: {len(names.taken) - 2} features "
        f"({len(numeric)} numeric, {len(grouped)} categorical fields, top {config.top_n}"
        f"{f', amount {amount.name}' if amount else ', no amount field'})")
    return _Features(as_of, select, params, where, names.taken, categories, amount, numeric=numeric, groups=groups,
                     fields=[f.name for f in numeric + grouped], rank_params=rank_params, distinct=distinct)


def _per_user_sql(f: _Features, source: str) -> str:
    """One row per user of `source` (events), ordered by user_id: every column but the per-value ones."""
    return f"SELECT {', '.join(f.select)} FROM {source} WHERE {f.where} GROUP BY user_id ORDER BY user_id"


def _per_value_sql(f: _Features, source: str) -> str:
    """One row per user, grouping field (`g`, its index in `f.groups`) and top value (`rank`) the user has
    events with: their count `n`, the amount sum `s` and the numeric means `m0`, `m1`... The same aggregates
    as one CASE WHEN per value and column would give, over the same events. Then, as `g` = len(f.groups) + i
    (rank 1), the user's number of distinct values of `f.distinct[i]` as `n`: the same counts as
    count(DISTINCT ...), at half its cost over every event."""
    carried = [sql_ident(m.name) for m in f.numeric]
    branches = []
    for g, group in enumerate(f.groups):
        col = sql_ident(group.field.name)
        if group.split is None:
            branches.append(f"SELECT user_id, {g} AS g, {group.rank} AS rank{''.join(', ' + c for c in carried)} "
                            f"FROM {source} WHERE {f.where} AND {col} IS NOT NULL")
        else:
            # each of the event's distinct values once: an event counts once for a value it names twice
            rows = (f"SELECT user_id, unnest(list_distinct({group.split})) AS value"
                    f"{''.join(', ' + c for c in carried)} FROM {source} WHERE {f.where} AND {col} IS NOT NULL")
            branches.append(f"SELECT user_id, {g} AS g, {group.rank} AS rank{''.join(', ' + c for c in carried)} "
                            f"FROM ({rows})")
    nulls = "".join(f", CAST(NULL AS {m.dtype.upper()}) AS {sql_ident(m.name)}" for m in f.numeric)
    for i, (_, value, condition) in enumerate(f.distinct, start=len(f.groups)):
        branches.append(f"SELECT user_id, {i} AS g, 1 AS rank{nulls} FROM (SELECT DISTINCT user_id, v FROM "
                        f"(SELECT user_id, {value} AS v FROM {source} WHERE {f.where} AND {condition}))")
    measures = ["count(*) AS n"]
    if f.amount is not None:
        total = f"sum({sql_ident(f.amount.name)})"
        measures.append(f"CAST({total} AS BIGINT) AS s" if f.amount.dtype.upper() != "DOUBLE" else f"{total} AS s")
    measures += [f"avg({sql_ident(m.name)}) AS m{i}" for i, m in enumerate(f.numeric)]
    return (f"SELECT user_id, g, rank, {', '.join(measures)} FROM ({' UNION ALL '.join(branches)}) "
            "WHERE rank >= 1 GROUP BY user_id, g, rank")


def _rows(con: duckdb.DuckDBPyConnection, f: _Features, source: str):
    """The aggregate rows of the users of `source` (a table or subquery of events), ordered by user_id, as
    Arrow, with the columns `f.columns`."""
    known = {**f.params, **f.rank_params}
    per_user, per_value = (_arrow(con.sql(sql, params=_used(known, sql)))
                           for sql in (_per_user_sql(f, source), _per_value_sql(f, source)))
    return _spread(per_user, per_value, f)


def _used(params: dict[str, Any], sql: str) -> dict[str, Any]:
    """The parameters `sql` names (DuckDB refuses others)."""
    named = set(re.findall(r"\$(\w+)", sql))
    return {k: v for k, v in params.items() if k in named}


def _spread(per_user, per_value, f: _Features):
    """The wide rows: `per_user`'s columns, the distinct counts and, per top value, its count, share, amount sum
    and numeric means from `per_value` (0 counts and sums, NULL means for a user without events of the value)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n_users = per_user.num_rows
    columns = {name: per_user.column(name) for name in per_user.column_names}
    n_events = per_user.column("n_events").to_numpy().astype(np.float64)
    row = pc.index_in(per_value.column("user_id"), value_set=per_user.column("user_id")).to_numpy()
    g_of = per_value.column("g").to_numpy()
    rank_of = per_value.column("rank").to_numpy().astype(np.int64) - 1

    def matrix(name: str, sel, width: int):
        """(values, valid) of `per_value`'s column `name` for the rows `sel`, laid out user x rank."""
        col = per_value.column(name)
        filled = pc.fill_null(col, 0).to_numpy()  # an integer column with NULLs would come out as floats
        values = np.zeros((n_users, width), dtype=filled.dtype)
        valid = np.zeros((n_users, width), dtype=bool)
        values[row[sel], rank_of[sel]] = filled[sel]
        valid[row[sel], rank_of[sel]] = col.is_valid().to_numpy(zero_copy_only=False)[sel]
        return col.type, values, valid

    for g, group in enumerate(f.groups):
        sel = g_of == g
        width = len(group.entries)
        _, counts, _ = matrix("n", sel, width)
        sums = matrix("s", sel, width) if f.amount is not None else None
        means = [matrix(f"m{i}", sel, width) for i in range(len(f.numeric))]
        for j, entry in enumerate(group.entries):
            columns[entry["count_column"]] = pa.array(counts[:, j])
            # as count(...) / count(*)::DOUBLE: the count as a double over n_events
            columns[entry["share_column"]] = pa.array(counts[:, j].astype(np.float64) / n_events)
            if sums is not None:
                kind, values, valid = sums
                columns[entry["sum_column"]] = pa.array(np.where(valid[:, j], values[:, j], 0), type=kind)
            for (kind, values, valid), m in zip(means, f.numeric):
                columns[entry["mean_columns"][m.name]] = pa.array(values[:, j], type=kind, mask=~valid[:, j])
    for i, (name, _, _) in enumerate(f.distinct, start=len(f.groups)):
        _, counts, _ = matrix("n", g_of == i, 1)
        columns[name] = pa.array(counts[:, 0])
    # as count(*) / count(DISTINCT CAST(event_time AS DATE))::DOUBLE
    columns["events_per_active_day"] = pa.array(n_events / columns["active_days"].to_numpy().astype(np.float64))
    return pa.table([columns[c] for c in f.columns], names=f.columns)


def _aggregate(con: duckdb.DuckDBPyConnection, home: Home, d: DatasetDefinition, config: AggregateConfig,
               log: Callable[[str], None]) -> AggregateResult:
    schema = d.schema
    f = _features(con, d, config, log)
    stg = AGGREGATES.staging_name(schema)
    rows = _rows(con, f, f'"{schema}".events')
    con.register("agg_rows", rows)
    try:
        con.execute(f"CREATE TABLE {stg} AS SELECT * FROM agg_rows")
    finally:
        con.unregister("agg_rows")
    n_users = rows.num_rows
    blob = _provenance(con, d, config, f, n_users)
    _write_meta(con, f"CREATE TABLE {AGGREGATES.staging_name(schema, META_TABLE)} AS", d, f, blob, n_users,
                AGGREGATES.parquet_path(home, schema))
    parquet = write_staged(con, AGGREGATES, schema, AGGREGATES.parquet_path(home, schema), blob, log)
    return AggregateResult(d.name, n_users, len(f.columns) - 2, f.columns, parquet, f.as_of, f"{schema}.{TABLE}", blob)


def refresh_file(home: Home, schema: str, as_of: datetime) -> Path:
    """Where a refresh as of `as_of` writes its users' rows (beside the other kinds' snapshot files)."""
    return home.data_dir / schema / "refresh" / as_of.strftime("%Y%m%dT%H%M%S") / AGGREGATES.file


def _refresh(con: duckdb.DuckDBPyConnection, home: Home, d: DatasetDefinition, config: AggregateConfig,
             log: Callable[[str], None]) -> AggregateResult:
    """Recompute `config.users` only: read their events alone, replace their rows of the table in one
    transaction (the others' rows are not rewritten), and write their rows alone to `refresh_file`. The full
    run's Parquet copy is left as it is (it stays the last full run's: a refresh's rows are in its own file)."""
    schema = d.schema
    if config.categories is None:
        raise AggregateError(f"a refresh of {d.name}'s aggregates needs the served top values (`categories` of the "
                             "served file's provenance), so the columns do not move")
    try:
        stored = [r[0] for r in con.execute(f'DESCRIBE "{schema}".{TABLE}').fetchall()]
    except duckdb.CatalogException:
        raise AggregateError(f"{d.name} has no aggregates to refresh: run `llm4es aggregate {d.name}` first") from None
    f = _features(con, d, config, log)
    users = list(config.users)
    if stored != f.columns:
        extra = [c for c in stored if c not in f.columns][:3] or [c for c in f.columns if c not in stored][:3]
        raise AggregateError(f"{d.name}: {schema}.{TABLE} has other columns than the served ones (e.g. {extra}): it "
                             f"was rebuilt since the last publish; publish it (`llm4es publish {d.name}`) or run "
                             f"`llm4es aggregate {d.name}` over every user")
    # the users' events once, as Arrow (the fields read only): the two aggregates then scan them, not every event
    read = ", ".join(["user_id", "event_time", *map(sql_ident, f.fields)])
    events = _arrow(con.sql(f'SELECT {read} FROM "{schema}".events WHERE user_id IN (SELECT unnest($users))',
                            params={"users": users}))
    con.register("agg_events", events)
    try:
        rows = _rows(con, f, "agg_events")
    finally:
        con.unregister("agg_events")
    n_refreshed = rows.num_rows
    target = refresh_file(home, schema, f.as_of)
    target.parent.mkdir(parents=True, exist_ok=True)
    blob = _provenance(con, d, config, f, n_refreshed)
    blob["refresh"] = {"as_of": f.as_of.isoformat(), "n_users": n_refreshed}

    def replace_rows() -> None:
        # one transaction: readers see the old rows or the new, never a user without a row
        con.register("agg_refresh", rows)
        try:
            with transaction(con):
                con.execute(f'DELETE FROM "{schema}".{TABLE} WHERE user_id IN (SELECT unnest($users))',
                            {"users": users})
                con.execute(f'INSERT INTO "{schema}".{TABLE} SELECT * FROM agg_refresh')
                n_users = con.execute(f'SELECT count(*) FROM "{schema}".{TABLE}').fetchall()[0][0]
                con.execute(f'DELETE FROM "{schema}".{META_TABLE}')
                _write_meta(con, f'INSERT INTO "{schema}".{META_TABLE} BY NAME', d, f, {**blob, "n_users": n_users},
                            n_users, target)
        finally:
            con.unregister("agg_refresh")

    log(f"{d.name}: {n_refreshed:,} users' aggregates recomputed as of {f.as_of}; their rows replaced in "
        f"{schema}.{TABLE}, written to {target}")
    parquet = write_parquet(rows, target, blob, before_rename=replace_rows)
    return AggregateResult(d.name, n_refreshed, len(f.columns) - 2, f.columns, parquet, f.as_of, f"{schema}.{TABLE}",
                           blob)


def _arrow(rel):
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def _provenance(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: AggregateConfig, f: _Features,
                n_users: int) -> dict:
    schema, as_of, columns, amount = d.schema, f.as_of, f.columns, f.amount
    ingest = last_ingest(con, schema) or {}
    validation = _last_validation(con, schema)
    produced_at = datetime.now(timezone.utc).replace(tzinfo=None)
    provenance = {
        "output": TABLE,
        "dataset": d.name,
        "table": f"{schema}.{TABLE}",
        "produced_at": produced_at.isoformat(),
        "code_version": code_version(),
        "ingest_id": ingest.get("ingest_id"),
        "source_hash": ingest.get("source_hash"),
        "definition_fingerprint": d.fingerprint(),
        "validation_run_id": validation[0] if validation else None,
        "validation_passed": validation[1] if validation else None,
        "as_of": as_of.isoformat(),
        "n_users": n_users,
        "n_features": len(columns) - 2,
        "config": {"top_n": config.top_n, "max_text_values": config.max_text_values, "as_of": as_of.isoformat(),
                   "amount_field": amount.name if amount else None, "force": config.force,
                   **({"refreshed_users": len(config.users)} if config.users is not None else {})},
        "columns": columns,
        "categories": f.categories,
    }
    return json.loads(json.dumps(provenance, default=str))  # category values such as dates as text


def _write_meta(con: duckdb.DuckDBPyConnection, into: str, d: DatasetDefinition, f: _Features, blob: dict,
                n_users: int, parquet: Path) -> None:
    """The one-row `agg_features_meta` (what produced the table), written by `into` (`CREATE TABLE x AS`: the
    staging copy of a full run; `INSERT INTO x BY NAME`: a refresh's row, in its transaction)."""
    columns = f.columns
    produced_at = datetime.fromisoformat(blob["produced_at"])
    con.execute(
        f"{into} SELECT "
        "CAST(? AS TIMESTAMP) AS produced_at, "
        "? AS dataset, CAST(? AS TIMESTAMP) AS as_of, CAST(? AS BIGINT) AS n_users, CAST(? AS INTEGER) AS n_features, "
        "? AS code_version, ? AS ingest_id, ? AS source_hash, ? AS definition_fingerprint, "
        "? AS validation_run_id, CAST(? AS BOOLEAN) AS validation_passed, ? AS config, ? AS columns, "
        "? AS categories, ? AS parquet_path",
        [produced_at, d.name, f.as_of, n_users, len(columns) - 2, blob["code_version"], blob["ingest_id"],
         blob["source_hash"], blob["definition_fingerprint"], blob["validation_run_id"], blob["validation_passed"],
         json.dumps(blob["config"]), json.dumps(columns), json.dumps(blob["categories"]), str(parquet)])


def slugify(value: Any) -> str:
    """A category value as part of an identifier: `Sci-Fi` -> `sci_fi`, `0742` -> `0742`."""
    slug = re.sub(r"[^a-z0-9]+", "_", str(value).lower()).strip("_")[:SLUG_MAX].strip("_")
    return slug or "value"


def _unique(name: str, taken: set[str]) -> str:
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


class _Names:
    """Column names in order, unique ignoring case (DuckDB identifiers are case-insensitive)."""

    def __init__(self, initial: list[str]):
        self.taken: list[str] = []
        self._lower: set[str] = set()
        for name in initial:
            self.take(name)

    def take(self, name: str) -> str:
        candidate, k = name, 1
        while candidate.lower() in self._lower:
            k += 1
            candidate = f"{name}_{k}"
        self._lower.add(candidate.lower())
        self.taken.append(candidate)
        return candidate


def _split_of(d: DatasetDefinition, f: FieldSpec) -> str | None:
    """The separator of a multi-valued field (the summary's `split`, e.g. MovieLens genres), else None."""
    summary = d.events.summary
    return summary.split if summary and summary.group_by == f.name and summary.split else None


def _grouping_fields(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, events: str, max_text_values: int,
                     log: Callable[[str], None]) -> list[FieldSpec]:
    """The fields whose values become per-value columns: every categorical field, and every text field
    that is multi-valued (split) or has at most `max_text_values` distinct values (free text such as
    titles or queries has too many values to count one by one)."""
    # Counted over every event, not only those up to as_of: which fields count does not change
    # between snapshots of the same data.
    out = []
    for f in d.events.fields:
        if f.kind == "categorical":
            out.append(f)
        elif f.kind == "text":
            col = f'"{f.name}"'
            split = _split_of(d, f)
            values = (f"unnest(list_filter(string_split({col}, $sep), lambda x: x <> ''))" if split else col)
            sql = f"SELECT count(DISTINCT v) FROM (SELECT {values} AS v FROM {events} WHERE {col} IS NOT NULL)"
            n = one(con, sql, {"sep": split} if split else {})[0]
            if n <= max_text_values:
                out.append(f)
            else:
                log(f"skipping text field {f.name}: {n:,} distinct values (more than {max_text_values})")
    return out


def _amount_field(d: DatasetDefinition, requested: str | None, numeric: list[FieldSpec]) -> FieldSpec | None:
    by_name = {f.name: f for f in numeric}
    if requested is not None:
        if requested not in by_name:
            raise AggregateError(
                f"amount field {requested!r} is not a numeric event field of {d.name}; numeric fields: "
                f"{', '.join(by_name) or 'none'}")
        return by_name[requested]
    return by_name.get("amount")


def _last_validation(con: duckdb.DuckDBPyConnection, schema: str) -> tuple[str, bool] | None:
    try:  # one query, not a catalog lookup first: a refresh pays for each
        return one(con, f'SELECT run_id, success FROM "{schema}".validation_log ORDER BY started_at DESC LIMIT 1')
    except duckdb.CatalogException:  # never validated (a forced run)
        return None


