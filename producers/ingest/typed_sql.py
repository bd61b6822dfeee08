"""SQL expressions that turn raw text columns into typed warehouse columns.

Each typed value comes with a reject condition: the raw value is present, but the typed value
is NULL, so it did not parse. Pure functions from the definition to SQL text, so they can be
read and tested without a database.

Raw column names come from data files and may hold any text: they reach SQL only through
`qualify` (quoted identifiers). A mapping's `sql:` expression is pasted in as written: it was
checked to be one expression when the definition was parsed, and it is evaluated on a sandboxed
connection (`producers.ingest.sandbox`).
"""
from __future__ import annotations

from dataclasses import dataclass

from producers.datasets.definition import FieldSpec, TimeSpec
from producers.stores.warehouse import sql_ident, sql_str


INTEGER_TYPES = {"BIGINT", "INTEGER"}
OFFSET_AT_END = r"\d:\d\d(:\d\d(\.\d+)?)?\s*(Z|[+-]\d\d(:?\d\d)?)$"  # a clock time, then Z or +hh[:mm]


@dataclass(frozen=True)
class TypedColumn:
    name: str
    value: str  # SQL giving the typed value
    raw: str | None  # SQL giving the raw text the value came from (None: nothing to check)
    what: str  # how a failure is described: "INTEGER", "timestamp as unix seconds", ...

    def failed(self) -> str:
        """SQL that is true when the raw text is present but did not parse."""
        if self.raw is None:
            return "false"
        return f"(nullif(trim({self.raw}), '') IS NOT NULL AND ({self.value}) IS NULL)"

    def reason(self) -> str:
        """SQL giving the reject reason for this column, or NULL when it parsed."""
        before, after = sql_str(f'field {self.name}: cannot read "'), sql_str(f'" as {self.what}')
        return f"CASE WHEN {self.failed()} THEN {before} || {self.raw} || {after} END"


def qualify(table: str, column: str) -> str:
    """`"table"."column"`, both quoted: any text names exactly one column."""
    return f"{sql_ident(table)}.{sql_ident(column)}"


def expression(sql: str) -> str:
    """A mapping's `sql:` expression in parentheses, on lines of its own so a trailing comment ends there."""
    return f"(\n{sql}\n)"


@dataclass(frozen=True)
class RawColumns:
    """The raw columns of each declared table: resolves a mapping's column references.

    A reference is a column of the table at hand exactly as its file names it (`region.north`
    is one column when the file has it), or `table.column` for another declared table's column
    (`movies.movie_title`).
    """

    tables: dict[str, list[str]]

    def find(self, ref: str, table: str) -> tuple[str, str] | None:
        if ref in self.tables.get(table, ()):
            return table, ref
        for i, char in enumerate(ref):
            if char == "." and ref[i + 1:] in self.tables.get(ref[:i], ()):
                return ref[:i], ref[i + 1:]
        return None

    def sql(self, ref: str, table: str) -> str:
        found = self.find(ref, table)
        if found is None:  # the ingest checks every reference first, so this is a bug
            raise LookupError(f"column {ref!r} is in no declared table")
        return qualify(*found)


def user_column(raw_column: str, dtype: str, table: str, cols: RawColumns) -> TypedColumn:
    raw = cols.sql(raw_column, table)
    return TypedColumn("user_id", cast(f"trim({raw})", dtype), raw, dtype)


def time_column(spec: TimeSpec, table: str, cols: RawColumns) -> TypedColumn:
    raw = cols.sql(spec.column, table) if spec.column else expression(spec.sql)
    text = f"trim({raw})"
    fmt = spec.format
    if fmt == "auto":
        # A cast to TIMESTAMP drops a UTC offset ("14:22+03:00" stays 14:22), so exports whose rows
        # carry different offsets would be on different clocks: times with an offset go through
        # TIMESTAMPTZ and are stored in UTC, independent of the session's time zone.
        utc = f"timezone('UTC', TRY_CAST({text} AS TIMESTAMPTZ))"
        has_offset = f"regexp_matches({text}, {sql_str(OFFSET_AT_END)})"
        value = f"CASE WHEN {has_offset} THEN {utc} ELSE TRY_CAST({text} AS TIMESTAMP) END"
        what = "a timestamp"
    elif fmt in ("unix", "unix_ms"):
        scale = 1_000_000 if fmt == "unix" else 1_000
        value = f"TRY(make_timestamp(CAST(TRY_CAST({text} AS DOUBLE) * {scale} AS BIGINT)))"
        what = "unix seconds" if fmt == "unix" else "unix milliseconds"
    elif fmt == "day_index":
        value = f"TIMESTAMP {sql_str(spec.origin)} + to_days({cast(text, 'INTEGER')})"
        what = f"a day index (day 0 = {spec.origin})"
    elif fmt == "day_index_time":
        # "<days> HH:MM:SS"; seconds may read 60, so add seconds instead of casting to TIME.
        parts = f"regexp_extract({text}, '^(\\d+) (\\d{{1,2}}):(\\d{{1,2}}):(\\d{{1,2}})$', ['d', 'h', 'm', 's'])"
        h, m, sec = (f"TRY_CAST(nullif({parts}.{k}, '') AS INTEGER)" for k in "hms")
        secs = f"CASE WHEN {h} < 24 AND {m} < 60 AND {sec} <= 60 THEN {h} * 3600 + {m} * 60 + {sec} END"
        value = (f"TIMESTAMP {sql_str(spec.origin)} + to_days(TRY_CAST(nullif({parts}.d, '') AS INTEGER))"
                 f" + to_seconds({secs})")
        what = f"'<day index> HH:MM:SS' (day 0 = {spec.origin})"
    else:
        value, what = f"try_strptime({text}, {sql_str(fmt)})", f"a time in format {fmt}"
        if "%z" in fmt or "%Z" in fmt:  # strptime gives a TIMESTAMPTZ: store a plain TIMESTAMP in UTC
            value = f"timezone('UTC', {value})"
    return TypedColumn("event_time", value, raw, what)


def cast(text: str, dtype: str) -> str:
    """TRY_CAST, except that text with a fraction never becomes an integer (DuckDB would round 6.5 to 7)."""
    if dtype in INTEGER_TYPES:
        return f"CASE WHEN regexp_full_match({text}, '[+-]?\\d+') THEN TRY_CAST({text} AS {dtype}) END"
    return f"TRY_CAST({text} AS {dtype})"


def local_number(text: str, dtype: str, decimal: str, thousands: str) -> str:
    """`text` read with its own separators (`decimal` ',' for 12,50; `thousands` for 1.234,56), or NULL when
    it does not follow them: '1.234' under decimal ',' without thousands '.' is not guessed. The
    separators come from a fixed set (FieldSpec), and reach SQL as quoted literals."""
    digits = rf"\d{{1,3}}(?:[{thousands}]\d{{3}})+|\d+" if thousands else r"\d+"  # [x]: x taken literally
    fraction = "" if dtype in INTEGER_TYPES else rf"(?:[{decimal}]\d+)?"
    pattern = rf"[+-]?(?:{digits}){fraction}"
    plain = f"replace({text}, {sql_str(thousands)}, '')" if thousands else text
    if decimal != ".":
        plain = f"replace({plain}, {sql_str(decimal)}, '.')"
    return f"CASE WHEN regexp_full_match({text}, {sql_str(pattern)}) THEN TRY_CAST({plain} AS {dtype}) END"


def pad_code(text: str, width: int) -> str:
    """Left-pad a code with zeros (MCC 742 -> 0742) without cutting longer codes (lpad would)."""
    return f"lpad({text}, greatest({width}, length({text}))::INTEGER, '0')"


def field_column(spec: FieldSpec, table: str, cols: RawColumns, pad: int | None = None) -> TypedColumn:
    """A raw column is trimmed and cast; an `sql` expression is cast as it is (it may not be text).

    Only a field with a raw `column` is checked for parse failures: a computed value has no
    raw text of its own to blame (give both `column` and `sql` to check the input column).
    `pad` is the width of the field's code table, so values match its codes by equality.
    """
    dtype = spec.dtype.upper()
    raw = cols.sql(spec.column, table) if spec.column else None
    if spec.sql:
        value = expression(spec.sql) if dtype == "VARCHAR" else f"TRY_CAST({expression(spec.sql)} AS {dtype})"
    elif dtype == "VARCHAR":
        value = pad_code(f"nullif(trim({raw}), '')", pad) if pad else raw
    elif spec.decimal != "." or spec.thousands:
        value = local_number(f"trim({raw})", dtype, spec.decimal, spec.thousands)
        separators = f"decimal {spec.decimal!r}" + (f", thousands {spec.thousands!r}" if spec.thousands else "")
        return TypedColumn(spec.name, value, raw, f"{dtype} ({separators})")
    else:
        value = cast(f"trim({raw})", dtype)
    return TypedColumn(spec.name, value, raw, dtype)


def reasons(columns: list[TypedColumn]) -> str:
    """SQL joining every failed column's reason; NULL when the row parsed."""
    parts = [c.reason() for c in columns if c.raw is not None]
    if not parts:
        return "NULL"
    return f"nullif(concat_ws('; ', {', '.join(parts)}), '')"
