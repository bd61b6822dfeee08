"""SQL that renders each event as text, built where the data lives. Two formats:

- `paper` (the LLM4ES paper's): a header line naming the fields (`Date | Title | Year | Genres |
  Rating`), then one line per event in time order, the time and the values separated by `, `.
- `compact` (token-efficient, the default): the same header, then the events of a day on lines of
  up to four events separated by `; `, the first starting with the date
  (`1997-11-03: Evil Dead II,1987, Action, Horror,3; Four Rooms,1995, Thriller,4`): the date once
  per day instead of a full timestamp on every event; a number follows its comma without a space
  (byte-level BPE tokenizers such as SmolLM2's spend a token on the space before digits); and a
  run of identical consecutive events is written once with its count (`Coffee shop,3.50 x4`). A
  run that spans several days gets a line of its own with its first and last date
  (`2021-03-01 to 2022-02-01: Employed x12`), so months of the same state cost one line.
  Lines are capped at four events so that the budget can still cut within a long day.

Either way a line is the unit the token budget keeps or drops (oldest first), and the SQL returns
how many events each line holds, so "events kept" stays a count of events. Codes are replaced by
their descriptions (MCC 5411 -> "Grocery Stores, Supermarkets"); which fields appear, their names
and rendering come from the dataset definition. Pure functions from the definition to SQL text;
`producers.serialize.run` executes them.
"""
from __future__ import annotations

from typing import Literal

from producers.datasets.definition import NUMERIC_DTYPES, DatasetDefinition, FieldSpec
from producers.stores.warehouse import sql_str

TimeFormat = Literal["readable", "day-index"]
Format = Literal["paper", "compact"]
FORMATS: tuple[str, ...] = ("paper", "compact")
HEADER_SEP = " | "
VALUE_SEP = ", "
EVENT_SEP = "; "  # compact: between the events of a day
RUN_MARK = " x"  # compact: a run of identical consecutive events, `<event> x<count>`
ITEMS_PER_LINE = 4  # compact: events (or runs) per line, the granularity of the budget's cut
_TIME_OF_DAY = ("%H", "%I", "%M", "%S", "%p", "%f", "%X", "%T", "%R", "%c")

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


def date_text(d: DatasetDefinition, time_format: TimeFormat, col: str = "e.event_time") -> str:
    """The event's day as text (compact format): the display pattern up to its first time-of-day part."""
    if time_format == "day-index":
        return time_text(d, time_format, col)
    day = _day_pattern(d)
    if day == "%Y-%m-%d":
        return f"left(CAST({col} AS VARCHAR), 10)"
    return f"strftime({col}, {sql_str(day)})"


def _day_pattern(d: DatasetDefinition) -> str:
    pattern = d.events.time.display
    cut = min([pattern.find(p) for p in _TIME_OF_DAY if p in pattern] or [len(pattern)])
    return pattern[:cut].rstrip(" T,:-/") or "%Y-%m-%d"


def line_sql(d: DatasetDefinition) -> str:
    """The event line from the rendered columns of `rendered_events_sql`."""
    cols = ["t_time", *(f"t_{f.name}" for f in d.serialized_fields)]
    return f"concat_ws({sql_str(VALUE_SEP)}, {', '.join(_q(c) for c in cols)})"


def user_bodies_sql(d: DatasetDefinition, time_format: TimeFormat = "readable", max_lines: int | None = None,
                    where: str = "", fmt: Format = "paper") -> str:
    """Per user: the lines in time order joined by newlines (the most recent `max_lines`).

    Columns: user_id, n_events_total, body, and for the compact format `line_events` (the events
    each kept line holds, in line order). In the paper format a line is an event.

    Lines are ordered by time, then by the line itself, so events at the same second always come
    out in the same order. `list(... ORDER BY ...)` is about 1.5x faster than an ordered
    string_agg in DuckDB 2.0 (measured in benchmarks/serialize.py).
    """
    if fmt == "compact":
        return compact_bodies_sql(d, time_format, max_lines, where)
    if fmt != "paper":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    keep = f"[-{max_lines}:]" if max_lines else ""
    return (f"SELECT user_id, count(*) AS n_events_total, "
            f"array_to_string(list(line ORDER BY event_time, line){keep}, chr(10)) AS body "
            f"FROM (SELECT user_id, event_time, {line_sql(d)} AS line "
            f"FROM ({rendered_events_sql(d, time_format, where)})) "
            f"GROUP BY user_id")


def compact_bodies_sql(d: DatasetDefinition, time_format: TimeFormat = "readable", max_lines: int | None = None,
                       where: str = "") -> str:
    """The compact format (see the module docstring), as one query.

    Events are ordered as in the paper format (time, then text). A run is a maximal stretch of
    consecutive events with the same text (every serialized field, not the time). A run within one
    day is an item of that day's line; a run over several days is a line of its own. Lines are
    ordered by their first event.
    """
    keep = f"[-{max_lines}:]" if max_lines else ""
    event = _compact_event(d)
    rendered = rendered_events_sql(d, time_format, where)
    day = date_text(d, time_format, "r.event_time")
    order = "PARTITION BY user_id ORDER BY event_time, v"
    # A day in the same month as the previous day line shows only its day of the month ("17: ...")
    # when dates are ISO (YYYY-MM-DD): 3 tokens instead of 11, digits being a token each.
    iso = time_format == "readable" and _day_pattern(d) == "%Y-%m-%d"
    same_month = "left(d0, 8) = left(prev, 8)" if iso else "false"
    return f"""
        WITH ev AS (SELECT r.user_id, r.event_time, {day} AS d, {event} AS v FROM ({rendered}) AS r),
        marked AS (SELECT *, CASE WHEN v = lag(v) OVER ({order}) THEN 0 ELSE 1 END AS new_run FROM ev),
        numbered AS (SELECT *, sum(new_run) OVER ({order} ROWS UNBOUNDED PRECEDING) AS run FROM marked),
        runs AS (SELECT user_id, run, any_value(v) AS v, min(event_time) AS t0, arg_min(d, event_time) AS d0,
                        arg_max(d, event_time) AS d1, count(*) AS n
                 FROM numbered GROUP BY user_id, run),
        items AS (SELECT *, v || CASE WHEN n > 1 THEN {sql_str(RUN_MARK)} || n ELSE '' END AS item,
                         (row_number() OVER (PARTITION BY user_id, d0, d0 = d1 ORDER BY t0, run) - 1)
                         // {ITEMS_PER_LINE} AS chunk
                  FROM runs),
        day_lines AS (
            SELECT user_id, min(t0) AS t, d0, chunk, string_agg(item, {sql_str(EVENT_SEP)} ORDER BY t0, run) AS items,
                   sum(n) AS n
            FROM items WHERE d0 = d1 GROUP BY user_id, d0, chunk),
        lines AS (
            SELECT user_id, t, CASE WHEN chunk > 0 THEN '' WHEN {same_month} THEN right(d0, 2) || ': '
                                    ELSE d0 || ': ' END || items AS line, n
            FROM (SELECT *, lag(d0) OVER (PARTITION BY user_id ORDER BY t, chunk) AS prev FROM day_lines)
            UNION ALL
            SELECT user_id, t0 AS t, d0 || ' to ' || d1 || ': ' || item AS line, n FROM items WHERE d0 <> d1)
        SELECT user_id, CAST(sum(n) AS BIGINT) AS n_events_total,
               array_to_string(list(line ORDER BY t, line){keep}, chr(10)) AS body,
               list(CAST(n AS BIGINT) ORDER BY t, line){keep} AS line_events
        FROM lines GROUP BY user_id"""


def _compact_event(d: DatasetDefinition) -> str:
    """An event's values joined by `, `, or by `,` alone before a number (a space before digits is a token)."""
    fields = d.serialized_fields
    if not fields:
        return "''"
    parts = [_q(f"t_{fields[0].name}")]
    for f in fields[1:]:
        sep = "," if f.dtype.upper() in NUMERIC_DTYPES else VALUE_SEP
        parts.append(f"{sql_str(sep)} || {_q(f't_{f.name}')}")
    return " || ".join(parts)


def _q(name: str) -> str:
    return f'"{name}"' if not name.startswith('"') else name
