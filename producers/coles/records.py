"""Per-user event sequences for ptls, built by one DuckDB query over `"<schema>".events`.

A record is a ptls feature dict: `{'user_id': id, 'event_time': float64 tensor (unix seconds),
'<categorical field>': int64 codes, '<numeric field>': float32 values, 'time_delta_days': float32}`,
every sequence in time order (ties: the definition's key columns, then every field in definition
order, so the order is total whatever order the rows were loaded in).

- categorical fields: the `max_categories` most frequent values (over all users' events up to
  as_of; ties broken by value; NULL counts as a value of its own) get codes 1..K by rank, every
  other value K+1 ("other"); 0 is padding. The vocabulary size of the model is K+2.
- numeric fields (numeric dtype): sign(x) * ln(1 + |x|); NULL, NaN and infinities -> 0. Numeric fields of another
  dtype are skipped (as by the aggregate features).
- `time_delta_days`: ln(1 + days since the user's previous event), 0 for the first event;
  computed over the whole history, before it is cut to the `max_seq_len` most recent events.
- text fields are not used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
import numpy as np

from producers.shared.as_of import pick_as_of
from producers.coles.config import ColesConfig, ColesError
from producers.datasets.definition import DatasetDefinition, FieldSpec

TIME_DELTA = "time_delta_days"
_US_PER_DAY = 86_400_000_000


@dataclass
class Records:
    users: list  # user ids, ascending
    records: list[dict]  # one ptls feature dict per user, same order
    n_events: np.ndarray  # events per user up to as_of, before cutting to max_seq_len
    categorical: dict[str, int]  # field -> K (codes 1..K, K+1 other, 0 padding)
    numeric: list[str]  # numeric inputs, TIME_DELTA last
    as_of: datetime
    digest: str  # sha256 of every sequence: the data version the run key uses
    vocabulary: dict[str, dict[str, Any]] = field(default_factory=dict)  # per field: distinct values, coverage
    skipped: list[str] = field(default_factory=list)  # event fields not used, with why

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_kept(self) -> int:
        return int(sum(len(r["event_time"]) for r in self.records))


def usable_fields(d: DatasetDefinition) -> tuple[list[FieldSpec], list[FieldSpec], list[str]]:
    """(categorical, numeric, skipped descriptions) of the definition's event fields."""
    categorical, numeric, skipped = [], [], []
    for f in d.events.fields:
        if f.kind == "categorical":
            categorical.append(f)
        elif f.is_number:
            numeric.append(f)
        elif f.kind == "numeric":
            skipped.append(f"{f.name} (numeric field of dtype {f.dtype})")
        else:
            skipped.append(f"{f.name} (text)")
    return categorical, numeric, skipped


def read_records(con: duckdb.DuckDBPyConnection, d: DatasetDefinition, config: ColesConfig,
                 vocab_as_of: datetime | None = None, users: list | None = None,
                 codes: dict[str, list] | None = None) -> Records:
    """Every user's events up to as_of (default: the last event) as ptls records, sorted by user id.

    A refresh (inference with a trained encoder): `codes`, each field's ranked values as the encoder's
    vocabulary stored them (`vocabulary[field]["values"]`), so every value keeps the code the encoder
    learned even when late events (an append dated before the old as-of) would rank them otherwise;
    else `vocab_as_of`, the as-of the vocabulary was ranked at (runs that stored no values); `users`,
    only these users' records."""
    import torch

    categorical, numeric, skipped = usable_fields(d)
    if not categorical and not numeric:
        raise ColesError(f"{d.name} has no categorical or numeric event fields for CoLES to encode "
                         f"(fields: {', '.join(f'{f.name} ({f.kind})' for f in d.events.fields) or 'none'})")
    events = f'"{d.schema}".events'
    first, last = _row(con, f"SELECT min(event_time), max(event_time) FROM {events} WHERE user_id IS NOT NULL")
    as_of = pick_as_of(d.name, config.as_of, first, last, ColesError)  # never in the future

    names = {f.name for f in d.events.fields}
    delta = TIME_DELTA
    while delta in names:
        delta = f"_{delta}"
    vocab_as_of = vocab_as_of or as_of
    params: dict[str, Any] = {"as_of": as_of, "max_len": config.max_seq_len}
    ev = f"SELECT * FROM {events} WHERE event_time <= $as_of AND user_id IS NOT NULL"
    vev = f"SELECT * FROM {events} WHERE event_time <= $vocab_as_of AND user_id IS NOT NULL"
    if users is not None:
        params["users"] = list(users)
        ev += " AND user_id IN (SELECT unnest($users))"

    # vocabularies: one small query per categorical field (size and coverage, for the model and provenance)
    vocabulary: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for f in categorical:
        distinct, covered, total = _row(con, f"""
            WITH ev AS ({vev}), g AS (SELECT "{f.name}" AS v, count(*) AS n FROM ev GROUP BY 1),
            r AS (SELECT n, row_number() OVER (ORDER BY n DESC, v NULLS LAST) AS code FROM g)
            SELECT count(*), sum(n) FILTER (WHERE code <= $k), sum(n) FROM r""",
                                        {"vocab_as_of": vocab_as_of, "k": config.max_categories})
        sizes[f.name] = k = min(int(distinct), config.max_categories)
        vocabulary[f.name] = {"distinct_values": int(distinct), "codes": k, "other_code": k + 1,
                              "embedding_in": k + 2, "event_coverage": float(covered) / float(total) if total else 0.0}
        if codes is not None and f.name in codes:  # the trained encoder's size, whatever the events say now
            sizes[f.name] = k = len(codes[f.name])
            vocabulary[f.name].update(codes=k, other_code=k + 1, embedding_in=k + 2)
            values = list(codes[f.name])
        else:  # the k most frequent values, ranked once: the coding below and the stored run both use them
            values = [r[0] for r in con.execute(
                f'SELECT CAST("{f.name}" AS VARCHAR) FROM ({vev}) GROUP BY "{f.name}" '
                f'ORDER BY count(*) DESC, "{f.name}" NULLS LAST LIMIT $k',
                {"vocab_as_of": vocab_as_of, "k": k}).fetchall()]
        vocabulary[f.name]["values"] = values  # stored with the run, so that a refresh codes values the same way

    keys = [c for c in (d.events.key or []) if c not in ("user_id", "event_time")]
    order_cols = ["event_time", *keys, *(f.name for f in d.events.fields if f.name not in keys)]
    order = ", ".join(f'ev."{c}" NULLS LAST' for c in order_cols)
    ctes = [f"ev AS ({ev})"]
    joins, select, lists = [], [], []
    for i, f in enumerate(categorical):
        params[f"voc{i}"] = vocabulary[f.name]["values"]
        ranked = f"$voc{i}::VARCHAR[]"
        ctes.append(f"voc{i} AS (SELECT unnest({ranked}) AS v, generate_subscripts({ranked}, 1) AS code)")
        joins.append(f'LEFT JOIN voc{i} ON CAST(ev."{f.name}" AS VARCHAR) IS NOT DISTINCT FROM voc{i}.v')
        select.append(f"coalesce(voc{i}.code, {sizes[f.name] + 1})::BIGINT AS c{i}")
        lists.append(f"list(c{i} ORDER BY pos) AS c{i}")
    for i, f in enumerate(numeric):
        x = f'CAST(ev."{f.name}" AS DOUBLE)'
        select.append(f"coalesce(CASE WHEN isfinite({x}) THEN CAST(sign({x}) AS DOUBLE) * ln(1 + abs({x})) END, 0)"
                      f"::FLOAT AS n{i}")
        lists.append(f"list(n{i} ORDER BY pos) AS n{i}")
    sql = f"""
        WITH {', '.join(ctes)},
        coded AS (
            SELECT ev.user_id, epoch_us(ev.event_time) AS t_us, {', '.join(select)},
                   ln(1 + coalesce(epoch_us(ev.event_time) - lag(epoch_us(ev.event_time)) OVER w, 0)
                          / {_US_PER_DAY}.0)::FLOAT AS dt,
                   row_number() OVER w AS pos,
                   count(*) OVER (PARTITION BY ev.user_id) AS n
            FROM ev {' '.join(joins)}
            WINDOW w AS (PARTITION BY ev.user_id ORDER BY {order}))
        SELECT user_id, any_value(n) AS n_events, list(t_us ORDER BY pos) AS t_us, {', '.join(lists)},
               list(dt ORDER BY pos) AS dt
        FROM coded WHERE pos > n - $max_len
        GROUP BY user_id ORDER BY user_id"""
    table = con.sql(sql, params=params).to_arrow_table()

    users = table.column("user_id").to_pylist()
    n_events = table.column("n_events").to_numpy().astype(np.int64)
    columns: dict[str, np.ndarray] = {"event_time": _flat(table, "t_us", np.float64) / 1e6}
    for i, f in enumerate(categorical):
        columns[f.name] = _flat(table, f"c{i}", np.int64)
    for i, f in enumerate(numeric):
        columns[f.name] = _flat(table, f"n{i}", np.float32)
    columns[delta] = _flat(table, "dt", np.float32)
    offsets = _offsets(table, "t_us")

    digest = hashlib.sha256()
    digest.update(repr(users).encode())
    digest.update(offsets.tobytes())
    per_column = {}
    for name, values in columns.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
        per_column[name] = torch.from_numpy(values).split(np.diff(offsets).tolist())
    records = [{"user_id": u, **{name: per_column[name][j] for name in columns}} for j, u in enumerate(users)]
    return Records(users=users, records=records, n_events=n_events, categorical=sizes,
                   numeric=[f.name for f in numeric] + [delta], as_of=as_of, digest=digest.hexdigest(),
                   vocabulary=vocabulary, skipped=skipped)


def _row(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> tuple:
    """The one row of an aggregate query, read to its end (DuckDB 2 blocks a connection with a half-read result)."""
    return con.execute(sql, params or {}).fetchall()[0]


def _offsets(table: Any, column: str) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0]


def _flat(table: Any, column: str, dtype: Any) -> np.ndarray:
    """The list column's values end to end, as a writable numpy array (torch wants one)."""
    arr = table.column(column).combine_chunks()
    return np.array(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
