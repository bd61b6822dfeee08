"""The SQL that types raw text: each rule evaluated on literal inputs in DuckDB."""
from __future__ import annotations

from datetime import datetime

import duckdb
import pytest

from producers.datasets.definition import FieldSpec, TimeSpec
from producers.ingest.typed_sql import RawColumns, field_column, time_column

COLS = RawColumns({"t": ["x"]})


def evaluate(column, raw: str | None):
    con = duckdb.connect()
    con.execute('CREATE TABLE t AS SELECT ?::VARCHAR AS "x"', [raw])
    return con.execute(f'SELECT {column.value}, {column.failed()} FROM t AS "t"').fetchone()


@pytest.mark.parametrize("raw, value, failed", [
    ("42", 42, False), (" -7 ", -7, False), ("6.5", None, True), ("4.0", None, True), ("1e3", None, True),
    ("", None, False), (None, None, False),
])
def test_integers_never_round_fractions(raw, value, failed):
    col = field_column(FieldSpec(name="n", column="x", dtype="INTEGER"), "t", COLS)
    assert evaluate(col, raw) == (value, failed)


@pytest.mark.parametrize("raw, value", [
    ("3 10:23:26", datetime(2019, 1, 4, 10, 23, 26)),
    ("0 00:00:60", datetime(2019, 1, 1, 0, 1, 0)),  # the Sber data has :60 seconds
    ("3 25:00:00", None), ("3 10:61:00", None), ("3 10:00:61", None), ("3.5 10:00:00", None), ("x", None),
])
def test_day_index_time_checks_the_clock(raw, value):
    col = time_column(TimeSpec(column="x", format="day_index_time", origin="2019-01-01"), "t", COLS)
    got, failed = evaluate(col, raw)
    assert got == value and failed == (value is None)


def test_day_index_rejects_fractional_days():
    col = time_column(TimeSpec(column="x", format="day_index", origin="2019-01-01"), "t", COLS)
    assert evaluate(col, "6")[0] == datetime(2019, 1, 7)
    assert evaluate(col, "6.5") == (None, True)


@pytest.mark.parametrize("raw, value", [("742", "0742"), ("5411", "5411"), ("12345", "12345"), ("", None)])
def test_codes_are_padded_without_cutting(raw, value):
    col = field_column(FieldSpec(name="mcc", column="x", kind="categorical"), "t", COLS, pad=4)
    assert evaluate(col, raw)[0] == value


def test_unix_seconds_are_utc():
    col = time_column(TimeSpec(column="x", format="unix"), "t", COLS)
    assert evaluate(col, "881250949")[0] == datetime(1997, 12, 4, 15, 55, 49)
    assert evaluate(col, "1e30") == (None, True)


@pytest.mark.parametrize("fmt, raw, value", [
    ("auto", "2024-03-01T14:22:05+03:00", datetime(2024, 3, 1, 11, 22, 5)),
    ("auto", "2024-03-01 14:22:05-05:00", datetime(2024, 3, 1, 19, 22, 5)),
    ("auto", "2024-03-01T14:22:05.5+0100", datetime(2024, 3, 1, 13, 22, 5, 500000)),
    ("auto", "2024-03-01T14:22:05Z", datetime(2024, 3, 1, 14, 22, 5)),
    ("auto", "2024-01-01 01:02:10+01", datetime(2024, 1, 1, 0, 2, 10)),  # a Parquet TIMESTAMPTZ read as text
    ("auto", "2024-03-01 14:22:05", datetime(2024, 3, 1, 14, 22, 5)),  # no offset: kept as written
    ("auto", "2024-03-01", datetime(2024, 3, 1)),  # a date's "-01" is no offset
    ("%Y-%m-%dT%H:%M:%S%z", "2024-03-01T14:22:05+03:00", datetime(2024, 3, 1, 11, 22, 5)),
])
def test_times_with_a_utc_offset_are_stored_in_utc(fmt, raw, value):
    """A bank export's `+03:00` must not be dropped (auto) nor leave a TIMESTAMPTZ column (%z)
    whose wall time depends on the machine's time zone."""
    col = time_column(TimeSpec(column="x", format=fmt), "t", COLS)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'America/New_York'")
    con.execute('CREATE TABLE t AS SELECT ?::VARCHAR AS "x"', [raw])
    got, kind = con.execute(f'SELECT {col.value}, typeof({col.value}) FROM t AS "t"').fetchone()
    assert (got, kind) == (value, "TIMESTAMP")
