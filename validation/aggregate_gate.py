"""The quality gate on an aggregate snapshot (`agg_features` rows of some users) before it is served.

Great Expectations expectations, in the style of `validation.snapshot_gate` (whose report and error it
returns), on three small frames:
- `columns`: the snapshot's columns (no rows) -> exactly the served ones, in their order
- `rows`: one row per user: its key, the activity columns, `non_finite` (how many of the row's feature
  values are NaN or +-inf, counted in Arrow: pandas reads NaN as missing, so no check on a value itself
  can see it) and `first_non_finite` (which column, for the message)
  -> user keys unique; no NaN/inf anywhere; the activity columns (`n_events`...) are never NULL (every
  other NULL can be legitimate: a sample standard deviation of one value, the mean rating of a category
  the user has no event in)
- `ranges`: one row per numeric feature column that does not accumulate with time (`judged_by_range`:
  means, std, min, max, shares, events per active day; not counts, sums, n_distinct, n_events,
  active_days, span_days, recency_days, which a longer history or a later as-of legitimately pushes past the
  served maximum):
  the share of the snapshot's values outside the range the served rows hold (their min..max, widened by
  `range_slack` of its width on each side)
  -> at most `max_out_of_range` per column (a share, not every value: one user may be the most extreme
  yet; a unit or sign error moves every value)
- `figures`: one row: the share of the expected users (those refreshed) that have a row.

Which columns are features: all but `user_id` and `feature_timestamp`. The range check needs the served
rows (`previous`); without them only the other checks run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from validation.snapshot_gate import (
    EXAMPLES,
    GateCheck,
    SnapshotGateError,
    SnapshotReport,
    _Expectation,
    _plain,
    run_frames,
    share_present,
)

KEYS = ("user_id", "feature_timestamp")
NEVER_NULL = ("n_events", "active_days", "span_days", "events_per_active_day", "recency_days")
# Columns that grow with a user's history (a refresh after a long gap legitimately passes the served maximum):
# judged for finiteness, not against the served range.
ACCUMULATING = ("n_events", "active_days", "span_days", "recency_days")
ACCUMULATING_SUFFIXES = ("_count", "_sum", "_n_distinct")


def judged_by_range(column: str) -> bool:
    return column not in ACCUMULATING and not column.endswith(ACCUMULATING_SUFFIXES)


@dataclass(frozen=True)
class AggregateGateConfig:
    range_slack: float = 0.5  # the served min..max widened by this share of its width on each side
    max_out_of_range: float = 0.05  # share of a column's snapshot values allowed outside it
    min_share_present: float = 1.0  # of the expected users: every refreshed user has a row


@dataclass(frozen=True)
class Ranges:
    """Each numeric feature column's served min and max (from the rows served before this snapshot)."""
    low: dict[str, float]
    high: dict[str, float]


def served_ranges(con, source_sql: str) -> Ranges:
    """min and max of every numeric column of `source_sql` (a DuckDB relation: the served history), in one scan."""
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM ({source_sql})").fetchall()}
    numeric = [c for c, t in types.items() if c not in KEYS and _is_number(t) and judged_by_range(c)]
    if not numeric:
        return Ranges({}, {})
    # isfinite keeps a NaN or inf in an old row from widening the range to everything (CASE, not FILTER:
    # 25x faster over a hundred columns)
    parts = [f'min(CASE WHEN isfinite("{c}") THEN "{c}" END), max(CASE WHEN isfinite("{c}") THEN "{c}" END)'
             for c in numeric]
    row = con.execute(f"SELECT {', '.join(parts)} FROM ({source_sql})").fetchall()[0]
    return Ranges({c: row[2 * i] for i, c in enumerate(numeric)}, {c: row[2 * i + 1] for i, c in enumerate(numeric)})


def check_aggregate_snapshot(snapshot: pa.Table, columns: Sequence[str], previous: Ranges | None = None,
                             config: AggregateGateConfig = AggregateGateConfig(), *,
                             expected_users: Iterable | None = None, force: bool = False) -> SnapshotReport:
    """Run the gate on `snapshot` (the served `columns` expected); raise SnapshotGateError on failure unless `force`."""
    import pyarrow.compute as pc

    frame = snapshot.to_pandas()
    numeric = [c for c in snapshot.column_names if c not in KEYS and _is_arrow_number(snapshot.schema.field(c).type)]
    # from Arrow, not pandas: there a NULL (legitimate) and a NaN (never) are the same missing value
    bad = np.zeros((snapshot.num_rows, len(numeric)), dtype=bool)
    for j, c in enumerate(numeric):
        if pa.types.is_floating(snapshot.schema.field(c).type):
            bad[:, j] = np.asarray(pc.fill_null(pc.invert(pc.is_finite(snapshot.column(c))), False), dtype=bool)
    first = [numeric[int(np.argmax(r))] if r.any() else None for r in bad]
    # narrow frames: GX's cost grows with the columns it is handed, the checks need only these
    rows = frame[["user_id", *[c for c in NEVER_NULL if c in frame.columns]]].assign(
        non_finite=bad.sum(axis=1), first_non_finite=first)
    ex = [
        _Expectation("columns", "ExpectTableColumnsToMatchOrderedList", {"column_list": list(columns)},
                     "the served columns, in order", f"{len(columns)} columns as served"),
        _Expectation("rows", "ExpectColumnValuesToBeUnique", {"column": "user_id"}, "one row per user",
                     "user keys unique"),
        _Expectation("rows", "ExpectColumnValuesToBeBetween", {"column": "non_finite", "max_value": 0},
                     "no NaN or infinite values", "every feature value finite or NULL"),
        *[_Expectation("rows", "ExpectColumnValuesToNotBeNull", {"column": c}, f"{c} is never NULL",
                       "no NULL") for c in NEVER_NULL if c in frame.columns],
    ]
    figures: dict[str, float] = {}
    if expected_users is not None:
        figures["share_present"], expectation = share_present(expected_users, frame["user_id"],
                                                              config.min_share_present, "refreshed users")
        ex.append(expectation)
    ranges = None
    if previous is not None:
        out = []
        for c in filter(judged_by_range, numeric):
            lo, hi = previous.low.get(c), previous.high.get(c)
            if lo is None or hi is None:
                continue
            pad = (hi - lo) * config.range_slack
            v = frame[c].to_numpy(dtype=np.float64, na_value=np.nan)
            v = v[np.isfinite(v)]  # NULLs are judged above, NaN/inf too
            share = float(((v < lo - pad) | (v > hi + pad)).mean()) if len(v) else 0.0
            out.append({"column": c, "share_out": share, "served": f"{lo:.4g}..{hi:.4g}",
                        "seen": f"{v.min():.4g}..{v.max():.4g}" if len(v) else "none"})
        ranges = pd.DataFrame(out, columns=["column", "share_out", "served", "seen"])
        ex.append(_Expectation("ranges", "ExpectColumnValuesToBeBetween",
                               {"column": "share_out", "max_value": config.max_out_of_range},
                               "values within the served range", f"at most {config.max_out_of_range:.0%} of each "
                               f"column's values outside the served min..max ± {config.range_slack:.0%} of its width"))
    checks = run_frames({"columns": frame.iloc[:0], "rows": rows, "ranges": ranges,
                         "figures": pd.DataFrame([figures]) if figures else None}, ex,
                        {"rows": "user_id", "ranges": "column"}, {"rows": "users", "ranges": "columns"})
    for check, e in zip(checks, [e for e in ex if e.batch != "ranges" or ranges is not None]):
        _explain(check, e, frame, rows, ranges)
    report = SnapshotReport(success=all(c.success for c in checks), forced=force, checks=checks, n_users=len(frame),
                            dim=None)
    if not report.success and not force:
        raise SnapshotGateError(report)
    return report


def _explain(check: GateCheck, e: _Expectation, frame: pd.DataFrame, rows: pd.DataFrame,
             ranges: pd.DataFrame | None) -> None:
    """Failing examples a person can act on: the column and value, not only the user."""
    if e.expectation == "ExpectTableColumnsToMatchOrderedList":
        got = list(frame.columns)
        want = e.kwargs["column_list"]
        missing, extra = [c for c in want if c not in got], [c for c in got if c not in want]
        check.figure = f"{len(got)} columns, {len(missing)} missing, {len(extra)} unexpected"
        if not check.success:
            check.examples = ([f"missing {c}" for c in missing[:EXAMPLES]] +
                              [f"unexpected {c}" for c in extra[:EXAMPLES]] or ["same columns, another order"])
    if check.success:
        return
    if e.kwargs.get("column") == "non_finite":
        bad = rows[rows["non_finite"] > 0].head(EXAMPLES)
        check.examples = [f"user {_plain(u)}: {c} = {frame.loc[i, c]}" for i, u, c in
                          zip(bad.index, bad["user_id"], bad["first_non_finite"])]
    elif e.kwargs.get("column") == "share_out" and ranges is not None:
        bad = ranges[ranges["share_out"] > e.kwargs["max_value"]].head(EXAMPLES)
        check.examples = [f"{r.column}: {r.share_out:.0%} outside, values {r.seen} vs served {r.served}"
                          for r in bad.itertuples()]


def _is_arrow_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_number(duck_type: str) -> bool:
    t = duck_type.upper()
    return t in ("DOUBLE", "FLOAT", "REAL", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT",
                 "UINTEGER", "USMALLINT", "UTINYINT") or t.startswith("DECIMAL")




def check_aggregate_file(snapshot: Path, columns: Sequence[str], history: Path | None,
                         config: AggregateGateConfig = AggregateGateConfig(), *, expected_users: Iterable | None = None,
                         force: bool = False) -> SnapshotReport:
    """The gate on an aggregate snapshot file, its ranges judged against the served history file (when it exists)."""
    import duckdb
    import pyarrow.parquet as pq

    previous = None
    if history is not None and history.is_file():
        con = duckdb.connect()
        try:
            previous = served_ranges(con, "SELECT * FROM read_parquet('" + str(history).replace("'", "''") + "')")
        finally:
            con.close()
    return check_aggregate_snapshot(pq.read_table(snapshot), columns, previous, config,
                                    expected_users=expected_users, force=force)
