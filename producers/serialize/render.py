"""SQL that renders each event as text: the paper's serialization format, built where the data lives.

A user's text is a header line naming the fields (`Date | Title | Year | Genres | Rating`),
then one line per event in time order with the values separated by `, `. Codes are replaced
by their descriptions (MCC 5411 -> "Grocery Stores, Supermarkets"); which fields appear, their
names and rendering come from the dataset definition. Pure functions from the definition to
SQL text; `producers.serialize.run` executes them.
"""
from __future__ import annotations

from typing import Literal

from producers.datasets.definition import DatasetDefinition, FieldSpec
from producers.ingest.raw_load import sql_str

TimeFormat = Literal["readable", "day-index"]
HEADER_SEP = " | "
VALUE_SEP = ", "

# strftime patterns DuckDB's timestamp-to-text cast already produces: a prefix is much cheaper.
_CAST_PREFIX = {"%Y-%m-%d %H:%M:%S": 19, "%Y-%m-%d %H:%M": 16, "%Y-%m-%d": 10}


def header(d: DatasetDefinition) -> str:
    return HEADER_SEP.join([d.events.time.label, *(f.display for f in d.serialized_fields)])


def time_text(d: DatasetDefinition, time_format: TimeFormat, col: str = "e.event_time") -> str:
    """The event time as text: readable (the definition's `display` pattern) or the paper's day index."""
    if time_format == "day-index":
        # Days since the dataset's own day 0 where it has one (Sber), else since 1970 (the paper's UNIX days).
        origin = d.events.time.origin or "1970-01-01"
        return f"CAST(datediff('day', DATE {sql_str(origin)}, {col}) AS VARCHAR)"
    pattern = d.events.time.display
    if pattern in _CAST_PREFIX:
        return f"left(CAST({col} AS VARCHAR), {_CAST_PREFIX[pattern]})"
    return f"strftime({col}, {sql_str(pattern)})"


def value_text(f: FieldSpec, col: str, code_alias: str | None) -> str:
    """One field's value as text; NULL becomes the empty string so positions never shift."""
    dtype = f.dtype.upper()
    if code_alias:
        text = f"coalesce({code_alias}.description, CAST({col} AS VARCHAR))"
    elif dtype == "DOUBLE":
        # DECIMAL(18, d) is a plain 64-bit integer inside (twice as fast as 38 digits); values too
        # large for it keep DuckDB's own rendering.
        text = (f"coalesce(CAST(TRY_CAST({col} AS DECIMAL(18, {f.decimals})) AS VARCHAR), "
                f"CAST({col} AS VARCHAR))")
    elif dtype == "VARCHAR":
        # A line break inside a value would split the event into two lines.
        text = f"replace(replace({col}, chr(13), ' '), chr(10), ' ')"
    else:
        text = f"CAST({col} AS VARCHAR)"
    return f"coalesce({text}, '')"


def rendered_events_sql(d: DatasetDefinition, time_format: TimeFormat = "readable", where: str = "") -> str:
    """SELECT user_id, event_time, t_time, t_<field>... (each value as text) for every event."""
    schema = f'"{d.schema}"'
    joins, values = [], [f"{time_text(d, time_format)} AS t_time"]
    for i, f in enumerate(d.serialized_fields):
        alias = None
        if f.codes:
            alias = f"c{i}"
            joins.append(f"LEFT JOIN {schema}.codes AS {alias} ON {alias}.code_table = {sql_str(f.codes)} "
                         f'AND {alias}.code = CAST(e."{f.name}" AS VARCHAR)')
        values.append(f'{value_text(f, f"e.{_q(f.name)}", alias)} AS "t_{f.name}"')
    return (f"SELECT e.user_id, e.event_time, {', '.join(values)} FROM {schema}.events AS e "
            f"{' '.join(joins)} {('WHERE ' + where) if where else ''}")


def line_sql(d: DatasetDefinition) -> str:
    """The event line from the rendered columns of `rendered_events_sql`."""
    cols = ["t_time", *(f"t_{f.name}" for f in d.serialized_fields)]
    return f"concat_ws({sql_str(VALUE_SEP)}, {', '.join(_q(c) for c in cols)})"


def user_bodies_sql(d: DatasetDefinition, time_format: TimeFormat = "readable", max_lines: int | None = None,
                    where: str = "") -> str:
    """Per user: the event lines in time order joined by newlines (the most recent `max_lines`).

    Lines are ordered by time, then by the line itself, so events at the same second always come
    out in the same order. `list(... ORDER BY ...)` is about 1.5x faster than an ordered
    string_agg in DuckDB 2.0 (measured in benchmarks/serialize.py).
    """
    keep = f"[-{max_lines}:]" if max_lines else ""
    return (f"SELECT user_id, count(*) AS n_events_total, "
            f"array_to_string(list(line ORDER BY event_time, line){keep}, chr(10)) AS body "
            f"FROM (SELECT user_id, event_time, {line_sql(d)} AS line FROM ({rendered_events_sql(d, time_format, where)})) "
            f"GROUP BY user_id")


def _q(name: str) -> str:
    return f'"{name}"' if not name.startswith('"') else name
